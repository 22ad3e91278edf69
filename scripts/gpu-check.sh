#!/usr/bin/env bash
# One pass of GPU measurements on a single card, within a fixed time budget:
#   install   the Python 3.12 wheels in .whl/ (optuna, mlflow-skinny, albumentations and the
#             dependencies the machine lacks) into /tmp/site; check the imports
#   gpu       nvidia-smi, read-only
#   throughput  fp32 eager, bf16 eager and fast at 64, 256 and 512 px
#   concurrent  the fast step in 1, 2 and 4 processes on the card at 64 px
#   prepare   mapnet-tune prepare on DRIVE with the search's options
#   study     benchmarks/study.py: a 4-trial DRIVE search, full width, 2 short epochs
#   retrain   mapnet-tune retrain-best --top-k 1 on that study (1 short epoch)
#   precision benchmarks/study.py --precision-check: bf16 against fp32 validation IoU
# then a summary. Tables go to $OUT/benchmarks.md, each stage's log to $OUT/logs/.
#
# Usage (from the repository root):
#   bash scripts/gpu-check.sh             on a CUDA machine; needs .whl/ (scripts/gpu-wheels.sh
#                                         fills it) unless SKIP_INSTALL=1
#   bash scripts/gpu-check.sh --dry-run   the same plumbing on the CPU at smoke sizes (or
#                                         CPU_SMOKE=1), with the current Python environment
# Environment: OUT (default ./gpu-check-out), DRIVE_ROOT (default ../shared/data/drive),
# WORK (working directory of the study; default a temporary folder, removed at the end),
# BUDGET_S (total seconds; default 420, 300 with --dry-run), PYTHON (default python3),
# SKIP_INSTALL=1 (use the packages already importable).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
CPU_SMOKE=${CPU_SMOKE:-0}
[[ "${1:-}" == "--dry-run" ]] && CPU_SMOKE=1
OUT=$(mkdir -p "${OUT:-./gpu-check-out}" && cd "${OUT:-./gpu-check-out}" && pwd)
if [[ -z ${WORK:-} ]]; then
  WORK=$(mktemp -d /tmp/gpu-check-work.XXXXXX)
  trap 'rm -rf "$WORK"' EXIT
fi
DRIVE_ROOT=${DRIVE_ROOT:-$REPO/../shared/data/drive}
PYTHON=${PYTHON:-python3}
TABLES=$OUT/benchmarks.md
STUDY=drive-bench
mkdir -p "$OUT/logs" "$WORK"
export NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1
# The embedded stores in $WORK, whatever the environment points at.
unset MLFLOW_TRACKING_URI MAPNET_TUNE_STORAGE
STORES=(--storage sqlite:///optuna.db --tracking-uri sqlite:///mlflow.db)

if [[ $CPU_SMOKE == 1 ]]; then
  DEVICE=cpu
  SKIP_INSTALL=1
  BUDGET_S=${BUDGET_S:-300}
  THROUGHPUT=(--sizes 64 --steps 2 --warmup 1)
  CONCURRENT=(--sizes 64 --batch 1 --steps 2 --warmup 1 --concurrent 2)
  SEARCH=(--smoke --target 0.05 --retrain-epochs 1 --retrain-patches 4)
  PRECISION=(--smoke)
else
  DEVICE=cuda
  BUDGET_S=${BUDGET_S:-420}
  THROUGHPUT=(--sizes 64,256,512)
  CONCURRENT=(--sizes 64 --steps 30 --concurrent 2,4)
  # Four trials of 2 x 150 steps at full width; no trial starts after 150 s.
  SEARCH=(--trials 4 --epochs 2 --steps-per-epoch 150 --target 0.5 --timeout 150
          --retrain-epochs 1 --retrain-patches 40)
  PRECISION=(--epochs 2 --steps-per-epoch 100)
fi

START=$(date +%s)
SUMMARY=()

# run_stage NAME SECONDS COMMAND...: run COMMAND with its log in $OUT/logs/NAME.log, under
# the smaller of SECONDS and what is left of BUDGET_S; record the outcome for the summary.
# A failed stage does not stop the later ones.
run_stage() {
  local name=$1 limit=$2 rc=0
  shift 2
  local left=$((BUDGET_S - ($(date +%s) - START)))
  ((limit > left)) && limit=$left
  if ((limit < 15)); then
    SUMMARY+=("| $name | skipped: time budget spent | - |")
    echo "== $name: skipped, ${left}s of the budget left"
    return 0
  fi
  local command="$*"
  echo "== $name (limit ${limit}s): ${command//$'\n'/; }"
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$OUT/logs/$name.log" 2>&1 || rc=$?
  local took=$(($(date +%s) - t0))
  local status=ok
  if ((rc == 124 || rc == 137)); then
    status="timed out"
  elif ((rc != 0)); then
    status="failed ($rc)"
  fi
  SUMMARY+=("| $name | $status | $took |")
  echo "   $status in ${took}s; last lines of logs/$name.log:"
  tail -n 4 "$OUT/logs/$name.log" | sed 's/^/   | /'
  return 0
}

stage_ok() { [[ " ${SUMMARY[*]} " == *"| $1 | ok |"* ]]; }

# Everything the later stages import, so that a missing package costs seconds, not a stage.
IMPORTS='import torch, optuna, mlflow, albumentations, mapnet_tune.retrain, mapnet_tune.search
print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.is_available())
print("optuna", optuna.__version__, "mlflow", mlflow.__version__)'

if [[ ${SKIP_INSTALL:-0} != 1 ]]; then
  run_stage install 120 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=$REPO:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
fi
run_stage imports 60 "$PYTHON" -c "$IMPORTS"
if ! stage_ok imports; then
  echo "the Python packages do not import (see $OUT/logs/imports.log); stopping"
  cat "$OUT/logs/imports.log"
  exit 1
fi
if command -v nvidia-smi >/dev/null; then
  run_stage gpu 30 nvidia-smi --format=csv \
    --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit
  nvidia-smi >>"$OUT/logs/gpu.log" 2>&1 || true
fi

run_stage throughput 90 "$PYTHON" benchmarks/throughput.py --device $DEVICE "${THROUGHPUT[@]}" \
  --append "$TABLES"
run_stage concurrent 90 "$PYTHON" benchmarks/throughput.py --device $DEVICE "${CONCURRENT[@]}" \
  --append "$TABLES"

if [[ -d $DRIVE_ROOT/training ]]; then
  DRIVE_ROOT=$(cd "$DRIVE_ROOT" && pwd)
  # The search's dataset options, so that the study finds this cache entry.
  run_stage prepare 60 env -C "$WORK" "$PYTHON" -m mapnet_tune.cli prepare --dataset drive \
    --source "$DRIVE_ROOT" --option input_mode=rgb --option patch_size=64 \
    --option patches_per_image=9500 --option patch_protocol=orobix
  run_stage study 210 "$PYTHON" benchmarks/study.py --workdir "$WORK" --study $STUDY \
    --source "$DRIVE_ROOT" --device $DEVICE "${SEARCH[@]}" --append "$TABLES"
  if stage_ok study; then
    run_stage retrain 100 env -C "$WORK" "$PYTHON" -m mapnet_tune.cli retrain-best \
      --study $STUDY --top-k 1 "${STORES[@]}" --source "$DRIVE_ROOT" --device $DEVICE
  fi
  run_stage precision 90 "$PYTHON" benchmarks/study.py --precision-check --workdir "$WORK" \
    --source "$DRIVE_ROOT" --device $DEVICE "${PRECISION[@]}" --append "$TABLES"
else
  SUMMARY+=("| prepare, study, retrain, precision | skipped: no DRIVE at $DRIVE_ROOT | - |")
  echo "== no DRIVE training set at $DRIVE_ROOT (set DRIVE_ROOT): data stages skipped"
fi

{
  echo "## gpu-check summary, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "- mode: $([[ $CPU_SMOKE == 1 ]] && echo 'CPU smoke (--dry-run)' || echo CUDA)"
  echo "- total: $(($(date +%s) - START)) s of a ${BUDGET_S} s budget"
  echo "- logs: logs/<stage>.log; tables: benchmarks.md"
  echo
  echo "| stage | status | seconds |"
  echo "|---|---|---:|"
  printf '%s\n' "${SUMMARY[@]}"
} >"$OUT/summary.md"
echo
cat "$OUT/summary.md"
echo
[[ -f $TABLES ]] && cat "$TABLES"
# Non-zero when any stage did not finish cleanly, so that the caller sees it at once.
for line in "${SUMMARY[@]}"; do [[ $line == *"| ok |"* ]] || exit 1; done
