"""The forkserver that DataLoader workers of the torch backend are forked from, and its early start.

Importing this module needs neither torch nor DALI, so the entry point can start the forkserver before it imports
torch itself: the forkserver's own import of torch (its preload, ~1.5 s here) then runs on another core while the
rank imports, instead of after the model is built, when the rank waits for its first batch.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import multiprocessing.context
import os
import signal
import threading
from collections.abc import Sequence

from .forkserver_guard import PARENT_ENV

# The forkserver first ties its life to the rank's, then imports the datasets' module once, so forking a worker
# from it is cheap.
_PRELOAD = ["mixmo_dist.data.forkserver_guard", "mixmo_dist.data.torch_loader"]
_FORKSERVER_LOCK = threading.Lock()
_forkserver_started = False

# Signals a launcher sends to a rank's whole process group: workers must not die of them (see
# `workers._worker_init`).
GROUP_SIGNALS = (signal.SIGUSR2, signal.SIGINT, signal.SIGTERM)


def worker_context() -> multiprocessing.context.BaseContext:
    """The start method of DataLoader workers: a forkserver, started once per process with `GROUP_SIGNALS` blocked.

    Forking the rank itself is unsafe: by the time workers start it runs other threads (DALI executors, OpenMP
    pools, gloo/NCCL, pin-memory), and a lock one of them held at the fork stays held forever in the child. A worker
    that deadlocks that way looks alive, so the DataLoader waits for it forever; it was seen once here, in CI. The
    forkserver is a fresh single-threaded interpreter that imports the datasets' module once (so forking a worker
    from it is cheap), and every worker is forked from it. It inherits the blocked signal mask through exec, so
    neither it nor a newly forked worker can be killed by a preemption signal aimed at the rank's process group; the
    rank itself gets the signal (another of its threads takes it, or the main thread once the mask is restored).
    The forkserver dies with the rank, and each worker with the forkserver (see `forkserver_guard`).
    """
    from multiprocessing import forkserver, resource_tracker

    global _forkserver_started
    with _FORKSERVER_LOCK:
        if not _forkserver_started:
            multiprocessing.set_forkserver_preload(_PRELOAD)
            previous = signal.pthread_sigmask(signal.SIG_BLOCK, GROUP_SIGNALS)
            os.environ[PARENT_ENV] = str(os.getpid())  # read (and removed) by forkserver_guard in the forkserver
            try:
                # `forkserver.ensure_running` first starts multiprocessing's resource tracker, and that start ends
                # with SIGINT and SIGTERM *unblocked* in this thread: the forkserver spawned right after it then
                # blocked SIGUSR2 only, and a SIGTERM to the rank's process group (torchrun forwarding a signal,
                # SLURM ending a step) killed it, so the next validation's workers could not start and the run
                # crashed before it saved. Start the tracker first (it gets the signals blocked too), block again.
                resource_tracker.ensure_running()
                signal.pthread_sigmask(signal.SIG_BLOCK, GROUP_SIGNALS)
                forkserver.ensure_running()
            finally:
                del os.environ[PARENT_ENV]
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)
            _forkserver_started = True
    return multiprocessing.get_context("forkserver")


def start_early(argv: Sequence[str]) -> bool:
    """Start the forkserver now when the run that `argv` describes will use torch-backend workers. Returns whether it
    started it.

    Anything this cannot decide (a config error, which the run reports itself; `data.backend=auto` where DALI is
    installed, which only the data layer resolves) leaves the forkserver to start when the first loader needs it,
    as it always could.
    """
    from mixmo_dist.config import load_config

    try:
        data = load_config(list(argv)).data
    except Exception:  # noqa: BLE001 -- the run itself loads the config again and reports the error
        return False
    if data.num_workers == 0 or data.backend not in ("torch", "auto") or (data.backend == "auto" and _dali_found()):
        return False
    worker_context()
    return True


def _dali_found() -> bool:
    """Whether DALI is installed, without importing it (a parent package that is missing raises)."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ImportError:
        return False
