#!/usr/bin/env bash
# Dreamer's GPU throughput table (lunarl issue 13): the CPU table of scripts/results/dreamer.md
# (session 8: car_track, 16 envs x 16 steps, 128 imagination starts, train_ratio 16) for tiny,
# 1m and 12m, then tiny and 1m with the car experiment's settings (car_track_dreamer: train ratio
# 256, 128 updates per iteration). One bench_dreamer.py process per row, each with its own time
# limit and JSON, so a row that runs out of time costs only itself. Meant for one call on a lent
# GPU machine, prepared here:
#   ../shared/tools/gpu-wheels.sh              # brax, mujoco, hydra... as wheels in .whl/
#   then on the device: bash scripts/device_dreamer.sh   (carry .whl; at most DEVICE_BUDGET_S, 540)
# Output: $OUT (or ./device_out): one JSON per row, devices.txt, and the log of each row.
# DEVICE_QUICK=1 runs the first tiny row only, with one repeat (a check of the script on a CPU).
set -uo pipefail

out=${OUT:-device_out}
mkdir -p "$out"
python=${PYTHON:-python3}

if compgen -G ".whl/*.whl" > /dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
fi
export WANDB_MODE=disabled

{
  "$python" -c 'import jax, platform; print(jax.__version__, jax.default_backend(), jax.devices(), platform.node())'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2> /dev/null || echo "no nvidia-smi"
} > "$out/devices.txt" 2>&1
cat "$out/devices.txt"

# size, setting (tr16: session 8's table; car: the car experiment's), the row's own time limit
# (s); in order of need, the table first. A device call may run 600 s, so the rows share
# DEVICE_BUDGET_S and a row starts only with 60 s left.
repeats=5
rows=("tiny tr16 150" "1m tr16 150" "12m tr16 300" "tiny car 150" "1m car 200")
if [[ "${DEVICE_QUICK:-0}" == 1 ]]; then
  repeats=1
  rows=("tiny tr16 600")
fi
deadline=$((SECONDS + ${DEVICE_BUDGET_S:-540}))

failed=0
for row in "${rows[@]}"; do
  read -r size setting limit <<< "$row"
  name="bench_dreamer_${size}_${setting}"
  if [[ "$setting" == car ]]; then
    setting_args=(--experiment car_track_dreamer)
  else
    setting_args=(--set imagine_starts=128 --set train_ratio=16)
  fi
  left=$((deadline - SECONDS))
  if ((left < 60)); then
    echo "== $name skipped: ${left}s of the budget left"
    failed=1
    continue
  fi
  ((limit > left)) && limit=$left
  echo "== $name (limit ${limit}s)"
  if ! timeout "$limit" "$python" scripts/bench_dreamer.py --sizes "$size" --repeats "$repeats" \
      "${setting_args[@]}" --out "$out/$name.json" > "$out/$name.log" 2>&1; then
    echo "$name failed or ran out of time; its log:"
    failed=1
  fi
  tail -n 3 "$out/$name.log"
done
exit "$failed"
