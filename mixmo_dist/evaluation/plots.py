"""PNG curves of a run (from its metrics.jsonl) and a reliability diagram (from an evaluation JSON).

- `curves_loss.png`: training loss and the per-member losses `loss_member_<m>` against the step;
- `curves_lr.png`: learning rate against the step;
- `curves_throughput.png`: training images per second against the step;
- `curves_val_top1.png`: validation top-1 of the ensemble and of each member (`member_top1`) against the step;
- `reliability.png` from an evaluation JSON with a `reliability` entry (see `mixmo_dist.evaluation.metrics`).

matplotlib is the optional extra `plot` (`pip install 'mixmo_dist[plot]'`); it is imported only here, with the
non-interactive Agg backend, so headless jobs never need a display.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

_MEMBER_LOSS = re.compile(r"^loss_member_(\d+)$")
_RELIABILITY_KEYS = ("bin_lower", "bin_upper", "accuracy", "confidence", "count")


def _pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or a clear error naming the missing extra."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError(
            "mixmo_dist.plot needs matplotlib, the optional extra 'plot': pip install 'mixmo_dist[plot]'"
        ) from exc
    matplotlib.use("Agg")  # headless: never try to open a display
    import matplotlib.pyplot as plt

    return plt


def read_metrics(path: Path) -> list[dict]:
    """Records of a metrics.jsonl file.

    Args:
        path: the JSON-lines file.

    Returns:
        one dict per non-blank line, in file order.

    Raises:
        ValueError: the file is missing or empty, a line is not a JSON object, or lacks `split` / `step`.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"metrics file {path} does not exist (is RUN_DIR the run's output directory?)")
    records = []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from exc
            if not isinstance(record, dict) or "split" not in record or "step" not in record:
                raise ValueError(f"{path}:{line_no}: expected a JSON object with 'split' and 'step'")
            records.append(record)
    if not records:
        raise ValueError(f"metrics file {path} is empty: nothing to plot")
    return records


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the records that hold a finite number under `key`."""
    points = [
        (r["step"], r[key])
        for r in records
        if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) and math.isfinite(r[key])
    ]
    return [p[0] for p in points], [p[1] for p in points]


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


def _line_plot(series: dict[str, tuple[list, list]], ylabel: str, title: str, path: Path, log_y: bool = False) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, label=label, marker="o" if len(xs) < 30 else None, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log_y:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    if len(series) > 1:
        ax.legend()
    return _save(fig, path)


def plot_curves(records: list[dict], out_dir: Path) -> list[Path]:
    """Write the training/validation curve PNGs into `out_dir`.

    Args:
        records: metrics.jsonl records (`read_metrics`).
        out_dir: destination directory.

    Returns:
        the PNG paths written (a curve whose metric appears in no record is skipped).

    Raises:
        ValueError: no record holds any plottable metric.
    """
    out_dir = Path(out_dir)
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    written = []

    losses = {"loss": _series(train, "loss")}
    members = sorted({int(m.group(1)) for r in train for k in r if (m := _MEMBER_LOSS.match(k))})
    losses.update({f"member {i}": _series(train, f"loss_member_{i}") for i in members})
    losses = {k: v for k, v in losses.items() if v[0]}
    if losses:
        written.append(_line_plot(losses, "training loss", "loss", out_dir / "curves_loss.png"))
    lr = _series(train, "lr")
    if lr[0]:
        written.append(_line_plot({"lr": lr}, "learning rate", "learning rate", out_dir / "curves_lr.png"))
    speed = _series(train, "img_per_s")
    if speed[0]:
        path = out_dir / "curves_throughput.png"
        written.append(_line_plot({"img/s": speed}, "images / s", "training throughput", path))

    top1 = {"ensemble": _series(val, "top1")}
    num_members = max((len(r["member_top1"]) for r in val if isinstance(r.get("member_top1"), list)), default=0)
    for i in range(num_members):
        points = [(r["step"], r["member_top1"][i]) for r in val
                  if isinstance(r.get("member_top1"), list) and len(r["member_top1"]) > i]  # fmt: skip
        top1[f"member {i}"] = ([p[0] for p in points], [p[1] for p in points])
    # Metrics are fractions in [0, 1]; papers report percent.
    top1 = {k: (xs, [100 * y for y in ys]) for k, (xs, ys) in top1.items() if xs}
    if top1:
        written.append(_line_plot(top1, "top-1 accuracy (%)", "validation top-1", out_dir / "curves_val_top1.png"))
    if not written:
        raise ValueError("no plottable metric (loss, lr, img_per_s, top1) in the metrics records")
    return written


def read_reliability(path: Path) -> dict:
    """The `reliability` entry of an evaluation JSON, validated.

    Raises:
        ValueError: the file is missing, not JSON, or its `reliability` entry is missing or malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"evaluation file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"evaluation file {path} is not valid JSON ({exc.msg})") from exc
    rel = data.get("reliability") if isinstance(data, dict) else None
    if not isinstance(rel, dict):
        raise ValueError(f"evaluation file {path} has no 'reliability' object (write it with mixmo_dist.evaluate)")
    missing = [k for k in _RELIABILITY_KEYS if not isinstance(rel.get(k), list)]
    if missing:
        raise ValueError(f"evaluation file {path}: reliability lacks the list(s) {missing}")
    if len({len(rel[k]) for k in _RELIABILITY_KEYS}) != 1 or not rel["count"]:
        raise ValueError(f"evaluation file {path}: reliability lists must be non-empty and of equal length")
    return {**rel, "ece": data.get("ece"), "top1": data.get("top1")}


def plot_reliability(reliability: dict, path: Path) -> Path:
    """Reliability diagram: per-bin accuracy against the diagonal, gap to the mean confidence, and bin counts.

    Args:
        reliability: `read_reliability` output (bin_lower, bin_upper, accuracy, confidence, count; optional ece).
        path: the PNG to write.
    """
    plt = _pyplot()
    lower, upper = reliability["bin_lower"], reliability["bin_upper"]
    width = [hi - lo for lo, hi in zip(lower, upper)]
    filled = [i for i, c in enumerate(reliability["count"]) if c]  # empty bins have no accuracy
    acc = [reliability["accuracy"][i] for i in filled]
    conf = [reliability["confidence"][i] for i in filled]
    fig, (ax, ax_count) = plt.subplots(2, 1, figsize=(5.5, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    lower_f, width_f = [lower[i] for i in filled], [width[i] for i in filled]
    ax.bar(lower_f, acc, width=width_f, align="edge", edgecolor="black", color="tab:blue", label="accuracy")
    gap = [c - a for a, c in zip(acc, conf)]
    ax.bar(lower_f, gap, bottom=acc, width=width_f, align="edge", color="tab:red", alpha=0.3, hatch="//", label="gap")
    ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    title = "reliability"
    if isinstance(reliability.get("ece"), (int, float)):
        title += f" (ECE {100 * reliability['ece']:.2f}%)"
    ax.set_title(title)
    ax.legend(loc="upper left")
    ax_count.bar(lower, reliability["count"], width=width, align="edge", edgecolor="black", color="tab:gray")
    ax_count.set_xlabel("confidence")
    ax_count.set_ylabel("samples")
    return _save(fig, path)
