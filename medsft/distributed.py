"""From config to processes: the Accelerator for this process, how the loss must be scaled for it, the
DeepSpeed-specific checks of the loop, a debug dump for tests, and `medsft launch-config`.

How a run becomes N processes is medsft/launcher.py (re-invocation through `accelerate launch`); this module is
what each of those processes does with its share.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig

from medsft.errors import ConfigError

log = logging.getLogger("medsft.distributed")

# Set to a folder: at the end of training every process writes rank<N>.json there (step counts, a hash of the
# full weights, the LR in the real optimizer) and rank 0 the logits of a fixed input (tests/test_distributed*.py).
DEBUG_DUMP_ENV = "MEDSFT_DEBUG_DUMP"
DEBUG_PROMPT = "## Thinking\n\nDolor torácico opresivo irradiado al brazo izquierdo"


def use_cpu(cfg: DictConfig) -> bool:
    return bool(cfg.launcher.cpu) or not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU") in ("1", "true")


def resolve_mixed_precision(cfg: DictConfig, cpu: bool) -> str:
    wanted = cfg.train.mixed_precision
    if wanted != "auto":
        return wanted
    if not cpu and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def _launched_with_deepspeed_env() -> bool:
    """`accelerate launch` with a DeepSpeed accelerate config (not a plugin this process made itself)."""
    return bool(os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"))


def build_accelerator(cfg: DictConfig):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    cpu = use_cpu(cfg)
    mixed_precision = resolve_mixed_precision(cfg, cpu)
    handlers = []
    if cpu and (int(os.environ.get("WORLD_SIZE", "1")) > 1 or cfg.deepspeed.enabled):
        # gloo on CPU; without it accelerate under DeepSpeed believes world=1 and its batch assert fails (and
        # DeepSpeed's CPU default, oneCCL, is not installed).
        handlers.append(InitProcessGroupKwargs(backend="gloo", timeout=timedelta(minutes=30)))
    deepspeed_plugin = None
    if cfg.deepspeed.enabled:
        from medsft.deepspeed_config import build_deepspeed_plugin

        deepspeed_plugin = build_deepspeed_plugin(cfg, mixed_precision)
    elif _launched_with_deepspeed_env():
        # accelerate would build DeepSpeed from its own config file, behind the medsft config's back.
        raise ConfigError("this process was started by `accelerate launch` with a DeepSpeed config, but the medsft "
                          "config has deepspeed=none: pass the matching preset (e.g. deepspeed=zero3); medsft "
                          "builds the DeepSpeed config itself (`medsft launch-config` writes the accelerate files "
                          "from it)")
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        cpu=cpu and deepspeed_plugin is None,
        deepspeed_plugin=deepspeed_plugin,
        kwargs_handlers=handlers,
        step_scheduler_with_optimizer=False,
    )
    if accelerator.num_processes > 1 and not accelerator.is_main_process:
        # Rank 0 tells the story; the others speak up only for warnings (every line twice helps nobody).
        logging.getLogger("medsft").setLevel(logging.WARNING)
    return accelerator


# ------------------------------------------------------------------------------------------ DeepSpeed in the loop


def deepspeed_engine(accelerator):
    """The DeepSpeed engine of this run, or None when DeepSpeed is off."""
    wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)
    return getattr(wrapped, "engine", None)


def loss_scale_for(accelerator) -> float:
    """Factor that turns 'sum of token losses / tokens of the whole step' into the right gradient.

    DDP averages gradients over processes and accelerate (non-DeepSpeed) divides each backward by the
    accumulation steps. DeepSpeed does the same two divisions itself: `engine.backward` divides the loss by its
    gradient_accumulation_steps, and the ZeRO reduction averages over the data-parallel group (sum, then
    divided by dp_world_size: postscale_gradients, the default). x world x accum undoes both, in both cases;
    tests/test_distributed.py checks first-step loss and grad norm of DeepSpeed against plain DDP / 1 process.
    """
    engine = deepspeed_engine(accelerator)
    if engine is not None:
        if not engine.postscale_gradients() or float(engine.gradient_predivide_factor()) != 1.0:
            log.warning("DeepSpeed prescale_gradients / gradient_predivide_factor changes gradient scaling; medsft "
                        "assumes the defaults (average over the data-parallel group)")
        return float(engine.dp_world_size * engine.gradient_accumulation_steps())
    return float(accelerator.num_processes * accelerator.gradient_accumulation_steps)


def nonfinite_backward_loss(loss: torch.Tensor) -> torch.Tensor:
    """The loss to back-propagate under DeepSpeed when the step must be skipped.

    DeepSpeed must see every backward of a step (its accumulation boundary runs the optimizer), so the loop
    cannot just stop calling backward as it does without DeepSpeed. NaN gradients make DeepSpeed's ZeRO step
    detect an overflow, skip the update on every process and clear the accumulated gradients (fp32 and ZeRO-3
    always; bf16 with bf16.check_grad_overflow, which the generated config sets).
    """
    return loss * float("nan")


def deepspeed_step_applied(model, finite: bool) -> bool:
    """Whether the step DeepSpeed just ran (inside the last backward) updated the weights.

    False when medsft flagged a non-finite loss, and also when the loss was finite but DeepSpeed found non-finite
    gradients and skipped the update (fp32/bf16 overflow, fp16 loss-scale overflow): the loop then counts a skipped
    step, as without DeepSpeed. Raises if DeepSpeed applied a step medsft flagged as non-finite.
    """
    was_applied = getattr(model, "was_step_applied", None)
    applied = bool(was_applied()) if callable(was_applied) else finite
    if applied and not finite:
        from medsft.train.loop import TrainingDiverged

        raise TrainingDiverged("DeepSpeed applied an optimizer step whose gradients were not finite (this DeepSpeed "
                               "version does not skip non-finite bf16 steps: it lacks bf16.check_grad_overflow); "
                               "upgrade DeepSpeed or train in fp32")
    return finite and applied


# ------------------------------------------------------------------------------------------ debug dump (tests)


def _zero3_gather(module, engine):
    if engine is not None and engine.zero_optimization_stage() == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
    return nullcontext()


def weights_digest(module) -> tuple[str, int]:
    """sha256 of the full parameters (names, shapes, fp32 bytes) and their element count."""
    digest = hashlib.sha256()
    count = 0
    for name, param in sorted(module.named_parameters(), key=lambda item: item[0]):
        data = param.detach().to("cpu", torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(data.shape)).encode())
        digest.update(data.numpy().tobytes())
        count += data.numel()
    return digest.hexdigest(), count


def _optimizer_steps(ctx, engine) -> Optional[int]:
    if engine is not None:
        return int(engine.global_steps - engine.skipped_steps)
    optimizer = getattr(ctx.optimizer, "optimizer", ctx.optimizer)
    for state in optimizer.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def write_debug_dump(ctx) -> None:
    """Collective (every process calls it): rank<N>.json per process, reference logits on rank 0.

    No-op unless $MEDSFT_DEBUG_DUMP names a folder. Called by the loop after the final checkpoint, so the
    logits are those of the saved weights.
    """
    out = os.environ.get(DEBUG_DUMP_ENV)
    if not out:
        return
    out = Path(out)
    accelerator, model = ctx.accelerator, ctx.model
    engine = deepspeed_engine(accelerator)
    module = accelerator.unwrap_model(model)
    with _zero3_gather(module, engine):
        digest, count = weights_digest(module)
    ids = ctx.tokenizer(DEBUG_PROMPT, return_tensors="pt").input_ids
    was_training = model.training
    model.eval()
    with torch.no_grad(), accelerator.autocast():
        logits = model(input_ids=ids.to(accelerator.device)).logits.float().cpu()
    if was_training:
        model.train()
    optimizer = engine.optimizer if engine is not None else getattr(ctx.optimizer, "optimizer", ctx.optimizer)
    record = {
        "rank": accelerator.process_index,
        "world": accelerator.num_processes,
        "global_step": ctx.state.global_step,
        "skipped_steps": ctx.state.skipped_steps,
        "optimizer_steps": _optimizer_steps(ctx, engine),
        "lr_in_optimizer": float(optimizer.param_groups[0]["lr"]),
        "weights_sha256": digest,
        "num_parameters": count,
        "loss_scale": ctx.loss_scale,
        "peak_gpu_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "deepspeed": None if engine is None else {
            "zero_stage": engine.zero_optimization_stage(),
            "gradient_accumulation_steps": engine.gradient_accumulation_steps(),
            "train_micro_batch_size_per_gpu": engine.train_micro_batch_size_per_gpu(),
            "train_batch_size": engine.train_batch_size(),
            "dp_world_size": engine.dp_world_size,
            "global_steps": engine.global_steps,
            "skipped_steps": engine.skipped_steps,
            "optimizer": type(engine.optimizer).__name__,
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{accelerator.process_index}.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    if accelerator.is_main_process:
        torch.save({"input_ids": ids, "logits": logits}, out / "reference_logits.pt")
    accelerator.wait_for_everyone()


# ------------------------------------------------------------------------------------------ medsft launch-config

ACCELERATE_CONFIG_FILE = "accelerate_config.yaml"
DEEPSPEED_CONFIG_FILE = "deepspeed_config.json"


def accelerate_config(cfg: DictConfig, mixed_precision: str, deepspeed_file: Optional[Path]) -> dict:
    """accelerate's config file (`accelerate launch --config_file`) for the composed `launcher` group."""
    launcher = cfg.launcher
    world = int(launcher.num_processes)
    data: dict = {
        "compute_environment": "LOCAL_MACHINE",
        "debug": False,
        "num_processes": world,
        "num_machines": int(launcher.num_machines),
        "machine_rank": int(launcher.machine_rank),
        "rdzv_backend": launcher.rdzv_backend,
        "same_network": True,
        "main_training_function": "main",
        "downcast_bf16": "no",
        "tpu_env": [],
        "tpu_use_cluster": False,
        "tpu_use_sudo": False,
        "use_cpu": bool(launcher.cpu) and not cfg.deepspeed.enabled,
        "dynamo_config": {},
        "enable_cpu_affinity": False,
    }
    if launcher.main_process_ip:
        data["main_process_ip"] = launcher.main_process_ip
    if launcher.main_process_port:
        data["main_process_port"] = int(launcher.main_process_port)
    if cfg.deepspeed.enabled:
        data["distributed_type"] = "DEEPSPEED"
        data["deepspeed_config"] = {
            "deepspeed_config_file": str(deepspeed_file),
            "zero3_init_flag": int(cfg.deepspeed.zero_stage) == 3,
            "deepspeed_multinode_launcher": "standard",
        }
    else:
        data["distributed_type"] = "MULTI_GPU" if (world > 1 or launcher.num_machines > 1) else "NO"
        data["mixed_precision"] = mixed_precision
    return data


def launch_config_files(cfg: DictConfig, out_dir: Path) -> dict[str, Path]:
    """Write the accelerate config YAML (+ the DeepSpeed JSON when DeepSpeed is on) for `cfg` into out_dir."""
    import yaml

    from medsft.deepspeed_config import deepspeed_json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # auto = bf16: the files are for GPU machines (this one may be a CPU login node); launcher.cpu=true -> fp32.
    wanted = cfg.train.mixed_precision
    mixed_precision = wanted if wanted != "auto" else ("no" if cfg.launcher.cpu else "bf16")
    written: dict[str, Path] = {}
    ds_path = None
    if cfg.deepspeed.enabled:
        ds_path = (out_dir / DEEPSPEED_CONFIG_FILE).resolve()
        ds = deepspeed_json(cfg, mixed_precision, world_size=int(cfg.launcher.num_processes))
        ds_path.write_text(json.dumps(ds, indent=2) + "\n", encoding="utf-8")
        written["deepspeed"] = ds_path
    acc_path = out_dir / ACCELERATE_CONFIG_FILE
    acc_path.write_text(yaml.safe_dump(accelerate_config(cfg, mixed_precision, ds_path), sort_keys=False),
                        encoding="utf-8")
    written["accelerate"] = acc_path
    return written


def cli_main(argv: list[str]) -> int:
    """`medsft launch-config [overrides] --out DIR`: the accelerate/DeepSpeed files of a composed config."""
    parser = argparse.ArgumentParser(
        prog="medsft launch-config",
        description="Write accelerate_config.yaml (and deepspeed_config.json) for the composed medsft config, "
                    "for `accelerate launch --config_file DIR/accelerate_config.yaml launch.py <same overrides>`.",
    )
    parser.add_argument("overrides", nargs="*",
                        help="Hydra overrides, e.g. deepspeed=zero3_8gpu launcher.num_processes=8")
    parser.add_argument("--out", default="launch_config", help="output folder (default ./launch_config)")
    args = parser.parse_args(argv)

    from hydra import compose, initialize_config_dir

    from medsft.config import register_configs, validate
    from medsft.run import CONF_DIR

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(args.overrides))
    validate(cfg)
    written = launch_config_files(cfg, Path(args.out))
    for kind, path in written.items():
        print(f"{kind:<11} {path}")
    print("\nrun with:\n  accelerate launch --config_file "
          f"{written['accelerate']} launch.py {' '.join(args.overrides)}")
    return 0
