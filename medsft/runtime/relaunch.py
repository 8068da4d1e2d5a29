"""`python launch.py launcher.num_processes=8 ...` starts the distributed job itself.

When the composed config asks for more than one process (launcher.num_processes > 1 or num_machines > 1), or
for DeepSpeed or FSDP (which need a process group even on one device), and this process is not already one of a
distributed job (medsft.runtime.cluster), the same config is re-invoked as a subprocess through `accelerate
launch` (torchrun underneath; plain torchrun for a single DeepSpeed process): the child gets this run's Hydra
overrides, so it composes the same config (checked: it refuses to start on any difference), writes into this
run's folder (hydra.run.dir), and uses a free rendezvous port of its own, so the jobs of a multirun never
collide. This process waits, forwards SIGINT/SIGTERM/SIGUSR1, and ends with the child's exit code (the worker's
own code, e.g. 2 for a config error, not torchrun's generic 1).

On CPU (no CUDA, or launcher.cpu=true) the child runs `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu
--num_processes N` (gloo): `accelerate launch --cpu` would silently start ONE process. DeepSpeed runs are
launched the same way without ACCELERATE_USE_CPU (which would drop DeepSpeed); their Accelerator picks gloo.
FSDP runs keep ACCELERATE_USE_CPU: their Accelerator turns FSDP on over gloo itself (medsft.runtime.fsdp).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Mapping, Optional

import psutil  # a dependency of accelerate
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from medsft.config import flatten, to_plain_dict
from medsft.errors import ConfigError, MedsftError
from medsft.models import resolve_model_dir
from medsft.outputs import objective_of
from medsft.runtime.accelerator import use_cpu
from medsft.runtime.cluster import (
    LAUNCH_DIR_ENV,
    adopt_slurm_env,
    check_launcher,
    inside_launcher,
    rendezvous,
    slurm_task_per_process,
    world_size,
)
from medsft.runtime.lock import held_fds

log = logging.getLogger("medsft.launcher")

CONFIG_FILE = "expected_config.json"

# Hydra's own overrides that still matter to the child's composition; run dirs, sweep/launcher plugins and
# the job's identity do not (the child is a plain single run into this run's folder).
_HYDRA_PASS_THROUGH = ("hydra.searchpath", "hydra.verbose", "hydra.job.chdir", "hydra/job_logging",
                       "hydra/hydra_logging", "hydra.job_logging", "hydra.hydra_logging")


class DistributedJobFailed(MedsftError):
    """The re-invoked distributed job ended non-zero; its exit code becomes ours."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def needs_relaunch(cfg: DictConfig, environ: Mapping[str, str] = os.environ) -> bool:
    # DeepSpeed and FSDP need a process group even for one process (zero2_local): torchrun's variables give it one.
    engine = bool(cfg.deepspeed.enabled or cfg.fsdp.enabled)
    wants = world_size(cfg) > 1 or int(cfg.launcher.num_machines) > 1 or engine
    return wants and not inside_launcher(environ) and not slurm_task_per_process(cfg, environ)


# ----------------------------------------------------------------------------------------------- the command


def _quote(value: str) -> str:
    """A value for a Hydra override: as is when plain, else single-quoted with escapes."""
    if re.fullmatch(r"[\w./:+\-@~%]+", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def accelerate_command(cfg: DictConfig, hydra_args: list[str], rdzv: dict, config_file: Path) -> list[str]:
    """`python -m accelerate.commands.launch ... -m medsft.cli train <hydra args>` for this machine.

    One process (DeepSpeed on one device) goes through torchrun instead: `accelerate launch --multi_gpu` wants
    two or more, and without it no process group (which DeepSpeed needs) is set up.
    """
    launcher = cfg.launcher
    machines = int(launcher.num_machines)
    if world_size(cfg) == 1 and machines == 1:
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "1",
                "--master_addr", "127.0.0.1", "--master_port", str(rdzv["main_process_port"]),
                "--module", "medsft.cli", "train", *hydra_args]
    argv = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(config_file),
        "--multi_gpu",
        "--num_processes", str(world_size(cfg)),
        "--num_machines", str(machines),
        "--machine_rank", str(rdzv["machine_rank"]),
        "--main_process_port", str(rdzv["main_process_port"]),
        # medsft's Accelerator sets precision and DeepSpeed from the config; the launcher only starts processes.
        "--mixed_precision", "no",
        "--dynamo_backend", "no",
    ]
    if rdzv.get("main_process_ip"):
        argv += ["--main_process_ip", str(rdzv["main_process_ip"])]
    if machines > 1:
        argv += ["--rdzv_backend", str(launcher.rdzv_backend), "--same_network"]
    if use_cpu(cfg):
        threads = max(1, (os.cpu_count() or 1) // max(1, world_size(cfg) // machines))
        argv += ["--num_cpu_threads_per_process", str(threads)]
    return argv + ["--module", "medsft.cli", "train", *hydra_args]


def child_env(cfg: DictConfig, launch_dir: Path, environ: Mapping[str, str] = os.environ) -> dict:
    env = dict(environ)
    env[LAUNCH_DIR_ENV] = str(launch_dir)
    if use_cpu(cfg) and not cfg.deepspeed.enabled:
        env["ACCELERATE_USE_CPU"] = "1"  # with --multi_gpu: N gloo processes (`--cpu` would start one)
    else:
        env.pop("ACCELERATE_USE_CPU", None)  # it would silently drop DeepSpeed
        if cfg.deepspeed.enabled and cfg.launcher.cpu:
            env["CUDA_VISIBLE_DEVICES"] = ""  # DeepSpeed on CPU although this machine has GPUs
            env["DS_ACCELERATOR"] = "cpu"
    if cfg.fsdp.enabled and cfg.launcher.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""  # FSDP2 builds its device mesh on the default accelerator: hide the GPUs
    return env


def _minimal_accelerate_config(path: Path) -> Path:
    """Our own accelerate config file, so a user's ~/.cache/huggingface/accelerate default cannot leak in."""
    path.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nuse_cpu: false\n"
                    "debug: false\ndowncast_bf16: 'no'\nenable_cpu_affinity: false\n", encoding="utf-8")
    return path


def hydra_child_args(cfg: DictConfig, run_dir: Path) -> tuple[list[str], Path]:
    """(the child's Hydra command line, its working directory) from this process's HydraConfig."""
    try:
        hydra_cfg = HydraConfig.get()
    except ValueError as err:
        raise ConfigError("a distributed run (launcher.num_processes > 1, DeepSpeed or FSDP) re-invokes itself through "
                          "its Hydra command line: start it with `python launch.py ...` / `medsft train ...`, or "
                          "start the processes yourself (accelerate launch / torchrun)") from err
    args: list[str] = []
    for source in hydra_cfg.runtime.config_sources:
        path = str(source.path)
        if source.schema != "file":
            continue
        if source.provider == "main":
            args.append(f"--config-path={path}")
        elif source.provider == "command-line":
            args.append(f"--config-dir={path}")
    args.append(f"--config-name={hydra_cfg.job.config_name}")
    args += list(hydra_cfg.overrides.task)
    args += [o for o in hydra_cfg.overrides.hydra if o.split("=", 1)[0].lstrip("+~") in _HYDRA_PASS_THROUGH]
    args += [
        f"hydra.run.dir={_quote(str(Path(run_dir).resolve()))}",
        "hydra.output_subdir=null",  # this run's .hydra/ is already written
        # One log file per rank in the run folder (both ranks appending to one file interleaves them).
        "hydra.job.name=train_rank${oc.env:RANK,0}",
        f"output_dir={_quote(str(cfg.output_dir))}",  # a multirun job moves it (sweep.checkpoints)
    ]
    return args, Path(hydra_cfg.runtime.cwd)


# ----------------------------------------------------------------------------------------------- relaunch


def _config_snapshot(cfg: DictConfig) -> dict:
    return json.loads(json.dumps(to_plain_dict(cfg), default=str))


def check_child_config(cfg: DictConfig, environ: Mapping[str, str] = os.environ) -> None:
    """In a re-invoked child: refuse to train on a config that differs from the parent's."""
    launch_dir = environ.get(LAUNCH_DIR_ENV)
    expected_file = Path(launch_dir) / CONFIG_FILE if launch_dir else None
    if expected_file is None or not expected_file.is_file():
        return
    expected = flatten(json.loads(expected_file.read_text(encoding="utf-8")))
    got = flatten(_config_snapshot(cfg))
    diffs = [f"{key}: parent {expected.get(key)!r} != child {got.get(key)!r}"
             for key in sorted(set(expected) | set(got)) if expected.get(key) != got.get(key)]
    if diffs:
        raise ConfigError("the distributed child composed a different config than the parent (overrides not passed "
                          "through?):\n  - " + "\n  - ".join(diffs[:20]))


def record_exit(code: int, environ: Mapping[str, str] = os.environ) -> None:
    """In a re-invoked child: leave this rank's exit code for the parent (torchrun reports only 1)."""
    launch_dir = environ.get(LAUNCH_DIR_ENV)
    if not launch_dir or not Path(launch_dir).is_dir():
        return
    rank = environ.get("RANK", "0")
    try:
        (Path(launch_dir) / f"rank{rank}.exit").write_text(str(int(code)), encoding="utf-8")
    except OSError:
        pass


def _worker_exit_code(launch_dir: Path, launcher_code: int) -> int:
    codes = []
    for path in sorted(launch_dir.glob("rank*.exit"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0)):
        try:
            codes.append(int(path.read_text(encoding="utf-8").strip()))
        except (OSError, ValueError):
            continue
    nonzero = [c for c in codes if c]
    return nonzero[0] if nonzero else launcher_code


def _set_parent_death_signal() -> None:  # pragma: no cover - runs in the forked child
    """Linux: the launcher dies with its parent (no orphaned training processes)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: the signal forwarding below still applies
        pass


def _training_processes(pid: int) -> list:
    """The launcher's children: torchrun's workers (its agent runs inside the launcher process)."""
    try:
        return psutil.Process(pid).children(recursive=False)
    except psutil.Error:  # the process is gone: signal the launcher instead
        return []


def run_child(argv: list[str], env: dict, cwd: Path) -> int:
    """Run the launcher in its own session and wait; returns its exit code.

    SIGINT goes to the launcher (torchrun stops its workers). SIGTERM and SIGUSR1 (a scheduler's "time is
    nearly up") become SIGTERM to the training processes themselves: they save a checkpoint at the next step
    boundary and exit (medsft/train/signals.py); torchrun, signalled itself, would SIGKILL them 30 s later.
    """
    # The experiment lock's file is inherited: the lock lives until the launcher too has exited (runtime/lock.py).
    proc = subprocess.Popen(argv, env=env, cwd=str(cwd), start_new_session=True, pass_fds=held_fds(),
                            preexec_fn=_set_parent_death_signal if sys.platform.startswith("linux") else None)
    forwarded = [s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGUSR1", None)) if s is not None]
    previous = {}

    def forward(signum, _frame):
        if proc.poll() is not None:
            return
        workers = [] if signum == signal.SIGINT else _training_processes(proc.pid)
        if not workers:
            proc.send_signal(signum if signum != getattr(signal, "SIGUSR1", None) else signal.SIGTERM)
        for worker in workers:
            try:
                worker.send_signal(signal.SIGTERM)
            except Exception:  # noqa: BLE001 - already gone
                pass

    try:
        for sig in forwarded:
            try:
                previous[sig] = signal.signal(sig, forward)
            except ValueError:  # not the main thread
                pass
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def prepare_model_source(cfg: DictConfig) -> None:
    """Build a locally made model (embedded SmolLM2, tiny-random) into the cache here, once, before the workers
    start: otherwise whichever worker takes the cache lock first builds it, and transformers writes a model's
    weights only on rank 0 of a process group, so a build by another rank would leave a cache entry without
    weights. Hub ids and local folders are left as they are (nothing is downloaded here)."""
    resolve_model_dir(cfg.model.path, cfg.model.cache_dir, cfg.model.tiny)


def relaunch(cfg: DictConfig, run_dir: Path) -> Optional[float]:
    """Run this config as an `accelerate launch` job; returns its objective, raises DistributedJobFailed."""
    check_launcher(cfg)
    prepare_model_source(cfg)
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    hydra_args, cwd = hydra_child_args(cfg, run_dir)
    rdzv = rendezvous(cfg)
    launch_dir = Path(tempfile.mkdtemp(prefix="medsft-launch-"))
    try:
        (launch_dir / CONFIG_FILE).write_text(json.dumps(_config_snapshot(cfg)), encoding="utf-8")
        argv = accelerate_command(cfg, hydra_args, rdzv, _minimal_accelerate_config(launch_dir / "accelerate.yaml"))
        log.info("starting %d process(es)%s (port %s): %s", world_size(cfg),
                 f" on {cfg.launcher.num_machines} machines, this one rank {rdzv['machine_rank']}"
                 if int(cfg.launcher.num_machines) > 1 else "", rdzv["main_process_port"],
                 " ".join(argv[1:]))
        code = run_child(argv, child_env(cfg, launch_dir), cwd)
        if code != 0:
            code = _worker_exit_code(launch_dir, code)
            raise DistributedJobFailed(f"the distributed job ({world_size(cfg)} process(es)) exited with code {code}; "
                                       "its messages are above", exit_code=code)
    finally:
        shutil.rmtree(launch_dir, ignore_errors=True)
    return objective_of(run_dir)


def maybe_relaunch(cfg: DictConfig, run_dir: Path) -> tuple[bool, Optional[float]]:
    """(True, objective) when the run went to a re-invoked distributed job; (False, None) to run it here."""
    if needs_relaunch(cfg):
        return True, relaunch(cfg, run_dir)
    check_child_config(cfg)
    adopt_slurm_env(cfg)
    wanted, actual = world_size(cfg), int(os.environ.get("WORLD_SIZE", "1") or 1)
    if wanted != actual and inside_launcher():
        log.warning("launcher.num_processes=%d but this job has %d processes: the global batch is computed from "
                    "the real number (%d x bsz x accumulation)", wanted, actual, actual)
    return False, None
