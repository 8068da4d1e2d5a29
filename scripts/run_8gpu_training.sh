#!/usr/bin/env bash
# The seed's production run: Llama-3.1-8B-Instruct, 8 GPUs, DeepSpeed ZeRO-3, bf16, seq 8192, lr 5e-6,
# batch 2 x accumulation 8 x 8 GPUs = 128 per optimizer step, 3 epochs. launch.py starts the 8 processes itself
# (accelerate launch, free rendezvous port).
#   scripts/run_8gpu_training.sh data.path=train.json [--model_path P] [--experiment_name N] [--n_epochs E] \
#       [--wandb_online] [overrides...]
set -euo pipefail
cd "$(dirname "$0")/.."
args=(experiment=medical_o1_spanish_8gpu deepspeed=zero3_8gpu launcher.num_processes=8)
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
