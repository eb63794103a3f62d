"""Benchmarks: every figure is a ratio against a baseline measured in the same run (`make bench`)."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def quick_main(run: Callable[..., object], prog: str, doc: str, argv: list[str] | None) -> int:
    """The command line of a benchmark whose only option is `--quick`: parse `argv`, call `run(quick=...)`."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small smoke run, not a measurement")
    run(quick=parser.parse_args(argv).quick)
    return 0
