"""Reading a run back: the verified checkpoint a path names, and the MixMo network stored in it.

Used by `python -m mixmo_dist.evaluate` and `python -m mixmo_dist.export` (`resolve_checkpoint`, from the store,
also by `model.init_from`).

Shape legend: M members, K classes.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixmo_dist.checkpoint import CheckpointError
from mixmo_dist.checkpoint.store import CheckpointStore, resolve_checkpoint
from mixmo_dist.config import Config, config_from_dict
from mixmo_dist.data import timm_mean_std
from mixmo_dist.model import MixMoNet, build_model

__all__ = ["LoadedCheckpoint", "load_checkpoint", "normalization_of", "resolve_checkpoint"]

log = logging.getLogger("mixmo_dist")

_SHAPE_KEYS = ("arch", "num_members", "num_classes", "classes")
# Settings that define the network's tensors: an override cannot change them, the checkpoint's shape decides.
_SHAPE_OVERRIDES = {("model", "arch"), ("model", "num_classes"), ("mixmo", "num_members")}


@dataclass
class LoadedCheckpoint:
    """A MixMo network read back from a verified checkpoint directory.

    Attributes:
        path: the step directory.
        step: the optimizer step it was saved at.
        config: the stored config with the command-line overrides applied.
        shape: the stored shape settings (arch, num_members, num_classes, classes, ...).
        model: the MixMoNet with the checkpoint's weights, on the CPU, in eval mode.
        mean, std: the input normalisation the run trained with (see `normalization_of`).
        weights: which weights `model` holds: "ema" (the moving average, what the run validated with when
            optim.ema_decay was set) or "raw" (the trained weights, model.safetensors).
    """

    path: Path
    step: int
    config: Config
    shape: dict
    model: MixMoNet
    mean: tuple[float, ...]
    std: tuple[float, ...]
    weights: str = "raw"

    @property
    def classes(self) -> list[str]:
        return list(self.shape["classes"])


def _merge(stored: Mapping[str, Any], overrides: Mapping[str, Mapping[str, Any]]) -> dict:
    merged = {section: dict(values or {}) for section, values in stored.items()}
    for section, values in overrides.items():
        merged.setdefault(section, {}).update(values)
    return merged


WEIGHTS = ("auto", "ema", "raw")


def load_checkpoint(
    step_dir: str | os.PathLike[str], overrides: Mapping[str, Mapping[str, Any]] | None = None, weights: str = "auto"
):
    """Rebuild the MixMoNet of a verified step directory (see `resolve_checkpoint`) from its own files.

    Args:
        step_dir: the checkpoint directory.
        overrides: `{section: {key: value}}` applied over the stored config (e.g. a new `data.root`); settings that
            define tensor shapes (model.arch, model.num_classes, mixmo.num_members) come from the checkpoint.
        weights: "auto" = the EMA weights when the run kept them (optim.ema_decay set: its validation scored those),
            else the trained ones; "ema" = the EMA weights (an error without them); "raw" = the trained weights.

    Returns:
        LoadedCheckpoint; weights are loaded with safetensors only, strictly.

    Raises:
        CheckpointError: missing/unreadable files, a state.json without its shape, weights that do not fit.
        ConfigError: an override that is invalid for the stored config.
    """
    step_dir = Path(step_dir)
    overrides = overrides or {}
    store = CheckpointStore(step_dir.parent, keep_last=1)
    state = store.read_json(step_dir, "state.json")
    shape = state.get("shape") if isinstance(state, dict) else None
    if not isinstance(shape, dict) or any(k not in shape for k in _SHAPE_KEYS) or "config" not in state:
        raise CheckpointError(f"checkpoint {step_dir}: state.json lacks 'config' or shape keys {_SHAPE_KEYS}")
    for section, key in sorted(_SHAPE_OVERRIDES):
        if key in overrides.get(section, {}):
            log.warning("--%s.%s has no effect: the network's shape comes from checkpoint %s", section, key, step_dir)
    config = config_from_dict(_merge(state["config"], overrides))
    model = build_model(shape["arch"], int(shape["num_members"]), int(shape["num_classes"]))
    if weights not in WEIGHTS:
        raise ValueError(f"--weights {weights!r}: choose one of {', '.join(WEIGHTS)}")
    kept_ema = state["config"].get("optim", {}).get("ema_decay") is not None
    if weights == "ema" and not kept_ema:
        raise CheckpointError(
            f"checkpoint {step_dir} has no EMA weights (the run had optim.ema_decay null); use --weights raw or auto"
        )
    which = "ema" if kept_ema and weights != "raw" else "raw"
    if which == "ema":
        source = "trainer.safetensors (ema/)"
        tensors = {k[4:]: v for k, v in store.read_tensors(step_dir, "trainer.safetensors").items() if k[:4] == "ema/"}
        if not tensors:
            raise CheckpointError(f"checkpoint {step_dir}: optim.ema_decay is set but {source} holds no tensors")
    else:
        source = "model.safetensors"
        tensors = store.read_tensors(step_dir, "model.safetensors")
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:400]
        raise CheckpointError(
            f"checkpoint {step_dir}: {source} does not fit {shape['arch']} with M={shape['num_members']}, "
            f"K={shape['num_classes']}: {detail}"
        ) from None
    if which == "ema":
        log.info(
            "checkpoint %s: the EMA weights (what its run validated with; --weights raw for the trained ones)", step_dir
        )
    mean, std = normalization_of(step_dir, shape["arch"])
    return LoadedCheckpoint(step_dir, int(state.get("step", 0)), config, shape, model.eval(), mean, std, which)


def normalization_of(step_dir: Path, arch: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the run normalised with: its run.json (`<run>/run.json`), else timm's for `arch` (warned)."""
    run_json = step_dir.parent.parent / "run.json"
    try:
        norm = json.loads(run_json.read_text())["normalization"]
        return tuple(float(v) for v in norm["mean"]), tuple(float(v) for v in norm["std"])
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("no normalization in %s: using timm's statistics for %s", run_json, arch)
        return timm_mean_std(arch)
