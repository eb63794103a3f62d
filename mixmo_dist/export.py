"""Entry point `python -m mixmo_dist.export --checkpoint DIR --out FILE.safetensors`.

Folds the MixMo network of a checkpoint (a step directory, or a run directory: its newest complete checkpoint) into
the plain timm model of the same arch, whose logits are the ensemble's mean logits, and writes it as safetensors
(`mixmo_dist.model.weights.export_folded`); prints the file's metadata as JSON. Nothing is written but `--out`: the
run directory may be read-only, and a corrupt checkpoint in it is skipped with a warning naming it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from mixmo_dist.checkpoint import CheckpointError
from mixmo_dist.checkpoint.reader import load_checkpoint, resolve_checkpoint
from mixmo_dist.config import ConfigError
from mixmo_dist.model.weights import export_folded
from mixmo_dist.runtime.logs import setup_logging

log = logging.getLogger("mixmo_dist")


def main(argv: list[str] | None = None) -> int:
    """Command line; user errors print one `error: ...` line and exit 2."""
    parser = argparse.ArgumentParser(
        prog="python -m mixmo_dist.export", description=__doc__.split("\n\n")[1], allow_abbrev=False
    )
    parser.add_argument("--checkpoint", required=True, help="step directory or run output directory")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        loaded = load_checkpoint(resolve_checkpoint(args.checkpoint))
        metadata = export_folded(loaded, args.out)
    except (ConfigError, CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: cannot write --out {args.out} ({err.strerror or err}); choose a writable place", file=sys.stderr)
        return 2
    log.info("exported %s (step %d) to %s", loaded.path, loaded.step, args.out)
    print(json.dumps({"out": str(args.out), **metadata}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
