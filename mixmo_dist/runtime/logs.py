"""The one logging set-up of every entry point: INFO on the main process, WARNING on the others, to stderr."""

from __future__ import annotations

import logging
import sys


def setup_logging(main_process: bool = True) -> None:
    """Configure the root logger (replacing earlier handlers): timestamped lines on stderr."""
    logging.basicConfig(
        level=logging.INFO if main_process else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
