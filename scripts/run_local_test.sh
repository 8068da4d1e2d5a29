#!/usr/bin/env bash
# The seed's 1-GPU smoke test: ZeRO-2 on one device, 10 samples, seq 1024, batch 1 x accumulation 8, 1 epoch.
#   scripts/run_local_test.sh [--model_path P] [--experiment_name N] [--n_epochs E] [--wandb_online] [overrides...]
# Anything else is passed to launch.py as Hydra overrides (e.g. data.path=train.json launcher.cpu=true).
set -euo pipefail
cd "$(dirname "$0")/.."
args=(experiment=local_test deepspeed=zero2_local)
while (($#)); do
  case "$1" in
    --model_path) args+=("model.path=$2"); shift 2 ;;
    --experiment_name) args+=("experiment_name=$2"); shift 2 ;;
    --n_epochs) args+=("train.n_epochs=$2"); shift 2 ;;
    --wandb_online) args+=(logging=wandb_online); shift ;;
    *) args+=("$1"); shift ;;
  esac
done
exec python launch.py "${args[@]}"
