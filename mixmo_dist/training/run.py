"""One training run from its command-line words: config -> runtime -> Trainer -> fit. Used by `python -m
mixmo_dist.train` and by submitit's `TrainJob`."""

from __future__ import annotations

import contextlib
from pathlib import Path

from mixmo_dist.config import load_config
from mixmo_dist.model.sync_bn import require_cuda_for_sync_bn
from mixmo_dist.runtime.accelerator import build_accelerator, die_with_parent
from mixmo_dist.runtime.collectives import StopAllRanks
from mixmo_dist.runtime.faults import PeerLost, end_rank_after_fault
from mixmo_dist.runtime.logs import setup_logging
from mixmo_dist.runtime.startup import STARTUP
from mixmo_dist.runtime.threads import set_intra_op_threads
from mixmo_dist.training.trainer import Trainer

# `run` raises StopAllRanks; its callers outside training (the submitit job) catch it from here.
__all__ = ["StopAllRanks", "run"]


def run(argv: list[str]) -> str:
    """Train with the config that `argv` describes. Returns "completed", "preempted" or "interrupted".

    Raises:
        ConfigError, CheckpointError, ValueError: user errors that every rank meets alike (bad config, checkpoint
            mismatch, unwritable output directory).
        StopAllRanks: a user error one rank may meet alone (missing data, a corrupt image), agreed by every rank;
            its `report` is set on the one rank that should print it.

    A lost peer (a collective timed out or broke) does not return: the rank prints its line, requeues the SLURM job
    where it runs in one and exits 75 (`runtime.faults.end_rank_after_fault`).
    """
    STARTUP.mark("imports")
    cfg = load_config(argv)
    die_with_parent()
    accelerator = build_accelerator(
        cfg.run.mixed_precision,
        output_dir=cfg.run.output_dir,
        trackers=cfg.log.all_trackers,
        startup_timeout_s=cfg.fault.startup_timeout_s,
        tf32=cfg.run.tf32,
    )
    set_intra_op_threads(cfg.run.num_threads)  # after the Accelerator, which may set its own count
    setup_logging(accelerator.is_main_process)
    STARTUP.mark("runtime")
    # Stop the trackers and tear the process group down before the interpreter exits: left to the interpreter's
    # shutdown after an error every rank agreed on, gloo's threads can outlive it and abort the rank ("terminate
    # called without an active exception", exit -6) after its one-line error was printed.
    try:
        status = _fit(cfg, accelerator)
    except KeyboardInterrupt:
        raise  # a second Ctrl-C leaves at once: a teardown could wait on a collective that another rank never joins
    except PeerLost as err:
        end_rank_after_fault(err, Path(cfg.run.output_dir), cfg.fault.max_requeues)
    except BaseException:
        with contextlib.suppress(Exception):  # the error being raised is the one to report, not a teardown's
            accelerator.end_training()
        raise
    accelerator.end_training()
    return status


def _fit(cfg, accelerator) -> str:
    if cfg.model.sync_bn:
        require_cuda_for_sync_bn(accelerator.device)  # before the output directory is created
    trainer = Trainer(cfg, accelerator)
    drain = True
    try:
        return trainer.fit()
    except (KeyboardInterrupt, PeerLost):
        drain = False  # a second Ctrl-C and a lost peer leave at once; a resume sends what the trackers lack
        raise
    finally:
        trainer.close(drain_trackers=drain)
