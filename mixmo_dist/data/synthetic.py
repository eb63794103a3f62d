"""The synthetic backend: random normalised images generated once on the device, for throughput runs and smoke tests.

Shape legend: U unique images per rank per step, P pool size, S image side.

It follows the same contract as the folder backends (same epoch plan, same per-rank sharding, same state_dict),
but reads nothing from disk and decodes nothing, so it measures the training step alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mixmo_dist.config import DataConfig
from mixmo_dist.runtime.seeds import derive_seed

from .placement import Placement
from .plan import EpochPlan

if TYPE_CHECKING:
    from . import Data

# Device memory held by the image pool; samples beyond it reuse pool images (sample i shows image i mod P), so a
# large synthetic_size costs labels only.
_POOL_BYTES = 256 * 2**20
# The val split is a tenth of synthetic_size (at least one sample).
_VAL_FRACTION = 10


class _SyntheticPool:
    """Seeded random images (float32 [P,3,S,S], already normalised: N(0,1)) on the device."""

    def __init__(self, num_samples: int, *, image_size: int, seed: int, device: torch.device, channels_last: bool):
        per_image = 3 * image_size * image_size * 4
        size = max(1, min(num_samples, _POOL_BYTES // per_image))
        gen = torch.Generator(device=device).manual_seed(derive_seed(seed, 0x5E7))
        images = torch.randn(size, 3, image_size, image_size, generator=gen, device=device)
        self.images_P3SS = images
        self.gen = gen
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def labels(self, num: int, num_classes: int) -> Tensor:
        """int64 [num] uniform random labels on the device (drawn from the pool's generator, in call order)."""
        return torch.randint(num_classes, (num,), generator=self.gen, device=self.images_P3SS.device)

    def take(self, indices: Tensor) -> Tensor:
        """Images float32 [len(indices),3,S,S] of samples `indices` (a fresh tensor, layout of the pool)."""
        # index_select returns NCHW-contiguous whatever the pool's layout, hence the explicit format.
        picked = self.images_P3SS.index_select(0, indices % self.images_P3SS.shape[0])
        return picked.contiguous(memory_format=self.memory_format)


class SyntheticTrain(EpochPlan):
    """Train batches (images float32 [U*V,3,S,S], labels int64 [U], on the device) of one rank.

    Nothing is augmented here: the V views of an image (`views`) are copies of it, which keeps the contract's
    shapes (and the cost of moving V times more rows) without pretending to crop.
    """

    def __init__(
        self,
        pool: _SyntheticPool,
        labels_N: Tensor,
        *,
        unique_per_rank: int,
        rank: int,
        world_size: int,
        seed: int,
        views: int = 1,
    ) -> None:
        super().__init__(
            labels_N.shape[0], unique_per_rank=unique_per_rank, rank=rank, world_size=world_size, seed=seed
        )
        self._pool = pool
        self._labels_N = labels_N
        self._views = views

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        epoch, start = self.begin_pass()
        device = self._labels_N.device
        indices_SU = self.rank_indices(epoch).to(device)
        for step in range(start, self.steps):
            idx_U = indices_SU[step]
            self.advance()
            yield self._pool.take(idx_U.repeat_interleave(self._views)), self._labels_N[idx_U]


class SyntheticVal:
    """Val batches of one rank: samples rank::world_size of the synthetic val split, last batch short."""

    def __init__(
        self, pool: _SyntheticPool, labels_N: Tensor, first_index: int, *, batch_size: int, rank: int, world_size: int
    ) -> None:
        # Val images come after the train ones in the pool's index space, so they differ from train images
        # whenever the pool is large enough to hold both.
        self._indices = torch.arange(labels_N.shape[0], device=labels_N.device)[rank::world_size]
        self._pool = pool
        self._labels_N = labels_N
        self._first = first_index
        self._batch_size = batch_size

    @property
    def num_samples(self) -> int:
        """Samples this rank evaluates."""
        return self._indices.shape[0]

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self._batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for idx_B in self._indices.split(self._batch_size):
            yield self._pool.take(idx_B + self._first), self._labels_N[idx_B]


def build_synthetic_data(cfg: DataConfig, place: Placement) -> Data:
    """Builds the synthetic backend from `cfg.synthetic_size`, `cfg.num_synthetic_classes` and `cfg.image_size`.

    Every rank generates the same pool and labels from the run seed, so the ranks agree on the dataset without
    talking. `place.mean`/`place.std` are only recorded: the images are drawn already normalised.
    """
    from . import Data

    num_train, num_classes = cfg.synthetic_size, cfg.num_synthetic_classes
    num_val = max(1, num_train // _VAL_FRACTION)
    pool = _SyntheticPool(
        num_train + num_val,
        image_size=cfg.image_size,
        seed=place.seed,
        device=place.device,
        channels_last=place.channels_last,
    )
    train_labels_N = pool.labels(num_train, num_classes)
    val_labels_N = pool.labels(num_val, num_classes)
    world = dict(rank=place.rank, world_size=place.world_size)
    train = SyntheticTrain(
        pool,
        train_labels_N,
        unique_per_rank=place.unique_per_rank,
        seed=place.seed,
        views=place.views_per_image,
        **world,
    )
    val = SyntheticVal(pool, val_labels_N, num_train, batch_size=place.val_batch_size, **world)
    return Data(
        train=train,
        val=val,
        classes=[f"class_{k:03d}" for k in range(num_classes)],
        mean=place.mean,
        std=place.std,
        num_train=num_train,
        num_val=num_val,
        backend="synthetic",
    )
