"""The house rules of docs/architecture.md, checked on the code itself: the layer contract, no import cycle,
imports at the top of each file, and one source for every config default."""

from __future__ import annotations

import ast
import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest
import yaml
from omegaconf import MISSING

from medsft.config import evaluate, rl, schema
from medsft.data.templates import DEFAULT_RESPONSE_TEMPLATE

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "medsft"


def _import_graph() -> grimp.ImportGraph:
    return grimp.build_graph("medsft", include_external_packages=False, cache_dir=None)


def lint_imports(config: Path, *paths: Path) -> tuple[int, str]:
    """`lint-imports` with this config (in a fresh process: it reconfigures logging, which would silence the
    loggers of the tests that run after it); returns (exit code, output)."""
    code = ("import sys; from importlinter.cli import lint_imports; "
            f"sys.exit(lint_imports(config_filename={str(config)!r}, no_cache=True, no_logo=True))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in paths)} if paths else None
    done = subprocess.run([sys.executable, "-c", code], cwd=config.parent, capture_output=True, text=True,
                          timeout=300, env=env)
    return done.returncode, done.stdout + done.stderr


def test_the_layer_contract_holds():
    """pyproject.toml's import-linter contracts (the layers, top to bottom, and no cycle): `lint-imports`."""
    code, out = lint_imports(ROOT / "pyproject.toml")
    assert code == 0, out[-4000:]
    assert "2 kept, 0 broken" in out


def test_the_layer_contract_catches_an_arrow_up(tmp_path):
    """The contract can fail: in a copy of the package (renamed, so the installed one is not read instead) where
    the data layer imports the training stage inside a function, it is broken and names the import."""
    copy = tmp_path / "medsftcopy"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    for path in copy.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        path.write_text(re.sub(r"\b(from|import) medsft\b", r"\1 medsftcopy", text), encoding="utf-8")
    records = copy / "data" / "records.py"
    records.write_text(records.read_text(encoding="utf-8") + "\n\ndef _up():\n    import medsftcopy.train.loop\n",
                       encoding="utf-8")
    config = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    config = config.replace('root_package = "medsft"', 'root_package = "medsftcopy"')
    config = config.replace('containers = ["medsft"]', 'containers = ["medsftcopy"]')
    config = config.replace('ancestors = ["medsft"]', 'ancestors = ["medsftcopy"]')
    (tmp_path / "pyproject.toml").write_text(config, encoding="utf-8")
    code, out = lint_imports(tmp_path / "pyproject.toml", tmp_path)
    assert code == 1 and "0 kept, 2 broken" in out and "medsftcopy.data.records -> medsftcopy.train.loop" in out, out


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), i.e. the import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(module: str) -> None:
        index[module] = low[module] = counter[0]
        counter[0] += 1
        stack.append(module)
        on_stack.add(module)
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_no_import_cycle_between_modules():
    """Module by module (finer than the package-level contract): no two modules of medsft import each other,
    directly or through others; a package's __init__ handing names on counts like any module."""
    assert _cycles(_import_graph()) == []


def test_the_cycle_check_finds_a_cycle(tmp_path):
    """The check above can fail: a two-module cycle in a scratch package is found."""
    pkg = tmp_path / "loopy"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from loopy import b\n")
    (pkg / "b.py").write_text("def f():\n    from loopy import a  # inside a function: still an arrow\n")
    sys.path.insert(0, str(tmp_path))
    try:
        graph = grimp.build_graph("loopy", cache_dir=None)
    finally:
        sys.path.remove(str(tmp_path))
    assert _cycles(graph) == [["loopy.a", "loopy.b"]]


def _function_imports(path: Path) -> list[tuple[int, str, str]]:
    """(line, the import, the line above it) of every import inside a function of `path`."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found = []
    for node in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                if isinstance(sub, (ast.Import, ast.ImportFrom)):
                    found.append((sub.lineno, lines[sub.lineno - 1], lines[sub.lineno - 2] if sub.lineno > 1 else ""))
    return found


def test_imports_inside_functions_say_why():
    """Imports live at the top of each file; one stays inside a function only for an optional extra or a measured
    start-up cost, with a comment on its line (or on the `try:` above it) saying which."""
    silent = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for lineno, line, above in _function_imports(path):
            if "#" not in line and "#" not in above:
                silent.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}")
    assert silent == []


# ------------------------------------------------------------------------------------------ one source of defaults

SCHEMAS = [cls for module in (schema, rl, evaluate) for cls in vars(module).values()
           if isinstance(cls, type) and dataclasses.is_dataclass(cls) and cls.__module__ == module.__name__]


@pytest.mark.parametrize("cls", SCHEMAS, ids=lambda c: c.__name__)
def test_schemas_hold_types_not_values(cls):
    """Every leaf of the config schemas is MISSING: its default is written once, in conf/ (a group's base.yaml or
    default.yaml); the schema only types it. (Nested groups are structure, and `rl` is null until a preset.)"""
    valued = []
    for f in dataclasses.fields(cls):
        if f.name == "defaults" or f.default_factory is not dataclasses.MISSING:
            continue
        if f.default is not MISSING and not (cls is schema.Config and f.name == "rl" and f.default is None):
            valued.append(f"{cls.__name__}.{f.name} = {f.default!r}")
    assert valued == []


def test_every_default_is_set_by_conf(compose_config):
    """The defaults conf/ composes to leave nothing unset but what the user must give (a data path)."""
    from omegaconf import OmegaConf

    assert sorted(OmegaConf.missing_keys(compose_config("~experiment"))) == []
    assert sorted(OmegaConf.missing_keys(compose_config("data=custom_es"))) == ["data.path"]
    rl_cfg = compose_config("stage=rl", "rl=grpo")
    assert sorted(OmegaConf.missing_keys(rl_cfg)) == []
    assert sorted(OmegaConf.missing_keys(compose_config("eval=custom", config_name="evaluate"))) == ["eval.path"]


def test_presets_say_only_what_they_change():
    """A preset that restates its group's base value writes that default twice."""
    restated = []
    for base_file in sorted((ROOT / "conf").rglob("base.yaml")):
        base = yaml.safe_load(base_file.read_text(encoding="utf-8"))
        for preset in sorted(base_file.parent.glob("*.yaml")):
            if preset == base_file:
                continue
            values = yaml.safe_load(preset.read_text(encoding="utf-8")) or {}
            for key, value in values.items():
                if key != "defaults" and key in base and base[key] == value and not isinstance(value, dict):
                    restated.append(f"{preset.relative_to(ROOT)}: {key}")
    assert restated == []


def test_the_layout_constant_is_the_configured_default():
    """medsft.data.templates' layout (for code that needs it whatever the config says) is conf's default."""
    base = yaml.safe_load((ROOT / "conf" / "data" / "base.yaml").read_text(encoding="utf-8"))
    assert base["response_template"] == DEFAULT_RESPONSE_TEMPLATE
