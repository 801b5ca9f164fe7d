#!/usr/bin/env bash
# One command to check a GPU machine: `isoconv doctor`, `isoconv bench` (device vs torchvision loader, each
# precision, cm-vanilla and cm-xl), then the reference 25-epoch ConvMixer-256/8 recipe with time to 92.5% test
# top-1, stopped cleanly (checkpointed, resumable) when the total budget (default 540 s) would be passed.
# Writes OUT/doctor.json, bench.json, tta.json, the training run in OUT/tta-run, and OUT/summary.{json,md}.
#
#   scripts/gpu-check.sh [--device cuda] [--data-dir D] [--out gpu-check] [--budget 540] [--quick]
#
# --quick: tiny models, tiny subsets, 1 epoch (runs on a CPU in well under a minute: `--quick --device cpu`);
# the doctor skips its compile checks there (`--skip compile`: inductor takes about a minute on a CPU). Without a
# visible CUDA GPU, --quick with no --device runs on the CPU and says so first; a CUDA check stops at once.
# Exit code: 0 when every step succeeded, 2 when no check could start (bad arguments, no GPU), else 1.
set -u
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$here/src${PYTHONPATH:+:$PYTHONPATH}"
py="${ISOCONV_PYTHON:-python3}"
device=cuda data_dir="" out=gpu-check budget=540 quick=0 device_given=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device="$2"; device_given=1; shift 2 ;;
    --data-dir) data_dir="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --budget) budget="$2"; shift 2
      case "$budget" in ''|*[!0-9]*) echo "gpu-check.sh: error: --budget takes whole seconds, got $budget" >&2; exit 2 ;; esac ;;
    --quick) quick=1; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "gpu-check.sh: error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$device" in
  cuda*)  # one line, before any step, when the GPU asked for is not there (each step would fail the same way)
    has_gpu="import sys, torch; d = torch.device(sys.argv[1])
sys.exit(0 if torch.cuda.is_available() and (d.index or 0) < torch.cuda.device_count() else 1)"
    if ! "$py" -c "$has_gpu" "$device" 2>/dev/null; then
      if [ "$quick" = 1 ] && [ "$device_given" = 0 ]; then
        echo "gpu-check.sh: no CUDA GPU visible; --quick runs on the CPU instead (--device cpu)"
        device=cpu
      else
        echo "gpu-check.sh: error: no CUDA GPU visible for --device $device (torch.cuda.is_available() is false);" \
          "run it on a GPU machine, or pass --quick (without --device) or --device cpu to check this CPU" >&2
        exit 2
      fi
    fi ;;
esac
if [ -e "$out/tta-run" ]; then
  echo "gpu-check.sh: error: $out already holds a check (tta-run); pass another --out or remove it" >&2; exit 2
fi
mkdir -p "$out" || exit 2
data=()
[ -n "$data_dir" ] && data=(--data-dir "$data_dir")
ms() { echo $(( $(date +%s%N) / 1000000 )); }  # milliseconds now (no bc needed)
start=$(ms)
steps_json=""

step() {  # step NAME COMMAND...: run, time and record a step; a failure does not stop the check
  local name="$1"; shift
  local t0 t1 rc
  echo "== $name: $*"
  t0=$(ms)
  "$@" 2>&1 | tee "$out/$name.log"
  rc=${PIPESTATUS[0]}
  t1=$(ms)
  steps_json="$steps_json${steps_json:+, }\"$name\": {\"exit_code\": $rc, \"seconds\": $(( t1 - t0 )).0e-3}"
}

isoconv=("$py" -m isoconv)
doctor_skip=()
if [ "$quick" = 1 ]; then
  doctor_skip=(--skip compile)
  bench=(--models cm-cpu --dim 16 --depth 1 --amps off --batch-size 16 --epoch-images 32 --test-subset 16
         --steps 1 --windows 1 --warmup 1 --workers 0 --matmul-size 64)
  tta=(--recipe cpu-quick --model cm-cpu --dim 16 --depth 1 --epochs 1 --train-subset 128 --test-subset 64
       --batch-size 64 --workers 0)
else
  amps=off,bf16,fp16
  case "$device" in cpu*) amps=off,bf16 ;; esac
  bench=(--models cm-vanilla,cm-xl --amps "$amps" --batch-size 512 --test-subset 512 --workers 8)
  tta=(--recipe convmixer-cifar10-25ep --workers 8)
fi

step doctor "${isoconv[@]}" doctor --device "$device" --json "$out/doctor.json" "${doctor_skip[@]}"
step bench "${isoconv[@]}" bench --loaders device,torchvision "${bench[@]}" --device "$device" "${data[@]}" \
  --json "$out/bench.json"
# what is left of the budget, less a margin for loading the data and the last evaluation; at least 30 s
left=$(( budget - ($(ms) - start) / 1000 - 30 ))
[ "$left" -lt 30 ] && left=30
step tta "${isoconv[@]}" bench --time-to-accuracy 0.925 "${tta[@]}" --time-budget "$left" --device "$device" \
  "${data[@]}" --out "$out/tta-run" --json "$out/tta.json"

"$py" "$here/scripts/gpu_check_summary.py" "$out" "$device" "$quick" "{$steps_json}"
