"""Benchmark: training images per second of the DALI CPU backend against the torchvision DataLoader backend.

Both backends are built through `mixmo_dist.data.build_data` on the same folder of ~500x375 natural-photo JPEGs
(`benchmarks/photos.py`, cached in data/bench_photos/), with the same augmentation (RandomResizedCrop 224,
scale (0.08, 1), horizontal flip, normalisation, channels_last) and the same CPU budget: 2 DALI threads against
2 DataLoader worker processes. The rate is measured over whole epochs (pipeline / worker start-up included, as a
trainer sees it) after one warm-up epoch; the epochs of the two backends alternate and each keeps its best, so a
burst of load from another process does not decide the ratio.

    python -m benchmarks.bench_data [--quick]
"""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks import cpu_placement, quick_main, unique_images_per_s
from benchmarks.photos import make_bench_photos
from mixmo_dist.config import DataConfig
from mixmo_dist.data import build_data

__all__ = ["run"]

_CACHE = Path(__file__).resolve().parents[1] / "data" / "bench_photos"
_IMAGE_SIZE = 224
_BATCH = 64
_WORKERS = 2  # DALI threads for dali-cpu, DataLoader workers for torch


def run(quick: bool = False, root: Path | str | None = None) -> dict:
    """Measures both backends.

    Args:
        quick: fewer photos and rounds (a smoke run of the benchmark, not a measurement to quote).
        root: photo cache folder; data/bench_photos/ (quick: data/bench_photos_quick/) of the repository if None.
    Returns:
        {"dali_vs_torch": dali / torch rate, "dali_img_per_s": ..., "torch_img_per_s": ...}.
    """
    num_train, rounds = (256, 1) if quick else (1536, 3)
    if root is None:
        root = _CACHE.with_name(_CACHE.name + "_quick") if quick else _CACHE
    root = make_bench_photos(root, num_train=num_train)
    # The main process only iterates; its intra-op threads would compete with the 2 decoding threads/workers.
    torch.set_num_threads(1)
    loaders = {}
    for backend in ("dali-cpu", "torch"):
        cfg = DataConfig(
            root=str(root),
            backend=backend,
            image_size=_IMAGE_SIZE,
            train_crop="random_resized",
            min_crop_scale=0.08,
            hflip=True,
            dali_threads=_WORKERS,
            dali_prefetch=2,
            num_workers=_WORKERS,
        )
        place = cpu_placement(_BATCH)
        data = build_data(cfg, place)
        loaders[backend] = data.train
        unique_images_per_s(data.train)  # warm-up: page cache, imports, first pipeline / worker start
    best = {backend: 0.0 for backend in loaders}
    for _ in range(rounds):
        for backend, loader in loaders.items():
            best[backend] = max(best[backend], unique_images_per_s(loader))
    result = {
        "dali_vs_torch": best["dali-cpu"] / best["torch"],
        "dali_img_per_s": best["dali-cpu"],
        "torch_img_per_s": best["torch"],
    }
    print(
        f"data loading, {num_train} photos ~500x375 -> RandomResizedCrop {_IMAGE_SIZE} + flip, batch {_BATCH}, "
        f"{_WORKERS} DALI threads vs {_WORKERS} DataLoader workers, best of {rounds} epoch(s):\n"
        f"  dali-cpu {result['dali_img_per_s']:8.1f} img/s\n"
        f"  torch    {result['torch_img_per_s']:8.1f} img/s\n"
        f"  ratio    {result['dali_vs_torch']:8.2f}x"
    )
    return result


def main(argv: list[str] | None = None) -> int:
    return quick_main(run, "python -m benchmarks.bench_data", __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
