"""Entry point `python -m mixmo_dist.compare RUN_DIR... [--out DIR] [--ood DIR]`: runs side by side.

    python -m mixmo_dist.submit --config C --sweep run.seed=1,2,3 --sweep mixmo.num_members=1,2 --wait
    python -m mixmo_dist.compare runs/grid/* --out runs/grid/compare

Groups the runs by the config keys in which they differ (seeds pooled), evaluates what the runs did not record
(temperature scaling, selective risk, OOD with `--ood`; cached in `<out>/evals/`), adds deep ensembles of 2 of the
single-member runs, measures each row's inference cost, and writes `<out>/compare.md` (also printed), `compare.csv`
and `compare.png` (accuracy and NLL against FLOPs). See `mixmo_dist.evaluation.compare` for every definition. User
errors (not a run directory, a corrupt checkpoint, an evaluation that fails) print `error: ...` and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mixmo_dist.checkpoint import CheckpointError
from mixmo_dist.config import ConfigError
from mixmo_dist.evaluation.compare import build_rows, plot, read_run, to_markdown, write_csv


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mixmo_dist.compare", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="trainer output directories (e.g. a sweep's points)")
    parser.add_argument("--out", default="compare", help="where compare.md/.csv/.png and the cached evals go")
    parser.add_argument("--ood", help="an image folder of classes outside training: adds OOD AUROC columns")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    try:
        runs = [read_run(Path(p)) for p in args.runs if Path(p).resolve() != out.resolve()]
        rows = build_rows(runs, out / "evals", args.ood)
        out.mkdir(parents=True, exist_ok=True)
        table = to_markdown(rows)
        (out / "compare.md").write_text(table)
        write_csv(rows, out / "compare.csv")
        plot(rows, out / "compare.png")
    except (ValueError, ConfigError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(table, end="")
    print(f"wrote {out / 'compare.md'}, {out / 'compare.csv'}, {out / 'compare.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from mixmo_dist.runtime.exit import exit_now

    exit_now(main())
