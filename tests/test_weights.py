"""model/weights in process: the folded exports (file and hub folder), the readers of vanilla weights and
`init_from_vanilla`, against values computed here by hand. Fast, so `make mutation` can select them (issue 22);
the end-to-end tests (a trained run, timm in a fresh process) are in test_evaluate_export.py.

M = 3 members throughout, so a sum and a mean of the members differ, and so do / M and / 2."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
from pathlib import Path

import pytest
import timm
import torch
from conftest import tmpfs_mount
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from mixmo_dist.checkpoint.reader import LoadedCheckpoint
from mixmo_dist.checkpoint.store import CheckpointStore
from mixmo_dist.config.schema import Config, DataConfig
from mixmo_dist.model import build_model
from mixmo_dist.model.weights import (
    _model_card,
    export_folded,
    export_hub,
    hub_config,
    init_from_vanilla,
    load_vanilla_state_dict,
    split_standardized,
)

ARCH, M, K = "resnet18", 3, 5
# A narrow, shallow resnet18 (timm's own keyword arguments): every key and shape of the real one, 0.1M parameters.
SMALL = {"layers": (1, 1, 1, 1), "channels": (8, 16, 32, 64), "stem_width": 8}
CLASSES = ["ant", "bee", "cat", "dog", "eel"]


def _randomised(model):
    """Every parameter and BatchNorm buffer random (the reference init zeroes biases and sets BN to identity, at
    which a lost bias or a swapped buffer would not show)."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.dtype.is_floating_point:
                values = torch.rand(t.shape, generator=gen) * 0.2 + (0.5 if "running_var" in name else -0.1)
                t.copy_(values)
    return model.eval()


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    model = _randomised(build_model(ARCH, M, K, **SMALL))
    path = tmp_path_factory.mktemp("run") / "checkpoints" / "step_00000042"
    config = Config(data=DataConfig(image_size=40, val_resize_ratio=0.8))
    shape = {"arch": ARCH, "num_members": M, "num_classes": K, "classes": CLASSES}
    return LoadedCheckpoint(
        path=path, step=42, config=config, shape=shape, model=model, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6)
    )


def _plain(state):
    plain = timm.create_model(ARCH, num_classes=K, pretrained=False, **SMALL)
    plain.load_state_dict(state, strict=True)
    return plain.eval()


def _mean_member_logits(model, x):
    with torch.no_grad():
        out = model(x)  # eval: [M, B, K]
    assert out.shape == (M, x.shape[0], K)
    return out.mean(0)


def test_folded_state_dict_sums_encoders_and_averages_heads(loaded):
    model = loaded.model
    state = model.folded_state_dict()
    torch.testing.assert_close(state["conv1.weight"], sum(e.weight for e in model.encoders), rtol=0, atol=1e-6)
    torch.testing.assert_close(state["fc.weight"], sum(h.weight for h in model.heads) / M, rtol=0, atol=1e-6)
    torch.testing.assert_close(state["fc.bias"], sum(h.bias for h in model.heads) / M, rtol=0, atol=1e-6)
    x = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(_plain(state)(x), _mean_member_logits(model, x), rtol=1e-4, atol=1e-4)


def test_export_folded_writes_the_folded_weights_and_every_metadata_field(loaded, tmp_path):
    out = tmp_path / "a" / "b" / "model.safetensors"  # two folders to create
    meta = export_folded(loaded, out)
    export_folded(loaded, out.parent / "again.safetensors")  # into a folder that exists
    (out.parent / "again.safetensors").unlink()
    expected = {
        "format": "timm",
        "arch": ARCH,
        "num_classes": str(K),
        "classes": json.dumps(CLASSES),
        "mean": "[0.1, 0.2, 0.3]",
        "std": "[0.4, 0.5, 0.6]",
        "source_checkpoint": str(loaded.path.resolve()),
        "source_step": "42",
        "source_weights": "raw",
        "num_members": str(M),
    }
    assert meta == expected
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == expected
    written = load_file(str(out))
    folded = loaded.model.folded_state_dict()
    assert set(written) == set(folded)
    for key, value in folded.items():
        assert torch.equal(written[key], value), key
    assert sorted(os.listdir(out.parent)) == ["model.safetensors"]  # written atomically: no part file left


def test_export_folded_refuses_another_suffix(loaded, tmp_path):
    out = tmp_path / "model.pth"
    with pytest.raises(ValueError, match=rf"^--out {out}: the export is a safetensors file, its name must end in"):
        export_folded(loaded, out)
    assert not out.exists()


def test_hub_config_every_field(loaded):
    config = hub_config(loaded)
    assert config == {
        "architecture": ARCH,
        "num_classes": K,
        "label_names": CLASSES,
        "pretrained_cfg": {
            "input_size": [3, 40, 40],
            "interpolation": "bilinear",
            "crop_pct": 0.8,
            "crop_mode": "center",
            "mean": [0.1, 0.2, 0.3],
            "std": [0.4, 0.5, 0.6],
            "num_classes": K,
            "classifier": "fc",
        },
        "mixmo": {
            "num_members": M,
            "source_checkpoint": str(loaded.path.resolve()),
            "source_step": 42,
            "source_weights": "raw",
            "folding": "encoders summed, heads averaged: the logits are the members' mean logits",
        },
    }


def test_model_card_with_and_without_metrics(loaded):
    config = hub_config(loaded)
    card = _model_card(config, {"top1": 0.75, "nll": 0.5})
    lines = card.splitlines()
    assert lines[:5] == [
        "---",
        "library_name: timm",
        "tags: [image-classification, timm, mixmo]",
        "---",
        f"# {ARCH}, MixMo M=3, folded",
    ]
    assert "Step 42 (the trained weights) of" in card and "5 classes, input 40 px." in card
    assert 'model = timm.create_model("local-dir:PATH_TO_THIS_FOLDER", pretrained=True)' in lines
    assert lines[-3:] == ["|---|---|", "| top1 | 0.75 |", "| nll | 0.5 |"]
    assert card.endswith("| nll | 0.5 |\n")
    assert (
        card
        == "\n".join(
            [
                "---",
                "library_name: timm",
                "tags: [image-classification, timm, mixmo]",
                "---",
                "# resnet18, MixMo M=3, folded",
                "",
                "A 3-member MixMo network (Ramé, Sun, Cord, ICCV 2021) trained with mixmo_dist and folded into a "
                "plain timm `resnet18` (encoders summed, heads averaged: the logits are the members' mean logits). "
                "Step 42 (the trained weights) of "
                f"`{loaded.path.resolve()}`; 5 classes, input 40 px.",
                "",
                "```python",
                "import timm",
                'model = timm.create_model("local-dir:PATH_TO_THIS_FOLDER", pretrained=True)',
                "```",
                "",
                "| metric (the run's last validation) | value |",
                "|---|---|",
                "| top1 | 0.75 |",
                "| nll | 0.5 |",
            ]
        )
        + "\n"
    )
    bare = _model_card(config, None)
    assert bare.endswith("The run recorded no validation metrics.\n") and "| metric" not in bare
    assert _model_card(config, {}).endswith("The run recorded no validation metrics.\n")
    ema = hub_config(dataclasses.replace(loaded, weights="ema"))
    assert ema["mixmo"]["source_weights"] == "ema" and "Step 42 (the EMA weights) of" in _model_card(ema, None)


def test_export_hub_writes_the_folder_and_only_it(loaded, tmp_path):
    out = tmp_path / "hub"
    config = export_hub(loaded, out, {"top1": 0.5})
    assert config == hub_config(loaded)
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["hub"]  # no part folder left (checked before the nested export)
    assert (out / "config.json").read_text() == json.dumps(config, indent=2) + "\n"
    nested = tmp_path / "x" / "y" / "hub"
    export_hub(loaded, nested)
    assert sorted(os.listdir(nested)) == ["README.md", "config.json", "model.safetensors"]
    assert (out / "README.md").read_text() == _model_card(config, {"top1": 0.5})
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    written = load_file(str(out / "model.safetensors"))
    for key, value in loaded.model.folded_state_dict().items():
        assert torch.equal(written[key], value), key
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(out):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_export_hub_into_an_empty_folder_and_refusals(loaded, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    export_hub(loaded, empty)
    assert (empty / "README.md").read_text().endswith("The run recorded no validation metrics.\n")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match=rf"^--hub-dir {full}: exists and is not an empty folder; choose a new one"):
        export_hub(loaded, full)
    assert os.listdir(full) == ["keep.txt"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="exists and is not an empty folder"):
        export_hub(loaded, a_file)
    assert a_file.read_text() == "x"


def test_export_hub_that_fails_midway_leaves_nothing(loaded, tmp_path):
    class Unprintable:
        def __format__(self, spec):
            raise RuntimeError("cannot print this metric")

    out = tmp_path / "hub"
    with pytest.raises(RuntimeError, match="cannot print this metric"):
        export_hub(loaded, out, {"top1": Unprintable()})
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------ vanilla weights in


def _vanilla():
    return _randomised(timm.create_model(ARCH, num_classes=K, pretrained=False, **SMALL))


def _one_member_run(tmp_path: Path, vanilla_state, members=1, extra=None) -> Path:
    """A run directory of ours holding a 1-member checkpoint in our own key layout."""
    store = CheckpointStore(tmp_path / "run1" / "checkpoints", keep_last=1)
    tensors = {f"core.{k}": v for k, v in vanilla_state.items() if not k.startswith(("conv1.", "fc."))}
    tensors["encoders.0.weight"] = vanilla_state["conv1.weight"]
    tensors["heads.0.weight"] = vanilla_state["fc.weight"]
    tensors["heads.0.bias"] = vanilla_state["fc.bias"]
    tensors.update(extra or {})
    tmp = store.begin(7)
    store.write_tensors(tmp, "model.safetensors", tensors)
    store.write_json(tmp, "state.json", {"shape": {"num_members": members, "arch": ARCH}})
    store.commit(tmp, 7)
    return tmp_path / "run1"


@pytest.mark.parametrize("kind", ["safetensors", "pth", "pth_nested_state_dict", "pth_nested_model", "run"])
def test_init_from_vanilla_splits_the_stem_and_copies_the_rest(kind, tmp_path):
    vanilla = _vanilla()
    state = vanilla.state_dict()
    if kind == "safetensors":
        path = tmp_path / "v.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"arch": ARCH})
    elif kind == "run":
        path = _one_member_run(tmp_path, state)
    else:
        path = tmp_path / "v.pth"
        wrapped = {"pth": state, "pth_nested_state_dict": {"state_dict": state, "epoch": 3}}.get(kind)
        torch.save(wrapped if wrapped is not None else {"model": state, "step": 1}, path)
    model = build_model(ARCH, M, K, **SMALL).eval()
    init_from_vanilla(model, str(path))
    for enc in model.encoders:
        torch.testing.assert_close(enc.weight, state["conv1.weight"] / M, rtol=0, atol=0)
    for head in model.heads:
        assert torch.equal(head.weight, state["fc.weight"]) and torch.equal(head.bias, state["fc.bias"])
    for key, value in model.core.state_dict().items():
        assert torch.equal(value, state[key]), key
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(_mean_member_logits(model, x), vanilla(x), rtol=1e-4, atol=1e-4)


def test_init_from_vanilla_splits_a_stem_bias_too(tmp_path):
    arch = "convnext_atto"
    vanilla = timm.create_model(arch, num_classes=K, pretrained=False).eval()
    with torch.no_grad():
        vanilla.stem[0].bias.uniform_(-0.5, 0.5)
    path = tmp_path / "c.safetensors"
    save_file({k: v.contiguous() for k, v in vanilla.state_dict().items()}, str(path))
    model = build_model(arch, M, K).eval()
    init_from_vanilla(model, str(path))
    for enc in model.encoders:
        torch.testing.assert_close(enc.bias, vanilla.stem[0].bias / M, rtol=0, atol=0)
        torch.testing.assert_close(enc.weight, vanilla.stem[0].weight / M, rtol=0, atol=0)


def test_reader_returns_the_arch_the_file_names(tmp_path):
    path = tmp_path / "v.safetensors"
    save_file({"a": torch.ones(2)}, str(path), metadata={"arch": "resnet50"})
    state, arch = load_vanilla_state_dict(path, "conv1", "fc")
    assert arch == "resnet50" and torch.equal(state["a"], torch.ones(2))
    save_file({"a": torch.ones(2)}, str(path))
    assert load_vanilla_state_dict(path, "conv1", "fc")[1] is None
    torch.save({"a": torch.ones(2)}, tmp_path / "v.pt")
    assert load_vanilla_state_dict(tmp_path / "v.pt", "conv1", "fc")[1] is None
    state, arch = load_vanilla_state_dict(_one_member_run(tmp_path, _vanilla().state_dict()), "conv1", "fc")
    assert arch == ARCH and set(state) == set(_vanilla().state_dict())


def test_init_from_errors_name_the_file_and_the_key(tmp_path):
    model = build_model(ARCH, M, K, **SMALL)
    good = _vanilla().state_dict()

    def refused(obj, message, name="v.pth", arch=None):
        path = tmp_path / name
        if name.endswith(".safetensors"):
            save_file(obj, str(path), metadata={"arch": arch} if arch else None)
        elif obj is not None:
            torch.save(obj, path)
        with pytest.raises(ValueError) as err:
            init_from_vanilla(model, str(path))
        assert str(err.value) == f"model.init_from={path}: {message}"

    refused(None, "no such file or directory", name="absent.pth")
    refused(
        {k: v.contiguous() for k, v in good.items()},
        "key arch is 'resnet50', the model is 'resnet18'",
        "a.safetensors",
        "resnet50",
    )
    missing = dict(good)
    missing.pop("layer1.0.bn1.running_mean")
    refused(missing, "key 'layer1.0.bn1.running_mean' is missing (is it a resnet18 checkpoint?)")
    refused(
        good | {"fc.weight": torch.zeros(7, 64), "fc.bias": torch.zeros(7)},
        "key 'fc.bias' has shape (7,), the resnet18 with 5 classes needs (5,)",
    )
    refused(good | {"extra.weight": torch.zeros(1)}, "unexpected key 'extra.weight' (is it a resnet18 checkpoint?)")
    notdict = "not a state_dict (a dict of name -> tensor, possibly under 'state_dict' or 'model')"
    refused([1, 2], notdict)
    refused({}, notdict)
    refused({"a": torch.ones(1), "b": 3}, notdict)
    refused({"state_dict": {"a": 1}}, notdict)
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=rf"^model.init_from={tmp_path / 'bad.safetensors'}: cannot read safetensors"):
        init_from_vanilla(model, str(tmp_path / "bad.safetensors"))
    (tmp_path / "bad.pth").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"cannot load it with torch.load\(weights_only=True\): "):
        init_from_vanilla(model, str(tmp_path / "bad.pth"))
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(
        ValueError, match=r"unsupported file type '.npz'; expected .safetensors, .pth, .pt, .bin or a run"
    ):
        init_from_vanilla(model, str(tmp_path / "w.npz"))


def test_run_directories_must_hold_one_member_and_our_keys(tmp_path):
    model = build_model(ARCH, M, K, **SMALL)
    state = _vanilla().state_dict()
    two = _one_member_run(tmp_path / "a", state, members=2)
    with pytest.raises(ValueError, match=r"key num_members is 2; a run directory must be a 1-member \(vanilla\) run"):
        init_from_vanilla(model, str(two))
    odd = _one_member_run(tmp_path / "b", state, extra={"heads.1.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected key 'heads.1.weight' in .*step_00000007/model.safetensors"):
        init_from_vanilla(model, str(odd))
    empty = tmp_path / "c"
    (empty / "checkpoints").mkdir(parents=True)
    with pytest.raises(ValueError, match=rf"^model.init_from={empty}: run directory {empty} holds no complete"):
        init_from_vanilla(model, str(empty))


def _standardised(w, eps):
    """timm's StdConv2d weight: per output channel, zero mean and unit (biased) variance, with eps."""
    flat = w.reshape(w.shape[0], -1).double()
    mean, var = flat.mean(1, keepdim=True), flat.var(1, unbiased=False, keepdim=True)
    return ((flat - mean) / torch.sqrt(var + eps)).reshape(w.shape)


@pytest.mark.parametrize("members, eps", [(2, 1e-8), (3, 1e-3)])
def test_split_standardized_members_standardise_to_the_vanillas_standardised_weight(members, eps):
    torch.manual_seed(0)
    weight = torch.randn(4, 3, 3, 3) * 0.3 + 0.05
    parts = split_standardized(weight, eps, members)
    assert parts.shape == (members, 4, 3, 3, 3) and parts.dtype == weight.dtype
    target = _standardised(weight, eps)
    stds = [_standardised(parts[m], eps) for m in range(members)]
    torch.testing.assert_close(sum(stds), target, rtol=0, atol=2e-5)
    # Each part is already standardised up to the factor sqrt(var + eps) (its own mean is 0) ...
    for m in range(members):
        assert parts[m].reshape(4, -1).double().mean(1).abs().max() < 1e-6
    # ... and the members differ from each other and from an even split.
    assert not torch.allclose(stds[0], stds[1], atol=1e-3)
    assert not torch.allclose(stds[0], target / members, atol=1e-3)
    # timm's own layer: the M StdConv2d outputs sum to a plain conv with the vanilla's standardised weight.
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    total = 0
    with torch.no_grad():
        for m in range(members):
            conv = timm.layers.StdConv2d(3, 4, 3, eps=eps, bias=False)
            conv.weight.copy_(parts[m])
            total = total + conv(x)
        expected = torch.nn.functional.conv2d(x, target.float(), padding=1)
    torch.testing.assert_close(total, expected, rtol=0, atol=1e-4)


def test_split_standardized_needs_room_for_m_directions():
    with pytest.raises(ValueError) as err:
        split_standardized(torch.randn(2, 1, 2, 2), 1e-8, 3)  # 4 weights per output channel, 3 members need 5
    assert str(err.value) == "a standardised conv with 4 weights per output channel cannot be split into 3"
    assert split_standardized(torch.randn(2, 1, 2, 2), 1e-8, 2).shape == (2, 2, 1, 2, 2)


def _bit(members):
    return build_model("resnetv2_50x1_bit", members, K, channels=(128, 128, 128, 128), stem_chs=32).eval()


def test_a_multi_member_bit_is_not_exported_and_the_message_says_why(loaded, tmp_path):
    bit = dataclasses.replace(loaded, model=_bit(3), shape={**loaded.shape, "arch": "resnetv2_50x1_bit"})
    reason = (
        "cannot export resnetv2_50x1_bit with M=3: its first conv 'stem.conv' is timm's weight-standardised "
        "StdConv2d, and the folded stem (the sum of the 3 members' standardised weights) is no standardised weight, "
        "so timm.create_model would compute another network; use MixMoNet.fold() in Python (exact: a plain first "
        "conv), or evaluate the checkpoint"
    )
    for call, target in (
        (lambda: export_folded(bit, tmp_path / "m.safetensors"), f"--out {tmp_path / 'm.safetensors'}"),
        (lambda: export_hub(bit, tmp_path / "hub"), f"--hub-dir {tmp_path / 'hub'}"),
    ):
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value) == f"{target}: {reason}"
    assert os.listdir(tmp_path) == []
    one = dataclasses.replace(bit, model=_bit(1))
    export_folded(one, tmp_path / "one.safetensors")  # one member: its stem is timm's own


def _run_dir(root: Path, state: dict, first: str, cls: str, shape=True, cls_2d=False, arch="x") -> Path:
    """A run directory of ours (our key layout) holding a vanilla network's weights."""
    store = CheckpointStore(root / "checkpoints", keep_last=1)
    tensors = {}
    for key, value in state.items():
        if key.startswith(first + "."):
            tensors["encoders.0." + key[len(first) + 1 :]] = value
        elif key.startswith(cls + "."):
            value = value.flatten(1) if cls_2d and value.dim() == 4 else value
            tensors["heads.0." + key[len(cls) + 1 :]] = value
        else:
            tensors["core." + key] = value
    tmp = store.begin(3)
    store.write_tensors(tmp, "model.safetensors", tensors)
    store.write_json(tmp, "state.json", {"shape": {"num_members": 1, "arch": arch}} if shape else {"step": 3})
    store.commit(tmp, 3)
    return root


def test_run_directories_with_a_stem_bias_and_a_1x1_conv_head(tmp_path):
    # ConvNeXt: the stem conv has a bias (encoders.0.bias in our runs).
    vanilla = timm.create_model("convnext_atto", num_classes=K, pretrained=False).eval()
    with torch.no_grad():
        vanilla.stem[0].bias.uniform_(-0.5, 0.5)
    state, arch = load_vanilla_state_dict(
        _run_dir(tmp_path / "c", vanilla.state_dict(), "stem.0", "head.fc"), "stem.0", "head.fc"
    )
    assert torch.equal(state["stem.0.bias"], vanilla.stem[0].bias) and arch == "x"
    # ResNet-v2: the classifier is a 1x1 conv [K, D, 1, 1]; our runs store the head as a Linear [K, D].
    v2 = timm.create_model("resnetv2_18", num_classes=K, layers=(1, 1, 1, 1), channels=(32, 32, 32, 32), stem_chs=32)
    root = _run_dir(tmp_path / "v", v2.state_dict(), "stem.conv", "head.fc", cls_2d=True, arch="resnetv2_18")
    state, _ = load_vanilla_state_dict(root, "stem.conv", "head.fc", (K, 32, 1, 1))
    assert state["head.fc.weight"].shape == (K, 32, 1, 1)
    assert torch.equal(state["head.fc.weight"], v2.head.fc.weight)
    state, _ = load_vanilla_state_dict(root, "stem.conv", "head.fc")  # no shape given: kept as stored
    assert state["head.fc.weight"].shape == (K, 32)
    model = build_model("resnetv2_18", M, K, layers=(1, 1, 1, 1), channels=(32, 32, 32, 32), stem_chs=32).eval()
    init_from_vanilla(model, str(root))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(_mean_member_logits(model, x), v2.eval()(x), rtol=1e-4, atol=1e-4)


def test_a_run_directory_without_a_shape_or_with_more_members_is_named(tmp_path):
    state = _vanilla().state_dict()
    root = _run_dir(tmp_path / "a", state, "conv1", "fc", shape=False)
    with pytest.raises(ValueError) as err:
        load_vanilla_state_dict(root, "conv1", "fc")
    assert str(err.value) == (
        f"model.init_from={root}: key num_members is None; a run directory must be a 1-member (vanilla) run; "
        "export a MixMo run with `python -m mixmo_dist.export` and pass the file instead"
    )


def test_a_pickle_that_is_more_than_weights_is_refused_unread(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.ones(2), "code": _Pickled()}, path)
    with pytest.raises(Exception) as torch_err:
        torch.load(path, map_location="cpu", weights_only=True)
    detail = " ".join(str(torch_err.value).split())[:300]
    assert len(" ".join(str(torch_err.value).split())) > 300  # the cut is exercised
    with pytest.raises(ValueError) as err:
        load_vanilla_state_dict(path, "conv1", "fc")
    assert str(err.value) == f"model.init_from={path}: cannot load it with torch.load(weights_only=True): {detail}"


class _Pickled:
    """An object torch.load(weights_only=True) refuses to build."""


def test_a_failed_safetensors_write_is_raised_as_the_oserror_it_is(tmp_path):
    """safetensors reports a full disk as its own SafetensorError; `_save_file` raises it as an OSError (errno,
    message, file) so the commands' one-line handling of OSError names it. A real 64 KiB tmpfs."""
    from mixmo_dist.model.weights import _save_file

    with tmpfs_mount(tmp_path / "disk", "64k") as disk:
        target = disk / "x.safetensors"
        with pytest.raises(OSError) as info:
            _save_file({"a": torch.zeros(100_000)}, target, {"format": "pt"})
        err = info.value
        assert (err.errno, err.strerror, err.filename) == (errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
        assert isinstance(err.__cause__, SafetensorError)
        _save_file({"a": torch.arange(4.0)}, target, {"format": "pt"})  # what fits is written
        assert torch.equal(load_file(str(target))["a"], torch.arange(4.0))
