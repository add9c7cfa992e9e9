#!/usr/bin/env bash
# One GPU acceptance run on a bare H100/H200 box (docs/gpu.md): installs from the wheelhouse, then
# runs the CUDA tests, whole runs and the GPU benchmarks. At most 420 s in all, installs included.
#
#   bash bench/build_wheelhouse.sh --backbone /models/all-MiniLM-L6-v2   # beforehand, on a CPU machine
#   bash bench/gpu_acceptance.sh [--out DIR]   # on the GPU box, from anywhere in the repository
#   bash bench/gpu_acceptance.sh --dry-run     # list the steps, their time limits and commands
#   bash bench/gpu_acceptance.sh --steps FILE  # run FILE's steps instead (`name|limit|command` lines)
#
# Every step runs on its own time limit (SIGTERM, then SIGKILL 2 s later). As each step ends, its
# output is in DIR/<step>_gpu.log, its status in DIR/<step>_step_gpu.json and the summary
# DIR/gpu_acceptance_gpu.json is rewritten; the benchmarks write DIR/*_gpu.json after every
# configuration they measure. A failed or timed-out step is recorded and the run goes on: the
# script exits 0 once it has run to the end (2 only for bad arguments). DIR defaults to
# bench/results; step commands see it as $RESULTS_DIR.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
OUT=$REPO/bench/results
DRY=0
STEPS_FILE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$(realpath -m "${2:?--out needs a folder}"); shift 2 ;;  # relative to the caller's folder
    --dry-run) DRY=1; shift ;;
    --steps) STEPS_FILE=$(realpath -m "${2:?--steps needs a file}"); shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "gpu_acceptance.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
cd "$REPO"
BUDGET=420   # seconds for the whole run: a second run fits in a 10-minute window
GRACE=2      # seconds between a step's SIGTERM and its SIGKILL
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
export RESULTS_DIR="$OUT"
R='"$RESULTS_DIR"'
PYTEST="$PY -m pytest -q -rs -p no:cacheprovider"
# Files with CUDA tests, bar the whole runs, which get steps (and time limits) of their own.
UNIT_TESTS=$(grep -l "from gpu_marks import cuda" tests/test_*.py | grep -v test_gpu_runs.py | tr '\n' ' ')
RUNS=tests/test_gpu_runs.py
# A skipped test must not pass a step: the fused-kernel and whole-run steps check their JUnit XML
# (pytest itself fails a step that selects no test). Only cuda-tests may skip (flash-attn's test).
none_skipped() { grep -q 'skipped="0"' "$1"; }
export -f none_skipped

# name | time limit (s) | command. The limits plus one GRACE per step stay within BUDGET.
STEPS=(
  "install|25|$PY -m pip install -q --no-index --find-links .whl deepspeed webdataset hjson pydantic braceexpand pytest"
  "environment|10|$PY bench/gpu_env.py --out $R/environment_gpu.json"
  "fused-kernel|20|REOLM_REQUIRE_FUSED=1 $PYTEST tests/test_model_backends.py -k fused_attention_kernel --junitxml $R/fused_kernel_gpu.xml && none_skipped $R/fused_kernel_gpu.xml"
  "cuda-tests|60|REOLM_REQUIRE_FUSED=1 $PYTEST -m gpu $UNIT_TESTS $RUNS::test_fp32_training_on_cuda_follows_the_cpu_loss_curve --junitxml $R/cuda_tests_gpu.xml"
  "finetune-e2e|50|$PYTEST $RUNS::test_finetune_launch_end_to_end_on_cuda --junitxml $R/finetune_e2e_gpu.xml && none_skipped $R/finetune_e2e_gpu.xml"
  "pretrain-resume|55|$PYTEST $RUNS::test_one_gpu_deepspeed_pretraining_stops_on_sigterm_and_resumes --junitxml $R/pretrain_resume_gpu.xml && none_skipped $R/pretrain_resume_gpu.xml"
  "throughput|45|$PY bench/throughput.py --configs L12-H384 --warmup 2 --steps 5 --out $R/throughput_gpu.json"
  "pretrain-bench|60|$PY bench/pretrain_gpu.py --steps 100 --out $R/pretrain_gpu.json"
  "finetune-bench|45|$PY bench/finetune_gpu.py --steps 15 --out $R/finetune_gpu.json"
  "ranking-1M-items|25|$PY bench/ranking.py --device cuda --measure-users 20000 --repeats 1 --out $R/ranking_gpu.json"
)
if [ -n "$STEPS_FILE" ]; then
  mapfile -t STEPS < <(grep -v '^\s*\(#\|$\)' "$STEPS_FILE")
fi

if [ "$DRY" = 1 ]; then
  echo "gpu_acceptance.sh would run, writing into $OUT (limit in seconds, then command):"
  total=0
  for s in "${STEPS[@]}"; do
    IFS='|' read -r name limit cmd <<<"$s"
    printf '  %-18s %4ss  %s\n' "$name" "$limit" "$cmd"
    total=$(( total + limit + GRACE ))
  done
  echo "limits + ${GRACE} s grace per step: ${total} s of a ${BUDGET} s budget"
  exit 0
fi

mkdir -p "$OUT" || { echo "gpu_acceptance.sh: cannot create $OUT" >&2; exit 2; }
RECORDS=()
START=$(date +%s)

# The summary, rewritten after every step; $1 = whether the run has reached its end.
write_summary() {
  local failed=0 r
  for r in "${RECORDS[@]}"; do [[ $r == *'"status": "passed"'* ]] || failed=$(( failed + 1 )); done
  {
    printf '{"benchmark": "gpu_acceptance", "complete": %s, "budget_s": %s, "total_seconds": %s, "failed": %s,\n' \
      "$1" "$BUDGET" "$(( $(date +%s) - START ))" "$failed"
    printf ' "host": "%s", "date": "%s", "environment": "environment_gpu.json", "steps": [\n' \
      "$(hostname)" "$(date -u +%FT%TZ)"
    (IFS=','; printf '  %s\n' "${RECORDS[*]}")
    printf ']}\n'
  } >"$OUT/gpu_acceptance_gpu.json.tmp" && mv "$OUT/gpu_acceptance_gpu.json.tmp" "$OUT/gpu_acceptance_gpu.json"
}

# Runs one step on its time limit (cut to what is left of the budget); records its status.
run_step() {
  local name=$1 limit=$2 cmd=$3 left rc t0 dt status log="$OUT/${1}_gpu.log"
  left=$(( BUDGET - ($(date +%s) - START) - GRACE ))
  [ "$limit" -le "$left" ] || limit=$left
  t0=$(date +%s)
  if [ "$limit" -lt 1 ]; then
    rc=-1; status="not-run"; echo "budget spent" >"$log"
  else
    echo "== $name (limit ${limit}s): $cmd"
    timeout --signal=TERM --kill-after="$GRACE" "$limit" bash -c "$cmd" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    case "$rc" in 0) status=passed ;; 124|137) status=timed-out ;; *) status=failed ;; esac
  fi
  dt=$(( $(date +%s) - t0 ))
  echo "== $name: $status (rc=$rc) in ${dt}s"
  local record="{\"step\": \"$name\", \"status\": \"$status\", \"rc\": $rc, \"seconds\": $dt, \"limit_s\": $limit, \"log\": \"${name}_gpu.log\"}"
  echo "$record" >"$OUT/${name}_step_gpu.json"
  RECORDS+=("$record")
  write_summary false
}

for s in "${STEPS[@]}"; do
  IFS='|' read -r name limit cmd <<<"$s"
  run_step "$name" "$limit" "$cmd"
done
write_summary true
echo "total $(( $(date +%s) - START ))s; steps and statuses in $OUT/gpu_acceptance_gpu.json"
exit 0
