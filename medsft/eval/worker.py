"""Generation in a fresh process, on a model folder: how a ZeRO-3 run evaluates its checkpoints and answers the
before/after questions. Its own weights are sharded across processes (no process holds a whole model, and
generating with ZeRO-3's hooks needs every process in lockstep), but what it needs is on disk: the base model
for "before", and each checkpoint, saved with the full gathered 16-bit weights, for the checkpoint eval and
"after". The main process runs

    python -m medsft.eval.worker JOB.json RESULT.json

and waits (the other processes wait at their barrier); the worker loads the folder with plain from_pretrained
(no DeepSpeed, no process group: the distributed environment variables are removed), generates exactly as the
in-process path does (medsft.eval.generate, medsft.eval.runner), writes RESULT.json and exits, so its memory is
freed before training goes on. On a GPU machine it runs on the main process's GPU, beside that process's
shards: keep checkpoint.eval_limit small for large models.

JOB.json:
    {"task": "benchmark", "model": <model node>, "eval": <eval node>}     -> evaluate_benchmark's metrics
    {"task": "answers", "model": <model node>, "questions": [...], "max_new_tokens": N, "batch_size": B,
     "system_prompt": str | null, "repetition_penalty": R}              -> {"texts": [...]}
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from medsft.config.evaluate import EvalConfig
from medsft.config.schema import ModelConfig
from medsft.eval.generate import generate_responses
from medsft.eval.runner import eval_device, evaluate_benchmark, load_for_eval, load_preset_items

log = logging.getLogger("medsft.eval.worker")

# Set by torchrun / accelerate launch / DeepSpeed: the worker is one plain process, not a rank of the job.
_DISTRIBUTED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                    "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_WORLD_SIZE", "CROSS_RANK", "CROSS_SIZE")
_DISTRIBUTED_PREFIXES = ("TORCHELASTIC_", "ACCELERATE_", "MEDSFT_LAUNCH_DIR")


def worker_env(environ: Optional[dict] = None) -> dict:
    """This process's environment without what makes a process a rank of a distributed (DeepSpeed) job."""
    env = dict(os.environ if environ is None else environ)
    for key in list(env):
        if key in _DISTRIBUTED_ENV or key.startswith(_DISTRIBUTED_PREFIXES):
            env.pop(key)
    return env


def run_worker(job: dict, timeout_s: Optional[float] = None) -> dict:
    """Run `job` in a fresh `python -m medsft.eval.worker` and return its result; RuntimeError (naming the exit
    code; the worker's own output is on this process's console) when it fails."""
    with tempfile.TemporaryDirectory(prefix="medsft-worker-") as tmp:
        job_file, result_file = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_file.write_text(json.dumps(job, ensure_ascii=False), encoding="utf-8")
        done = subprocess.run([sys.executable, "-m", "medsft.eval.worker", str(job_file), str(result_file)],
                              env=worker_env(), timeout=timeout_s, check=False)
        if done.returncode != 0 or not result_file.is_file():
            raise RuntimeError(f"the generation worker for {job.get('model', {}).get('path')} ended with exit "
                               f"code {done.returncode} (its output is above)")
        return json.loads(result_file.read_text(encoding="utf-8"))


def _model_node(data: dict):
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), data)


def run_job(job: dict) -> dict:
    """The worker's body (in this process): load the model folder, generate, return the JSON-ready result."""
    model_cfg = _model_node(job["model"])
    task = job["task"]
    if task == "benchmark":
        eval_cfg = OmegaConf.merge(OmegaConf.structured(EvalConfig), job["eval"])
        device = eval_device(eval_cfg.device)
        model, tokenizer = load_for_eval(model_cfg, device)
        return evaluate_benchmark(model, tokenizer, load_preset_items(eval_cfg), eval_cfg)
    if task == "answers":
        model, tokenizer = load_for_eval(model_cfg, eval_device("auto"))
        texts = generate_responses(model, tokenizer, list(job["questions"]), max_new_tokens=int(job["max_new_tokens"]),
                                   batch_size=int(job["batch_size"]), system_prompt=job.get("system_prompt"),
                                   progress=False, repetition_penalty=float(job.get("repetition_penalty", 1.0)))
        return {"texts": texts}
    raise ValueError(f"unknown worker task {task!r} (benchmark | answers)")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m medsft.eval.worker JOB.json RESULT.json", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    job = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    result: Any = run_job(job)
    tmp = Path(argv[1]).with_suffix(".tmp")
    tmp.write_text(json.dumps(result, ensure_ascii=False, default=float), encoding="utf-8")
    os.replace(tmp, argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
