"""Ending a command-line process without the interpreter's teardown.

Once a command's `main` has returned, everything it wrote is closed, and Python's own exit steps that matter have
run (threads joined, `atexit` callbacks, standard streams flushed), what is left of a normal exit is the teardown of
every module and object: 1.0-1.6 s for a process that imported torch, torchvision and timm on this 2-core machine
(0.5 s for torch alone), against 0.06 s for `os._exit`. Every rank pays it at the end of every run, and a launcher
waits for the slowest rank; the test suite, which starts a few hundred such processes, paid minutes.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import NoReturn


def exit_now(code: int) -> NoReturn:
    """Exit with status `code` after the steps of a normal exit that can lose something, skipping the teardown.

    The steps kept, in Python's order: non-daemon threads (with one still running, whose end Python would wait
    for, this is a normal `sys.exit`), the `atexit` callbacks (logging's shutdown, multiprocessing's children, the
    trackers' libraries, `weakref.finalize` objects), and a flush of stdout and stderr (a
    failed flush turns status 0 into 120, as Python's exit does).
    """
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if others:
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a full disk, a reader that went away, a stream already closed
            # What Python's own exit does then: a run that "succeeded" with its output lost exits 120, not 0.
            code = code or 120
    os._exit(code)
