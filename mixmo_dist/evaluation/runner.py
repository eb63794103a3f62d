"""An evaluation of MixMo checkpoint(s): exact metrics over all ranks, temperature scaling, corruptions.

Used by `python -m mixmo_dist.evaluate` (see its docstring for the command line and the output).

Shape legend: M members (all networks), B batch rows, N samples, K classes.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mixmo_dist.checkpoint import CheckpointError
from mixmo_dist.checkpoint.reader import LoadedCheckpoint, load_checkpoint, resolve_checkpoint
from mixmo_dist.config import ConfigError, DataConfig
from mixmo_dist.data import Placement, build_data
from mixmo_dist.data.folder import scan_split
from mixmo_dist.data.index import PathTable, split_table
from mixmo_dist.data.torch_loader import TorchValLoader, ValSet
from mixmo_dist.evaluation.calibration import temperature_scaled_metrics
from mixmo_dist.evaluation.metrics import EvalAccumulator
from mixmo_dist.evaluation.ood import ood_metrics, selective_metrics, uncertainty_scores
from mixmo_dist.runtime.accelerator import build_accelerator, die_with_parent
from mixmo_dist.runtime.collectives import Collectives
from mixmo_dist.runtime.logs import setup_logging

log = logging.getLogger("mixmo_dist")


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
    root: str | Path, split: str, classes: list[str], data_cfg: DataConfig, place: Placement
) -> TorchValLoader:
    """A validation loader (torch backend's resize + centre crop) over `root/<split>/<class>/<image>`.

    The split must hold exactly `classes` (labels are indices into it). Every rank reads samples rank::world_size.

    Raises:
        ValueError: a missing split folder, an empty class folder or another class set (the message names the path).
    """
    first = place.rank == 0
    _, table = split_table(
        root, split, classes, reference="the checkpoint", cache_dir=data_cfg.index_dir, full_check=first
    )
    return TorchValLoader(ValSet(table, data_cfg), data_cfg, place)


def rows_on_main(comm: Collectives, t_NX: Tensor, strided: bool) -> Tensor | None:
    """All ranks' rows of `t_NX` in dataset order, on rank 0 only (None elsewhere; a collective: every rank calls
    it). Only the rank that fits the temperature holds the N x K logits: an all-gather put them on every rank
    (200 MB per rank on ImageNet val).

    `strided`: rank r holds samples r::world_size (torch-style sharding), so rows are interleaved back; otherwise
    rank r holds a contiguous block (DALI) and the parts are concatenated.
    """
    parts = comm.gather_rows_to_main(t_NX)
    if parts is None:
        return None
    if not strided:
        return torch.cat(parts)
    world, total = len(parts), sum(len(part) for part in parts)
    assert all(len(part) == len(range(r, total, world)) for r, part in enumerate(parts)), [len(p) for p in parts]
    out = t_NX.new_empty((total, *t_NX.shape[1:]))
    for r, part in enumerate(parts):
        out[r::world] = part
    return out


class _Evaluator:
    """The networks of one evaluation and the collectives of this world; evaluates any loader with them."""

    def __init__(self, loaded: list[LoadedCheckpoint], accelerator, comm: Collectives) -> None:
        self.acc = accelerator
        self.comm = comm
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

    @torch.no_grad()
    def logits(self, images_BCHW: Tensor) -> Tensor:
        """Member logits of every network, concatenated: float32 [M,B,K]."""
        with self.acc.autocast():
            return torch.cat([net(images_BCHW).float() for net in self.networks])

    def run(self, loader: Iterable, keep_logits: bool) -> tuple[dict, Tensor | None, Tensor | None]:
        """Metrics over all ranks, plus this rank's mean logits [N_r,K] and labels [N_r] when `keep_logits`.

        Also keeps this rank's per-sample uncertainty scores [N_r,4] (`evaluation.ood.uncertainty_scores`) in
        `self.scores`, for selective prediction and OOD detection.
        """
        acc = EvalAccumulator(self.num_members, self.num_classes, self.device)
        kept_logits, kept_labels, kept_scores = [], [], []
        for images_BCHW, labels_B in loader:
            logits_MBK = self.logits(images_BCHW)
            acc.update(logits_MBK, labels_B)
            kept_scores.append(uncertainty_scores(logits_MBK, labels_B))
            if keep_logits:
                kept_logits.append(logits_MBK.mean(0))
                kept_labels.append(labels_B.to(self.device, torch.long))
        # compute() raises on an empty split; here the emptiness must be global, not one rank's (N < world size).
        result = acc.compute(reduce=self.comm.sum if self.world > 1 else None)
        empty_scores = torch.zeros((0, 4), dtype=torch.float64, device=self.device)
        self.scores = torch.cat(kept_scores) if kept_scores else empty_scores
        if not keep_logits:
            return result, None, None
        empty = torch.zeros((0, self.num_classes), device=self.device)
        logits_NK = torch.cat(kept_logits) if kept_logits else empty
        labels_N = torch.cat(kept_labels) if kept_labels else torch.zeros(0, dtype=torch.long, device=self.device)
        return result, logits_NK, labels_N


def _broadcast_from_main(comm: Collectives, main: bool, fn: Callable[[], Any]) -> Any:
    """Run `fn` on rank 0 only and hand its result, or its user error, to every rank."""
    value, error = None, None
    if main:
        try:
            value = fn()
        except (ConfigError, CheckpointError, ValueError) as err:
            error = str(err)
    value, error = comm.broadcast_object((value, error))
    if error is not None:
        raise CheckpointError(error)
    return value


def _first_then_others(comm: Collectives, main: bool, fn: Callable[[], Any]) -> Any:
    """Run `fn` on rank 0, then (once it succeeded) on the other ranks; a user error of rank 0's stops every rank.

    For what reads the dataset index: rank 0 checks or builds it (one scan per evaluation) while the others wait,
    then they read it.
    """
    value, error = None, None
    if main:
        try:
            value = fn()
        except (ConfigError, CheckpointError, ValueError) as err:
            error = str(err)
            raise
        finally:
            comm.broadcast_object(error)
        return value
    error = comm.broadcast_object(None)
    if error is not None:
        raise ValueError(error)
    return fn()


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


def _val_loader(first: LoadedCheckpoint, classes: list[str], split: str, place: Placement):
    """(loader, strided) for the evaluated split, built from the first checkpoint's data config."""
    cfg = first.config
    if split == "val":
        data = build_data(cfg.data, place)
        if list(data.classes) != classes:
            raise ValueError(
                f"data.root={cfg.data.root} ({cfg.data.dataset}) has {len(data.classes)} classes that differ from the "
                f"{len(classes)} classes of checkpoint {first.path}"
            )
        return data.val, not data.backend.startswith("dali")
    if cfg.data.dataset != "imagefolder":
        raise ValueError(f"--split {split}: only the val split of data.dataset={cfg.data.dataset} can be evaluated")
    return build_folder_val_loader(cfg.data.root, split, classes, cfg.data, place), True


def _evaluate_corruptions(evaluator: _Evaluator, root: Path, first: LoadedCheckpoint, classes, place) -> dict:
    table: dict[str, dict[str, dict[str, float]]] = {}
    for corruption, severity, folder in _corruption_dirs(root):
        loader = build_folder_val_loader(folder.parent, folder.name, classes, first.config.data, place)
        metrics, _, _ = evaluator.run(loader, keep_logits=False)
        table.setdefault(corruption, {})[severity] = {k: metrics[k] for k in ("top1", "nll", "ece")}
        log.info("corruption %s/%s: top1 %.4f nll %.4f", corruption, severity, metrics["top1"], metrics["nll"])
    cells = [cell for by_severity in table.values() for cell in by_severity.values()]
    out: dict[str, Any] = {"corruptions": table}
    for key in ("top1", "nll", "ece"):
        out[f"corruption_mean_{key}"] = sum(cell[key] for cell in cells) / len(cells)
    return out


def _evaluate_ood(evaluator: _Evaluator, root: Path, first: LoadedCheckpoint, place, in_scores_N4: Tensor) -> dict:
    """OOD detection against the image folder `root/<class>/<image>` (classes outside the training set)."""
    if not root.is_dir():
        raise ValueError(f"--ood {root}: not a directory (expected DIR/<class>/<image>, classes outside training)")
    classes, samples = scan_split(root.parent, root.name)
    loader = TorchValLoader(ValSet(PathTable(samples), first.config.data), first.config.data, place)
    evaluator.run(loader, keep_logits=False)
    out_scores_N4 = rows_on_main(evaluator.comm, evaluator.scores, strided=True)
    metrics = None
    if out_scores_N4 is not None:
        metrics = {"num_scored": int(out_scores_N4.shape[0]), **ood_metrics(in_scores_N4, out_scores_N4.cpu())}
    metrics = evaluator.comm.broadcast_object(metrics)  # computed on rank 0, a few numbers for every rank
    log.info(
        "ood %s (%d images, %d classes): auroc msp %.4f entropy %.4f disagreement %.4f",
        *(root, len(samples), len(classes), metrics["msp"]["auroc"], metrics["entropy"]["auroc"]),
        metrics["disagreement"]["auroc"],
    )
    return {"ood": {"dir": str(root), "num_images": len(samples), **metrics}}


def run(args: argparse.Namespace, overrides: dict) -> dict:
    """Evaluate as `args` says (on every rank); returns the result dict (the same on every rank).

    Raises:
        ConfigError, CheckpointError, ValueError: user errors, naming the culprit.
    """
    die_with_parent()
    out_dir = str(Path(args.out).resolve().parent) if args.out else str(Path.cwd())
    accelerator = build_accelerator("auto", output_dir=out_dir)
    comm = Collectives(accelerator)
    setup_logging(accelerator.is_main_process)
    resolve = lambda: [str(resolve_checkpoint(p)) for p in args.checkpoint]  # noqa: E731
    paths = _broadcast_from_main(comm, accelerator.is_main_process, resolve)
    loaded = [load_checkpoint(p, overrides, getattr(args, "weights", "auto")) for p in paths]
    classes = check_same_classes(loaded)
    first = loaded[0]
    data_cfg = first.config.data
    place = Placement(
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        seed=first.config.run.seed,
        device=accelerator.device,
        unique_per_rank=1,
        val_batch_size=data_cfg.val_batch_size or data_cfg.batch_size,
        channels_last=first.config.model.channels_last,
        mean=first.mean,
        std=first.std,
    )
    loader, strided = _first_then_others(
        comm, accelerator.is_main_process, lambda: _val_loader(first, classes, args.split, place)
    )
    evaluator = _Evaluator(loaded, accelerator, comm)
    log.info(
        "evaluating %d network(s), %d members, split %s on %d rank(s)",
        *(len(loaded), evaluator.num_members, args.split, accelerator.num_processes),
    )
    result, logits_NK, labels_N = evaluator.run(loader, keep_logits=args.temperature_scale)
    # One row of 4 scores per sample, on rank 0 only; the few figures go back to every rank.
    in_scores_N4 = rows_on_main(comm, evaluator.scores, strided)
    in_scores_N4 = None if in_scores_N4 is None else in_scores_N4.cpu()
    selective = None
    if in_scores_N4 is not None:
        selective = {"selective_count": int(in_scores_N4.shape[0]), **selective_metrics(in_scores_N4)}
    result.update(comm.broadcast_object(selective))
    if getattr(args, "ood", None):
        result.update(_evaluate_ood(evaluator, Path(args.ood), first, place, in_scores_N4))
    if args.temperature_scale:
        all_logits_NK = rows_on_main(comm, logits_NK, strided)
        all_labels_N = rows_on_main(comm, labels_N, strided)
        fitted = None if all_logits_NK is None else temperature_scaled_metrics(all_logits_NK[None], all_labels_N)
        result.update(comm.broadcast_object(fitted))  # a few numbers: every rank returns the same result
    if args.corruptions:
        result.update(_evaluate_corruptions(evaluator, Path(args.corruptions), first, classes, place))
    result.update(
        checkpoints=[str(item.path) for item in loaded],
        steps=[item.step for item in loaded],
        archs=[item.shape["arch"] for item in loaded],
        weights=[item.weights for item in loaded],
        members_per_network=[net.num_members for net in evaluator.networks],
        num_members=evaluator.num_members,
        split=args.split,
        world_size=accelerator.num_processes,
    )
    return result
