#!/usr/bin/env bash
# Issue 13's training queue: every run of experiments/depth_regime and the seeded
# reference-size reproduction (experiments/threshold_sweep), then the decoding benchmark's
# deep-model seeds, the saturation-probe model and its static baselines, and last the
# depth regime's longer budget (16 epochs), one at a time, in order of value, at low CPU
# priority. Resumable: a finished run is skipped (its .done marker),
# an interrupted one continues from its last checkpoint (deepexit-train --resume, saved
# once per epoch). Start or continue it, in the background, from the repository root:
#   nohup bash experiments/queue.sh > runs/queue.log 2>&1 &
# Reports from whatever has finished (no training):
#   .venv/bin/python experiments/depth_regime/run.py --report_only
#   .venv/bin/python experiments/threshold_sweep/run.py --report_only
#   .venv/bin/python experiments/decoding/run.py --report_only
#   .venv/bin/python experiments/saturation_probe/run.py   (trains nothing once these are done)
#   .venv/bin/python experiments/depth_regime/run.py --report_only --epochs=16 --nokd
# The run.py drivers train the same runs into the same workdirs when called without
# --report_only; this script only orders them across the two experiments.
set -u
cd "$(dirname "$0")/.."
export DEEPEXIT_DATA_DIR="${DEEPEXIT_DATA_DIR:-../shared/data}"
NICE="${NICE:-15}"
C=experiments/configs

run() {  # run CONFIG_SPEC SEED WORKDIR [more deepexit-train flags]
  local spec=$1 seed=$2 wd=$3
  shift 3
  [[ -e $wd/.done ]] && return 0
  mkdir -p "$wd"
  echo "$(date -u +%FT%TZ) start $wd"
  local t0=$SECONDS
  if nice -n "$NICE" .venv/bin/deepexit-train --config="$spec" --config.train.seed="$seed" \
      --workdir="$wd" --resume "$@"; then
    echo $((SECONDS - t0)) >> "$wd/wall_seconds"
    touch "$wd/.done"
    echo "$(date -u +%FT%TZ) done $wd ($((SECONDS - t0)) s)"
  else
    echo $((SECONDS - t0)) >> "$wd/wall_seconds"
    echo "$(date -u +%FT%TZ) FAILED $wd"
  fi
}

depth_seed() {  # the depth regime's three trainings of one seed
  for m in early_exit static4 static8; do
    run "$C/depth.py:$m" "$1" "runs/depth_regime/${m}_s$1"
  done
}

depth_seed 0
for s in 0 1 2; do  # reference-size reproduction, 3 seeds (~1-2 min each)
  run "$C/reference.py" "$s" "runs/threshold_sweep/early_exit_s$s"
  run "$C/static.py:2" "$s" "runs/threshold_sweep/static2_s$s"
  run "$C/static.py:4" "$s" "runs/threshold_sweep/static4_s$s"
done
depth_seed 1
depth_seed 2
for s in 0 1 2; do  # the depth regime with the recipe study's best recipe
  run "$C/depth.py:early_exit_kd" "$s" "runs/depth_regime/early_exit_kd_s$s"
done
for s in 1 2; do  # experiments/decoding: the deep model's PPL seeds (seed 0 is the timed one)
  run "$C/deep.py" "$s" "runs/decoding/deep_s$s"
  run "$C/deep_static.py:2" "$s" "runs/decoding/deep_static2_s$s"
done
# experiments/saturation_probe: the probe-study model and its static baselines (seed 0)
run "$C/probe.py" 0 runs/saturation_probe/model
for d in 1 2 4; do
  run "$C/probe_static.py:$d" 0 "runs/saturation_probe/static$d"
done
for s in 0 1 2; do  # the depth regime at 16 epochs: does depth pay with a longer budget?
  for m in early_exit static4 static8; do
    run "$C/depth.py:$m" "$s" "runs/depth_regime_e16/${m}_s$s" --config.train.epochs=16
  done
done
echo "$(date -u +%FT%TZ) queue finished"
