"""model.sync_bn on CPU: refused naming the key; a SyncBN-trained checkpoint loads for evaluate and export.

What one GPU can show (a 1-rank SyncBN step equals plain BN, the conversion keeps the keys) is in tests/test_gpu.py,
which `make gpu-check` runs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import run_train, tiny_args
from safetensors import safe_open
from torch import nn

from mixmo_dist.checkpoint.reader import load_checkpoint, resolve_checkpoint
from mixmo_dist.checkpoint.store import CheckpointStore
from mixmo_dist.config import Config, ConfigError, ModelConfig, config_to_dict
from mixmo_dist.export import main as export_main
from mixmo_dist.model import build_model
from mixmo_dist.model.sync_bn import use_sync_batchnorm

K = 5


def _net() -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet18", 2, K)


def _bn_count(net: nn.Module, kind: type) -> int:
    return sum(type(m) is kind for m in net.modules())


def test_sync_bn_is_refused_on_cpu_naming_the_key():
    with pytest.raises(ConfigError, match="model.sync_bn") as info:
        use_sync_batchnorm(_net(), "cpu")
    assert info.value.key == "model.sync_bn" and "CUDA" in str(info.value)


def test_the_conversion_keeps_timms_fused_norm_and_activation():
    """ResNet-v2's BatchNormAct2d (BN and ReLU in one module) must become timm's SyncBatchNormAct: torch's own
    conversion makes it a bare SyncBatchNorm and silently drops the ReLU. In eval mode a SyncBatchNorm runs no
    collective, so the CPU shows that the converted network computes the same logits."""
    from timm.layers import BatchNormAct2d, SyncBatchNormAct

    torch.manual_seed(0)
    net = build_model("resnetv2_18", 2, K).eval()
    synced = use_sync_batchnorm(copy.deepcopy(net), "cuda").eval()  # only the device type is checked: no GPU needed
    assert _bn_count(synced, BatchNormAct2d) == 0 and _bn_count(synced, SyncBatchNormAct) == _bn_count(
        net, BatchNormAct2d
    )
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(synced(x), net(x), rtol=0, atol=0)


def test_a_cpu_run_with_sync_bn_is_one_line_and_creates_nothing(tiny_data, tmp_path):
    out = tmp_path / "run"
    rc, log = run_train(tiny_args(tiny_data, out, "--model.sync_bn=true"), nproc=1)
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    assert rc == 2 and len(errors) == 1 and "config key model.sync_bn" in errors[0], log[-3000:]
    assert not out.exists()


def test_a_checkpoint_trained_with_sync_bn_loads_for_evaluate_and_export_on_cpu(tmp_path):
    """The trainer saves the SyncBN-converted model's state_dict; evaluate and export rebuild a plain model on the
    CPU and load it strictly (`load_checkpoint`). Written here through the same store, from a converted model whose
    BN statistics differ from a fresh model's, so that the loaded numbers can only come from the file."""
    plain = _net()
    with torch.no_grad():  # a few BN updates so the buffers are not the defaults
        plain.train()(torch.randn(2, 8, 3, 32, 32), torch.tensor([[0, 0, 32, 32]] * 8), torch.ones(2, 8) / 2,
                      torch.ones(2, 8) / 2)  # fmt: skip
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain))  # converting needs no GPU
    assert _bn_count(synced, nn.SyncBatchNorm) == _bn_count(plain, nn.BatchNorm2d) > 0
    assert _bn_count(synced, nn.BatchNorm2d) == 0
    state = synced.state_dict()
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in plain.state_dict().items()}

    run = tmp_path / "run"
    store = CheckpointStore(run / "checkpoints", keep_last=1)
    staging = store.begin(3)
    store.write_tensors(staging, "model.safetensors", state)
    cfg = Config(model=ModelConfig(arch="resnet18", sync_bn=True))
    shape = {"arch": "resnet18", "num_members": 2, "num_classes": K, "classes": [f"c{k}" for k in range(K)]}
    store.write_json(staging, "state.json", {"step": 3, "config": config_to_dict(cfg), "shape": shape})
    step_dir = store.commit(staging, 3)

    loaded = load_checkpoint(resolve_checkpoint(run))
    assert loaded.config.model.sync_bn and _bn_count(loaded.model, nn.SyncBatchNorm) == 0
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), plain.eval()(x), rtol=0, atol=0)
    out = tmp_path / "plain.safetensors"
    assert export_main(["--checkpoint", str(step_dir), "--out", str(out)]) == 0
    with safe_open(str(out), framework="pt") as f:
        assert json.loads(f.metadata()["num_classes"]) == K and "bn1.running_var" in f.keys()
