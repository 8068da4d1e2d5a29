"""Where an SFT run is (TrainState, saved in every checkpoint) and what must not change for a resume to be
exact (run_fingerprint)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from omegaconf import DictConfig

from medsft.data.dataset import SFTData


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint so a resume continues exactly."""

    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps done in `epoch`
    global_step: int = 0
    samples_seen: int = 0
    skipped_steps: int = 0
    consecutive_skips: int = 0
    wandb_run_id: Optional[str] = None
    last_loss: Optional[float] = None
    last_val_loss: Optional[float] = None


def run_fingerprint(cfg: DictConfig, data: SFTData, world: int) -> dict:
    """Values that must not change for a resume to be exact (beyond the config keys resume compares)."""
    return {
        "data_hash": data.stats.get("content_hash"),
        "train_examples": len(data.train),
        "train_bsz_per_gpu": cfg.train.train_bsz_per_gpu,
        "gradient_accumulation_steps": cfg.train.gradient_accumulation_steps,
        "world_size": world,
        "max_seq_len": cfg.data.max_seq_len,
        "seed": cfg.seed,
    }
