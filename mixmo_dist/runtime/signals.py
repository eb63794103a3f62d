"""Preemption and interrupt signals: a handler that only records them; the trainer acts at a step boundary."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
from dataclasses import dataclass, field

log = logging.getLogger("mixmo_dist")

_PR_SET_PDEATHSIG = 1


def die_with(parent: int) -> bool:
    """Ask the kernel to SIGKILL this process when `parent` (its current parent process) dies.

    Linux's PR_SET_PDEATHSIG: the signal comes when the thread that created this process exits, so `parent` must
    have created it from a thread that lives as long as the process (its main thread). If `parent` is already gone
    (this process was re-parented before the call took effect), exit at once.

    Returns:
        False where the kernel call is unavailable (not Linux); the caller decides whether that matters.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:
        os._exit(1)
    return True


# What the ranks agree on at a step boundary (the maximum over ranks wins): an interrupt (Ctrl-C) outranks a
# preemption, so a run a person stopped is never requeued.
NO_STOP, PREEMPT, INTERRUPT = 0.0, 1.0, 2.0


def _stop_at_once(signum, frame) -> None:
    """A second Ctrl-C: KeyboardInterrupt, with multiprocessing told the process is exiting. The DataLoader workers
    then die mid-handshake with the training process's fd-sharing thread (the batch buffers they are handed), and that
    thread prints a ConnectionResetError traceback unless the process is known to be exiting."""
    import multiprocessing.util

    multiprocessing.util._exiting = True
    raise KeyboardInterrupt


@dataclass
class StopSignal:
    """Records SIGUSR2/SIGTERM (preemption) and SIGINT (Ctrl-C); the trainer acts at the next step boundary, after
    all ranks agree.

    The handler only sets a flag: a collective inside a signal handler could deadlock mid-collective. After a first
    SIGINT the default handler is back, so a second Ctrl-C stops at once (KeyboardInterrupt).
    """

    signals: tuple = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)
    received: str | None = None
    _previous: dict = field(default_factory=dict)

    def install(self) -> None:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, _stop_at_once)
        if self.received is None:
            self.received = signal.Signals(signum).name
            again = " (Ctrl-C again stops at once, without saving)" if signum == signal.SIGINT else ""
            log.warning("received %s: saving at the next step boundary, then stopping%s", self.received, again)

    @property
    def flag(self) -> float:
        """This rank's vote at the step boundary: NO_STOP, PREEMPT or INTERRUPT."""
        if self.received is None:
            return NO_STOP
        return INTERRUPT if self.received == "SIGINT" else PREEMPT

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
