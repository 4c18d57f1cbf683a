#!/usr/bin/env bash
# The GPU figures of `props-ray bench` in one short run, on a machine with one CUDA device and this
# checkout (torch, transformers, peft, opacus and pydantic importable; no Ray or MLflow needed):
#
#   OUT=gpu-out bash cluster/gpu-check.sh
#
# 1. the device and the library versions;
# 2. the Pythia-1B-architecture DPO step in bf16 (`python -m props_ray.bench.gpu`): pairs/s, tokens/s,
#    MFU and DP-SGD / non-private, with the base weights in float32 (as jobs run today) and in bf16;
# 3. DP-SGD overhead on CUDA (`python -m props_ray.bench.dp_overhead`): the tiny model and the
#    Pythia-160M and -410M architectures, 8 pairs x 2 rows x 256 tokens, bf16 autocast;
# 4. the 1B step with bf16 weights at 16 pairs a step.
# Each step has its own time limit, so one that hangs does not take the rest with it. The log and
# one JSON per figure land in $OUT.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false
LOG="$OUT/gpu-check.log"

step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2 t0=$SECONDS
  shift 2
  echo "== $name" | tee -a "$LOG"
  timeout "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "   ($name: exit $rc, $((SECONDS - t0)) s)" | tee -a "$LOG"
}

step device 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
step versions 40 "$PY" -c "import torch, transformers, peft, opacus, pydantic; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, \
'peft', peft.__version__, 'opacus', opacus.__version__, 'pydantic', pydantic.__version__, torch.cuda.get_device_name())"
step gpu-1b 130 "$PY" -m props_ray.bench.gpu --json "$OUT/gpu-1b.json"
step gpu-1b-bf16-weights 120 "$PY" -m props_ray.bench.gpu --weights bfloat16 --json "$OUT/gpu-1b-bf16w.json"
step dp-overhead 140 "$PY" -m props_ray.bench.dp_overhead --dtype bfloat16 --steps 10
step gpu-1b-bf16-weights-16-pairs 110 "$PY" -m props_ray.bench.gpu --weights bfloat16 --batch 16 \
  --json "$OUT/gpu-1b-bf16w-b16.json"
echo "== the figures" && grep -E "^(gpu:|  |==|\(|device)" "$LOG" | grep -v "^   (" | tail -n 60
