"""Weight files in and out of MixMo form.

- Reading a run back for inference: `resolve_checkpoint` (a step dir or a run dir -> a verified step dir) and
  `load_checkpoint` (-> the MixMoNet, its stored config and shape), used by `evaluate` and by `export`.
- `python -m mixmo_dist.export --checkpoint DIR --out FILE.safetensors`: folds the MixMo network into the plain timm
  model of the same arch (encoders summed, heads averaged: its logits are the ensemble's mean logits) and writes its
  state_dict as safetensors with metadata {arch, num_classes, classes, mean, std, source_checkpoint, format: timm}, so
  `timm.create_model(arch, num_classes=K, pretrained=True, pretrained_cfg_overlay=dict(file=FILE, num_classes=K))`
  loads it.
- `init_from_vanilla(model, path)` (`model.init_from`): starts a MixMo network from a vanilla network of the same
  arch (an exported or timm safetensors file, a timm `.pth`/`.bin` state_dict, or a 1-member run of ours).

Shape legend: M members, K classes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

import mixmo_dist.model.registry  # noqa: F401  (registers the paper's archs with timm)
from mixmo_dist.checkpoint import CheckpointError, CheckpointStore, apply_umask, parse_step_dir_name
from mixmo_dist.config import Config, ConfigError, config_from_dict
from mixmo_dist.data import timm_mean_std
from mixmo_dist.model import MixMoNet, build_model

__all__ = [
    "LoadedCheckpoint",
    "export_folded",
    "init_from_vanilla",
    "load_checkpoint",
    "load_vanilla_state_dict",
    "main",
    "normalization_of",
    "resolve_checkpoint",
]

log = logging.getLogger("mixmo_dist")

_SHAPE_KEYS = ("arch", "num_members", "num_classes", "classes")
# Settings that define the network's tensors: an override cannot change them, the checkpoint's shape decides.
_SHAPE_OVERRIDES = {("model", "arch"), ("model", "num_classes"), ("mixmo", "num_members")}
_TORCH_SUFFIXES = (".pth", ".pt", ".bin")


# --------------------------------------------------------------------------------------------------------------
# Reading a run back.
# --------------------------------------------------------------------------------------------------------------


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """The verified checkpoint directory that `path` names.

    Args:
        path: a step directory (`.../checkpoints/step_<N>`) or a run output directory (then its newest complete
            checkpoint, found by `CheckpointStore.find_latest`, which moves corrupt ones aside).

    Raises:
        CheckpointError: `path` does not exist, is neither kind of directory, holds no complete checkpoint, or the
            step directory fails its sha256 verification (the message names it and the reason).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint {path}: no such file or directory")
    if p.is_dir() and parse_step_dir_name(p.name) is not None:
        reason = CheckpointStore(p.parent, keep_last=1).verify(p)
        if reason is not None:
            raise CheckpointError(f"checkpoint {p} is not usable: {reason}")
        return p
    root = p / "checkpoints"
    if p.is_dir() and root.is_dir():
        found = CheckpointStore(root, keep_last=1).find_latest()
        if found is None:
            raise CheckpointError(f"run directory {p} holds no complete checkpoint under {root}")
        return found
    raise CheckpointError(
        f"checkpoint {path} is neither a step directory (checkpoints/step_<8 digits>) nor a run output directory "
        "(one holding checkpoints/)"
    )


@dataclass
class LoadedCheckpoint:
    """A MixMo network read back from a verified checkpoint directory.

    Attributes:
        path: the step directory.
        step: the optimizer step it was saved at.
        config: the stored config with the command-line overrides applied.
        shape: the stored shape settings (arch, num_members, num_classes, classes, ...).
        model: the MixMoNet with the checkpoint's weights, on the CPU, in eval mode.
    """

    path: Path
    step: int
    config: Config
    shape: dict
    model: MixMoNet

    @property
    def classes(self) -> list[str]:
        return list(self.shape["classes"])


def _merge(stored: Mapping[str, Any], overrides: Mapping[str, Mapping[str, Any]]) -> dict:
    merged = {section: dict(values or {}) for section, values in stored.items()}
    for section, values in overrides.items():
        merged.setdefault(section, {}).update(values)
    return merged


def load_checkpoint(step_dir: str | os.PathLike[str], overrides: Mapping[str, Mapping[str, Any]] | None = None):
    """Rebuild the MixMoNet of a verified step directory (see `resolve_checkpoint`) from its own files.

    Args:
        step_dir: the checkpoint directory.
        overrides: `{section: {key: value}}` applied over the stored config (e.g. a new `data.root`); settings that
            define tensor shapes (model.arch, model.num_classes, mixmo.num_members) come from the checkpoint.

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
    tensors = store.read_tensors(step_dir, "model.safetensors")
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:400]
        raise CheckpointError(
            f"checkpoint {step_dir}: model.safetensors does not fit {shape['arch']} with M={shape['num_members']}, "
            f"K={shape['num_classes']}: {detail}"
        ) from None
    return LoadedCheckpoint(step_dir, int(state.get("step", 0)), config, shape, model.eval())


def normalization_of(step_dir: Path, arch: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the run normalised with: its run.json (`<run>/run.json`), else timm's for `arch` (warned)."""
    run_json = step_dir.parent.parent / "run.json"
    try:
        norm = json.loads(run_json.read_text())["normalization"]
        return tuple(float(v) for v in norm["mean"]), tuple(float(v) for v in norm["std"])
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("no normalization in %s: using timm's statistics for %s", run_json, arch)
        return timm_mean_std(arch)


# --------------------------------------------------------------------------------------------------------------
# Export.
# --------------------------------------------------------------------------------------------------------------


def export_folded(loaded: LoadedCheckpoint, out: str | os.PathLike[str]) -> dict[str, str]:
    """Write the folded timm state_dict of `loaded` to the safetensors file `out` (atomically).

    Returns:
        The metadata stored in the file's header (all values are strings; lists are JSON).
    """
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out}: the export is a safetensors file, its name must end in .safetensors")
    mean, std = normalization_of(loaded.path, loaded.shape["arch"])
    metadata = {
        "format": "timm",
        "arch": str(loaded.shape["arch"]),
        "num_classes": str(loaded.shape["num_classes"]),
        "classes": json.dumps(loaded.classes),
        "mean": json.dumps(list(mean)),
        "std": json.dumps(list(std)),
        "source_checkpoint": str(loaded.path.resolve()),
        "source_step": str(loaded.step),
        "num_members": str(loaded.shape["num_members"]),
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in loaded.model.folded_state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(f".{out.name}.part-{os.getpid()}")
    try:
        save_file(tensors, str(part), metadata=metadata)
        apply_umask(part)
        os.replace(part, out)
    finally:
        part.unlink(missing_ok=True)
    return metadata


# --------------------------------------------------------------------------------------------------------------
# init_from.
# --------------------------------------------------------------------------------------------------------------


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, Tensor]:
    # Training scripts often nest the weights one level down; those two spellings are accepted, nothing else.
    if isinstance(obj, dict) and len(obj) and not all(isinstance(v, Tensor) for v in obj.values()):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if (
        not isinstance(obj, dict)
        or not obj
        or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    ):
        raise ValueError(
            f"model.init_from={path}: not a state_dict (a dict of name -> tensor, possibly under 'state_dict' or "
            "'model')"
        )
    return obj


def _from_run(path: Path, first_conv: str, classifier: str) -> tuple[dict[str, Tensor], str]:
    """The timm-form state_dict of a 1-member run/step directory, and its arch."""
    step_dir = resolve_checkpoint(path)
    store = CheckpointStore(step_dir.parent, keep_last=1)
    shape = store.read_json(step_dir, "state.json").get("shape", {})
    if shape.get("num_members") != 1:
        raise ValueError(
            f"model.init_from={path}: key num_members is {shape.get('num_members')!r}; a run directory must be a "
            "1-member (vanilla) run; export a MixMo run with `python -m mixmo_dist.export` and pass the file instead"
        )
    state = {}
    for key, value in store.read_tensors(step_dir, "model.safetensors").items():
        if key.startswith("core."):
            state[key[len("core.") :]] = value
        elif key == "encoders.0.weight":
            state[f"{first_conv}.weight"] = value
        elif key.startswith("heads.0."):
            state[f"{classifier}.{key[len('heads.0.') :]}"] = value
        else:
            raise ValueError(f"model.init_from={path}: unexpected key {key!r} in {step_dir}/model.safetensors")
    return state, str(shape.get("arch"))


def load_vanilla_state_dict(path: str | os.PathLike[str], first_conv: str, classifier: str):
    """Read a vanilla network's weights in timm form.

    Args:
        path: a `.safetensors` file (timm or exported), a `.pth`/`.pt`/`.bin` state_dict (loaded with
            `torch.load(weights_only=True)`), or a 1-member run/step directory of ours.
        first_conv, classifier: the arch's first conv and classifier module names (timm metadata).

    Returns:
        (state_dict, arch or None when the file does not say).

    Raises:
        ValueError: unreadable file, unsupported kind, or a run directory with more than one member.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"model.init_from={path}: no such file or directory")
    if p.is_dir():
        try:
            return _from_run(p, first_conv, classifier)
        except CheckpointError as err:
            raise ValueError(f"model.init_from={path}: {err}") from None
    if p.suffix == ".safetensors":
        try:
            with safe_open(str(p), framework="pt") as f:
                arch = (f.metadata() or {}).get("arch")
            return load_file(str(p)), arch
        except (SafetensorError, OSError) as err:
            raise ValueError(f"model.init_from={path}: cannot read safetensors file: {err}") from None
    if p.suffix in _TORCH_SUFFIXES:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as err:
            detail = " ".join(str(err).split())[:300]
            raise ValueError(
                f"model.init_from={path}: cannot load it with torch.load(weights_only=True): {detail}"
            ) from None
        return _unwrap_state_dict(obj, p), None
    raise ValueError(
        f"model.init_from={path}: unsupported file type {p.suffix!r}; expected .safetensors, "
        f"{', '.join(_TORCH_SUFFIXES)} or a run directory"
    )


@torch.no_grad()
def init_from_vanilla(model: MixMoNet, path: str) -> None:
    """Initialise `model` from a vanilla network of the same arch, in place.

    The core takes the vanilla weights and buffers; every encoder takes the vanilla first conv divided by M, so the
    summed evaluation path starts equal to the vanilla network; every head takes the vanilla classifier. After it,
    the eval-mode mean of the member logits equals the vanilla network's logits.

    Raises:
        ValueError: naming the file and the key, when the arch differs, a key is missing or unexpected, or a tensor
            shape differs (e.g. another number of classes).
    """
    first_w = f"{model.first_conv_name}.weight"
    cls_w = f"{model.classifier_name}.weight"
    cls_b = f"{model.classifier_name}.bias"
    state, arch = load_vanilla_state_dict(path, model.first_conv_name, model.classifier_name)
    if arch is not None and arch != model.arch:
        raise ValueError(f"model.init_from={path}: key arch is {arch!r}, the model is {model.arch!r}")
    core = model.core.state_dict()
    expected = {k: v.shape for k, v in core.items()}
    expected[first_w] = model.encoders[0].weight.shape
    expected[cls_w] = model.heads[0].weight.shape
    if model.heads[0].bias is not None:
        expected[cls_b] = model.heads[0].bias.shape
    for key in sorted(expected):
        if key not in state:
            raise ValueError(f"model.init_from={path}: key {key!r} is missing (is it a {model.arch} checkpoint?)")
        if tuple(state[key].shape) != tuple(expected[key]):
            raise ValueError(
                f"model.init_from={path}: key {key!r} has shape {tuple(state[key].shape)}, the {model.arch} with "
                f"{model.num_classes} classes needs {tuple(expected[key])}"
            )
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise ValueError(f"model.init_from={path}: unexpected key {unexpected[0]!r} (is it a {model.arch} checkpoint?)")
    model.core.load_state_dict({k: state[k] for k in core}, strict=True)
    m = len(model.encoders)
    for enc in model.encoders:
        enc.weight.copy_(state[first_w] / m)
    for head in model.heads:
        head.weight.copy_(state[cls_w])
        if head.bias is not None:
            head.bias.copy_(state[cls_b])
    log.info("initialised %s (M=%d) from vanilla weights %s", model.arch, m, path)


# --------------------------------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """`python -m mixmo_dist.export --checkpoint DIR --out FILE.safetensors`; prints the metadata as JSON."""
    parser = argparse.ArgumentParser(
        prog="python -m mixmo_dist.export", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    parser.add_argument("--checkpoint", required=True, help="step directory or run output directory")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    try:
        loaded = load_checkpoint(resolve_checkpoint(args.checkpoint))
        metadata = export_folded(loaded, args.out)
    except (ConfigError, CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    log.info("exported %s (step %d) to %s", loaded.path, loaded.step, args.out)
    print(json.dumps({"out": str(args.out), **metadata}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
