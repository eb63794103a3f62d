"""The one logging set-up of every entry point: INFO on the main process, WARNING on the others, to stderr."""

from __future__ import annotations

import logging
import sys
import warnings

_show_warning_default = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """The package's own warnings (a checkpoint passed over, moved aside) as one log line naming what they name;
    the file and line of the `warnings.warn` call say nothing to a user. Other libraries' warnings are unchanged."""
    if category.__module__.split(".")[0] == "mixmo_dist":
        logging.getLogger("mixmo_dist").warning("%s", message)
    else:
        _show_warning_default(message, category, filename, lineno, file, line)


def setup_logging(main_process: bool = True) -> None:
    """Configure the root logger (replacing earlier handlers): timestamped lines on stderr."""
    logging.basicConfig(
        level=logging.INFO if main_process else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    warnings.showwarning = _show_warning
