"""Entry point `python -m mixmo_dist.submit`: submit training with submitit (SLURM or local), requeue on preemption.

    python -m mixmo_dist.submit --config FILE [--slurm.key=value ...] [--section.key=value ...]
        [--sweep section.key=V1,V2,... ...] [--cluster=slurm|local] [--wait]

The `slurm` section of the config sizes the job (one task per GPU; `gpus_per_node: 0` requests no GPU at all); the
job itself is `mixmo_dist.cluster.submitit_job.TrainJob`. With `--sweep` words (`mixmo_dist.cluster.sweep`) every
point of the grid is one job of a single SLURM job array (submitit's batch; each point sized by the slurm section,
`slurm.array_parallelism` of them at once) or one local process, trains into its own
`<run.output_dir>/<key-value_...>` directory and is preempted and requeued on its own; a failed point does not stop
the others, and `--wait` lists the points that failed.
"""

from __future__ import annotations

import argparse
import sys

import submitit

from mixmo_dist.cluster.submitit_job import TrainJob, build_executor, job_outcome, submit_clean, wait_for_job
from mixmo_dist.cluster.sweep import parse_sweeps, point_argv, point_name, sweep_points
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
    parser.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="a grid axis (repeat for more): one job per combination, each in <run.output_dir>/<key-value_...>",
    )
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Validate the config(s), submit, print the job id(s) and logs; with --wait return 0 only if every run
    completed."""
    args, train_argv = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        cfg = load_config(train_argv)
        points = sweep_points(parse_sweeps(args.sweep)) if args.sweep else []
        argvs = [point_argv(train_argv, point, cfg.run.output_dir) for point in points] or [train_argv]
        for point, words in zip(points, argvs):
            try:
                load_config(words)  # every point is valid before anything is submitted
            except ConfigError as err:
                raise ConfigError(f"sweep point {point_name(point)}: {err}") from None
        executor = build_executor(cfg, args.cluster, array=bool(points))
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        jobs = submit_clean(executor, [TrainJob(words) for words in argvs])
    except submitit.core.utils.FailedJobError as err:  # sbatch refused the job; its stderr says why
        print(f"error: submission failed: {err}", file=sys.stderr)
        return 1
    names = [point_name(point) for point in points] or [None]
    for name, job in zip(names, jobs):
        first = job.task(0).paths
        what = f" for {name}" if name else ""
        print(f"submitted job {job.job_id} ({args.cluster}, {job.num_tasks} tasks){what}", flush=True)
        print(f"stdout: {first.stdout}\nstderr: {first.stderr}", flush=True)
    if not args.wait:
        return 0
    failed = []
    for name, job in zip(names, jobs):
        wait_for_job(job, args.cluster)
        ok, message = job_outcome(job)
        print(f"job {job.job_id}{f' ({name})' if name else ''}: {message}", flush=True)
        if not ok:
            failed.append(name or job.job_id)
    if failed and points:
        print(f"{len(failed)} of {len(jobs)} sweep points failed: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
