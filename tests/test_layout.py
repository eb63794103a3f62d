"""The package layout that docs/DESIGN.md promises: entry points on top, stages in folders, imports going one way.

Parses every module of `mixmo_dist/` (imports inside functions included) and checks each import against the table of
what each part may use. A new import that crosses a boundary fails here with the file and the line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "mixmo_dist"

ENTRY_POINTS = {"train", "evaluate", "export", "plot", "submit", "slurm_launch", "compare"}
TOP_LEVEL = ENTRY_POINTS | {"__init__"}

# part -> the parts of mixmo_dist it may import (besides itself). "checkpoint.base" is the package's errors, its
# store and its lock, which know nothing about models or training.
ALLOWED = {
    "config": {"runtime"},
    "runtime": set(),
    "data": {"config", "runtime"},
    "ops": {"runtime"},
    "model": {"config", "runtime", "ops", "checkpoint.base"},
    "checkpoint.base": {"runtime"},
    "checkpoint.state": {"checkpoint.base", "runtime"},
    "checkpoint.reader": {"checkpoint.base", "config", "runtime", "data", "model"},
    "evaluation": {"config", "runtime", "data", "model", "checkpoint.base", "checkpoint.reader"},
    "training": {
        "config",
        "runtime",
        "data",
        "model",
        "ops",
        "checkpoint.base",
        "checkpoint.state",
        "evaluation.metrics",
        "version",
    },
    "cluster": {"config", "training"},
}


def _part(module: str) -> str:
    """The layout part of a dotted module name inside mixmo_dist (e.g. 'training.trainer' -> 'training')."""
    head, _, rest = module.partition(".")
    if head == "checkpoint":
        sub = rest.partition(".")[0]
        return f"checkpoint.{sub}" if sub in ("state", "reader") else "checkpoint.base"
    if module == "evaluation.metrics" or module.startswith("evaluation.metrics."):
        return "evaluation.metrics"
    if module == "__version__":
        return "version"  # `from mixmo_dist import __version__`
    return head


def _imports(path: Path, root: Path = PKG) -> list[tuple[int, str]]:
    """(line, dotted module inside mixmo_dist) of every import of the project in `path` (a file under `root`)."""
    module = ".".join(path.relative_to(root).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    # Imports under `if TYPE_CHECKING:` only name types for annotations; they never run.
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
        for inner in ast.walk(node)
    }
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            parts = package.split(".") if package else []
            base = parts[: len(parts) - node.level + 1]
            found.append((node.lineno, ".".join([*base, node.module] if node.module else base)))
            continue
        elif isinstance(node, ast.ImportFrom) and node.module == "mixmo_dist":
            names = [f"mixmo_dist.{a.name}" for a in node.names]  # `from mixmo_dist import train`
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            continue
        for name in names:
            if name == "mixmo_dist" or name.startswith("mixmo_dist."):
                found.append((node.lineno, name.removeprefix("mixmo_dist").lstrip(".")))
    return found


def violations(path: Path, root: Path = PKG) -> list[str]:
    """The imports of `path` that its part of the layout may not make."""
    rel = path.relative_to(root)
    if len(rel.parts) == 1:
        if rel.stem in ENTRY_POINTS | {"__init__"}:
            return []  # entry points may use everything
        own = rel.stem
    else:
        own = _part(".".join(rel.with_suffix("").parts))
    allowed = (
        {"runtime"}
        if own == "evaluation.metrics"
        else ALLOWED[own.partition(".")[0]]
        if own not in ALLOWED
        else ALLOWED[own]
    )
    bad = []
    for line, target in _imports(path, root):
        part = _part(target)
        same_stage = part.partition(".")[0] == own.partition(".")[0] and not part.startswith("checkpoint")
        if part == own or part in allowed or same_stage:
            continue
        if part in ENTRY_POINTS:
            bad.append(f"{rel}:{line} imports the entry point {target}")
        else:
            bad.append(f"{rel}:{line} ({own}) may not import {target} ({part})")
    return bad


def _modules() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def test_top_level_holds_only_entry_points_config_and_init():
    assert {p.stem for p in PKG.glob("*.py")} <= TOP_LEVEL
    stages = {p.name for p in PKG.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert stages == {"checkpoint", "cluster", "config", "data", "evaluation", "model", "ops", "runtime", "training"}


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_imports_follow_the_layout(path):
    bad = violations(path)
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    ("where", "code", "culprit"),
    [
        ("checkpoint/state.py", "from mixmo_dist.training.trainer import Trainer", "training.trainer"),
        ("checkpoint/store.py", "from mixmo_dist.model import build_model", "model"),
        ("data/plan.py", "from ..training import plan", "training"),
        ("model/weights.py", "import mixmo_dist.checkpoint.reader", "checkpoint.reader"),
        ("ops/mixing.py", "def f():\n    from mixmo_dist import train", "train"),
    ],
)
def test_the_checker_reports_a_crossing(tmp_path, where, code, culprit):
    """The table is enforced, relative and function-level imports included."""
    path = tmp_path / where
    path.parent.mkdir(parents=True)
    path.write_text(code + "\n")
    bad = violations(path, tmp_path)
    assert len(bad) == 1 and culprit in bad[0], bad
