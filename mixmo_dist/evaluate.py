"""Entry point `python -m mixmo_dist.evaluate`: checkpoint(s) -> one JSON object of metrics.

    python -m mixmo_dist.evaluate --checkpoint DIR [--checkpoint DIR2 ...] [--section.key=value ...] [--out FILE]
        [--temperature-scale] [--corruptions DIR] [--ood DIR] [--split val]
    accelerate launch [--multi_gpu] --num_processes N -m mixmo_dist.evaluate ...   (same result, N ranks)

Each DIR is a step directory or a run output directory (its newest complete checkpoint). Each network is rebuilt
from its checkpoint's stored config (command-line overrides apply, e.g. `--data.root=...`), verified (sha256) and
loaded with safetensors. Several checkpoints form a deep ensemble: their members are concatenated (M_total heads;
the ensemble is the mean of all member logits); they must share the class list. The data of the evaluation is the
first checkpoint's data config: `--split val` uses `build_data`'s validation loader (any backend and dataset); any
other split name reads `<data.root>/<split>/<class>/` with the torch backend's validation transform.

Metrics (`evaluation.metrics.EvalAccumulator`) are exact under several ranks: the sufficient statistics are all-reduced.
`--temperature-scale` gathers the mean logits and labels to every rank (padded all_gather, put back in dataset
order, so the halves do not depend on the number of ranks) and adds `temperature`, `temperature_halves`,
`calibrated_nll`, `calibrated_ece` (T fitted on one half, reported on the other, swapped). `--corruptions DIR` reads
ImageNet-C style folders `DIR/<corruption>/<severity>/<class>/` with the torch validation transform and adds
`corruptions: {name: {severity: {top1, nll, ece}}}` and `corruption_mean_top1/nll/ece` (means over every
corruption and severity). Every evaluation adds selective prediction on the evaluated split: `aurc` and
`risk_at_80` (samples ranked by the ensemble's max softmax). `--ood DIR` (an image folder of classes outside the
training set, read with the torch validation transform) adds `ood: {dir, num_images, msp|entropy|disagreement:
{auroc, aupr, fpr95}}`, OOD as the positive class (`evaluation/ood.py` defines each score and metric). Both gather
one row of 4 scores per sample, so they are exact under several ranks too.

The JSON goes to stdout (rank 0 only; logs go to stderr) and to `--out`; nothing is written anywhere else, so the
run directories read may be read-only. A corrupt checkpoint of a run directory is skipped with a warning naming
it, and the previous complete one is used. User errors (missing or corrupt checkpoint, class mismatch, bad override,
an unwritable `--out`) print `error: ...` naming the culprit and exit with status 2.

Shape legend: M members (all networks), B batch rows, N samples, K classes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch.distributed as dist

from mixmo_dist.checkpoint import CheckpointError
from mixmo_dist.checkpoint.reader import WEIGHTS
from mixmo_dist.config import ConfigError, parse_overrides
from mixmo_dist.evaluation.runner import run
from mixmo_dist.runtime.files import write_json_atomic


def _json_safe(value: Any) -> Any:
    """NaN/inf become None: the output is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mixmo_dist.evaluate",
        description="Evaluate MixMo checkpoint(s); extra --section.key=value words override the stored config.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "--checkpoint", action="append", required=True, help="step dir or run output dir; repeat for a deep ensemble"
    )
    parser.add_argument("--out", help="also write the JSON result to this file")
    parser.add_argument(
        "--temperature-scale",
        action="store_true",
        help="add temperature-scaled NLL/ECE (fit on one half, report on the other, swapped)",
    )
    parser.add_argument("--corruptions", help="ImageNet-C style DIR/<corruption>/<severity>/<class>/ to evaluate")
    parser.add_argument(
        "--ood", help="image folder DIR/<class>/<image> of classes outside the training set: OOD detection metrics"
    )
    parser.add_argument("--split", default="val", help="split to evaluate (default val)")
    parser.add_argument(
        "--weights",
        choices=WEIGHTS,
        default="auto",
        help="auto (default): the EMA weights when the run kept them (optim.ema_decay; what its validation scored), "
        "else the trained ones; ema; raw: the trained weights",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line wrapper: one JSON object on stdout (rank 0); user errors print `error: ...` and exit 2."""
    try:
        return _main(argv)
    finally:
        # Tear the process group down before the interpreter exits: left to the interpreter's shutdown, gloo's
        # threads can outlive it and abort the rank ("terminate called without an active exception", exit -6)
        # after the result was printed (seen in CI with 2 ranks).
        if dist.is_available() and dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def _main(argv: list[str] | None) -> int:
    args, rest = _parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        config_path, overrides = parse_overrides(rest)
        if config_path is not None:
            raise ConfigError(
                "--config is not used by evaluate: the checkpoint's stored config is the base; "
                "override single keys with --section.key=value"
            )
        result = _json_safe(run(args, overrides))
    except (ConfigError, CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if dist.is_initialized() and dist.get_rank() != 0:
        return 0
    print(json.dumps(result), flush=True)  # first: an unwritable --out then loses nothing
    if args.out:
        try:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(args.out, result)
        except OSError as err:
            reason = err.strerror or err
            print(f"error: cannot write --out {args.out} ({reason}); the result is on stdout above", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    from mixmo_dist.runtime.exit import exit_now

    exit_now(main())
