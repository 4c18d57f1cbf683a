#!/usr/bin/env bash
# props-ray's pinned dependencies for a machine that has Python and PyTorch but no package index (an
# air-gapped GPU node, a locked-down image), as one archive to unpack there and put on PYTHONPATH:
#
#   HAVE=image-packages.txt PYVER=3.12 OUT=.offline bash cluster/offline-site.sh
#   # on the target, from the repository root:
#   mkdir -p /tmp/site && tar -xJf .offline/site.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD
#   python3 -m props_ray.cli run jobs/demo.yaml
#
# HAVE lists the distributions the target already has, one a line (the output of `pip list
# --format=freeze` or `pip list` there, or bare names): those are left out, whatever their version.
# Every other pin of constraints.txt is downloaded as a wheel for that Python on manylinux x86-64 and
# unpacked. What a batch job never loads is dropped to keep the archive small (44 MiB for Python
# 3.12 and a PyTorch image): Ray's Java jars and the dashboard's source maps, the MLflow UI's
# JavaScript (so `props-ray ui` needs a full install), and virtualenv and py-spy, which Ray uses only
# for runtime environments and its profiler. TRL is left out too (`props-ray bench` compares against
# it). Run from the repository root with a pip that reaches an index. LIST_ONLY=1 prints the pins it
# would bundle and stops.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${HAVE:?HAVE=FILE: the distributions the target already has, one a line}"
PYVER=${PYVER:-3.12}
OUT=${OUT:-.offline}
PIP=${PIP:-python3 -m pip}
DROP_DISTS="trl virtualenv py-spy"
DROP_PATHS="ray/jars ray/dashboard/client/build/static/js/*.map mlflow/server/js virtualenv* py_spy*"

norm() { tr 'A-Z_.' 'a-z--' | sed 's/[[:space:]]*$//'; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# the target's names: 'name==version', 'name version' (pip list) or 'name'; pip list's header lines drop out
sed -E 's/[ =<>@].*//' "$HAVE" | norm | grep -v -E '^(package|-+)?$' | sort -u >"$work/have"
grep -v -E '^\s*(#|$)' constraints.txt | sed -E 's/==.*//' | norm | sort -u >"$work/pinned"
wanted=$(comm -23 "$work/pinned" "$work/have" | grep -v -x -F -f <(tr ' ' '\n' <<<"$DROP_DISTS") || true)
[ -n "$wanted" ] || { echo "the target has every pinned distribution: nothing to bundle"; exit 0; }
for name in $wanted; do  # the pinned version of each, as constraints.txt spells it
  grep -i -E "^${name//-/[-_.]}==" constraints.txt
done >"$work/requirements.txt"
[ -z "${LIST_ONLY:-}" ] || { cat "$work/requirements.txt"; exit 0; }
echo "bundling $(wc -l <"$work/requirements.txt") distributions for Python $PYVER: $(tr '\n' ' ' <"$work/requirements.txt")"
platforms=""
for tag in manylinux2014_x86_64 manylinux1_x86_64 manylinux_2_5_x86_64; do platforms+=" --platform $tag"; done
for n in 17 24 27 28 31 34 35; do platforms+=" --platform manylinux_2_${n}_x86_64"; done
# shellcheck disable=SC2086
$PIP download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp $platforms \
  -d "$work/wheels" -r "$work/requirements.txt"
mkdir -p "$work/site"
for wheel in "$work"/wheels/*.whl; do unzip -q -o "$wheel" -d "$work/site"; done
(cd "$work/site" && for p in $DROP_PATHS; do rm -rf $p; done)
mkdir -p "$OUT"
tar -C "$work/site" -cf - . | xz -9 -T0 >"$OUT/site.tar.xz"
cp "$work/requirements.txt" "$OUT/site-requirements.txt"
echo "$OUT/site.tar.xz: $(du -h "$OUT/site.tar.xz" | cut -f1) ($(du -sh "$work/site" | cut -f1) unpacked)"
