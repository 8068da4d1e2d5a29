"""accelerate's config file (with its FSDP2 section, or the DeepSpeed JSON beside it) for a composed medsft config,
for users who start `accelerate launch` themselves (`medsft launch-config`, medsft/cli/launch_config.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import yaml
from omegaconf import DictConfig

from medsft.runtime.deepspeed import deepspeed_json
from medsft.runtime.fsdp import accelerate_fsdp_config

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
    elif cfg.fsdp.enabled:
        data["distributed_type"] = "FSDP"
        data["fsdp_config"] = accelerate_fsdp_config(cfg)
        data["mixed_precision"] = mixed_precision
    else:
        data["distributed_type"] = "MULTI_GPU" if (world > 1 or launcher.num_machines > 1) else "NO"
        data["mixed_precision"] = mixed_precision
    return data


def launch_config_files(cfg: DictConfig, out_dir: Path) -> dict[str, Path]:
    """Write the accelerate config YAML (+ the DeepSpeed JSON when DeepSpeed is on) for `cfg` into out_dir."""
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
