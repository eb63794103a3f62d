"""Run reporting on rank 0: metrics.jsonl + metrics.csv (cut back on resume), progress bar or lines."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from mixmo_dist import __version__
from mixmo_dist.config import Config, config_to_dict
from mixmo_dist.runtime.files import atomic_path, naming_the_file, write_text_atomic
from mixmo_dist.runtime.threads import current_choice

log = logging.getLogger("mixmo_dist")


def flatten_record(record: dict) -> dict:
    """Lists become numbered columns for the CSV and the trackers (member_top1 -> member_top1_0, member_top1_1, ...)."""
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
        self.val_steps: set[int] = set()  # steps of the val rows kept by the last `truncate_after`
        self.kept: list[dict] = []  # the rows kept by the last `truncate_after` (what the trackers may lack)

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
        self.val_steps = {rec.get("step") for rec in kept if rec.get("split") == "val"}
        self.kept = kept
        self._rewrite(kept)
        return dropped

    def set_aside(self) -> list[Path]:
        """Before a start from step 0: keep the rows of an earlier run in this directory as
        `metrics.jsonl.superseded-<UTC time>` (and the CSV beside it) instead of cutting them, with a warning.

        A fresh start (`checkpoint.resume=never`, or no checkpoint yet) would otherwise drop every row, as a
        resume drops the rows past its step; those rows may be the only record of the earlier run. Returns the
        kept files.
        """
        try:
            has_rows = any(line.strip() for line in self.jsonl.read_text().splitlines())
        except FileNotFoundError:
            return []
        if not has_rows:
            return []
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        kept = []
        for path in (self.jsonl, self.csv):
            if path.exists():
                target = path.with_name(f"{path.name}.superseded-{stamp}")
                os.rename(path, target)
                kept.append(target)
        log.warning(
            "starting from step 0 in %s, which holds the metrics of an earlier run: kept as %s",
            self.jsonl.parent,
            " and ".join(p.name for p in kept),
        )
        return kept

    def _rewrite(self, records: list[dict]) -> None:
        with naming_the_file(self.jsonl):
            write_text_atomic(self.jsonl, "".join(json.dumps(r) + "\n" for r in records))
        with naming_the_file(self.csv), atomic_path(self.csv) as tmp, tmp.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.columns, extrasaction="ignore")
            writer.writeheader()
            for rec in records:
                writer.writerow(flatten_record(rec))

    def append(self, record: dict) -> None:
        """Append one record to both files, each line whole or not at all (a full disk leaves no half line).

        Raises:
            OSError: naming the file that could not be written.
        """
        buf = io.StringIO(newline="")
        csv.DictWriter(buf, fieldnames=self.columns, extrasaction="ignore").writerow(flatten_record(record))
        _append_whole(self.jsonl, json.dumps(record) + "\n")
        _append_whole(self.csv, buf.getvalue())


def _append_whole(path: Path, text: str) -> None:
    """Append `text` to `path`; on a failed write (ENOSPC mid-line) the file is cut back to its previous end."""
    data = text.encode()
    with naming_the_file(path):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            start = os.lseek(fd, 0, os.SEEK_END)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            except OSError:
                os.ftruncate(fd, start)
                raise
        finally:
            os.close(fd)


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
        # What the GPU computes float32 matmuls and convolutions in (run.tf32): fp32 means fp32 only when this is off.
        "tf32": bool(torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32),
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
