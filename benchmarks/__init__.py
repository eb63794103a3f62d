"""Benchmarks: every figure is a ratio against a baseline measured in the same run (`make bench`)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable


def quick_main(run: Callable[..., object], prog: str, doc: str, argv: list[str] | None) -> int:
    """The command line of a benchmark whose only option is `--quick`: parse `argv`, call `run(quick=...)`."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small smoke run, not a measurement")
    run(quick=parser.parse_args(argv).quick)
    return 0


def unique_images_per_s(batches) -> float:
    """Unique images per second over one pass of `batches` (an iterable of (images, labels_U): one label per
    unique image, whatever the number of views per image)."""
    unique = 0
    start = time.perf_counter()
    for _images, labels_U in batches:
        unique += labels_U.shape[0]
    return unique / (time.perf_counter() - start)


def cpu_placement(unique: int, views: int = 1):
    """A one-rank CPU placement of `unique` images per batch (`views` views each), channels_last, seed 0."""
    from mixmo_dist.data import Placement

    return Placement(
        unique_per_rank=unique,
        views_per_image=views,
        val_batch_size=unique,
        rank=0,
        world_size=1,
        seed=0,
        device="cpu",
        channels_last=True,
    )
