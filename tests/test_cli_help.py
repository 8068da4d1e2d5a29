"""What a new user types first: `--version`, and `--help` of `python launch.py` and of every `medsft` command.

Each help page starts with what the command does and shows 3-5 examples, each a command of README.md (so
the help and the README cannot drift apart); `medsft train` runs the same override check as launch.py.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib

import pytest

import medsft
from medsft.cli import main
from medsft.cli.usage import EXAMPLES_HEADER
from readme_utils import ROOT, all_readme_commands

README_COMMANDS = set(all_readme_commands())


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)


def examples_of(help_text: str) -> list[str]:
    """The example commands of a help page (the lines after `examples (from README.md):`, comments cut)."""
    assert EXAMPLES_HEADER in help_text, help_text[:2000]
    block = help_text.split(EXAMPLES_HEADER, 1)[1].split("\n\n", 1)[0]
    return [re.sub(r"\s+#\s.*$", "", line).strip() for line in block.splitlines() if line.strip()]


def check_page(help_text: str, starts_with: str, fewest: int = 3) -> None:
    first = help_text.lstrip().splitlines()[0]
    assert first.startswith(starts_with) and not first.startswith("usage"), first
    examples = examples_of(help_text)
    assert fewest <= len(examples) <= 5, examples
    assert [e for e in examples if e not in README_COMMANDS] == [], "help examples that are not README commands"


def test_version_has_one_source(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"medsft {medsft.__version__}"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "version" not in project["project"] and project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "medsft.__version__"}
    done = _run("launch.py", "--version")  # not Hydra's version
    assert done.returncode == 0 and done.stdout.startswith(f"medsft {medsft.__version__} (python ")
    assert "torch " in done.stdout and "Hydra" not in done.stdout


def test_launch_help_says_what_a_run_does_with_readme_examples_and_the_groups():
    done = _run("launch.py", "--help")
    assert done.returncode == 0, done.stderr
    text = done.stdout
    check_page(text, "python launch.py / medsft train: fine-tune")
    assert "powered by Hydra" not in text and "== Config ==" not in text
    assert "train_bsz_per_gpu:" not in text  # no 135-line config dump (`--cfg job` prints it)
    groups = dict(re.findall(r"^  (\w[\w/]*)\s{2,}(.+)$", text.split("config groups", 1)[1], re.M))
    assert groups["experiment"].startswith("demo (default), demo_lora, local_test")
    assert groups["model"] == "llama3_1_8b_instruct, llama3_2_1b_instruct, smollm2_135m (default), tiny_random"
    assert "eval" not in groups and not any("base" in options.split(", ") for options in groups.values())
    assert "rl_schema" not in text

    train = _run("-m", "medsft.cli", "train", "--help")  # the same page
    assert train.returncode == 0 and train.stdout == text


def test_medsft_train_checks_overrides_like_launch_py():
    for argv in (("launch.py",), ("-m", "medsft.cli", "train")):
        done = _run(*argv, "train.n_epohcs=2")
        assert done.returncode == 2, done.stderr
        assert "unknown config key 'train.n_epohcs' (did you mean train.n_epochs?)" in done.stderr
        assert "Traceback" not in done.stderr


@pytest.mark.parametrize("command, starts_with, fewest", [
    ([], "medsft: fine-tune causal LMs", 3),
    (["data"], "`medsft data check|stats|sample|show`: look at data before training", 3),
    (["data", "stats"], "medsft data stats: token lengths", 2),  # a part of `medsft data`: its own two examples
    (["eval"], "medsft eval: evaluate a model", 3),
    (["prepare-model"], "medsft prepare-model: prepare a model", 3),
    (["sweep-report"], "medsft sweep-report: the table", 3),
    (["launch-config"], "medsft launch-config: write accelerate_config.yaml", 3),
])
def test_every_command_help_starts_with_what_it_does_and_readme_examples(command, starts_with, fewest, capsys):
    try:
        rc = main([*command, "--help"])
    except SystemExit as exit_:  # argparse's --help
        rc = exit_.code
    assert rc == 0
    check_page(capsys.readouterr().out, starts_with, fewest)


def test_eval_help_says_up_front_where_the_benchmark_data_must_be(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("MEDSFT_SHARED_DATA", str(tmp_path / "nowhere"))
    assert main(["eval", "--help"]) == 0
    text = capsys.readouterr().out
    head = text.split(EXAMPLES_HEADER)[0]
    assert f"$MEDSFT_SHARED_DATA={tmp_path / 'nowhere'}: NOT FOUND" in head
    assert "checkpoint-<epoch>-<step>" in head
    assert all("checkpoint-1-48" in e or "model=" in e for e in examples_of(text))  # real checkpoint names
    monkeypatch.setenv("MEDSFT_SHARED_DATA", str(tmp_path))
    assert main(["eval", "--help"]) == 0
    assert f"found ({tmp_path.resolve()})" in capsys.readouterr().out
