"""The time to a run's first step, in parts: one info line once the first step is done.

The parts are marked where they end, in the order they happen; each lasts from the previous mark (the first from
the process's start, read from the kernel, so the interpreter's start and the imports count). A part that does not
happen on a path (a loader without worker processes has no separate start) is simply absent from the line.
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger("mixmo_dist")


def process_age_s() -> float:
    """Seconds since this process started (0 where /proc cannot tell)."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the command name may hold spaces and parentheses
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, IndexError, ValueError):
        return 0.0
    started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat: start time after boot, in ticks
    return max(uptime - started, 0.0)


class StartupClock:
    """Durations of the named parts of a start-up, each measured from the previous mark."""

    def __init__(self) -> None:
        self.last = time.monotonic() - process_age_s()
        self.parts: dict[str, float] = {}
        self.done = False

    def mark(self, part: str) -> None:
        """End `part` now; a part marked twice, or a mark after `finish`, is ignored."""
        if self.done or part in self.parts:
            return
        now = time.monotonic()
        self.parts[part] = now - self.last
        self.last = now

    def line(self) -> str:
        parts = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in self.parts.items())
        return f"startup: {parts}; total {sum(self.parts.values()):.2f} s to the first step"

    def finish(self, part: str) -> None:
        """End the last part and log the line (once)."""
        if self.done:
            return
        self.mark(part)
        self.done = True
        log.info("%s", self.line())


STARTUP = StartupClock()
"""The clock of this process's run (imported by the stages that mark their end)."""
