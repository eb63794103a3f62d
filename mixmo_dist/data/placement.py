"""Where one rank's batches go and how big they are: the one object every data builder receives with its config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .folder import IMAGENET_MEAN, IMAGENET_STD

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True, kw_only=True)
class Placement:
    """One rank's place in the data-parallel world and the batch layout it wants.

    Attributes:
        rank, world_size: this process's global rank and the number of ranks.
        seed: the run seed (the same on every rank): epoch orders and augmentations derive from it.
        device: where batches are delivered and normalised.
        unique_per_rank: U, unique images per train batch of this rank.
        views_per_image: V, augmented views of each unique train image in a batch (1, or b*M for one view per
            copy of a MixMo batch: `data.copy_augmentation`).
        val_batch_size: rows per val batch of this rank.
        channels_last: deliver images in the channels_last memory format.
        mean, std: the normalisation (3 floats each, 0-1 units).
    """

    rank: int
    world_size: int
    seed: int
    device: torch.device | str
    unique_per_rank: int
    val_batch_size: int
    views_per_image: int = 1
    channels_last: bool = False
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        import torch  # lazily: importing the data package needs no torch (the demo generator relies on it)

        object.__setattr__(self, "device", torch.device(self.device))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside the world of size {self.world_size}")
        if self.unique_per_rank < 1 or self.val_batch_size < 1 or self.views_per_image < 1:
            raise ValueError(
                f"batch sizes must be >= 1, got unique_per_rank={self.unique_per_rank}, val={self.val_batch_size}, "
                f"views_per_image={self.views_per_image}"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean/std must be 3 values each (std > 0), got mean={self.mean} std={self.std}")
