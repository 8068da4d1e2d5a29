"""Experiment tracking (wandb or none) and the background push of checkpoints to the Hugging Face Hub.

Secrets (WANDB_API_KEY, HF_TOKEN) are read by the libraries from the environment or their cached logins;
nothing here copies them into a config, a log line or a file.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import threading
import time
from pathlib import Path
from typing import Any, Optional

from huggingface_hub import HfApi

log = logging.getLogger(__name__)

_SECRET_KEY = re.compile(r"(token|secret|password|api_key|apikey)", re.IGNORECASE)


def redact(data: Any) -> Any:
    """Drop any config entry whose key looks like a secret (defence in depth: the schema has none)."""
    if isinstance(data, dict):
        return {k: redact(v) for k, v in data.items() if not _SECRET_KEY.search(str(k))}
    if isinstance(data, list):
        return [redact(v) for v in data]
    return data


class Tracker:
    """A thin wrapper so the loop logs the same way with wandb or without it; main process only."""

    def __init__(self, backend: str, enabled: bool):
        self.backend = backend if enabled else "none"
        self.run = None

    @property
    def run_id(self) -> Optional[str]:
        return getattr(self.run, "id", None)

    def start(self, cfg, run_name: str, config: dict, resume_id: Optional[str] = None) -> None:
        if self.backend != "wandb" or cfg.logging.wandb_mode == "disabled":
            self.backend = "none"
            return
        import wandb  # only for runs that log to wandb (its import takes ~1 s)

        wandb_dir = Path(cfg.log_dir).resolve() / cfg.experiment_name
        wandb_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=cfg.logging.wandb_project,
            entity=cfg.logging.wandb_entity,
            name=run_name,
            config=redact(config),
            dir=str(wandb_dir),
            mode=cfg.logging.wandb_mode,
            id=resume_id,
            resume="allow" if resume_id else None,
            settings=wandb.Settings(console="off", silent=True),
        )

    def log(self, metrics: dict, step: int) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def summary(self, values: dict) -> None:
        if self.run is not None:
            for key, value in values.items():
                self.run.summary[key] = value

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class HubPusher:
    """Uploads checkpoint folders to the Hub from a background thread so training never waits on it.

    Failures are retried, then reported through `errors` and the log; they never stop training.
    `api` is an `huggingface_hub.HfApi` (token from HF_TOKEN or the cached login).
    """

    def __init__(self, repo_id: str, private: bool = True, api=None, retries: int = 3, backoff_s: float = 2.0):
        if api is None:
            api = HfApi()
        self.api = api
        self.repo_id = repo_id
        self.private = private
        self.retries = retries
        self.backoff_s = backoff_s
        self.pushed: list[str] = []
        self.errors: list[str] = []
        self._repo_ready = False
        self._queue: "queue.Queue[Optional[tuple[Path, str]]]" = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="medsft-hub-push", daemon=True)
        self._thread.start()

    def submit(self, folder: Path, message: str) -> None:
        self._queue.put((Path(folder), message))

    def close(self, timeout_s: float = 600.0) -> None:
        """Wait for queued uploads (bounded), then stop the worker."""
        self._queue.put(None)
        self._thread.join(timeout=timeout_s)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            folder, message = item
            self._push_with_retries(folder, message)

    def _push_with_retries(self, folder: Path, message: str) -> None:
        last_error = None
        for attempt in range(1, self.retries + 1):
            try:
                if not self._repo_ready:
                    self.api.create_repo(self.repo_id, private=self.private, exist_ok=True, repo_type="model")
                    self._repo_ready = True
                self.api.upload_folder(
                    folder_path=str(folder),
                    repo_id=self.repo_id,
                    commit_message=message,
                    ignore_patterns=["training_state/*", "COMPLETE"],
                )
                self.pushed.append(str(folder))
                log.info("pushed %s to the Hub (%s)", folder.name, self.repo_id)
                return
            except Exception as err:  # noqa: BLE001 - any failure is reported, never fatal to training
                last_error = f"{type(err).__name__}: {err}"
                if attempt < self.retries:
                    time.sleep(self.backoff_s * attempt)
        message = f"push of {folder.name} to {self.repo_id} failed after {self.retries} tries: {last_error}"
        self.errors.append(message)
        log.warning(message)


def hub_token_present() -> bool:
    return bool(os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"))
