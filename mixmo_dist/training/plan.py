"""The derived sizes of a run: rows per rank, steps, the scaled LR (computed here, logged, never written back)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from mixmo_dist.config import Config, ConfigError, DataConfig
from mixmo_dist.data import Placement, timm_mean_std
from mixmo_dist.training.optim import scaled_lr

log = logging.getLogger("mixmo_dist")


@dataclass(frozen=True)
class Plan:
    """Derived sizes and lengths of a run (logged in run.json and stored in checkpoints)."""

    world_size: int
    rows_per_rank: int
    unique_per_rank: int
    views_per_image: int
    grad_accum_steps: int
    micro_batches_per_epoch: int
    steps_per_epoch: float
    total_steps: int
    stop_step: int
    unique_per_step: int
    lr: float
    eval_every_steps: int


def rows_per_rank(data_cfg: DataConfig, world_size: int) -> int:
    """Rows per rank per micro-batch: `data.batch_size`, or `data.global_batch_size / world size`."""
    if data_cfg.global_batch_size is None:
        return data_cfg.batch_size
    if data_cfg.global_batch_size % world_size:
        raise ConfigError(
            f"config key data.global_batch_size: {data_cfg.global_batch_size} rows are not divisible by the world "
            f"size {world_size}"
        )
    return data_cfg.global_batch_size // world_size


def views_per_image(cfg: Config) -> int:
    """V, the augmented views the loader makes of each unique image: one per copy (b x M, each copy of the image in
    each member) under `data.copy_augmentation=per_copy`, else 1."""
    if cfg.data.copy_augmentation == "per_copy":
        return cfg.mixmo.batch_repetitions * cfg.mixmo.num_members
    return 1


def build_plan(cfg: Config, world_size: int, micro_batches_per_epoch: int) -> Plan:
    """The plan of a run of `cfg` on `world_size` ranks whose loader yields `micro_batches_per_epoch` per epoch."""
    rows = rows_per_rank(cfg.data, world_size)
    reps = cfg.mixmo.batch_repetitions
    if rows % reps:
        raise ConfigError(f"config key mixmo.batch_repetitions: {reps} does not divide the {rows} rows per rank")
    accum = cfg.optim.grad_accum_steps
    steps_per_epoch = micro_batches_per_epoch / accum
    total = max(1, math.ceil(cfg.schedule.epochs * steps_per_epoch))
    stop = total if cfg.schedule.max_steps is None else min(total, cfg.schedule.max_steps)
    unique_per_step = rows // reps * world_size * accum
    return Plan(
        world_size=world_size,
        rows_per_rank=rows,
        unique_per_rank=rows // reps,
        views_per_image=views_per_image(cfg),
        grad_accum_steps=accum,
        micro_batches_per_epoch=micro_batches_per_epoch,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        stop_step=stop,
        unique_per_step=unique_per_step,
        lr=scaled_lr(cfg.optim.lr, cfg.optim.lr_reference_batch, unique_per_step),
        eval_every_steps=max(1, round(cfg.eval.every_n_epochs * steps_per_epoch)),
    )


def warn_if_batch_exceeds_data(cfg: Config, plan: Plan, num_train: int) -> None:
    """Warn when one step's batch holds more unique images than the training split: the epoch plan then wraps
    inside the step, so the batch repeats images on top of `mixmo.batch_repetitions` (a small or wrong data.root,
    or a batch size meant for another dataset); training works, so this is a warning, not an error."""
    unique = plan.unique_per_rank * plan.world_size
    if unique <= num_train:
        return
    key = "data.batch_size" if cfg.data.global_batch_size is None else "data.global_batch_size"
    value = cfg.data.batch_size if cfg.data.global_batch_size is None else cfg.data.global_batch_size
    log.warning(
        "config key %s=%d: a step reads %d unique images (%d rows per rank / mixmo.batch_repetitions=%d x %d ranks), "
        "more than the %d training images of data.root=%s: every step repeats images within its batch",
        *(key, value, unique, plan.rows_per_rank, cfg.mixmo.batch_repetitions, plan.world_size),
        *(num_train, cfg.data.root),
    )


def data_placement(cfg: Config, rank: int, world_size: int, device: torch.device) -> Placement:
    """Where and what the data builders of `cfg` deliver on this rank (rows, views, layout, normalisation)."""
    rows = rows_per_rank(cfg.data, world_size)
    mean, std = timm_mean_std(cfg.model.arch)
    return Placement(
        rank=rank,
        world_size=world_size,
        seed=cfg.run.seed,
        device=device,
        unique_per_rank=max(1, rows // cfg.mixmo.batch_repetitions),
        views_per_image=views_per_image(cfg),
        val_batch_size=cfg.data.val_batch_size or rows,
        channels_last=cfg.model.channels_last,
        mean=mean,
        std=std,
    )
