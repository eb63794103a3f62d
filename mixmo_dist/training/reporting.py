"""Run reporting on rank 0: metrics.jsonl + metrics.csv (cut back on resume), progress bar or lines."""

from __future__ import annotations

import csv
import json
import logging
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

from mixmo_dist import __version__
from mixmo_dist.config import Config, config_to_dict
from mixmo_dist.runtime.files import atomic_path, write_text_atomic
from mixmo_dist.runtime.threads import current_choice

log = logging.getLogger("mixmo_dist")


def _flatten(record: dict) -> dict:
    """Lists become numbered columns for the CSV (member_top1 -> member_top1_0, member_top1_1, ...)."""
    flat = {}
    for key, value in record.items():
        if isinstance(value, list):
            for i, item in enumerate(value):
                flat[f"{key}_{i}"] = item
        elif not isinstance(value, dict):
            flat[key] = value
    return flat


class MetricsLog:
    """`metrics.jsonl` (one flat JSON object per line) and `metrics.csv` with a fixed header.

    The CSV header is fixed when the run starts (train and val columns, one per member), so lines are appended
    rather than the file rewritten.
    """

    def __init__(self, output_dir: Path, columns: list[str]):
        self.jsonl = output_dir / "metrics.jsonl"
        self.csv = output_dir / "metrics.csv"
        self.columns = columns

    def truncate_after(self, step: int) -> int:
        """Drop lines with a step beyond `step` (a resumed run rewrites them); returns how many were dropped."""
        kept, dropped = [], 0
        if self.jsonl.exists():
            for line in self.jsonl.read_text().splitlines():
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill: drop it
                    dropped += 1
                    continue
                if rec.get("step", 0) > step:
                    dropped += 1
                else:
                    kept.append(rec)
        self._rewrite(kept)
        return dropped

    def _rewrite(self, records: list[dict]) -> None:
        write_text_atomic(self.jsonl, "".join(json.dumps(r) + "\n" for r in records))
        with atomic_path(self.csv) as tmp, tmp.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.columns, extrasaction="ignore")
            writer.writeheader()
            for rec in records:
                writer.writerow(_flatten(rec))

    def append(self, record: dict) -> None:
        with self.jsonl.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        with self.csv.open("a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=self.columns, extrasaction="ignore").writerow(_flatten(record))


class BestValidation:
    """The best validation top-1 so far and its step, recorded beside the last; never acted upon.

    The paper's tables report the best test epoch; a run keeps training to its last step, and export and evaluate
    read the last checkpoint unless told otherwise, so this figure only tells a reader where the best epoch was.
    It is part of the trainer's counters (`Trainer.state_dict`), so a requeued run keeps it.

    Args:
        split: what the validation loader reads (`Data.val_split`: "test" for CIFAR), stored with the figure.
    """

    def __init__(self, split: str) -> None:
        self.split = split
        self.top1: float | None = None
        self.step: int | None = None

    def update(self, step: int, top1: float) -> None:
        """Take the result of the validation at `step` (ties keep the earlier step)."""
        if self.top1 is None or top1 > self.top1:
            self.top1, self.step = float(top1), int(step)

    def record(self) -> dict:
        """The fields a val record carries: best_top1, best_step and val_split."""
        return {"best_top1": self.top1, "best_step": self.step, "val_split": self.split}

    def state_dict(self) -> dict:
        return {"best_top1": self.top1, "best_step": self.step}

    def load_state_dict(self, state: dict) -> None:
        """Restore from a checkpoint's counters (one written before the figure existed restores "none yet")."""
        self.top1, self.step = state.get("best_top1"), state.get("best_step")


def metric_columns(num_members: int) -> list[str]:
    members = range(num_members)
    train = [
        "loss",
        *[f"loss_member_{m}" for m in members],
        "lr",
        "img_per_s",
        "unique_img_per_s",
        "data_time",
        "compute_time",
        "kappa_mean",
        "cut_share",
        "cut_prob",
        "grad_norm",
        "nonfinite_skipped",
    ]
    val = [
        "top1",
        "top5",
        "nll",
        "ece",
        "brier",
        "prob_ensemble_top1",
        "prob_ensemble_nll",
        "prob_ensemble_ece",
        *[f"member_top1_{m}" for m in members],
        *[f"member_nll_{m}" for m in members],
        "diversity",
        "disagreement",
        "count",
        "best_top1",
        "best_step",
        "val_split",
    ]
    return ["split", "step", "epoch", *train, *val]


class Progress:
    """A one-line progress bar on a TTY, otherwise a log line every `every` steps (rank 0 only)."""

    def __init__(self, total_steps: int, start_step: int, mode: str, every: int):
        tty = sys.stderr.isatty()
        self.bar = mode == "bar" or (mode == "auto" and tty)
        self.total = total_steps
        self.every = every
        self.start_step = start_step
        self.t0 = time.monotonic()

    def update(self, step: int, rec: dict) -> None:
        if not self.bar and step % self.every != 0:
            return
        done = step - self.start_step
        elapsed = time.monotonic() - self.t0
        eta = elapsed / max(done, 1) * (self.total - step)
        text = (
            f"step {step}/{self.total} ep {rec['epoch']:.2f} loss {rec['loss']:.4f} lr {rec['lr']:.4g} "
            f"{rec['img_per_s']:.0f} img/s data {rec['data_time'] * 1e3:.0f}ms "
            f"compute {rec['compute_time'] * 1e3:.0f}ms "
            f"ETA {_hms(eta)}"
        )
        if self.bar:
            width = 24
            filled = int(width * step / max(self.total, 1))
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {text}   ")
            sys.stderr.flush()
        else:
            log.info(text)

    def close(self) -> None:
        if self.bar:
            sys.stderr.write("\n")


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def run_info(
    cfg: Config, accelerator, model: torch.nn.Module, data, hosts: list[str], plan: dict, num_threads: list[int]
) -> dict:
    """The content of `run.json`: where and how the run trains (world, device, threads per rank, data, plan, config);
    `num_threads_from` says how rank 0 chose its count (`runtime/threads.py`)."""
    device = accelerator.device
    cuda_name = f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""
    return {
        "world_size": accelerator.num_processes,
        "hosts": hosts,
        "device": str(device) + cuda_name,
        "mixed_precision": str(accelerator.mixed_precision),
        "num_threads": num_threads,
        "num_threads_from": current_choice().source,
        "num_params": sum(p.numel() for p in model.parameters()),
        "version": __version__,
        "git_commit": git_commit(),
        "backend": data.backend,
        "classes": list(data.classes),
        "normalization": {"mean": list(data.mean), "std": list(data.std)},
        "num_train": data.num_train,
        "num_val": data.num_val,
        "plan": plan,
        "config": config_to_dict(cfg),
    }


def git_commit() -> str | None:
    """The commit of the checkout this package runs from, or None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None
