"""Entry point `python -m mixmo_dist.submit`: submit training with submitit (SLURM or local), requeue on preemption.

    python -m mixmo_dist.submit --config FILE [--slurm.key=value ...] [--section.key=value ...]
        [--cluster=slurm|local] [--wait]

The `slurm` section of the config sizes the job (one task per GPU; `gpus_per_node: 0` requests no GPU at all); the
job itself is `mixmo_dist.cluster.submitit_job.TrainJob`.
"""

from __future__ import annotations

import argparse
import sys

import submitit

from mixmo_dist.cluster.submitit_job import TrainJob, build_executor, job_outcome, submit_clean, wait_for_job
from mixmo_dist.config import ConfigError, load_config


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Split the submitter's own flags from the trainer's words."""
    parser = argparse.ArgumentParser(
        prog="python -m mixmo_dist.submit",
        description="Submit mixmo_dist training with submitit. Other arguments are trainer config words "
        "(--config FILE, --section.key=value); the slurm section sizes the job.",
    )
    parser.add_argument("--cluster", choices=("slurm", "local"), default="slurm", help="executor (default: slurm)")
    parser.add_argument("--wait", action="store_true", help="block until the job ends; exit 0 only on success")
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Validate the config, submit, print the job id and logs; with --wait return 0 only if training completed."""
    args, train_argv = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        cfg = load_config(train_argv)
        executor = build_executor(cfg, args.cluster)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        job = submit_clean(executor, TrainJob(train_argv))
    except submitit.core.utils.FailedJobError as err:  # sbatch refused the job; its stderr says why
        print(f"error: submission failed: {err}", file=sys.stderr)
        return 1
    first = job.task(0).paths
    print(f"submitted job {job.job_id} ({args.cluster}, {job.num_tasks} tasks)", flush=True)
    print(f"stdout: {first.stdout}\nstderr: {first.stderr}", flush=True)
    if not args.wait:
        return 0
    wait_for_job(job, args.cluster)
    ok, message = job_outcome(job)
    print(f"job {job.job_id}: {message}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
