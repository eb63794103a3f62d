"""Weight files in and out of MixMo form.

- `init_from_vanilla(model, path)` (`model.init_from`): starts a MixMo network from a vanilla network of the same
  arch (an exported or timm safetensors file, a timm `.pth`/`.bin` state_dict, or a 1-member run of ours).
- `export_folded(loaded, out)`: folds a MixMo network into the plain timm model of the same arch (encoders summed,
  heads averaged: its logits are the ensemble's mean logits) and writes its state_dict as safetensors with metadata
  {arch, num_classes, classes, mean, std, source_checkpoint, format: timm}, so `timm.create_model(arch,
  num_classes=K, pretrained=True, pretrained_cfg_overlay=dict(file=FILE, num_classes=K))` loads it.

- `export_hub(loaded, out_dir, metrics)`: the same folded weights as a folder in the format the Hugging Face Hub
  and timm share: `config.json` (architecture, num_classes, label_names, pretrained_cfg with input size, mean, std,
  crop_pct, interpolation), `model.safetensors` and a `README.md` model card with the run's metrics, which
  `timm.create_model("local-dir:DIR", pretrained=True)` loads. Nothing is uploaded.

Both exports refuse a network whose fold `timm.create_model` cannot rebuild exactly: a weight-standardised stem
(BiT's StdConv2d) with M > 1, whose folded first conv must be a plain conv (`MixMoNet.fold_needs_plain_stem`); timm
would standardise the summed weights again and compute another network. `MixMoNet.fold()` gives the exact one.

Shape legend: M members, K classes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from mixmo_dist.checkpoint import CheckpointError
from mixmo_dist.checkpoint.store import CheckpointStore, resolve_checkpoint
from mixmo_dist.runtime.files import _umask, atomic_path

from .mixmo import MixMoNet, StdConv2d

if TYPE_CHECKING:
    from mixmo_dist.checkpoint.reader import LoadedCheckpoint

log = logging.getLogger("mixmo_dist")

_TORCH_SUFFIXES = (".pth", ".pt", ".bin")


def check_timm_can_rebuild(model: MixMoNet, target: str) -> None:
    """Raise a one-line ValueError naming the reason when timm cannot rebuild `model`'s fold from its weights."""
    if model.fold_needs_plain_stem:
        raise ValueError(
            f"{target}: cannot export {model.arch} with M={model.num_members}: its first conv "
            f"{model.first_conv_name!r} is timm's weight-standardised StdConv2d, and the folded stem (the sum of the "
            f"{model.num_members} members' standardised weights) is no standardised weight, so timm.create_model "
            "would compute another network; "
            "use MixMoNet.fold() in Python (exact: a plain first conv), or evaluate the checkpoint"
        )


def export_folded(loaded: LoadedCheckpoint, out: str | os.PathLike[str]) -> dict[str, str]:
    """Write the folded timm state_dict of `loaded` to the safetensors file `out` (atomically).

    Returns:
        The metadata stored in the file's header (all values are strings; lists are JSON).

    Raises:
        ValueError: `out` is not a .safetensors name, or timm cannot rebuild the fold (`check_timm_can_rebuild`).
    """
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out}: the export is a safetensors file, its name must end in .safetensors")
    check_timm_can_rebuild(loaded.model, f"--out {out}")
    metadata = {
        "format": "timm",
        "arch": str(loaded.shape["arch"]),
        "num_classes": str(loaded.shape["num_classes"]),
        "classes": json.dumps(loaded.classes),
        "mean": json.dumps(list(loaded.mean)),
        "std": json.dumps(list(loaded.std)),
        "source_checkpoint": str(loaded.path.resolve()),
        "source_step": str(loaded.step),
        "source_weights": loaded.weights,
        "num_members": str(loaded.shape["num_members"]),
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in loaded.model.folded_state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as part:
        _save_file(tensors, part, metadata)
    return metadata


def hub_config(loaded: LoadedCheckpoint) -> dict[str, Any]:
    """`config.json` of a hub-format folder: what timm's `local-dir:` loader reads to build and preprocess the model.

    The input size and crop fraction are the run's validation transform (`data.image_size`, resized by
    `data.val_resize_ratio` then center-cropped), the interpolation is the loaders' bilinear resize.
    """
    data = loaded.config.data
    num_classes = int(loaded.shape["num_classes"])
    return {
        "architecture": str(loaded.shape["arch"]),
        "num_classes": num_classes,
        "label_names": loaded.classes,
        "pretrained_cfg": {
            "input_size": [3, int(data.image_size), int(data.image_size)],
            "interpolation": "bilinear",
            "crop_pct": float(data.val_resize_ratio),
            "crop_mode": "center",
            "mean": list(loaded.mean),
            "std": list(loaded.std),
            "num_classes": num_classes,
            "classifier": loaded.model.classifier_name,
        },
        "mixmo": {
            "num_members": int(loaded.shape["num_members"]),
            "source_checkpoint": str(loaded.path.resolve()),
            "source_step": int(loaded.step),
            "source_weights": loaded.weights,
            "folding": "encoders summed, heads averaged: the logits are the members' mean logits",
        },
    }


def _model_card(config: dict[str, Any], metrics: dict[str, Any] | None) -> str:
    arch, mixmo = config["architecture"], config["mixmo"]
    lines = [
        "---",
        "library_name: timm",
        "tags: [image-classification, timm, mixmo]",
        "---",
        f"# {arch}, MixMo M={mixmo['num_members']}, folded",
        "",
        f"A {mixmo['num_members']}-member MixMo network (Ramé, Sun, Cord, ICCV 2021) trained with mixmo_dist and "
        f"folded into a plain timm `{arch}` ({mixmo['folding']}). Step {mixmo['source_step']} "
        f"({'the EMA weights' if mixmo.get('source_weights') == 'ema' else 'the trained weights'}) of "
        f"`{mixmo['source_checkpoint']}`; {config['num_classes']} classes, input "
        f"{config['pretrained_cfg']['input_size'][1]} px.",
        "",
        "```python",
        "import timm",
        'model = timm.create_model("local-dir:PATH_TO_THIS_FOLDER", pretrained=True)',
        "```",
        "",
    ]
    if metrics:
        lines += ["| metric (the run's last validation) | value |", "|---|---|"]
        lines += [f"| {key} | {value} |" for key, value in metrics.items()]
    else:
        lines.append("The run recorded no validation metrics.")
    return "\n".join(lines) + "\n"


def export_hub(loaded: LoadedCheckpoint, out_dir: str | os.PathLike[str], metrics: dict | None = None) -> dict:
    """Write the folded model as a hub-format folder `out_dir` (created; it must not exist or be empty).

    The folder is written under a temporary name next to it and renamed into place, so a failed export leaves no
    half folder. Returns the config written to `config.json`.

    Raises:
        ValueError: `out_dir` exists and holds files, or timm cannot rebuild the fold (`check_timm_can_rebuild`).
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--hub-dir {out}: exists and is not an empty folder; choose a new one (nothing is replaced)")
    check_timm_can_rebuild(loaded.model, f"--hub-dir {out}")
    config = hub_config(loaded)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in loaded.model.folded_state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.parent / f".{out.name}.part-{os.getpid()}"
    try:
        part.mkdir()
        (part / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _save_file(tensors, part / "model.safetensors", {"format": "pt"})
        (part / "README.md").write_text(_model_card(config, metrics))
        for child in part.iterdir():
            os.chmod(child, 0o666 & ~_umask())
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(part, out)
    except BaseException:
        shutil.rmtree(part, ignore_errors=True)
        raise
    return config


def _save_file(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors' `save_file`, with a failed write raised as the OSError it is: safetensors reports a full disk or
    a quota as its own SafetensorError ("I/O error: No space left on device (os error 28)"), which the commands'
    one-line handling of OSError would not catch."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as err:
        code = re.search(r"os error (\d+)", str(err))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from err


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


def _from_run(
    path: Path, first_conv: str, classifier: str, classifier_shape: tuple[int, ...] | None = None
) -> tuple[dict[str, Tensor], str]:
    """The timm-form state_dict of a 1-member run/step directory, and its arch (the head's [K,D] weight reshaped to
    `classifier_shape` when given, e.g. BiT's 1x1-conv classifier)."""
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
        elif key in ("encoders.0.weight", "encoders.0.bias"):
            state[f"{first_conv}.{key[len('encoders.0.') :]}"] = value
        elif key == "heads.0.weight" and classifier_shape is not None and value.numel() == math.prod(classifier_shape):
            state[f"{classifier}.weight"] = value.reshape(classifier_shape)
        elif key.startswith("heads.0."):
            state[f"{classifier}.{key[len('heads.0.') :]}"] = value
        else:
            raise ValueError(f"model.init_from={path}: unexpected key {key!r} in {step_dir}/model.safetensors")
    return state, str(shape.get("arch"))


def load_vanilla_state_dict(
    path: str | os.PathLike[str], first_conv: str, classifier: str, classifier_shape: tuple[int, ...] | None = None
):
    """Read a vanilla network's weights in timm form.

    Args:
        path: a `.safetensors` file (timm or exported), a `.pth`/`.pt`/`.bin` state_dict (loaded with
            `torch.load(weights_only=True)`), or a 1-member run/step directory of ours.
        first_conv, classifier: the arch's first conv and classifier module names (timm metadata).
        classifier_shape: timm's classifier weight shape, to which a run's [K,D] head is reshaped.

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
            return _from_run(p, first_conv, classifier, classifier_shape)
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


def split_standardized(weight: Tensor, eps: float, num_members: int) -> Tensor:
    """M weights [M,O,I,kh,kw] whose StdConv2d standardisations sum to that of `weight` [O,I,kh,kw], and differ.

    Per output channel (a vector of n = I kh kw values, variance var), with s = std(weight) (zero mean, variance
    var_s = var / (var + eps)): W_m = (s / M + r_m) * sqrt(var + eps), where the r_m are orthogonal to s and to the
    constant vector, sum to 0 and have squared norm |s|^2 (1 - 1/M^2). Then s / M + r_m has zero mean and the
    variance var_s, so std(W_m) = s / M + r_m (in exact arithmetic; float32 agrees to rounding) and the M
    standardisations sum to s. r_m = c (u_m - mean_k u_k) for M random orthonormal u_m (a QR decomposition of
    Gaussian draws, from torch's global RNG) with c = |s| sqrt(1 + 1/M). Dividing the weight by M, as for a plain
    conv, would not do: std(W / M) = std(W), so the members' sum would be M std(W).

    Raises:
        ValueError: fewer than M + 2 values per output channel (no room for M such directions).
    """
    out_channels, n = weight.shape[0], weight[0].numel()
    if n < num_members + 2:
        raise ValueError(f"a standardised conv with {n} weights per output channel cannot be split into {num_members}")
    w_On = weight.detach().reshape(out_channels, n).double()
    var_O1 = w_On.var(dim=1, unbiased=False, keepdim=True)
    s_On = (w_On - w_On.mean(dim=1, keepdim=True)) / torch.sqrt(var_O1 + eps)
    basis_On2 = torch.stack([torch.ones_like(s_On) / n**0.5, s_On / s_On.norm(dim=1, keepdim=True)], dim=2)
    g_OnM = torch.randn(out_channels, n, num_members, dtype=torch.float64)
    g_OnM = g_OnM - basis_On2 @ (basis_On2.transpose(1, 2) @ g_OnM)  # orthogonal to 1 and s
    u_OnM = torch.linalg.qr(g_OnM).Q
    c_O11 = s_On.norm(dim=1)[:, None, None] * (1.0 + 1.0 / num_members) ** 0.5
    r_OnM = c_O11 * (u_OnM - u_OnM.mean(dim=2, keepdim=True))
    # std(t X) = t X / sqrt(t^2 var_s + eps) is X for t^2 = eps / (1 - var_s) = var + eps (var_s = var / (var + eps)).
    w_OnM = (s_On[:, :, None] / num_members + r_OnM) * torch.sqrt(var_O1 + eps)[:, :, None]
    return w_OnM.permute(2, 0, 1).reshape(num_members, *weight.shape).to(weight.dtype)


@torch.no_grad()
def init_from_vanilla(model: MixMoNet, path: str) -> None:
    """Initialise `model` from a vanilla network of the same arch, in place.

    The core takes the vanilla weights and buffers; every encoder takes the vanilla first conv (and its bias)
    divided by M, so the summed evaluation path starts equal to the vanilla network; every head takes the vanilla
    classifier. After it, the eval-mode mean of the member logits equals the vanilla network's logits. A
    weight-standardised stem (BiT) is split with `split_standardized` instead: the standardised encoder weights sum
    to the vanilla conv's standardised weight, and the encoders start different.

    Raises:
        ValueError: naming the file and the key, when the arch differs, a key is missing or unexpected, or a tensor
            shape differs (e.g. another number of classes).
    """
    first_w = f"{model.first_conv_name}.weight"
    cls_w = f"{model.classifier_name}.weight"
    cls_b = f"{model.classifier_name}.bias"
    state, arch = load_vanilla_state_dict(path, model.first_conv_name, model.classifier_name, model.classifier_shape)
    if arch is not None and arch != model.arch:
        raise ValueError(f"model.init_from={path}: key arch is {arch!r}, the model is {model.arch!r}")
    core = model.core.state_dict()
    expected = {k: v.shape for k, v in core.items()}
    expected[first_w] = model.encoders[0].weight.shape
    if model.encoders[0].bias is not None:
        expected[f"{model.first_conv_name}.bias"] = model.encoders[0].bias.shape
    expected[cls_w] = model.classifier_shape
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
    if type(model.encoders[0]) is StdConv2d and m > 1:
        weights = split_standardized(state[first_w], model.encoders[0].eps, m)
    else:
        weights = [state[first_w] / m] * m
    for enc, weight in zip(model.encoders, weights):
        enc.weight.copy_(weight)
        if enc.bias is not None:
            enc.bias.copy_(state[f"{model.first_conv_name}.bias"] / m)
    for head in model.heads:
        head.weight.copy_(state[cls_w].reshape_as(head.weight))
        if head.bias is not None:
            head.bias.copy_(state[cls_b])
    log.info("initialised %s (M=%d) from vanilla weights %s", model.arch, m, path)
