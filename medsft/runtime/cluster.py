"""Where this process stands in a cluster: launched by accelerate/torchrun/srun or not, world size, rendezvous.

Under `srun` with one task per process (SLURM_STEP_NUM_TASKS == launcher.num_processes) SLURM's variables are
mapped to torch's (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). Under `srun` with one task per
machine each task re-invokes itself on its machine (medsft.runtime.relaunch): machine_rank from SLURM_NODEID,
the main machine from $MASTER_ADDR (or the job's first node), the port from the job id (all machines must agree
on it). See docs/distributed.md and scripts/slurm_multinode.sbatch.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from typing import Mapping, Optional

from omegaconf import DictConfig

from medsft.errors import ConfigError

LAUNCH_DIR_ENV = "MEDSFT_LAUNCH_DIR"  # set for a re-invoked child: expected config + per-rank exit codes

# Variables a launcher sets for the processes it starts.
_TORCH_LAUNCH_VARS = ("WORLD_SIZE", "LOCAL_RANK", "RANK", "TORCHELASTIC_RUN_ID")
# Set by `accelerate launch` for its processes, also for a single one (never by an in-process Accelerator).
_ACCELERATE_LAUNCH_VARS = ("ACCELERATE_DYNAMO_BACKEND", "ACCELERATE_MIXED_PRECISION", "ACCELERATE_CONFIG_DS_FIELDS")


def world_size(cfg: DictConfig) -> int:
    """launcher.num_processes is the TOTAL over all machines (accelerate's meaning)."""
    return int(cfg.launcher.num_processes)


def inside_launcher(environ: Mapping[str, str] = os.environ) -> bool:
    """True in a process started by accelerate launch / torchrun (or a SLURM srun task per process)."""
    if any(environ.get(name) not in (None, "") for name in _TORCH_LAUNCH_VARS + _ACCELERATE_LAUNCH_VARS):
        return True
    return environ.get(LAUNCH_DIR_ENV) not in (None, "")


def slurm_task_per_process(cfg: DictConfig, environ: Mapping[str, str] = os.environ) -> bool:
    """`srun` started one task per training process: run in place with SLURM's ranks.

    SLURM_STEP_NUM_TASKS is set by srun for its tasks only (a batch script sees the allocation's SLURM_NTASKS
    but is a single process).
    """
    ntasks = int(environ.get("SLURM_STEP_NUM_TASKS", "0") or 0)
    return ntasks > 1 and ntasks == world_size(cfg) and environ.get("SLURM_PROCID", "") != ""


def check_launcher(cfg: DictConfig) -> None:
    launcher = cfg.launcher
    if world_size(cfg) % int(launcher.num_machines):
        raise ConfigError(f"launcher.num_processes={launcher.num_processes} (the total over all machines) must "
                          f"divide by launcher.num_machines={launcher.num_machines}")
    if not 0 <= int(launcher.machine_rank) < int(launcher.num_machines):
        raise ConfigError(f"launcher.machine_rank={launcher.machine_rank} must be in [0, {launcher.num_machines})")
    if not 0 <= int(launcher.main_process_port) < 65536:
        raise ConfigError(f"launcher.main_process_port={launcher.main_process_port} must be a port "
                          "(0 = pick a free one)")


# ----------------------------------------------------------------------------------------------- ports, hosts


def pick_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now (the OS picks it); each job of a multirun asks for its own."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def slurm_job_port(environ: Mapping[str, str] = os.environ) -> Optional[int]:
    """Same port on every machine of a SLURM job, different between jobs: 20000 + job id mod 20000."""
    job = environ.get("SLURM_JOB_ID")
    return 20000 + int(job) % 20000 if job and job.isdigit() else None


def slurm_first_host(environ: Mapping[str, str] = os.environ) -> Optional[str]:
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not nodelist or not shutil.which("scontrol"):
        return None
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return out[0] if out else None


def this_machine_rank(cfg: DictConfig, environ: Mapping[str, str] = os.environ) -> int:
    """This machine's rank: SLURM_NODEID in a SLURM allocation of launcher.num_machines nodes, else
    launcher.machine_rank (0 on one machine)."""
    machines = int(cfg.launcher.num_machines)
    if machines == 1:
        return 0
    slurm_nodes = int(environ.get("SLURM_NNODES", "0") or 0)
    if slurm_nodes == machines and environ.get("SLURM_NODEID", "").isdigit():
        return int(environ["SLURM_NODEID"])
    return int(cfg.launcher.machine_rank)


def rendezvous(cfg: DictConfig, environ: Mapping[str, str] = os.environ) -> dict:
    """machine_rank / main_process_ip / main_process_port for this machine's `accelerate launch`."""
    launcher = cfg.launcher
    machines = int(launcher.num_machines)
    ip = launcher.main_process_ip
    port = int(launcher.main_process_port)
    if machines == 1:
        return {"machine_rank": 0, "main_process_ip": ip, "main_process_port": port or pick_free_port()}
    machine_rank = this_machine_rank(cfg, environ)
    ip = ip or environ.get("MASTER_ADDR") or slurm_first_host(environ)
    port = port or slurm_job_port(environ) or 0
    if not ip:
        raise ConfigError(f"launcher.num_machines={machines} needs launcher.main_process_ip (the address of machine "
                          "0), or $MASTER_ADDR, or a SLURM allocation")
    if not port:
        raise ConfigError(f"launcher.num_machines={machines} needs launcher.main_process_port: every machine must "
                          "use the same one (under SLURM it is derived from the job id)")
    return {"machine_rank": machine_rank, "main_process_ip": ip, "main_process_port": port}


def adopt_slurm_env(cfg: DictConfig, environ: dict = os.environ) -> None:
    """`srun` task per process: give torch/accelerate the variables torchrun would have set."""
    if not slurm_task_per_process(cfg, environ) or environ.get("WORLD_SIZE"):
        return
    environ["RANK"] = environ["SLURM_PROCID"]
    environ["LOCAL_RANK"] = environ.get("SLURM_LOCALID", "0")
    environ["WORLD_SIZE"] = environ["SLURM_STEP_NUM_TASKS"]
    environ["LOCAL_WORLD_SIZE"] = environ.get("SLURM_STEP_TASKS_PER_NODE", "").split("(")[0].split(",")[0] or str(
        world_size(cfg) // int(cfg.launcher.num_machines))
    environ.setdefault("MASTER_ADDR", cfg.launcher.main_process_ip or slurm_first_host(environ) or "127.0.0.1")
    environ.setdefault("MASTER_PORT", str(cfg.launcher.main_process_port or slurm_job_port(environ) or 29500))
