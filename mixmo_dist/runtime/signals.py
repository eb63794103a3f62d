"""Preemption and interrupt signals: a handler that only records them; the trainer acts at a step boundary."""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass, field

log = logging.getLogger("mixmo_dist")


@dataclass
class StopSignal:
    """Records SIGUSR2/SIGTERM; the trainer acts on it at the next step boundary, after all ranks agree.

    The handler only sets a flag: a collective inside a signal handler could deadlock mid-collective.
    """

    signals: tuple = (signal.SIGUSR2, signal.SIGTERM)
    received: str | None = None
    _previous: dict = field(default_factory=dict)

    def install(self) -> None:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            log.warning("received %s: saving at the next step boundary, then stopping", self.received)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
