#!/usr/bin/env bash
# One GPU acceptance run on a bare H100/H200 box (docs/gpu.md): installs from the wheelhouse, then
# runs the CUDA tests and the GPU benchmarks, writing bench/results/*_gpu.json. Under 8 minutes.
#
#   bash bench/build_wheelhouse.sh --backbone /models/all-MiniLM-L6-v2   # beforehand, on a CPU machine
#   bash bench/gpu_acceptance.sh            # on the GPU box, from the repository root
#   bash bench/gpu_acceptance.sh --dry-run  # list the steps and their commands, run nothing
#
# Each step has its own time limit; the run goes on after a failed step and exits non-zero at
# the end if any failed. bench/results/gpu_acceptance_gpu.json records every step's status and time.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false

GPU_TESTS=$(grep -l "pytest.mark.gpu" tests/*.py | tr '\n' ' ')
# name | time limit (s) | command; the limits add up to 480 s, the 8-minute budget
STEPS=(
  "install|60|$PY -m pip install -q --no-index --find-links .whl deepspeed webdataset hjson pydantic braceexpand pytest"
  "environment|20|nvidia-smi -L && $PY -c 'import torch, deepspeed, webdataset; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(), deepspeed.__version__); assert torch.cuda.is_available()'"
  "cuda-tests|90|$PY -m pytest -q -rs -m gpu -p no:cacheprovider $GPU_TESTS"
  "throughput|90|$PY bench/throughput.py --steps 10"
  "pretrain-200-steps|120|$PY bench/pretrain_gpu.py --steps 200"
  "finetune-and-ranking|60|$PY bench/finetune_gpu.py --steps 30"
  "ranking-1M-items|40|$PY bench/ranking.py --device cuda --measure-users 100000 --out bench/results/ranking_gpu.json"
)

if [ "$DRY" = 1 ]; then
  echo "gpu_acceptance.sh would run (limit in seconds, then command):"
  for s in "${STEPS[@]}"; do IFS='|' read -r name limit cmd <<<"$s"; printf '  %-22s %4ss  %s\n' "$name" "$limit" "$cmd"; done
  echo "writes: bench/results/throughput_gpu.json pretrain_gpu.json finetune_gpu.json ranking_gpu.json gpu_acceptance_gpu.json"
  exit 0
fi

mkdir -p bench/results
LOG=bench/results/gpu_acceptance_gpu.log
: >"$LOG"
RECORDS=()
FAILED=0
START=$(date +%s)
for s in "${STEPS[@]}"; do
  IFS='|' read -r name limit cmd <<<"$s"
  echo "== $name (limit ${limit}s): $cmd" | tee -a "$LOG"
  t0=$(date +%s)
  timeout --signal=TERM --kill-after=10 "$limit" bash -c "$cmd" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  dt=$(( $(date +%s) - t0 ))
  [ "$rc" = 0 ] || FAILED=1
  echo "== $name: rc=$rc in ${dt}s" | tee -a "$LOG"
  RECORDS+=("{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $dt}")
done
TOTAL=$(( $(date +%s) - START ))
{
  echo "{\"benchmark\": \"gpu_acceptance\", \"total_seconds\": $TOTAL, \"failed\": $FAILED,"
  echo " \"host\": \"$(hostname)\", \"date\": \"$(date -u +%FT%TZ)\", \"steps\": ["
  (IFS=','; echo "  ${RECORDS[*]}")
  echo "]}"
} >bench/results/gpu_acceptance_gpu.json
echo "total ${TOTAL}s; failed=$FAILED; see bench/results/gpu_acceptance_gpu.json and $LOG"
exit $FAILED
