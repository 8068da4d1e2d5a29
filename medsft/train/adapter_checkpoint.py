"""Checkpoints of adapter runs (`peft.enabled`): the adapter in peft's format, a training state without the
frozen base, and the final merge (`checkpoint.merge_adapter=true`). medsft.train.checkpoint calls in here.

Layout of an adapter checkpoint (`{root}/checkpoint-{epoch}-{step}/`):
    adapter_config.json, adapter_model.safetensors   the adapter (peft's format): `PeftModel.from_pretrained`,
                                                      and `AutoModelForCausalLM.from_pretrained` with peft installed
    README.md                                         peft's model card, naming the base model
    tokenizer files                                   with the chat template training rendered with
    training_state/                                   accelerate's save_state, holding only what trains: the
                                                      adapter's weights (no copy of the frozen base), optimizer,
                                                      scheduler, RNG; under DeepSpeed its shards, frozen
                                                      parameters excluded
    trainer_state.json, medsft_config.yaml, COMPLETE  as for every checkpoint
    merged/                                           (final checkpoint, checkpoint.merge_adapter=true) the plain
                                                      merged model (medsft.models.merge)

Under ZeRO-3 the adapter's parameters (and `modules_to_save`) are gathered from every process before saving,
so the file holds the real weights, never the empty partitions of a naive save (TRL #4416, peft #2892).
A resume reloads the frozen base from `model.path` (the same weights: resume refuses a changed model.path)
and the trained parameters from training_state/.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

from safetensors.torch import load_file

from medsft.models.adapters import is_peft_model, trainable_names
from medsft.models.merge import MERGED_DIR, merge_to_folder
from medsft.runtime.accelerator import deepspeed_engine

log = logging.getLogger("medsft.checkpoint")

STATE_MODEL_FILE = "model{suffix}.safetensors"  # accelerate's name for model i's weights in save_state


def is_adapter_run(accelerator, model) -> bool:
    return is_peft_model(accelerator.unwrap_model(model))


def _gathered(params: list, engine):
    """ZeRO-3: the full tensors of `params` on every process for the duration (a collective)."""
    if engine is not None and engine.zero_optimization_stage() == 3:
        import deepspeed  # the optional extra, present whenever a DeepSpeed engine exists

        engine.empty_partition_cache()  # parameters prefetched for a next forward are "in flight": settle them
        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return nullcontext()


def trained_state_dict(accelerator, model) -> dict:
    """Collective: the trained parameters (an adapter run's, gathered under ZeRO-3), on the CPU, every process."""
    unwrapped = accelerator.unwrap_model(model)
    named = [(name, param) for name, param in unwrapped.named_parameters() if param.requires_grad]
    with _gathered([param for _, param in named], deepspeed_engine(accelerator)):
        state_dict = {name: param.detach().to("cpu", copy=True) for name, param in named}
    empty = [name for name, tensor in state_dict.items() if tensor.numel() == 0]
    if empty:  # what a naive ZeRO-3 save writes; never let it pass as a checkpoint
        raise RuntimeError(f"adapter save: {len(empty)} empty tensors (e.g. {empty[0]}): parameters not gathered")
    return state_dict


def save_adapter(accelerator, model, folder: Path, state_dict: dict) -> None:
    """The trained parameters (`trained_state_dict`) in peft's format + model card, into folder (main process)."""
    accelerator.unwrap_model(model).save_pretrained(folder, state_dict=state_dict,
                                                    is_main_process=accelerator.is_main_process,
                                                    safe_serialization=True, save_embedding_layers=False)


def save_state_kwargs(accelerator, model) -> dict:
    """Extra arguments of accelerator.save_state: DeepSpeed leaves the frozen base out of its shards."""
    if deepspeed_engine(accelerator) is not None and is_adapter_run(accelerator, model):
        return {"exclude_frozen_parameters": True}
    return {}


def load_state_kwargs(accelerator, model) -> dict:
    """Extra arguments of accelerator.load_state matching save_state_kwargs (the frozen base is not in it)."""
    if deepspeed_engine(accelerator) is not None and is_adapter_run(accelerator, model):
        return {"load_module_strict": False}
    return {}


def register_state_hooks(accelerator, model) -> None:
    """Without DeepSpeed, accelerate's save_state writes a model's whole state dict and load_state expects it:
    for an adapter run, save only the trained parameters and load them back, checking that nothing else is
    missing. No-op for a full fine-tune."""
    if not is_adapter_run(accelerator, model):
        return

    def keep_trained(models, weights, output_dir):
        for index, (wrapped, state_dict) in enumerate(zip(models, weights)):
            trained = trainable_names(wrapped)
            weights[index] = {key: value for key, value in state_dict.items() if key in trained}

    def load_trained(models, input_dir):
        for index, wrapped in enumerate(models):
            path = Path(input_dir) / STATE_MODEL_FILE.format(suffix=f"_{index}" if index else "")
            state_dict = load_file(str(path), device=str(next(wrapped.parameters()).device))
            result = wrapped.load_state_dict(state_dict, strict=False)
            not_restored = sorted(set(result.missing_keys) & trainable_names(wrapped))
            if result.unexpected_keys or not_restored:
                raise RuntimeError(f"{path}: the adapter state does not match this model (unexpected "
                                   f"{result.unexpected_keys[:5]}, trained but missing {not_restored[:5]})")
        models.clear()  # loaded here; accelerate would expect the frozen base in the file too

    accelerator.register_save_state_pre_hook(keep_trained)
    accelerator.register_load_state_pre_hook(load_trained)


def pushes_merged_only(cfg) -> bool:
    """With checkpoint.merge_adapter=true the Hub gets the merged model at the end, not the adapter checkpoints
    (one repo holding both would load as the adapter)."""
    return bool(cfg.peft.enabled and cfg.checkpoint.merge_adapter)


def merge_final(ctx, checkpoint: Optional[Path]) -> Optional[Path]:
    """checkpoint.merge_adapter=true: `<final checkpoint>/merged`, a plain HF model (main process merges on CPU
    from the saved adapter, so any sharding is over); pushed to the Hub when push_to_hub. Every process waits."""
    cfg, accelerator = ctx.cfg, ctx.accelerator
    if not pushes_merged_only(cfg):
        return None
    out = None
    if checkpoint is None:
        log.warning("checkpoint.merge_adapter=true but no checkpoint was saved (checkpoint.save_final=false?): "
                    "nothing merged")
    elif accelerator.is_main_process:
        model_cfg = cfg.model.copy()
        model_cfg.path = str(checkpoint)
        out = merge_to_folder(model_cfg, Path(checkpoint) / MERGED_DIR)
        print(f"medsft: adapter merged into the base model: {out}", flush=True)
        if ctx.pusher is not None:
            ctx.pusher.submit(out, f"medsft {cfg.experiment_name} step {ctx.state.global_step} (merged)")
    accelerator.wait_for_everyone()
    return out
