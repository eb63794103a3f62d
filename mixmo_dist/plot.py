"""Entry point `python -m mixmo_dist.plot RUN_DIR [--eval FILE.json] [--out DIR]`: PNG curves and a reliability diagram.

Reads `RUN_DIR/metrics.jsonl` (one flat JSON object per line, `split` = "train" or "val", each with `step`) and writes
the curves (`mixmo_dist.evaluation.plots`) into RUN_DIR, or into `--out DIR` (for a read-only run directory); with
`--eval FILE.json` (an evaluation JSON with a `reliability` entry) also `reliability.png`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mixmo_dist.evaluation.plots import plot_curves, plot_reliability, read_metrics, read_reliability


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, write the PNGs, print their paths; user errors print one line and return 2."""
    parser = argparse.ArgumentParser(prog="python -m mixmo_dist.plot", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="run directory holding metrics.jsonl")
    parser.add_argument("--out", type=Path, default=None, help="where to write the PNGs (default: RUN_DIR)")
    parser.add_argument("--eval", type=Path, default=None, help="evaluation JSON for the reliability diagram")
    args = parser.parse_args(argv)
    out = args.run_dir if args.out is None else args.out
    try:
        if not args.run_dir.is_dir():
            raise ValueError(f"run directory {args.run_dir} does not exist")
        # Validate both inputs before drawing anything, so a bad --eval does not leave half the PNGs.
        records = read_metrics(args.run_dir / "metrics.jsonl")
        reliability = read_reliability(args.eval) if args.eval is not None else None
        out.mkdir(parents=True, exist_ok=True)
        written = plot_curves(records, out)
        if reliability is not None:
            written.append(plot_reliability(reliability, out / "reliability.png"))
    except (ValueError, ImportError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        where = "--out" if args.out is not None else "the run directory"
        print(
            f"{parser.prog}: error: cannot write the plots into {where} {out} ({exc.strerror or exc}); "
            "pass --out DIR for a read-only run directory",
            file=sys.stderr,
        )
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
