"""Imported first by the DataLoader workers' forkserver (and by nothing else): it dies with the rank that started it.

A forkserver is the rank's child, but nothing ties its life to the rank: it exits only when every holder of its
"alive" pipe has exited, and each worker it forks holds one, while torch's worker watchdog watches the worker's
parent, which is the forkserver. A rank killed with SIGKILL would leave the forkserver and its workers running for
good (re-parented to PID 1). So the forkserver asks the kernel for SIGKILL when the rank dies, and every worker asks
the same about the forkserver (`workers._worker_init`): killing the rank, by any means, ends the whole tree.

The rank passes its pid in MIXMO_FORKSERVER_PARENT; without it (an unrelated import) this module does nothing.
"""

from __future__ import annotations

import os

from mixmo_dist.runtime.signals import die_with

PARENT_ENV = "MIXMO_FORKSERVER_PARENT"

_parent = os.environ.pop(PARENT_ENV, "")
if _parent.isdigit():
    die_with(int(_parent))
