"""Training as a submitit job: the submitted callable (`TrainJob`), the executor, waiting for the outcome.

Each task runs the trainer in-process with the torch.distributed variables exported by submitit. When a task is
signalled (SIGUSR2 from `--signal`, `scancel -s USR2`, or SIGTERM), the trainer saves a checkpoint and returns
"preempted"; global rank 0 then hands over to submitit's own checkpoint-and-requeue handler, which pickles
`TrainJob.checkpoint()` (the same argv) and runs `scontrol requeue`, so the job restarts under the same id and the
trainer resumes from the latest checkpoint in run.output_dir. submitit's files (pickles, logs) go to
`<run.output_dir>/submitit/`. `TrainJob` is pickled by reference: it must stay importable from this module.
"""

from __future__ import annotations

import inspect
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import submitit
from submitit.core.job_environment import SignalHandler

from mixmo_dist.config import Config

# squeue states after which a job never runs again. SPECIAL_EXIT is a requeue held by an exit code that waits for a
# human, so a waiting submitter should stop too.
_TERMINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "SPECIAL_EXIT",
        "TIMEOUT",
    }
)
# After the job left the queue, how long a result file may still take to appear (shared file systems lag).
_RESULT_GRACE_S = 15.0


class TrainJob(submitit.helpers.Checkpointable):
    """The submitted callable: one instance per task, holding only the trainer's command line.

    Args:
        argv: trainer words (`--config FILE --section.key=value ...`), exactly what `mixmo_dist.training.run.run` takes.
    """

    def __init__(self, argv: list[str]) -> None:
        self.argv = list(argv)

    def __call__(self) -> str:
        """Run the trainer on this task; returns "completed", or "error: <message>" after an error every task
        stopped for (a preempted rank 0 requeues and exits instead; a lost peer requeues and exits 75)."""
        # CUDA_VISIBLE_DEVICES stays as SLURM set it: accelerate selects cuda:LOCAL_RANK itself, which would not
        # exist if each task saw only its own GPU. overwrite: a submitter's shell may have exported MASTER_PORT etc.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        # Requeueing is submitit's job here (below); the trainer's own `scontrol requeue` would requeue twice.
        os.environ.pop("MIXMO_REQUEUE_CMD", None)
        # After a lost peer or a hang there is no signal for submitit's handler to act on, and global rank 0 may be
        # the rank that is gone: every surviving task requeues the SLURM job itself (runtime/faults.py). The
        # requeued job runs the same pickled TrainJob, which resumes from run.output_dir.
        if submitit.JobEnvironment().name() == "slurm":
            os.environ["MIXMO_FAULT_REQUEUE"] = "scontrol"
        # submitit installed its checkpoint-and-requeue handler before calling us; the trainer replaces it with its
        # own (save at a step boundary first), so keep it to call once the checkpoint is on disk.
        submitit_handler = signal.getsignal(signal.SIGUSR2)
        from mixmo_dist.training.run import StopAllRanks, run  # the heavy imports (torch, timm) happen in the job only

        try:
            status = run(self.argv)
        except StopAllRanks as err:
            # An error every task stopped for together (a failed save, a corrupt image): one line in the reporting
            # task's log, and the same words as every task's result, instead of a traceback per task.
            if err.report:
                print(f"error: {err}", file=sys.stderr, flush=True)
            return f"error: {err}"
        if status == "preempted":
            _requeue(submitit_handler)
        return status

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """What submitit requeues: the same command line; the trainer resumes from run.output_dir by itself."""
        return submitit.helpers.DelayedSubmission(TrainJob(self.argv))


def _requeue(submitit_handler: Any) -> None:
    """After the trainer saved and returned "preempted": requeue from rank 0, leave quietly elsewhere.

    Never returns: rank 0 runs submitit's handler, which dumps `checkpoint()`, requeues the job (`scontrol requeue`
    on SLURM, exit code 144 for the local executor) and exits; or it raises UncompletedJobError when the requeue
    budget is spent. Other ranks exit 0 without a result file, because a stale "preempted" result would be taken for
    this task's outcome before the requeued run overwrites it; the requeue stops them anyway.
    """
    if submitit.JobEnvironment().global_rank != 0:
        sys.exit(0)
    is_submitit_handler = inspect.ismethod(submitit_handler) and isinstance(submitit_handler.__self__, SignalHandler)
    if not is_submitit_handler:
        raise RuntimeError(
            f"run was preempted but the SIGUSR2 handler found at start ({submitit_handler!r}) is not submitit's; "
            "TrainJob must run inside a submitit job to be requeued"
        )
    submitit_handler(signal.SIGUSR2, None)
    raise AssertionError("submitit's requeue handler returned")  # it always exits or raises


def executor_parameters(cfg: Config) -> dict[str, Any]:
    """AutoExecutor parameters for `cfg.slurm` (generic names plus `slurm_`-prefixed ones).

    One task per GPU (tasks_per_node defaults to max(1, gpus_per_node)); no GPU request at all when
    gpus_per_node is 0 (submitit would otherwise write `--gpus-per-node=0`, which some clusters reject).

    Returns:
        Keyword arguments for `submitit.AutoExecutor.update_parameters`; None values are left out.
    """
    s = cfg.slurm
    params: dict[str, Any] = {
        "name": s.job_name or cfg.run.name,
        "nodes": s.nodes,
        "tasks_per_node": s.tasks_per_node if s.tasks_per_node is not None else max(1, s.gpus_per_node),
        "cpus_per_task": s.cpus_per_task,
        "timeout_min": s.timeout_min,
        "gpus_per_node": s.gpus_per_node or None,
        "mem_gb": s.mem_gb,
        "slurm_partition": s.partition,
        "slurm_account": s.account,
        "slurm_qos": s.qos,
        "slurm_constraint": s.constraint,
        "slurm_signal_delay_s": s.signal_delay_s,
        # Lets `scontrol requeue` work even where the cluster's JobRequeue default is 0.
        "slurm_additional_parameters": {"requeue": True},
    }
    return {key: value for key, value in params.items() if value is not None}


def build_executor(cfg: Config, cluster: str, *, array: bool = False) -> submitit.AutoExecutor:
    """A configured executor whose folder is `<run.output_dir>/submitit` (`array`: a sweep's job array, with at most
    `slurm.array_parallelism` of its jobs running at once on SLURM).

    Raises:
        ValueError: the local executor is asked for more than one node.
    """
    if cluster == "local" and cfg.slurm.nodes != 1:
        raise ValueError(f"slurm.nodes={cfg.slurm.nodes}: the local executor runs on one node; use --cluster=slurm")
    folder = Path(cfg.run.output_dir).resolve() / "submitit"
    # submitit counts timeouts (a signal late in the time limit) against max_num_timeout; preemptions are free.
    executor = submitit.AutoExecutor(
        folder=folder,
        cluster=cluster,
        slurm_max_num_timeout=cfg.slurm.max_requeues,
        local_max_num_timeout=cfg.slurm.max_requeues,
    )
    executor.update_parameters(**executor_parameters(cfg))
    if array and cluster == "slurm":
        executor.update_parameters(slurm_array_parallelism=cfg.slurm.array_parallelism)
    return executor


def submit_clean(executor: submitit.AutoExecutor, job_fns: list[TrainJob]) -> list[submitit.Job]:
    """Submit outside the submitter's own SLURM/torch.distributed environment, keeping SLURM_CONF; several jobs go
    as one job array (submitit's batch: one `sbatch --array`)."""
    # A submitter inside an allocation would leak SLURM_* / MASTER_* variables into the job; clean_env hides them
    # all, including SLURM_CONF, without which sbatch cannot find a cluster that is not configured in /etc/slurm.
    slurm_conf = os.environ.get("SLURM_CONF")
    with submitit.helpers.clean_env():
        if slurm_conf is not None:
            os.environ["SLURM_CONF"] = slurm_conf
        if len(job_fns) == 1:
            return [executor.submit(job_fns[0])]
        jobs = []
        with executor.batch():
            for fn in job_fns:
                jobs.append(executor.submit(fn))
        return jobs


def _squeue_state(job_id: str) -> str | None:
    """The job's squeue state, "" when SLURM no longer knows it, None when squeue itself failed (try again)."""
    try:
        out = subprocess.run(
            ["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return "" if "Invalid job id" in out.stderr else None
    return out.stdout.strip().split("\n")[0].strip()


def wait_for_job(job: submitit.Job, cluster: str, poll_s: float = 2.0) -> None:
    """Block until every task wrote its result or the job is gone for good.

    submitit's own `wait()` needs sacct to notice a job that died without a result file and polls forever
    without accounting; squeue is enough here. A requeued job stays in squeue (PENDING), so waiting goes on
    across requeues.
    """
    tasks = [job.task(i) for i in range(job.num_tasks)]
    gone_since: float | None = None
    while not all(task.paths.result_pickle.exists() for task in tasks):
        if cluster == "local":
            finished = job.done()
        else:
            state = _squeue_state(str(job.job_id))
            finished = state == "" or (state is not None and state in _TERMINAL_STATES)
        if not finished:
            gone_since = None  # a requeue passes through states that look final for a moment
        else:
            gone_since = gone_since or time.monotonic()
            if time.monotonic() - gone_since > _RESULT_GRACE_S:
                return
        time.sleep(poll_s)


def job_outcome(job: submitit.Job) -> tuple[bool, str]:
    """(success, message) from the tasks' result files once the job is over; a task's own error comes first."""
    missing = []
    for i in range(job.num_tasks):
        task = job.task(i)
        if not task.paths.result_pickle.exists():
            missing.append(i)
            continue
        try:
            result = task.result()
        except Exception as err:  # the task's exception, re-raised by submitit: report it, do not crash here
            return False, f"task {i} failed: {err}"
        if isinstance(result, str) and result.startswith("error: "):
            return False, f"task {i} failed: {result[len('error: ') :]}"
        if result != "completed":
            return False, f"task {i} ended with {result!r}, expected 'completed'"
    if missing:
        return False, f"tasks {missing} ended without a result (killed?); see {job.task(missing[0]).paths.stderr}"
    return True, "completed"
