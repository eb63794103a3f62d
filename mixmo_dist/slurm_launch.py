"""Entry point of `srun` in `slurm/imagenet_r50.sh`: `python -m mixmo_dist.slurm_launch [trainer words...]`.

Builds this node's launcher command from the SLURM environment (`mixmo_dist.cluster.slurm`) and replaces itself with
it, so the launcher is the srun task and receives SLURM's signals.

`python -m mixmo_dist.slurm_launch --after-failed-step [trainer words...]` is what the batch script runs, outside
the step, when srun failed: it requeues the job if a rank recorded that decision in the run's faults.jsonl
(`runtime.faults.requeue_after_failed_step`).
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from mixmo_dist.cluster.slurm import build_argv, launch_env, plan_from_env

AFTER_FAILED_STEP = "--after-failed-step"


def after_failed_step(words: list[str]) -> int:
    """The run's output directory from the same words as the step's, then the requeue a rank asked for, if any."""
    from mixmo_dist.config import load_config
    from mixmo_dist.runtime.faults import requeue_after_failed_step

    try:
        plan = plan_from_env(os.environ, words)
        out_dir = Path(load_config(["--config", plan.config, *plan.overrides]).run.output_dir)
    except ValueError as err:  # a ConfigError is one
        print(f"mixmo_dist.slurm_launch: no requeue after the failed step: {err}", file=sys.stderr)
        return 2
    status, line = requeue_after_failed_step(out_dir)
    print(f"mixmo_dist.slurm_launch: {line}", file=sys.stderr if status else sys.stdout, flush=True)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Build the plan from the environment and exec the launcher; returns only on a configuration error."""
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] == [AFTER_FAILED_STEP]:
        return after_failed_step(words[1:])
    try:
        plan = plan_from_env(os.environ, words)
    except ValueError as err:
        print(f"mixmo_dist.slurm_launch: error: {err}", file=sys.stderr)
        return 2
    launcher_argv = build_argv(plan)
    print(f"[slurm_launch node {plan.machine_rank}/{plan.num_machines}] {shlex.join(launcher_argv)}", flush=True)
    # The single-process launcher (no --multi_gpu) does not forward signals to its child and dies of SIGUSR2 or
    # SIGTERM, which would take the trainer down with it before it saves. Ignoring them here is inherited through
    # exec; torchrun's agent and the trainer install their own handlers, which replace SIG_IGN.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.execvpe(launcher_argv[0], launcher_argv, launch_env(os.environ))
    return 1  # unreachable: execvpe replaces the process or raises


if __name__ == "__main__":
    sys.exit(main())
