"""One training run from its command-line words: config -> runtime -> Trainer -> fit. Used by `python -m
mixmo_dist.train` and by submitit's `TrainJob`."""

from __future__ import annotations

from mixmo_dist.config import load_config
from mixmo_dist.runtime.accelerator import build_accelerator, die_with_parent
from mixmo_dist.runtime.logs import setup_logging
from mixmo_dist.training.trainer import Trainer


def run(argv: list[str]) -> str:
    """Train with the config that `argv` describes. Returns "completed", "preempted" or "interrupted".

    Raises:
        ConfigError, CheckpointError, ValueError: user errors that every rank meets alike (bad config, checkpoint
            mismatch, unwritable output directory).
        StopAllRanks: a user error one rank may meet alone (missing data, a corrupt image), agreed by every rank;
            its `report` is set on the one rank that should print it.
    """
    cfg = load_config(argv)
    die_with_parent()
    accelerator = build_accelerator(
        cfg.run.mixed_precision, output_dir=cfg.run.output_dir, tensorboard=cfg.log.tensorboard
    )
    setup_logging(accelerator.is_main_process)
    if cfg.log.tensorboard:
        accelerator.init_trackers(cfg.run.name)
    trainer = Trainer(cfg, accelerator)
    try:
        return trainer.fit()
    finally:
        trainer.close()
