"""FSDP2 (PyTorch's `fully_shard`, one DTensor per parameter) driven by accelerate: the plugin built from the
`fsdp` group (one source of truth, nothing read from FSDP_* variables), FSDP on CPU (gloo), the model's
preparation, and the FSDP section of the accelerate config file (`medsft launch-config`).

Where each plugin value comes from:

    fsdp_version                  2 (FSDP1's flat parameters are not offered)
    reshard_after_forward         fsdp.sharding: full_shard -> true (ZeRO-3-like), shard_grad_op -> false
    auto_wrap_policy              transformer_based_wrap: one FSDP unit per decoder layer, the classes in
                                  fsdp.wrap_layers or else the model's _no_split_modules (checked on the model)
    activation_checkpointing      fsdp.activation_checkpointing (checkpoint_wrapper around each such layer)
    cpu_offload                   fsdp.cpu_offload (CPUOffloadPolicy; GPU only)
    cpu_ram_efficient_loading     fsdp.cpu_ram_efficient_loading (rank 0's weights broadcast into the shards)
    mixed_precision_policy        train.mixed_precision, resolved: bf16/fp16 parameters for compute, the
                                  reduction in that dtype or fp32 (fsdp.reduce_dtype); fp32 master weights
    state_dict_type               SHARDED_STATE_DICT: accelerate's save_state writes torch.distributed.checkpoint
                                  shards of the model and the optimizer (exact resume, same world size); the
                                  checkpoint's Hugging Face files get the FULL gathered weights

What the training loop relies on (tests/test_fsdp.py checks the resulting figures against one process):

- Gradient scale: FSDP2 reduce-scatters every gradient averaged over the processes (as DDP's all-reduce) and
  accelerate divides each backward by the accumulation steps, so medsft.runtime.accelerator.loss_scale_for's
  world x accumulation applies unchanged.
- Every micro-batch reduce-scatters (`micro_batch_sync` never enters no_sync under FSDP): the accumulated
  gradients stay sharded. FSDP2's no_sync would hold a full, unsharded gradient on every process.
- Parameter groups: FSDP2 shards each parameter on its own (no flattening across parameters), and accelerate
  swaps every optimizer parameter for its sharded DTensor inside its own group, so the no-decay group (norms,
  biases: medsft.train.optim decides on the full shapes, before sharding) stays exactly that.
- The LM head: accelerate makes [final norm, lm_head] (with a tied embedding: and the embedding) one unit that
  stays gathered from the end of the forward into the backward, so the chunked loss (medsft.compute.kernels)
  reads `lm_head.weight` whole after the forward.

accelerate enables FSDP only on accelerator devices (CUDA and the like); on CPU it would fall back to DDP over
gloo. PyTorch's FSDP2 itself runs on CPU with gloo, so on CPU `adopt_fsdp_on_cpu` switches the process state to
FSDP the way accelerate does on a GPU (tests and CPU clusters; CPU offload has no meaning there and is refused).
"""

from __future__ import annotations

import logging
import os

import torch
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from omegaconf import DictConfig
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy

from medsft.errors import ConfigError

log = logging.getLogger("medsft.distributed")

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_ACCELERATE_FSDP_ENV = "ACCELERATE_USE_FSDP"


def reshard_after_forward(fsdp: DictConfig) -> bool:
    return fsdp.sharding == "full_shard"


def mixed_precision_policy(fsdp: DictConfig, mixed_precision: str):
    """FSDP2's MixedPrecisionPolicy for the resolved `mixed_precision` (no | bf16 | fp16); None under fp32."""
    if mixed_precision == "no":
        return None
    if mixed_precision not in _DTYPES:
        raise ConfigError(f"mixed precision {mixed_precision!r} cannot be expressed for FSDP2 "
                          "(use train.mixed_precision=no|bf16|fp16)")
    compute = _DTYPES[mixed_precision]
    reduce = torch.float32 if fsdp.reduce_dtype == "float32" else compute
    return MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=reduce, output_dtype=compute)


def build_fsdp_plugin(cfg: DictConfig, mixed_precision: str, cpu: bool) -> FullyShardedDataParallelPlugin:
    """The accelerate plugin for this process, every value from `cfg` (FSDP_* environment variables ignored)."""
    fsdp = cfg.fsdp
    if fsdp.cpu_offload and cpu:
        raise ConfigError(f"fsdp={fsdp.name}: fsdp.cpu_offload=true needs GPUs (here the run is on the CPU, where "
                          "the parameters already live in CPU memory); use fsdp=full_shard")
    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        reshard_after_forward=reshard_after_forward(fsdp),
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=list(fsdp.wrap_layers) if fsdp.wrap_layers else None,
        activation_checkpointing=bool(fsdp.activation_checkpointing),
        activation_checkpointing_offload=False,
        cpu_offload=bool(fsdp.cpu_offload),
        cpu_ram_efficient_loading=bool(fsdp.cpu_ram_efficient_loading),
        mixed_precision_policy=mixed_precision_policy(fsdp, mixed_precision),
        state_dict_type="SHARDED_STATE_DICT",
        min_num_params=0,
    )


def launched_with_fsdp_env() -> bool:
    """`accelerate launch` with an FSDP accelerate config (before this process built an Accelerator of its own)."""
    return os.environ.get(_ACCELERATE_FSDP_ENV, "false").lower() == "true"


def adopt_fsdp_on_cpu(accelerator, plugin: FullyShardedDataParallelPlugin) -> None:
    """On CPU, make the process state FSDP as accelerate does on a GPU (it leaves CPU runs as MULTI_CPU, i.e.
    DDP); a no-op where accelerate already chose FSDP. Both shared states are set: accelerate re-reads the
    distributed type from PartialState whenever it builds another AcceleratorState view."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return
    if not torch.distributed.is_initialized():
        raise ConfigError(f"FSDP needs a process group; this process is {accelerator.distributed_type} (start it with "
                          "`python launch.py ... fsdp=...`, which launches it through accelerate/torchrun)")
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def is_fsdp(accelerator) -> bool:
    return bool(getattr(accelerator, "is_fsdp2", False))


# ----------------------------------------------------------------------------------------------- the model


def _module_classes(model: torch.nn.Module) -> set[str]:
    return {type(module).__name__ for module in model.modules()}


def wrap_layer_classes(model: torch.nn.Module, fsdp: DictConfig) -> list[str]:
    """The class names that become one FSDP unit each, checked against the model (ConfigError names the key)."""
    names = list(fsdp.wrap_layers) if fsdp.wrap_layers else list(getattr(model, "_no_split_modules", None) or [])
    present = _module_classes(model)
    if not names:
        raise ConfigError(f"fsdp={fsdp.name}: {type(model).__name__} declares no decoder layer classes "
                          "(_no_split_modules): set fsdp.wrap_layers=[<its decoder layer class>]")
    missing = [name for name in names if name not in present]
    if missing:
        source = "fsdp.wrap_layers" if fsdp.wrap_layers else f"{type(model).__name__}._no_split_modules"
        layers = sorted(n for n in present if n.endswith(("Layer", "Block")))
        raise ConfigError(f"{source} names {missing}, which {type(model).__name__} does not contain; its layer "
                          f"classes: {layers or sorted(present)}")
    return names


def fsdp_units(model: torch.nn.Module) -> int:
    """How many modules of `model` FSDP2 manages (each decoder layer, the embeddings, norm + head, the root)."""
    return sum(1 for module in model.modules() if isinstance(module, FSDPModule))


def prepare_fsdp(accelerator, cfg: DictConfig, model, optimizer):
    """accelerate.prepare under FSDP2, after checking the wrap classes on the model; logs the units."""
    plugin = accelerator.state.fsdp_plugin
    plugin.transformer_cls_names_to_wrap = wrap_layer_classes(model, cfg.fsdp)
    model, optimizer = accelerator.prepare(model, optimizer)
    # transformers' own mark of an FSDP2 model: generate() then keeps every process stepping until all are done
    # (synced_gpus), since each forward is a collective (the generation check, checkpoint evals).
    model._is_fsdp_managed_module = True
    log.info("FSDP2 %s: %d sharded modules (%s each, embeddings, final norm + LM head, the rest), %s%s%s",
             cfg.fsdp.sharding, fsdp_units(model), "/".join(plugin.transformer_cls_names_to_wrap),
             f"mixed precision {plugin.mixed_precision_policy}" if plugin.mixed_precision_policy else "fp32",
             ", activation checkpointing" if plugin.activation_checkpointing else "",
             ", CPU offload" if cfg.fsdp.cpu_offload else "")
    return model, optimizer


def retie(state_dict: dict, model: torch.nn.Module) -> dict:
    """A gathered FSDP2 state dict holds a tied weight twice, as two copies (one per name): make the tied names
    share one tensor again, so save_pretrained writes it once, as for an unsharded model."""
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        if target in state_dict and source in state_dict:
            state_dict[target] = state_dict[source]
    return state_dict


# ----------------------------------------------------------------------------------------------- launch config


def accelerate_fsdp_config(cfg: DictConfig) -> dict:
    """The `fsdp_config` section of accelerate's config file (`accelerate launch` turns it into FSDP_* variables;
    medsft builds its plugin from its own config all the same, see docs/distributed.md)."""
    fsdp = cfg.fsdp
    section = {
        "fsdp_version": 2,
        "fsdp_reshard_after_forward": reshard_after_forward(fsdp),
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_offload_params": bool(fsdp.cpu_offload),
        "fsdp_state_dict_type": "SHARDED_STATE_DICT",
        "fsdp_activation_checkpointing": bool(fsdp.activation_checkpointing),
        "fsdp_cpu_ram_efficient_loading": bool(fsdp.cpu_ram_efficient_loading),
        # accelerate launch insists on it with cpu_ram_efficient_loading (FSDP2 itself ignores it).
        "fsdp_sync_module_states": bool(fsdp.cpu_ram_efficient_loading),
    }
    if fsdp.wrap_layers:
        section["fsdp_transformer_layer_cls_to_wrap"] = ",".join(fsdp.wrap_layers)
    return section

