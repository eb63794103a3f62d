"""Intra-op threads of a rank: every CPU it may run on, shared with the other ranks of its node.

`accelerate launch` puts OMP_NUM_THREADS=1 in the ranks' environment when the user left it unset (and torchrun does
the same for several ranks), so a one-process CPU run would compute on one core of many. Each rank therefore sets
its own count: the CPUs of its affinity mask divided by the ranks on its node (LOCAL_WORLD_SIZE), torchrun's own
recommendation, unless `run.num_threads` or the user's OMP_NUM_THREADS says otherwise. DataLoader workers keep one
thread each (`data/workers.py`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

# The launcher's flag that also sets OMP_NUM_THREADS: given by the user, it is the user's choice.
_LAUNCHER_FLAG = "--num_cpu_threads_per_process"


@dataclass(frozen=True)
class ThreadChoice:
    """The intra-op thread count of this process and where it came from (logged in the run line, run.json)."""

    num_threads: int
    source: str


_choice: ThreadChoice | None = None


def set_intra_op_threads(configured: int) -> ThreadChoice:
    """Set torch's intra-op threads for this rank (see `choose_threads`) and remember the choice for `run.json`."""
    global _choice
    # The affinity, not os.cpu_count(): a container's or a scheduler's CPU set is what the rank may run on.
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    choice = choose_threads(configured, os.environ, affinity, _launcher_start())
    torch.set_num_threads(choice.num_threads)
    _choice = choice
    return choice


def current_choice() -> ThreadChoice:
    """The choice `set_intra_op_threads` made, or torch's own count where it was not called (a Trainer built in a
    test)."""
    return _choice or ThreadChoice(torch.get_num_threads(), "torch default")


def choose_threads(
    configured: int, environ: Mapping[str, str], affinity: int, launcher: tuple[Mapping[str, str], list[str]] | None
) -> ThreadChoice:
    """The thread count of a rank.

    Args:
        configured: `run.num_threads`; > 0 wins over everything.
        environ: this rank's environment.
        affinity: the number of CPUs in this process's affinity mask.
        launcher: the launcher's environment as it was started and its command line (`_launcher_start`), or None
            where they cannot be read.
    """
    if configured > 0:
        return ThreadChoice(configured, "run.num_threads")
    user = user_omp_threads(environ, launcher)
    if user is not None:
        return ThreadChoice(user, "OMP_NUM_THREADS set by the user")
    local = max(int(environ.get("LOCAL_WORLD_SIZE", "1") or 1), 1)
    return ThreadChoice(max(affinity // local, 1), f"auto: {affinity} CPUs in the affinity / {local} ranks on the node")


def user_omp_threads(environ: Mapping[str, str], launcher: tuple[Mapping[str, str], list[str]] | None) -> int | None:
    """OMP_NUM_THREADS when the user set it, None when it is unset or the launcher put it there by itself.

    The rank's environment alone cannot tell: `accelerate launch` writes OMP_NUM_THREADS (1, or its
    --num_cpu_threads_per_process) into every rank's environment whether or not the user set it, and torchrun
    writes 1 when it is unset; neither leaves a marker saying it did. Both run the ranks as their own children, and
    a process's start-up environment (/proc/PID/environ) keeps what its parent gave it whatever it later changes in
    os.environ. So under a launcher (ACCELERATE_DYNAMO_BACKEND, which `accelerate launch` always sets, or
    TORCHELASTIC_RUN_ID, set by torchrun's agent) the value is the user's exactly when the launcher itself was
    started with OMP_NUM_THREADS, or with its own thread flag. Comparing the value with what the launcher would
    inject instead cannot tell a user's OMP_NUM_THREADS=1 from the default. Where the launcher cannot be read
    (another OS), a value of 1, the launchers' own default, is taken as theirs.
    """
    value = environ.get("OMP_NUM_THREADS", "").strip()
    if not value.isdigit() or int(value) < 1:
        return None  # unset, or a value OpenMP would ignore
    if "ACCELERATE_DYNAMO_BACKEND" not in environ and "TORCHELASTIC_RUN_ID" not in environ:
        return int(value)  # no launcher: nobody but the user sets it
    if launcher is None:
        return None if value == "1" else int(value)
    launcher_env, launcher_argv = launcher
    chosen = "OMP_NUM_THREADS" in launcher_env or any(a.split("=")[0] == _LAUNCHER_FLAG for a in launcher_argv)
    return int(value) if chosen else None


def _launcher_start() -> tuple[dict[str, str], list[str]] | None:
    """The parent process's start-up environment and command line (the launcher's, under torchrun), or None."""
    parent = os.getppid()
    try:
        with open(f"/proc/{parent}/environ", "rb") as f:
            env_raw = f.read()
        with open(f"/proc/{parent}/cmdline", "rb") as f:
            argv_raw = f.read()
    except OSError:
        return None
    env = dict(item.split("=", 1) for item in env_raw.decode(errors="replace").split("\0") if "=" in item)
    return env, [a for a in argv_raw.decode(errors="replace").split("\0") if a]
