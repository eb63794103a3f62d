"""Runs side by side: group runs by the settings in which they differ, mean +- std over seeds, deep ensembles of the
single-member runs, and each row's inference cost. Used by `python -m mixmo_dist.compare`.

A run is an output directory of the trainer (config.yaml, metrics.jsonl, checkpoints/). Its figures come from:
  - `evaluate` of its newest complete checkpoint with temperature scaling (and `--ood DIR` when given), run once and
    cached in `<out>/evals/` (a later compare reuses it while the checkpoint is the same);
  - its metrics.jsonl for `best_top1` (the best validation during training, which only the run saw).
Groups: runs whose configs are equal but for `run.seed` and the bookkeeping keys (names, directories, logging,
checkpoint cadence, SLURM sizing, fault handling) form one group, labelled by the keys in which the groups differ.
Deep ensembles: in a group of single-member runs with at least 2 seeds, every pair of its runs is evaluated as a
deep ensemble of 2 (as many networks as MixMo's 2 members, at twice the inference cost); the row reports the mean
+- std over the pairs.
Cost: parameters, FLOPs of one image's forward (torch.utils.flop_counter, counting multiply-adds as 2), images/s of
a batch forward on this machine, measured in this command for every row, so the rows compare with each other.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from mixmo_dist.checkpoint.reader import load_checkpoint, resolve_checkpoint

# Keys that never define a group: identity, bookkeeping and where/how a run was scheduled.
_IGNORED_SECTIONS = ("log", "checkpoint", "slurm", "fault")
_IGNORED_KEYS = ("run.seed", "run.name", "run.output_dir", "data.root", "data.num_workers", "data.backend")

# (column, key in the evaluate result, how to reduce a list value)
METRICS: list[tuple[str, str]] = [
    ("top1", "top1"),
    ("member_top1", "member_top1"),
    ("nll", "nll"),
    ("ece", "ece"),
    ("brier", "brier"),
    ("nll_ts", "calibrated_nll"),
    ("ece_ts", "calibrated_ece"),
    ("diversity", "diversity"),
    ("aurc", "aurc"),
]
OOD_METRICS = [("ood_auroc_msp", ("msp", "auroc")), ("ood_auroc_disagreement", ("disagreement", "auroc"))]


@dataclass
class Run:
    """One run directory: its flat config, its newest checkpoint and its best validation."""

    path: Path
    config: dict[str, Any]
    checkpoint: Path
    best_top1: float | None


@dataclass
class Row:
    """One line of the table: a group of runs (or deep ensembles of pairs of them) and its figures per seed."""

    label: str
    kind: str  # "runs" or "deep ensemble x2"
    runs: list[Path]
    values: dict[str, list[float]] = field(default_factory=dict)
    cost: dict[str, float] = field(default_factory=dict)


def flat_config(path: Path) -> dict[str, Any]:
    """`{"section.key": value}` of a run's resolved config.yaml."""
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: cannot read the run's config ({err})") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: not a run config (a mapping of sections)")
    return {f"{section}.{key}": value for section, keys in raw.items() for key, value in (keys or {}).items()}


def read_run(path: Path) -> Run:
    """The run in directory `path`; ValueError naming what is missing."""
    if not (path / "config.yaml").is_file():
        raise ValueError(f"{path}: not a run directory (no config.yaml; give trainer output directories)")
    checkpoint = resolve_checkpoint(path)
    best = None
    metrics = path / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("split") == "val" and rec.get("best_top1") is not None:
                best = rec["best_top1"]
    return Run(path, flat_config(path / "config.yaml"), checkpoint, best)


def _defining(key: str) -> bool:
    return key.split(".")[0] not in _IGNORED_SECTIONS and key not in _IGNORED_KEYS


def group_runs(runs: list[Run]) -> list[tuple[str, list[Run]]]:
    """Runs equal in every defining key, labelled by the defining keys that differ between groups (in order)."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        ident = tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in run.config.items() if _defining(k)))
        groups.setdefault(ident, []).append(run)
    keys = sorted({k for run in runs for k in run.config if _defining(k)})
    differing = [k for k in keys if len({json.dumps(r.config.get(k), sort_keys=True) for r in runs}) > 1]
    out = []
    for members in groups.values():
        label = ", ".join(f"{k}={members[0].config.get(k)}" for k in differing) or "all runs"
        out.append((label, sorted(members, key=lambda r: (r.config.get("run.seed", 0), str(r.path)))))
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value); NaN when empty."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _metric_values(result: dict) -> dict[str, float]:
    values = {}
    for column, key in METRICS:
        value = result.get(key)
        if isinstance(value, list):
            value = statistics.fmean(value) if value else None
        if value is not None:
            values[column] = float(value)
    ood = result.get("ood")
    if ood:
        for column, (score, metric) in OOD_METRICS:
            values[column] = float(ood[score][metric])
    return values


def evaluate_cached(checkpoints: list[Path], cache: Path, ood: str | None, evaluate: Callable | None = None) -> dict:
    """`python -m mixmo_dist.evaluate --temperature-scale [--ood DIR]` of `checkpoints` (several: a deep ensemble),
    from the cache when the same checkpoints were evaluated before."""
    key = hashlib.sha256(json.dumps([str(c.resolve()) for c in checkpoints] + [ood]).encode()).hexdigest()[:16]
    file = cache / f"{key}.json"
    if file.is_file():
        return json.loads(file.read_text())
    cache.mkdir(parents=True, exist_ok=True)
    args = [w for c in checkpoints for w in ("--checkpoint", str(c))] + ["--temperature-scale", "--out", str(file)]
    if ood:
        args += ["--ood", ood]
    run = evaluate or _evaluate_subprocess
    run(args)
    return json.loads(file.read_text())


def _evaluate_subprocess(args: list[str]) -> None:
    res = subprocess.run([sys.executable, "-m", "mixmo_dist.evaluate", *args], capture_output=True, text=True)
    if res.returncode != 0:
        lines = [line for line in res.stderr.splitlines() if line.startswith("error:")] or res.stderr.splitlines()
        raise ValueError(f"evaluate {' '.join(args)} failed: {(lines or ['(no output)'])[-1]}")


@torch.no_grad()
def inference_cost(checkpoints: list[Path], batch: int = 32, repeats: int = 3) -> dict[str, float]:
    """Parameters, FLOPs per image and images/s of the networks of `checkpoints` (summed: an ensemble runs all)."""
    from torch.utils.flop_counter import FlopCounterMode

    params = flops = seconds = 0.0
    for ckpt in checkpoints:
        loaded = load_checkpoint(ckpt)
        net = loaded.model.eval()
        size = loaded.config.data.image_size
        params += sum(p.numel() for p in net.parameters())
        counter = FlopCounterMode(display=False)
        with counter:
            net(torch.zeros(1, 3, size, size))
        flops += counter.get_total_flops()
        images = torch.randn(batch, 3, size, size)
        net(images)  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            net(images)
        seconds += (time.perf_counter() - start) / repeats
    return {"params": params, "flops": flops, "images_per_s": batch / seconds}


def build_rows(runs: list[Run], cache: Path, ood: str | None, evaluate: Callable | None = None) -> list[Row]:
    """One row per group, plus one deep-ensemble row per group of single-member runs with at least 2 seeds."""
    rows = []
    for label, members in group_runs(runs):
        row = Row(label, "runs", [r.path for r in members])
        for run in members:
            result = evaluate_cached([run.checkpoint], cache, ood, evaluate)
            for column, value in _metric_values(result).items():
                row.values.setdefault(column, []).append(value)
            if run.best_top1 is not None:
                row.values.setdefault("best_top1", []).append(float(run.best_top1))
        row.cost = inference_cost([members[0].checkpoint])
        rows.append(row)
        if members[0].config.get("mixmo.num_members") == 1 and len(members) >= 2:
            pairs = list(itertools.combinations(members, 2))
            ens = Row(label, "deep ensemble x2", [r.path for r in members])
            for a, b in pairs:
                result = evaluate_cached([a.checkpoint, b.checkpoint], cache, ood, evaluate)
                for column, value in _metric_values(result).items():
                    ens.values.setdefault(column, []).append(value)
            ens.cost = inference_cost([pairs[0][0].checkpoint, pairs[0][1].checkpoint])
            rows.append(ens)
    return rows


COLUMNS = ["top1", "member_top1", "best_top1", "nll", "nll_ts", "ece", "ece_ts", "brier", "diversity", "aurc"]


def _columns(rows: list[Row]) -> list[str]:
    extra = [c for c, _ in OOD_METRICS if any(c in r.values for r in rows)]
    return [c for c in COLUMNS if any(c in r.values for r in rows)] + extra


def to_markdown(rows: list[Row]) -> str:
    cols = _columns(rows)
    head = ["group", "kind", "n", *cols, "params (M)", "GFLOPs/img", "img/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        n = max((len(v) for v in row.values.values()), default=0)
        cells = [row.label, row.kind, str(n)]
        for col in cols:
            values = row.values.get(col, [])
            mean, std = mean_std(values)
            # one value has no spread to show: "+- 0.0000" would claim one
            cells.append("" if math.isnan(mean) else f"{mean:.4f}" + (f" +- {std:.4f}" if len(values) > 1 else ""))
        cost = row.cost
        cells += [f"{cost['params'] / 1e6:.2f}", f"{cost['flops'] / 1e9:.3f}", f"{cost['images_per_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: list[Row], path: Path) -> None:
    cols = _columns(rows)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["group", "kind", "n", *[f"{c}_{s}" for c in cols for s in ("mean", "std")],
                         "params", "flops", "images_per_s", "runs"])  # fmt: skip
        for row in rows:
            stats = [x for c in cols for x in mean_std(row.values.get(c, []))]
            n = max((len(v) for v in row.values.values()), default=0)
            cost = row.cost
            writer.writerow([row.label, row.kind, n, *stats, cost["params"], cost["flops"], cost["images_per_s"],
                             " ".join(str(p) for p in row.runs)])  # fmt: skip


def plot(rows: list[Row], path: Path) -> None:
    """Accuracy and NLL against inference cost (FLOPs per image), one point per row with its std as error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    legend_in = 0.25 * len(rows) + 0.3  # inches under the panels for the legend, one line per row
    fig, axes = plt.subplots(1, 2, figsize=(10, 4 + legend_in))
    for ax, col, name in ((axes[0], "top1", "ensemble top-1"), (axes[1], "nll", "NLL")):
        for row in rows:
            mean, std = mean_std(row.values.get(col, []))
            x = row.cost["flops"] / 1e9
            ax.errorbar([x], [mean], yerr=[std], fmt="o" if row.kind == "runs" else "s", capsize=3,
                        label=f"{row.label} ({row.kind})")  # fmt: skip
        ax.set_xlabel("GFLOPs per image")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    # Group labels are long (the keys in which groups differ): one legend under both panels, never over the points.
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=1, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, legend_in / (4 + legend_in), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
