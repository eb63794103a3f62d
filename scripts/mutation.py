"""`make mutation`: mutmut 3 over the modules whose bugs change numbers without a crash, one module at a time.

    .venv/bin/python scripts/mutation.py                       # every module of MODULES
    .venv/bin/python scripts/mutation.py training/loss ops/mixing
    .venv/bin/python scripts/mutation.py --fresh ops/mixing    # forget earlier results of these modules

How mutmut 3 works, and why this script is shaped around it:
- it copies `source_paths` (here the whole package) and the tests into `./mutants/`, rewrites every function of the
  files it mutates into a trampoline plus one copy per mutant, and picks the copy at call time from the
  MUTANT_UNDER_TEST environment variable;
- it first runs the selected tests once with MUTANT_UNDER_TEST=stats to record, in process, which test calls which
  function; each mutant then runs only the tests recorded for its function. A test whose only call is inside a
  subprocess (a training run) is never recorded, so it kills nothing here even though the subprocess, started
  from `mutants/` with the variable inherited, would run the mutant: claims only a subprocess checks need a fast
  in-process test to count;
- its configuration is read from `[tool.mutmut]` of the `pyproject.toml` in the working directory, and the test
  selection is part of it. One shared `mutants/` for every module would mean one selection for all (the union of
  every module's tests in the stats pass) and every module's cache thrown away when any selection changed. So each
  module gets its own working directory `mutants/<module>/` (links to the package and the tests, a pyproject.toml
  with its own `[tool.mutmut]`), its own stats and its own cache: a rerun tests only the functions that changed.

Scores (killed / total per module, survivors named) are printed at the end; the exit status is 1 when a module
scores below --min-score (the issue's bar, 85%), so CI can hold the line once every module has had a pass.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "mutants"

# module -> the fast, in-process test files that check it. Fixed rather than "every test": the stats pass runs each
# file once per module, and subprocess-heavy files would spend the 90-minute budget on runs that record nothing.
MODULES: dict[str, list[str]] = {
    "training/loss": ["tests/test_loss_members.py", "tests/test_input_cutmix.py"],
    "training/members": ["tests/test_loss_members.py", "tests/test_input_cutmix.py"],
    "training/optim": ["tests/test_optim.py"],
    "training/trainer": [
        "tests/test_trainer_fit.py",
        "tests/test_trainer_loop.py",
        "tests/test_nonfinite_counters.py",
        "tests/test_accumulation.py",
    ],
    "ops/mixing": ["tests/test_ops.py", "tests/test_input_cutmix.py", "tests/test_mixing_exact.py"],
    "evaluation/metrics": ["tests/test_metrics.py", "tests/test_metrics_exact.py"],
    "evaluation/calibration": ["tests/test_metrics.py"],
    "checkpoint/store": ["tests/test_checkpoint.py", "tests/test_checkpoint_cleanup.py", "tests/test_store_exact.py"],
    "checkpoint/state": ["tests/test_state.py"],
    "data/plan": ["tests/test_plan.py"],
    "data/transforms": [
        "tests/test_transforms.py",
        "tests/test_data_torch.py::test_pad_random_views_are_padded_crops_and_flips",
    ],
    "model/weights": ["tests/test_weights.py"],
    "model/mixmo": ["tests/test_mixmo.py"],
}

# mutmut's exit codes per mutant (mutmut/stats.py, 3.8.1): what counts as killed. A timeout is a kill (the mutant
# made the tests hang); "no tests" (33, 5) is a survivor: no selected test calls the function in process.
KILLED = {1, 3, 36, -24, 24, 152, 255, 37}
NOT_CHECKED = {None, 2}

# pytest options for every mutant run: no SLURM or GPU tests, no cache writes, the project's timeout kept.
PYTEST_ARGS = ["-p", "no:cacheprovider", "-m", "not slurm and not gpu", "-o", "addopts="]


def _toml_list(items: list[str]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


def prepare(module: str, fresh: bool) -> Path:
    """The module's working directory: links to the package and tests, the project's pyproject plus its mutmut
    section (pytest inside `mutants/` reads the same file, so markers and timeouts stay the project's)."""
    work = WORK / module.replace("/", "__")
    if fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    for name in ("mixmo_dist", "tests"):
        link = work / name
        if not link.is_symlink():
            link.symlink_to(REPO / name)
    source = f"mixmo_dist/{module}.py"
    section = "\n".join(
        [
            "",
            "[tool.mutmut]",
            'source_paths = ["mixmo_dist"]',
            f"only_mutate = {_toml_list([source])}",
            f"pytest_add_cli_args_test_selection = {_toml_list(MODULES[module])}",
            f"pytest_add_cli_args = {_toml_list(PYTEST_ARGS)}",
            # torch is not fork-safe once its thread pools have started: fork workers from a clean server.
            'process_isolation = "forkserver"',
            # A mutant that makes the tests loop is stopped at 6x its tests' CPU time (mutmut's default, 30x, let a
            # handful of trainer mutants take ten minutes each); a timeout still counts as killed.
            "timeout_multiplier = 3.0",
            # The working directory is inside the repository's worktree, not a repository of its own.
            "use_git_change_detection = false",
            "",
        ]
    )
    pyproject = (REPO / "pyproject.toml").read_text() + section
    if not (work / "pyproject.toml").exists() or (work / "pyproject.toml").read_text() != pyproject:
        (work / "pyproject.toml").write_text(pyproject)
    return work


def run(module: str, work: Path, max_children: int) -> int:
    env = dict(os.environ)
    # The trampolines must be the only copy of the package on the path: mutmut puts `mutants/` first, and a
    # PYTHONPATH naming the checkout would still serve the original to subprocesses started elsewhere.
    env.pop("PYTHONPATH", None)
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "mutmut", "run", "--max-children", str(max_children)]
    print(f"== {module}: {' '.join(MODULES[module])}", flush=True)
    return subprocess.run(cmd, cwd=work, env=env).returncode


def score(module: str, work: Path) -> dict:
    meta = work / "mutants" / f"mixmo_dist/{module}.py.meta"
    codes = json.loads(meta.read_text())["exit_code_by_key"] if meta.exists() else {}
    killed = [k for k, c in codes.items() if c in KILLED]
    unchecked = [k for k, c in codes.items() if c in NOT_CHECKED]
    survivors = sorted(k for k, c in codes.items() if c not in KILLED and c not in NOT_CHECKED)
    return {"killed": len(killed), "total": len(codes), "unchecked": len(unchecked), "survivors": survivors}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("modules", nargs="*", help=f"default: all of {', '.join(MODULES)}")
    ap.add_argument("--fresh", action="store_true", help="delete the modules' earlier mutants and results first")
    ap.add_argument(
        "--max-children", type=int, default=os.cpu_count() or 1, help="mutants tested at once (default: one per CPU)"
    )
    ap.add_argument("--min-score", type=float, default=0.85)
    args = ap.parse_args()
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        ap.error(f"unknown module(s) {unknown}; choose from {list(MODULES)}")
    modules = args.modules or list(MODULES)
    results, failed = {}, []
    for module in modules:
        start = time.monotonic()
        work = prepare(module, args.fresh)
        if run(module, work, args.max_children) != 0:
            failed.append(module)
        results[module] = score(module, work) | {"minutes": (time.monotonic() - start) / 60}
    print("\nmodule                      killed/total  score  minutes")
    low = []
    for module, r in results.items():
        frac = r["killed"] / r["total"] if r["total"] else 0.0
        if frac < args.min_score:
            low.append(module)
        extra = f"  ({r['unchecked']} not checked)" if r["unchecked"] else ""
        print(f"{module:<27} {r['killed']:>5}/{r['total']:<6} {frac:6.1%} {r['minutes']:8.1f}{extra}")
        for name in r["survivors"]:
            print(f"    survived: {name}   (mutmut show {name}, in {WORK.name}/{module.replace('/', '__')})")
    if failed:
        print(f"mutmut failed for: {', '.join(failed)}")
    return 1 if failed or low else 0


if __name__ == "__main__":
    sys.exit(main())
