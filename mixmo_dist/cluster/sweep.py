"""Sweeps: `--sweep section.key=V1,V2,...` words -> the grid of runs, each with its own output directory.

    python -m mixmo_dist.submit --config C --sweep run.seed=1,2,3 --sweep mixmo.num_members=1,2 [--cluster=...]

The grid is the cartesian product of the sweep words, in the order given (the last word varies fastest). Point
`{mixmo.num_members: 2, run.seed: 3}` trains into `<run.output_dir>/mixmo.num_members-2_run.seed-3`: the run
directory names its values, so `python -m mixmo_dist.compare <run.output_dir>/*` (or any tool) can read them back,
and each point resumes, is preempted and requeued on its own. Values may not hold commas; a key must be a config key
(every point's config is validated before anything is submitted).

`--sweep config=A.yaml,B.yaml` makes the config file an axis: each point reads its own file (`--config`), then the
command line's words, which beat any file. A point's directory names the file by its stem (`config-demo_vanilla`),
so recipes that differ in several keys (Cut-MixMo against vanilla) are one sweep:

    python -m mixmo_dist.submit --sweep config=configs/demo.yaml,configs/demo_vanilla.yaml --sweep run.seed=1,2,3 \
        --run.output_dir=runs/seeds --cluster=local --slurm.tasks_per_node=2 --wait
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

from mixmo_dist.config import ConfigError

_KEY = re.compile(r"^[a-z_]+\.[a-z_0-9]+$")
# Characters kept in a directory name; anything else in a value becomes "_".
_SAFE = re.compile(r"[^A-Za-z0-9._+-]")


def parse_sweeps(words: list[str]) -> list[tuple[str, list[str]]]:
    """`["run.seed=1,2", ...]` -> `[("run.seed", ["1", "2"]), ...]`, in order.

    Raises:
        ConfigError: a word without `=`, a malformed key, a key swept twice, an empty value list or a repeated value.
    """
    sweeps: list[tuple[str, list[str]]] = []
    for word in words:
        key, sep, values = word.partition("=")
        key = key.strip().removeprefix("--")
        if not sep or not (_KEY.match(key) or key == "config"):
            raise ConfigError(f"--sweep {word!r}: expected section.key=V1,V2,... (e.g. --sweep run.seed=1,2,3)")
        items = [v.strip() for v in values.split(",")]
        if not values.strip() or any(not v for v in items):
            raise ConfigError(f"--sweep {word!r}: empty value in the list")
        if len(set(items)) != len(items):
            raise ConfigError(f"--sweep {word!r}: a value is repeated")
        if key in (k for k, _ in sweeps):
            raise ConfigError(f"--sweep {key} is given twice; put all its values in one word")
        if key == "run.output_dir":
            raise ConfigError("--sweep run.output_dir: each point's directory is derived from run.output_dir")
        if key == "config" and len({Path(v).stem for v in items}) != len(items):
            raise ConfigError(f"--sweep {word!r}: two config files have the same name (a point's directory names it)")
        sweeps.append((key, items))
    return sweeps


def sweep_points(sweeps: list[tuple[str, list[str]]]) -> list[dict[str, str]]:
    """Every combination of the swept values (`{key: value}` per point), the last sweep varying fastest."""
    keys = [key for key, _ in sweeps]
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(values for _, values in sweeps))]


def point_name(point: dict[str, str]) -> str:
    """The directory name of a point: `key-value` pairs joined by `_`, e.g. `mixmo.num_members-2_run.seed-3`."""
    return "_".join(f"{key}-{_SAFE.sub('_', _shown(key, value))}" for key, value in point.items())


def _shown(key: str, value: str) -> str:
    return Path(value).stem if key == "config" else value


def point_argv(train_argv: list[str], point: dict[str, str], base_output_dir: str | Path) -> list[str]:
    """The trainer words of one point: the sweep's own words, then its values and its output directory (the later
    words win)."""
    # A config file is the last `--config` (it replaces the command line's); `--section.key` words beat any file
    # wherever they stand, so the command line's words still apply on top of the point's file.
    words = [f"--config={value}" if key == "config" else f"--{key}={value}" for key, value in point.items()]
    return [*train_argv, *words, f"--run.output_dir={Path(base_output_dir) / point_name(point)}"]
