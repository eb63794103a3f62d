"""Entry point: `accelerate launch -m mixmo_dist.train --config configs/X.yaml [--section.key=value ...]`.

Parses the config, builds the runtime and the Trainer, runs it. No training logic lives here. `--help [SECTION]`,
`--print-config` and words the config refuses are answered before anything is built (see `mixmo_dist.config.cli`).
"""

from __future__ import annotations

import logging
import os
import sys

from mixmo_dist.config import ConfigError, load_config
from mixmo_dist.config.cli import answer_without_training

log = logging.getLogger("mixmo_dist")

PROG = "python -m mixmo_dist.train"


def run(argv: list[str]) -> str:
    """Train with the config that `argv` describes. Returns "completed" or "preempted".

    Raises:
        ConfigError, CheckpointError, ValueError: user errors that every rank meets alike (bad config, checkpoint
            mismatch, unwritable output directory).
        StopAllRanks: a user error one rank may meet alone (missing data, a corrupt image), agreed by every rank;
            its `report` is set on the one rank that should print it.
    """
    # Imported here, not at the top: `--help` and `--print-config` answer in a fraction of a second without torch.
    from mixmo_dist.runtime.accelerator import build_accelerator, die_with_parent
    from mixmo_dist.runtime.logs import setup_logging
    from mixmo_dist.training.trainer import Trainer

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


def _is_global_rank_zero() -> bool:
    # torchrun (under accelerate launch) exports RANK to every rank; a plain `python -m` run has none.
    return os.environ.get("RANK", "0") == "0"


def main(argv: list[str] | None = None) -> int:
    """Command-line wrapper: a user error prints one `error: ...` line, once per run, and exits 2 on every rank;
    a preempted run exits 0.

    Errors that one rank finds alone (its shard's corrupt image) reach every rank as `StopAllRanks`, printed by the
    rank that found it; the other user errors arise on every rank alike (same config, same files) and global rank 0
    prints them.
    """
    argv = sys.argv[1:] if argv is None else argv
    info_status = answer_without_training(argv, prog=PROG)
    if info_status is not None:
        return info_status
    from mixmo_dist.checkpoint import CheckpointError  # after the flags: see run()
    from mixmo_dist.runtime.collectives import StopAllRanks

    try:
        status = run(argv)
    except StopAllRanks as err:
        if err.report:
            print(f"error: {err}", file=sys.stderr)
        return 2
    except (ConfigError, CheckpointError, ValueError) as err:
        if _is_global_rank_zero():
            print(f"error: {err}", file=sys.stderr)
        return 2
    log.info("run %s", status)
    return 0


if __name__ == "__main__":
    sys.exit(main())
