"""medsft's additions to TRL's GRPOTrainer, and the callbacks that tie TRL's loop to medsft's outputs.

Built on TRL 1.16 (pinned: `trl==1.16.0`, the `rl` extra): MedsftGRPOTrainer adds the format-failure share,
tokens/s and sample generations (`samples/step_NNNNNN.jsonl`) to TRL's logs; MetricsFileCallback writes every
log to the run's metrics.jsonl (medsft.outputs); ConfigSnapshotCallback puts the resolved config into every
checkpoint and the wandb run.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Optional

import torch
import trl
from omegaconf import DictConfig, OmegaConf
from transformers import TrainerCallback

from medsft.config import to_plain_dict
from medsft.eval.format import check_format
from medsft.outputs import MetricsFile
from medsft.rl.rewards import completion_text
from medsft.tracking import redact

log = logging.getLogger("medsft.rl")

TRL_VERSION = "1.16.0"  # the version this module was written and tested against
CONFIG_FILE = "medsft_config.yaml"

if trl.__version__ != TRL_VERSION:
    log.warning("medsft.rl was built on trl==%s; trl %s is installed", TRL_VERSION, trl.__version__)


class MedsftGRPOTrainer(trl.GRPOTrainer):
    """TRL's GRPOTrainer plus medsft's logging: format-failure share, tokens/s, sample generations."""

    def __init__(self, *args, run_dir: Optional[Path] = None, samples_every_n_steps: int = 0,
                 samples_per_write: int = 4, **kwargs):  # fmt: skip
        super().__init__(*args, **kwargs)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.samples_every_n_steps = samples_every_n_steps
        self.samples_per_write = samples_per_write
        self._last_sample_step: Optional[int] = None
        self._tps_mark: Optional[tuple[float, float]] = None  # (tokens seen, time) at the last log
        self._last_scores_local: Optional[torch.Tensor] = None

    def _generate_and_score_completions(self, inputs):
        if self._tps_mark is None:  # tokens/s is measured from the first rollout on
            self._tps_mark = (float(self.state.num_input_tokens_seen), time.perf_counter())
        return super()._generate_and_score_completions(inputs)

    # Rewards: TRL computes them (our callables); we add the format-failure share and write samples.
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        mode = "train" if self.model.training else "eval"
        device = rewards_per_func.device
        rank, n = self.accelerator.process_index, len(prompts)
        local = rewards_per_func[rank * n : (rank + 1) * n]
        weights = self.reward_weights.to(device)
        scores = (local * weights.unsqueeze(0)).nansum(dim=1)
        scores[torch.isnan(local).all(dim=1)] = 0.0
        self._last_scores_local = scores
        checks = [check_format(completion_text(c)) for c in completions]
        failed = torch.tensor([0.0 if c.compliant else 1.0 for c in checks], device=device)
        self._metrics[mode]["format/failure_rate"].append(self.accelerator.gather(failed).mean().item())
        if mode == "train":
            self._maybe_write_samples(inputs, completions, checks, local)
        return rewards_per_func

    def _maybe_write_samples(self, inputs, completions, checks, local_rewards) -> None:
        every = self.samples_every_n_steps
        step = self.state.global_step
        if not every or self.run_dir is None or not self.accelerator.is_main_process:
            return
        if self._last_sample_step is not None and step - self._last_sample_step < every:
            return
        self._last_sample_step = step
        out = self.run_dir / "samples"
        out.mkdir(parents=True, exist_ok=True)
        with open(out / f"step_{step:06d}.jsonl", "w", encoding="utf-8") as f:
            for i in range(min(self.samples_per_write, len(completions))):
                row = inputs[i]
                f.write(json.dumps({
                    "step": step,
                    "record": row.get("record"),
                    "question": row.get("question"),
                    "reference": row.get("reference"),
                    "completion": completion_text(completions[i]),
                    "format_ok": checks[i].compliant,
                    "format_reason": checks[i].reason,
                    "rewards": {name: _finite(local_rewards[i, j].item())
                                for j, name in enumerate(self.reward_func_names)},
                }, ensure_ascii=False) + "\n")  # fmt: skip

    def log(self, logs: dict, start_time: Optional[float] = None) -> None:
        if self.model.training and self._tps_mark is not None and "loss" in logs:
            seen, now = float(self.state.num_input_tokens_seen), time.perf_counter()
            tokens = self._metrics["train"].get("num_tokens")
            seen = float(tokens[-1]) if tokens else seen
            if now > self._tps_mark[1]:
                logs["tokens_per_s"] = (seen - self._tps_mark[0]) / (now - self._tps_mark[1])
            self._tps_mark = (seen, now)
        super().log(logs, start_time)


def _finite(value: float) -> Optional[float]:
    return value if math.isfinite(value) else None


class MetricsFileCallback(TrainerCallback):
    """Every log (kind "train" or "eval") appended to `<run dir>/metrics.jsonl` (medsft.outputs.MetricsFile,
    as SFT) on the main process; `records` keeps them for the summary and the plot."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.file = None

    @property
    def records(self) -> list[dict]:
        return self.file.records if self.file is not None else []

    def _file(self, is_main: bool) -> MetricsFile:
        if self.file is None:
            self.file = MetricsFile(self.path, enabled=is_main)
        return self.file

    def write_summary(self, figures: dict, objective: Optional[float], is_main: bool) -> None:
        """The run's closing summary record (medsft.outputs), as SFT writes it, so sweeps read RL jobs alike."""
        self._file(is_main).write_summary(figures, objective)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        self._file(state.is_world_process_zero)
        kind = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        row: dict = {"kind": kind, "step": state.global_step, "epoch": state.epoch}
        for key, value in logs.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                row[key] = _finite(float(value))
        self.file.write(row)


class ConfigSnapshotCallback(TrainerCallback):
    """Writes the resolved config into every checkpoint (`medsft_config.yaml`), for resume checks and provenance."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg

    def on_train_begin(self, args, state, control, **kwargs):
        # transformers' WandbCallback (registered before ours) has started the run: add our config to it.
        if state.is_world_process_zero and "wandb" in (args.report_to or []):
            import wandb  # only when wandb reporting is on (its import takes ~1 s)

            if wandb.run is not None:
                wandb.config.update({"medsft": redact(to_plain_dict(self.cfg))}, allow_val_change=True)

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            OmegaConf.save(self.cfg, folder / CONFIG_FILE, resolve=True)
