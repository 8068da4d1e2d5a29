"""Experiment tracking (wandb or none) and the background push of checkpoints, each with its model card, to the
Hugging Face Hub.

Secrets (WANDB_API_KEY, HF_TOKEN) are read by the libraries from the environment or their cached logins;
nothing here copies them into a config, a log line or a file.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, Optional

from huggingface_hub import HfApi
from hydra.core.hydra_config import HydraConfig

from medsft import __version__

log = logging.getLogger(__name__)

_SECRET_KEY = re.compile(r"(token|secret|password|api_key|apikey)", re.IGNORECASE)
CARD_FILE = "README.md"  # the model card, pushed with each checkpoint's weights
PUSH_IGNORE = ["training_state/*", "COMPLETE"]  # resuming state stays local


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
    """Uploads checkpoint folders, with their model card, to the Hub in the background, so training never waits.

    huggingface_hub's own background upload does the work (`upload_folder(..., run_as_future=True)`: one worker
    thread, jobs in submission order, its own HTTP retries); the repo is created by the first job in that same
    queue. Every failure is collected in `errors` and logged by `close`; none stops training.
    `api` is an `huggingface_hub.HfApi` (token from HF_TOKEN or the cached login).
    """

    def __init__(self, repo_id: str, private: bool = True, api=None):
        self.api = api if api is not None else HfApi()
        self.repo_id = repo_id
        self.private = private
        self.pushed: list[str] = []
        self.errors: list[str] = []
        self._jobs: list[tuple[str, Future]] = [
            ("the repo", self.api.run_as_future(self.api.create_repo, repo_id, private=private, exist_ok=True,
                                                repo_type="model")),
        ]

    def submit(self, folder: Path, message: str, card: Optional[str] = None) -> None:
        """Queue the upload of a checkpoint folder (without its training state), with `card` as its README.md."""
        folder = Path(folder)
        if card is not None:
            (folder / CARD_FILE).write_text(card, encoding="utf-8")
        future = self.api.upload_folder(folder_path=str(folder), repo_id=self.repo_id, commit_message=message,
                                        ignore_patterns=PUSH_IGNORE, run_as_future=True)
        self._jobs.append((folder.name, future))

    def update_card(self, card: str, message: str) -> None:
        """Queue a new README.md (the final model card) after the uploads already queued."""
        future = self.api.upload_file(path_or_fileobj=card.encode("utf-8"), path_in_repo=CARD_FILE,
                                      repo_id=self.repo_id, commit_message=message, run_as_future=True)
        self._jobs.append(("the model card", future))

    def close(self, timeout_s: float = 600.0) -> None:
        """Wait for the queued uploads (at most timeout_s in all) and report each failure once."""
        deadline = time.monotonic() + timeout_s
        for name, future in self._jobs:
            try:
                future.result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                self._fail(name, f"still running after {timeout_s:.0f} s; left to finish in the background")
            except Exception as err:  # noqa: BLE001 - any failure is reported, never fatal to training
                self._fail(name, f"{type(err).__name__}: {err}")
            else:
                if name not in ("the repo", "the model card"):
                    self.pushed.append(name)
                    log.info("pushed %s to the Hub (%s)", name, self.repo_id)
        self._jobs = []

    def _fail(self, name: str, why: str) -> None:
        message = f"push of {name} to {self.repo_id} failed: {why}"
        self.errors.append(message)
        log.warning(message)


def command_line() -> str:
    """The command this run was started with: `python launch.py <its overrides>` (no secret is ever an
    override: tokens come from the environment)."""
    try:
        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # not under Hydra
        return " ".join(["python", *sys.argv]) if sys.argv and sys.argv[0] else "(called from Python)"
    return " ".join(["python launch.py", *(_shell_quote(o) for o in overrides)])


def _shell_quote(arg: str) -> str:
    return arg if re.fullmatch(r"[\w./:=+\-@%,~]+", arg) else "'" + arg.replace("'", "'\\''") + "'"


def _looks_like_hub_id(path: str) -> bool:
    return bool(re.fullmatch(r"[\w.\-]+/[\w.\-]+", path)) and not Path(path).expanduser().exists()


def _pct(value: Any) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, (int, float)) else "-"


def _num(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("-" if value is None else str(value))


def final_is_merged(cfg) -> bool:
    """checkpoint.merge_adapter=true: what is pushed is the merged plain model, not the adapter."""
    return bool(cfg.peft.enabled and cfg.checkpoint.merge_adapter)


def model_card(cfg, records: list[dict], run: dict, command: str, checkpoint: Optional[str] = None,
               final: bool = False) -> str:
    """The README.md pushed with the weights: base model, data, the command, the metrics so far (final ones at
    the end), and the layout the model answers in. `records`: the run's metrics.jsonl records; `run`: figures
    of the loop (train_examples, val_examples, total_steps, step)."""
    base = str(cfg.model.path)
    language = "en" if str(cfg.data.name).endswith("_en") else "es"
    adapter = bool(cfg.peft.enabled) and not final_is_merged(cfg)  # a LoRA upload: the Hub loads it as an adapter
    front = ["---", f"library_name: {'peft' if adapter else 'transformers'}", "pipeline_tag: text-generation",
             f"language:\n- {language}",
             "tags:\n- medsft\n- medical\n- chain-of-thought\n- sft" + (f"\n- {cfg.peft.name}" if adapter else "")]
    if _looks_like_hub_id(base):
        front.insert(1, f"base_model: {base}")
    front.append("---")
    t, o, d = cfg.train, cfg.optimizer, cfg.data
    world = int(cfg.launcher.num_processes)
    step, total = run.get("step"), run.get("total_steps")
    state = "final" if final else "training in progress"
    lines = [
        *front, "",
        f"# {cfg.hf_repo_id or cfg.experiment_name}", "",
        f"`{base}` fine-tuned with medsft {__version__} (stage 1: supervised fine-tuning on medical "
        "chain-of-thought, the HuatuoGPT-o1 recipe)"
        + (f"; a {cfg.peft.name} adapter (rank {cfg.peft.r}, alpha {cfg.peft.alpha:g}) on that base model, which "
           "transformers loads with peft installed." if adapter else "."), "",
        f"This upload: {'`' + checkpoint + '`, ' if checkpoint else ''}step {step} of {total} ({state}).", "",
        "## Data", "",
        f"- file: `{d.path}` (preset `data={d.name}`); record fields: question `{d.fields.question}`, reasoning "
        f"`{d.fields.reasoning}`, answer `{d.fields.response}`",
        f"- {run.get('train_examples', '?')} training examples, {run.get('val_examples', 0)} held out for "
        f"validation; at most {d.max_seq_len} tokens each (data.overlong={d.overlong})",
        "", "## Training", "",
        "```bash", command, "```", "",
        "| setting | value |", "|---|---|",
        f"| learning rate | {o.learning_rate:g} ({o.scheduler}, warmup {o.warmup_rates:g} of the steps) |",
        f"| AdamW | betas {list(o.betas)}, eps {o.eps:g}, weight decay {o.weight_decay:g} (matrices only) |",
        f"| batch | {t.train_bsz_per_gpu} per device x {t.gradient_accumulation_steps} accumulation x {world} "
        f"processes = {t.train_bsz_per_gpu * t.gradient_accumulation_steps * world} examples per step |",
        f"| epochs | {t.n_epochs}{f' (capped at {t.max_steps} steps)' if t.max_steps else ''} |",
        f"| precision | {t.mixed_precision}; DeepSpeed {cfg.deepspeed.name} |",
        f"| seed | {cfg.seed} |",
        "", f"## Results ({'final' if final else f'at step {step}'})", "",
        "| figure | value |", "|---|---|",
    ]
    lines += _result_rows(records)
    template = str(d.response_template).replace("{reasoning}", "<reasoning>").replace("{response}", "<answer>")
    lines += [
        "", "## How it answers", "",
        "Prompt it with the tokenizer's chat template (the user turn is the question"
        + (f", after the system prompt `{d.system_prompt}`" if d.system_prompt else "")
        + "); the assistant turn it was trained to write is:", "",
        "```", template, "```", "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{cfg.hf_repo_id}")',
        f'model = AutoModelForCausalLM.from_pretrained("{cfg.hf_repo_id}")',
        'messages = [{"role": "user", "content": "<a medical question>"}]',
        "ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\")",
        "out = model.generate(ids, max_new_tokens=1024)",
        "print(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))",
        "```", "",
        "A research artefact, not medical advice: the answers of a fine-tuned model can be wrong.", "",
    ]
    return "\n".join(lines)


def _result_rows(records: list[dict]) -> list[str]:
    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "val"]
    gen = {r.get("when"): r for r in records if r.get("kind") == "generation"}
    evals = [r for r in records if r.get("kind") == "checkpoint_eval"]
    summary = next((r for r in reversed(records) if r.get("kind") == "summary"), None)
    rows = []
    if train:
        rows.append(f"| train loss (last logged step {train[-1]['step']}) | {_num(train[-1].get('loss'))} |")
    if val:
        rows.append(f"| validation loss, step {val[0]['step']} -> {val[-1]['step']} | {_num(val[0]['val_loss'])} -> "
                    f"{_num(val[-1]['val_loss'])} |")
    for when in ("before", "after"):
        g = gen.get(when)
        if g:
            rows.append(f"| layout followed {when} training (held-out questions) | {g.get('n_compliant')}/"
                        f"{g.get('n_questions')} |")
    if evals:
        e = evals[-1]
        ci = e.get("accuracy_ci95")
        interval = f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}] (95% Wilson)" if ci else ""
        rows.append(f"| {e.get('benchmark')} accuracy, {e.get('n')} questions, step {e.get('step')} | "
                    f"{_pct(e.get('accuracy'))}{interval} |")
    if summary:
        if summary.get("tokens_per_s"):
            rows.append(f"| training throughput | {summary['tokens_per_s']:,.0f} tokens/s |")
        if summary.get("wall_time_s") is not None:
            rows.append(f"| wall time | {summary['wall_time_s']:.0f} s |")
    return rows or ["| (no metrics yet) | |"]


def hub_token_present() -> bool:
    return bool(os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"))
