#!/usr/bin/env bash
# GPU check (issue 26, item 4): one prepared script, at most 8 minutes on one H100 or H200.
#
# Measures training throughput per method (erm, mfr, cdt, reptile, adapt-maml-fo, adapt-reptile; fp32, bf16
# autocast, channels_last, torch.compile for ERM), embedding throughput (the shipped model and SFace's
# architecture), and facemeta adapt at larger budgets on real faces; writes benchmarks/results/gpu/results.{json,md}
# (parts/<stage>.json as each measurement finishes; gpu_check.log). Each stage runs under its own time limit, so
# one that fails or hangs loses only itself; a rerun resumes from the parts. The project never needs a GPU.
#
# Usage:
#   benchmarks/gpu_check.sh               # the GPU run (writes benchmarks/results/gpu/)
#   benchmarks/gpu_check.sh --dry-run     # tiny sizes on any machine, e.g. this CPU (same as QUICK=1);
#                                         # writes benchmarks/results/gpu/dry-run/
# Before a GPU run, on the CPU machine: python benchmarks/gpu_check.py --stage prepare [--model SINGLE.safetensors]
# writes runs/gpu_carry/ (a single-model base checkpoint and aligned faces of mfr2-mask, thermal, yaleb-side; the
# data set does not travel); pass it to the device run's carry. Without it the adapt stage times random faces.
# On the device machine:  benchmarks/gpu_check.sh && tar czf "$OUT/gpu.tgz" -C benchmarks/results gpu
# Environment: PYTHON (default python3), GPU_CHECK_OUT (results folder), FRESH=1 (ignore earlier parts).
set -uo pipefail
cd "$(dirname "$0")/.."

QUICK=${QUICK:-0}
for a in "$@"; do
  case "$a" in
    --dry-run|--quick) QUICK=1 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $a (use --dry-run or --help)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [[ $QUICK == 1 ]]; then
  RESULTS=${GPU_CHECK_OUT:-benchmarks/results/gpu/dry-run}
  FLAGS=(--quick --out "$RESULTS")
  # stage: limit in seconds (a dry run on a loaded 2-core CPU is slow, but small)
  LIMITS=(env:120 train:420 embed:180 adapt:240 report:60)
else
  RESULTS=${GPU_CHECK_OUT:-benchmarks/results/gpu}
  FLAGS=(--out "$RESULTS")
  # sums to 470 s (7 min 50 s) at worst; each stage stops starting new measurements 25 s before its limit
  LIMITS=(env:45 train:200 embed:80 adapt:125 report:20)
fi
[[ ${FRESH:-0} == 1 ]] && FLAGS+=(--fresh)
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_check.log"
echo "== gpu_check $(date -u '+%Y-%m-%d %H:%M:%S UTC') quick=$QUICK" | tee -a "$LOG"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
  | tee -a "$LOG"

failed=0
for entry in "${LIMITS[@]}"; do
  stage=${entry%%:*}; limit=${entry##*:}
  budget=$(( limit > 60 ? limit - 25 : limit - 5 ))
  echo "== stage $stage (limit ${limit} s)" | tee -a "$LOG"
  start=$SECONDS
  timeout -k 10 "$limit" "$PY" benchmarks/gpu_check.py --stage "$stage" --budget "$budget" "${FLAGS[@]}" \
    >> "$LOG" 2>&1
  rc=$?
  echo "== stage $stage: rc $rc, $(( SECONDS - start )) s" | tee -a "$LOG"
  if [[ $rc != 0 ]]; then
    failed=$(( failed + 1 ))
    tail -5 "$LOG"
  fi
done
echo "== done: $failed stage(s) failed; $RESULTS/results.md" | tee -a "$LOG"
exit $(( failed > 0 ))
