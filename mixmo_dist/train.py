"""Entry point: `accelerate launch -m mixmo_dist.train --config configs/X.yaml [--section.key=value ...]`.

Parses the config, builds the runtime and the Trainer, runs it. No training logic lives here. `--help [SECTION]`,
`--print-config` and words the config refuses are answered before anything is built (see `mixmo_dist.config.cli`).
"""

from __future__ import annotations

import logging
import sys

from mixmo_dist.config import ConfigError
from mixmo_dist.config.cli import answer_without_training, is_global_rank_zero

log = logging.getLogger("mixmo_dist")

PROG = "python -m mixmo_dist.train"


# Exit status of a run stopped by Ctrl-C after saving (the shell's convention for SIGINT: 128 + 2).
EXIT_INTERRUPTED = 130


def main(argv: list[str] | None = None) -> int:
    """Command-line wrapper: a user error prints one `error: ...` line, once per run, and exits 2 on every rank;
    a preempted run exits 0 (it is requeued); a run stopped by Ctrl-C saves and exits 130, and a second Ctrl-C exits
    130 at once.

    Errors that one rank finds alone (its shard's corrupt image) reach every rank as `StopAllRanks`, printed by the
    rank that found it; the other user errors arise on every rank alike (same config, same files) and global rank 0
    prints them.
    """
    argv = sys.argv[1:] if argv is None else argv
    info_status = answer_without_training(argv, prog=PROG)
    if info_status is not None:
        return info_status
    # Before torch is imported: the DataLoader workers' forkserver imports it on another core meanwhile.
    from mixmo_dist.data.forkserver import start_early

    start_early(argv)
    # Imported here, not at the top: `--help` and `--print-config` answer in a fraction of a second without torch.
    from mixmo_dist.checkpoint import CheckpointError
    from mixmo_dist.runtime.collectives import StopAllRanks
    from mixmo_dist.training.run import run

    try:
        status = run(argv)
    except StopAllRanks as err:
        if err.report:
            print(f"error: {err}", file=sys.stderr)
        return 2
    except (ConfigError, CheckpointError, ValueError) as err:
        if is_global_rank_zero():
            print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if is_global_rank_zero():
            print("interrupted: stopped without saving; the run resumes from its last checkpoint", file=sys.stderr)
        return EXIT_INTERRUPTED
    log.info("run %s", status)
    return EXIT_INTERRUPTED if status == "interrupted" else 0


if __name__ == "__main__":
    from mixmo_dist.runtime.exit import exit_now

    exit_now(main())
