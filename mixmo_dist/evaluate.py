"""Entry point `python -m mixmo_dist.evaluate`: checkpoint(s) -> one JSON object of metrics.

    python -m mixmo_dist.evaluate --checkpoint DIR [--checkpoint DIR2 ...] [--section.key=value ...] [--out FILE]
        [--temperature-scale] [--corruptions DIR] [--split val]
    accelerate launch [--multi_gpu] --num_processes N -m mixmo_dist.evaluate ...   (same result, N ranks)

Each DIR is a step directory or a run output directory (its newest complete checkpoint). Each network is rebuilt
from its checkpoint's stored config (command-line overrides apply, e.g. `--data.root=...`), verified (sha256) and
loaded with safetensors. Several checkpoints form a deep ensemble: their members are concatenated (M_total heads;
the ensemble is the mean of all member logits); they must share the class list. The data of the evaluation is the
first checkpoint's data config: `--split val` uses `build_data`'s validation loader (any backend and dataset); any
other split name reads `<data.root>/<split>/<class>/` with the torch backend's validation transform.

Metrics (`metrics.EvalAccumulator`) are exact under several ranks: the sufficient statistics are all-reduced.
`--temperature-scale` gathers the mean logits and labels to every rank (padded all_gather, put back in dataset
order, so the halves do not depend on the number of ranks) and adds `temperature`, `temperature_halves`,
`calibrated_nll`, `calibrated_ece` (T fitted on one half, reported on the other, swapped). `--corruptions DIR` reads
ImageNet-C style folders `DIR/<corruption>/<severity>/<class>/` with the torch validation transform and adds
`corruptions: {name: {severity: {top1, nll, ece}}}` and `corruption_mean_top1/nll/ece` (means over every
corruption and severity).

The JSON goes to stdout (rank 0 only; logs go to stderr) and to `--out`. User errors (missing or corrupt checkpoint,
class mismatch, bad override) print `error: ...` naming the culprit and exit with status 2.

Shape legend: M members (all networks), B batch rows, N samples, K classes.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from mixmo_dist.calibration import temperature_scaled_metrics
from mixmo_dist.checkpoint import CheckpointError
from mixmo_dist.config import ConfigError, parse_overrides
from mixmo_dist.data import build_data, scan_split
from mixmo_dist.data.torch_loader import PathTable, TorchValLoader
from mixmo_dist.export import LoadedCheckpoint, load_checkpoint, normalization_of, resolve_checkpoint
from mixmo_dist.metrics import EvalAccumulator
from mixmo_dist.reporting import write_json_atomic
from mixmo_dist.runtime import build_accelerator, die_with_parent

__all__ = ["build_folder_val_loader", "check_same_classes", "gather_rows", "main", "run"]

log = logging.getLogger("mixmo_dist")


# --------------------------------------------------------------------------------------------------------------
# Pieces.
# --------------------------------------------------------------------------------------------------------------


def check_same_classes(loaded: list[LoadedCheckpoint]) -> list[str]:
    """The class list every network shares; ValueError naming the checkpoints whose lists differ."""
    first = loaded[0]
    for other in loaded[1:]:
        if other.classes != first.classes:
            if sorted(other.classes) == sorted(first.classes):
                detail = "the same classes in another order"
            else:
                detail = f"{len(first.classes)} vs {len(other.classes)} classes"
            raise ValueError(
                f"checkpoints {first.path} and {other.path} were trained on different class lists ({detail}): "
                "a deep ensemble needs the same classes with the same labels"
            )
    return first.classes


def build_folder_val_loader(
    root: str | Path,
    split: str,
    classes: list[str],
    data_cfg: Any,
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    device: torch.device,
    channels_last: bool,
    mean,
    std,
) -> TorchValLoader:
    """A validation loader (torch backend's resize + centre crop) over `root/<split>/<class>/<image>`.

    The split must hold exactly `classes` (labels are indices into it). Every rank reads samples rank::world_size.

    Raises:
        ValueError: a missing split folder, an empty class folder or another class set (the message names the path).
    """
    _, samples = scan_split(root, split, classes, reference="the checkpoint")
    return TorchValLoader.from_cfg(
        PathTable(samples),
        data_cfg,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        device=device,
        channels_last=channels_last,
        mean=mean,
        std=std,
    )


def gather_rows(t_NX: Tensor, world_size: int, strided: bool) -> Tensor:
    """All ranks' rows of `t_NX` on every rank, in dataset order (a collective: every rank calls it).

    Ranks may hold different numbers of rows, so each pads to the largest count for `all_gather` and the padding is
    cut off again. `strided`: rank r holds samples r::world_size (torch-style sharding), so rows are interleaved
    back; otherwise rank r holds a contiguous block (DALI) and the parts are concatenated.
    """
    if world_size == 1:
        return t_NX
    count = torch.tensor([t_NX.shape[0]], device=t_NX.device)
    counts = [torch.zeros_like(count) for _ in range(world_size)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in torch.cat(counts).tolist()]
    padded = t_NX.new_zeros((max(sizes), *t_NX.shape[1:]))
    padded[: t_NX.shape[0]] = t_NX
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    parts = [part[:size] for part, size in zip(parts, sizes)]
    if not strided:
        return torch.cat(parts)
    total = sum(sizes)
    assert all(size == len(range(r, total, world_size)) for r, size in enumerate(sizes)), sizes
    out = t_NX.new_empty((total, *t_NX.shape[1:]))
    for r, part in enumerate(parts):
        out[r::world_size] = part
    return out


class _Evaluator:
    """The networks of one evaluation and the collectives of this world; evaluates any loader with them."""

    def __init__(self, loaded: list[LoadedCheckpoint], accelerator) -> None:
        self.acc = accelerator
        self.device = accelerator.device
        self.world = accelerator.num_processes
        self.networks = []
        for item in loaded:
            net = item.model.to(self.device).eval()
            if item.config.model.channels_last:
                net = net.to(memory_format=torch.channels_last)
            self.networks.append(net)
        self.num_members = sum(net.num_members for net in self.networks)
        self.num_classes = self.networks[0].num_classes

    def _reduce(self) -> Callable[[Tensor], Tensor] | None:
        if self.world == 1:
            return None

        def all_sum(t: Tensor) -> Tensor:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            return t

        return all_sum

    @torch.no_grad()
    def logits(self, images_BCHW: Tensor) -> Tensor:
        """Member logits of every network, concatenated: float32 [M,B,K]."""
        with self.acc.autocast():
            return torch.cat([net(images_BCHW).float() for net in self.networks])

    def run(self, loader: Iterable, keep_logits: bool) -> tuple[dict, Tensor | None, Tensor | None]:
        """Metrics over all ranks, plus this rank's mean logits [N_r,K] and labels [N_r] when `keep_logits`."""
        acc = EvalAccumulator(self.num_members, self.num_classes, self.device)
        kept_logits, kept_labels = [], []
        for images_BCHW, labels_B in loader:
            logits_MBK = self.logits(images_BCHW)
            acc.update(logits_MBK, labels_B)
            if keep_logits:
                kept_logits.append(logits_MBK.mean(0))
                kept_labels.append(labels_B.to(self.device, torch.long))
        # compute() raises on an empty split; here the emptiness must be global, not one rank's (N < world size).
        result = acc.compute(reduce=self._reduce())
        if not keep_logits:
            return result, None, None
        empty = torch.zeros((0, self.num_classes), device=self.device)
        logits_NK = torch.cat(kept_logits) if kept_logits else empty
        labels_N = torch.cat(kept_labels) if kept_labels else torch.zeros(0, dtype=torch.long, device=self.device)
        return result, logits_NK, labels_N


def _broadcast_from_main(accelerator, fn: Callable[[], Any]) -> Any:
    """Run `fn` on rank 0 only (it may rename files) and hand its result, or its user error, to every rank."""
    value, error = None, None
    if accelerator.is_main_process:
        try:
            value = fn()
        except (ConfigError, CheckpointError, ValueError) as err:
            error = str(err)
    if accelerator.num_processes > 1:
        box = [(value, error)]
        dist.broadcast_object_list(box, src=0)
        value, error = box[0]
    if error is not None:
        raise CheckpointError(error)
    return value


def _corruption_dirs(root: Path) -> list[tuple[str, str, Path]]:
    """(corruption, severity, severity dir) of an ImageNet-C style tree, sorted; ValueError when there is none."""
    if not root.is_dir():
        raise ValueError(f"--corruptions {root}: not a directory (expected DIR/<corruption>/<severity>/<class>/)")
    found = [
        (corruption.name, severity.name, severity)
        for corruption in sorted(root.iterdir())
        if corruption.is_dir() and not corruption.name.startswith(".")
        for severity in sorted(corruption.iterdir(), key=lambda p: (len(p.name), p.name))
        if severity.is_dir() and not severity.name.startswith(".")
    ]
    if not found:
        raise ValueError(f"--corruptions {root}: no <corruption>/<severity>/ folders in it")
    return found


# --------------------------------------------------------------------------------------------------------------
# The evaluation.
# --------------------------------------------------------------------------------------------------------------


def _setup_logging(main_process: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if main_process else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )


def _val_loader(first: LoadedCheckpoint, classes: list[str], split: str, ctx: dict):
    """(loader, strided) for the evaluated split, built from the first checkpoint's data config."""
    cfg = first.config
    if split == "val":
        data = build_data(cfg.data, unique_per_rank=1, **ctx)
        if list(data.classes) != classes:
            raise ValueError(
                f"data.root={cfg.data.root} ({cfg.data.dataset}) has {len(data.classes)} classes that differ from the "
                f"{len(classes)} classes of checkpoint {first.path}"
            )
        return data.val, not data.backend.startswith("dali")
    if cfg.data.dataset != "imagefolder":
        raise ValueError(f"--split {split}: only the val split of data.dataset={cfg.data.dataset} can be evaluated")
    kwargs = {k: v for k, v in ctx.items() if k not in ("val_batch_size", "seed")}
    loader = build_folder_val_loader(
        cfg.data.root, split, classes, cfg.data, batch_size=ctx["val_batch_size"], **kwargs
    )
    return loader, True


def _evaluate_corruptions(evaluator: _Evaluator, root: Path, first: LoadedCheckpoint, classes, ctx: dict) -> dict:
    kwargs = {k: v for k, v in ctx.items() if k not in ("val_batch_size", "seed")}
    table: dict[str, dict[str, dict[str, float]]] = {}
    for corruption, severity, folder in _corruption_dirs(root):
        loader = build_folder_val_loader(
            folder.parent, folder.name, classes, first.config.data, batch_size=ctx["val_batch_size"], **kwargs
        )
        metrics, _, _ = evaluator.run(loader, keep_logits=False)
        table.setdefault(corruption, {})[severity] = {k: metrics[k] for k in ("top1", "nll", "ece")}
        log.info("corruption %s/%s: top1 %.4f nll %.4f", corruption, severity, metrics["top1"], metrics["nll"])
    cells = [cell for by_severity in table.values() for cell in by_severity.values()]
    out: dict[str, Any] = {"corruptions": table}
    for key in ("top1", "nll", "ece"):
        out[f"corruption_mean_{key}"] = sum(cell[key] for cell in cells) / len(cells)
    return out


def run(args: argparse.Namespace, overrides: dict) -> dict:
    """Evaluate as `args` says (on every rank); returns the result dict (the same on every rank).

    Raises:
        ConfigError, CheckpointError, ValueError: user errors, naming the culprit.
    """
    die_with_parent()
    out_dir = str(Path(args.out).resolve().parent) if args.out else str(Path.cwd())
    accelerator = build_accelerator("auto", output_dir=out_dir, tensorboard=False)
    _setup_logging(accelerator.is_main_process)
    paths = _broadcast_from_main(accelerator, lambda: [str(resolve_checkpoint(p)) for p in args.checkpoint])
    loaded = [load_checkpoint(p, overrides) for p in paths]
    classes = check_same_classes(loaded)
    first = loaded[0]
    mean, std = normalization_of(first.path, first.shape["arch"])
    data_cfg = first.config.data
    ctx = dict(
        val_batch_size=data_cfg.val_batch_size or data_cfg.batch_size,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        seed=first.config.run.seed,
        device=accelerator.device,
        channels_last=first.config.model.channels_last,
        mean=mean,
        std=std,
    )
    loader, strided = _val_loader(first, classes, args.split, ctx)
    evaluator = _Evaluator(loaded, accelerator)
    log.info(
        "evaluating %d network(s), %d members, split %s on %d rank(s)",
        len(loaded),
        evaluator.num_members,
        args.split,
        accelerator.num_processes,
    )
    result, logits_NK, labels_N = evaluator.run(loader, keep_logits=args.temperature_scale)
    if args.temperature_scale:
        all_logits_NK = gather_rows(logits_NK, accelerator.num_processes, strided)
        all_labels_N = gather_rows(labels_N, accelerator.num_processes, strided)
        result.update(temperature_scaled_metrics(all_logits_NK[None], all_labels_N))
    if args.corruptions:
        result.update(_evaluate_corruptions(evaluator, Path(args.corruptions), first, classes, ctx))
    result.update(
        checkpoints=[str(item.path) for item in loaded],
        steps=[item.step for item in loaded],
        archs=[item.shape["arch"] for item in loaded],
        members_per_network=[net.num_members for net in evaluator.networks],
        num_members=evaluator.num_members,
        split=args.split,
        world_size=accelerator.num_processes,
    )
    return result


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
    parser.add_argument("--split", default="val", help="split to evaluate (default val)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line wrapper: one JSON object on stdout (rank 0); user errors print `error: ...` and exit 2."""
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
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(args.out), result)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
