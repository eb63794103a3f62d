"""Entry point `python -m mixmo_dist.export --checkpoint DIR (--out FILE.safetensors | --hub-dir FOLDER)`.

Folds the MixMo network of a checkpoint (a step directory, or a run directory: its newest complete checkpoint) into
the plain timm model of the same arch, whose logits are the ensemble's mean logits, and writes it as safetensors
(`--out`, `mixmo_dist.model.weights.export_folded`) or as a hub-format folder (`--hub-dir`: config.json,
model.safetensors and a README model card with the run's last validation, which
`timm.create_model("local-dir:FOLDER", pretrained=True)` loads; nothing is uploaded); prints what it wrote as JSON.
Nothing is written but the output: the run directory may be read-only, and a corrupt checkpoint in it is skipped
with a warning naming it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from mixmo_dist.checkpoint import CheckpointError
from mixmo_dist.checkpoint.reader import WEIGHTS, load_checkpoint, resolve_checkpoint
from mixmo_dist.config import ConfigError
from mixmo_dist.model.weights import export_folded, export_hub
from mixmo_dist.runtime.logs import setup_logging

log = logging.getLogger("mixmo_dist")


def main(argv: list[str] | None = None) -> int:
    """Command line; user errors print one `error: ...` line and exit 2."""
    parser = argparse.ArgumentParser(
        prog="python -m mixmo_dist.export", description=__doc__.split("\n\n")[1], allow_abbrev=False
    )
    parser.add_argument("--checkpoint", required=True, help="step directory or run output directory")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="output .safetensors file")
    where.add_argument("--hub-dir", help="output folder in the Hugging Face Hub / timm format (must be new or empty)")
    parser.add_argument(
        "--weights",
        choices=WEIGHTS,
        default="auto",
        help="auto (default): the EMA weights when the run kept them (what its validation scored), else the trained "
        "ones; ema; raw",
    )
    args = parser.parse_args(argv)
    setup_logging()
    target = f"--out {args.out}" if args.out else f"--hub-dir {args.hub_dir}"
    try:
        loaded = load_checkpoint(resolve_checkpoint(args.checkpoint), weights=args.weights)
        if args.out:
            result = {"out": str(args.out), **export_folded(loaded, args.out)}
        else:
            config = export_hub(loaded, args.hub_dir, last_validation(loaded.path.parent.parent))
            result = {"hub_dir": str(args.hub_dir), **config}
    except (ConfigError, CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: cannot write {target} ({err.strerror or err}); choose a writable place", file=sys.stderr)
        return 2
    log.info("exported %s (step %d) to %s", loaded.path, loaded.step, args.out or args.hub_dir)
    print(json.dumps(result))
    return 0


def last_validation(run_dir: Path) -> dict | None:
    """The model card's figures: the run's last validation row of metrics.jsonl (and its best top-1), or None when
    the run has none (or its metrics cannot be read: the card then says so)."""
    rows = []
    try:
        with open(run_dir / "metrics.jsonl", encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a line cut by a full disk: not a row
                if isinstance(row, dict) and row.get("split") in ("val", "test") and "top1" in row:
                    rows.append(row)
    except OSError:
        return None
    if not rows:
        return None
    last = rows[-1]
    keys = ("step", "val_split", "top1", "top5", "nll", "ece", "member_top1", "best_top1")
    return {key: last[key] for key in keys if key in last}


if __name__ == "__main__":
    from mixmo_dist.runtime.exit import exit_now

    exit_now(main())
