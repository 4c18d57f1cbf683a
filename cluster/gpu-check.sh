#!/usr/bin/env bash
# The GPU checks of props-ray in one short run, on a machine with one CUDA device and this checkout:
#
#   OUT=gpu-out bash cluster/gpu-check.sh                    # every part: demo, paper, bench
#   PARTS="bench" OUT=gpu-out bash cluster/gpu-check.sh      # some of them
#
# The device and the library versions come first, whatever the parts. Parts, in the order they run
# (each step has its own time limit, so one that hangs does not take the rest with it; together they
# fit a 10-minute window, the ones never run on a GPU before first):
# - demo: `props-ray run jobs/demo.yaml` with train.use_gpu (one worker a GPU), on Ray, Ray Train,
#   Ray Data and MLflow (a sqlite store).
# - paper: jobs/pythia-1b-hh-rlhf.yaml at reduced size: the job's methods, LoRA, bf16 and DP-SGD
#   settings on 1,000 HH-RLHF pairs at one epsilon, with a random model of the Pythia-160M
#   architecture on a tokenizer built from the data (`props-ray init-model`) and a random judge
#   (nothing from a hub). PAPER_DATA is the HH-RLHF file (../shared/data's, or a copy beside it).
# - bench: the Pythia-1B-architecture DPO step in bf16 autocast
#   (`python -m props_ray.bench.gpu`): pairs/s, tokens/s, MFU and DP-SGD / non-private; DP-SGD
#   overhead on CUDA for the tiny model and the Pythia-160M architecture (`props_ray.bench.dp_overhead`).
#   Needs torch, transformers, peft, opacus and pydantic; no Ray or MLflow.
# demo and paper need Ray and MLflow too: on a machine without a package index, build the archive of
# what it lacks with cluster/offline-site.sh; SITE names it, and this script unpacks it when any of
# Ray, MLflow, Opacus or pydantic is missing.
# USE_GPU=false, PAPER_MODEL and the *_SET variables shrink the run for a dry run on a CPU. The log,
# one JSON per bench figure and each job's trial table land in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
PARTS=${PARTS:-demo paper bench}
SITE=${SITE:-.offline/site.tar.xz}
PAPER_DATA=${PAPER_DATA:-.offline/harmless-base-test.jsonl.gz}
USE_GPU=${USE_GPU:-true}
PAPER_MODEL=${PAPER_MODEL:---hidden-size 768 --num-layers 12 --num-heads 12}  # the Pythia-160M architecture
DEMO_SET=${DEMO_SET:-}
PAPER_SET=${PAPER_SET:-}
RUNS=${RUNS:-/tmp/props-ray-gpu-check}
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false
LOG="$OUT/gpu-check.log"

step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2 t0=$SECONDS
  shift 2
  echo "== $name" | tee -a "$LOG"
  timeout "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "   ($name: exit $rc, $((SECONDS - t0)) s)" | tee -a "$LOG"
  return $rc
}
has() { [[ " $PARTS " == *" $1 "* ]]; }

step device 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
if [ -f "$SITE" ] && ! "$PY" -c "import ray, mlflow, opacus, pydantic" 2>/dev/null; then
  step unpack-site 60 bash -c "mkdir -p /tmp/site && tar -xJf '$SITE' -C /tmp/site" && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
step versions 40 "$PY" -c "import torch, transformers, peft, opacus, pydantic; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, \
'peft', peft.__version__, 'opacus', opacus.__version__, 'pydantic', pydantic.__version__, \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"

job() {  # job NAME FILE --set ...: run it, then copy its trial table to $OUT
  local name=$1 file=$2 limit=$3
  shift 3
  rm -rf "${RUNS:?}/$name"
  step "$name" "$limit" "$PY" -m props_ray.cli run "$file" --set "name=$name" --set "output_dir=$RUNS" \
    --set "tracking.tracking_uri=sqlite:///$RUNS/mlflow.db" --set "train.use_gpu=$USE_GPU" \
    --set train.num_workers=1 "$@"
  cp "$RUNS/$name/summary/trials.md" "$OUT/$name-trials.md" 2>/dev/null
  tail -n 40 "$RUNS/$name/summary/trials.md" 2>/dev/null | tee -a "$LOG" >/dev/null
}

if has demo; then
  # shellcheck disable=SC2086
  job demo-gpu jobs/demo.yaml 180 $DEMO_SET
fi

if has paper; then
  P="$RUNS/paper-models"
  mkdir -p "$P"
  # shellcheck disable=SC2086
  step paper-models 60 bash -c "'$PY' -m props_ray.cli init-model '$PAPER_DATA' --format hh_rlhf --out '$P/base' \
      $PAPER_MODEL --max-positions 1024 && '$PY' -c \"import sys; \
from transformers import AutoModelForSequenceClassification as M, AutoTokenizer as T; \
m = M.from_pretrained(sys.argv[1], num_labels=1); m.config.pad_token_id = 0; m.save_pretrained(sys.argv[2]); \
T.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2])\" '$P/base' '$P/judge'" &&
  # shellcheck disable=SC2086
  job paper-gpu jobs/pythia-1b-hh-rlhf.yaml 150 --set "model.name=$P/base" --set "eval.judge=$P/judge" \
    --set "data.source=$PAPER_DATA" --set data.num_pairs=1000 --set data.eval_prompts=32 \
    --set "privacy.epsilons=[1]" --set eval.max_new_tokens=32 --set train.cpus_per_worker=2 $PAPER_SET
fi
if has bench; then
  step gpu-1b 110 "$PY" -m props_ray.bench.gpu --json "$OUT/gpu-1b.json"
  step dp-overhead 90 "$PY" -m props_ray.bench.dp_overhead --dtype bfloat16 --steps 10 \
    --model tiny --model pythia-160m-arch
fi

echo "== the figures" && grep -E "^(gpu:|  |==|\(|device|\|)" "$LOG" | grep -v "^   (" | tail -n 80
