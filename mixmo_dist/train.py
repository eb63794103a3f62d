"""Entry point: `accelerate launch -m mixmo_dist.train --config configs/X.yaml [--section.key=value ...]`.

Parses the config, builds the runtime and the Trainer, runs it. No training logic lives here. `--help [SECTION]`,
`--print-config` and words the config refuses are answered before anything is built (see `mixmo_dist.config.cli`).
"""

from __future__ import annotations

import logging
import os
import sys

from mixmo_dist.config import ConfigError, load_config
from mixmo_dist.config.cli import info_text

log = logging.getLogger("mixmo_dist")

PROG = "python -m mixmo_dist.train"


def _setup_logging(main_process: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if main_process else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )


def run(argv: list[str]) -> str:
    """Train with the config that `argv` describes. Returns "completed" or "preempted".

    Raises:
        ConfigError, CheckpointError, ValueError: user errors (bad config, checkpoint mismatch, bad data).
    """
    # Imported here, not at the top: `--help` and `--print-config` answer in a fraction of a second without torch.
    from mixmo_dist.runtime import build_accelerator, die_with_parent
    from mixmo_dist.trainer import Trainer

    cfg = load_config(argv)
    die_with_parent()
    accelerator = build_accelerator(
        cfg.run.mixed_precision, output_dir=cfg.run.output_dir, tensorboard=cfg.log.tensorboard
    )
    _setup_logging(accelerator.is_main_process)
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


def _answer_without_training(argv: list[str]) -> int | None:
    """`--help`, `--print-config` or words the config refuses: print on global rank 0 only and return the exit
    status; None when `argv` describes a valid run.

    Every rank reads the same words and files, so every rank gets the same answer and exits here, before torch is
    imported or any process group or Accelerator exists: under `accelerate launch` the text or the error line
    appears once.
    """
    try:
        text = info_text(argv, prog=PROG)
        if text is None:
            load_config(argv)  # run() loads it again; this only refuses bad words early, on every rank alike
            return None
    except ConfigError as err:
        if _is_global_rank_zero():
            print(f"error: {err}", file=sys.stderr)
        return 2
    if _is_global_rank_zero():
        try:
            sys.stdout.write(text if text.endswith("\n") else text + "\n")
            sys.stdout.flush()
        except BrokenPipeError:
            # `--help | head`: the reader has what it wanted; point stdout at devnull so the exit flush stays quiet.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line wrapper: user errors print one `error: ...` line and exit 2; a preempted run exits 0."""
    argv = sys.argv[1:] if argv is None else argv
    info_status = _answer_without_training(argv)
    if info_status is not None:
        return info_status
    from mixmo_dist.checkpoint import CheckpointError  # after the flags: see run()

    try:
        status = run(argv)
    except (ConfigError, CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    log.info("run %s", status)
    return 0


if __name__ == "__main__":
    sys.exit(main())
