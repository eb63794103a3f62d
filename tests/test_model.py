"""MixMo conversion of timm ResNets: shapes, parameter counts, fold(), channels_last, fullgraph compile."""

import pytest
import torch

from mixmo_dist.model import TESTED_ARCHS, build_model
from mixmo_dist.ops import sample_mixing
from mixmo_dist.training.loss import reweight


def test_resnet50_parameter_count():
    net = build_model("resnet50", 2, 1000)
    assert sum(p.numel() for p in net.parameters()) == 27_615_440
    assert sum(p.numel() for p in build_model("resnet50", 1, 1000).parameters()) == 25_557_032


@pytest.mark.parametrize("arch", TESTED_ARCHS)
def test_every_arch_converts_trains_and_folds(arch):
    torch.manual_seed(0)
    net = build_model(arch, 2, 7)
    # Encoders never hold BN/ReLU: plain bias-free convs, 3 input channels.
    for enc in net.encoders:
        assert isinstance(enc, torch.nn.Conv2d) and enc.bias is None and enc.in_channels == 3
    assert not torch.equal(net.encoders[0].weight, net.encoders[1].weight)
    g = torch.Generator().manual_seed(0)
    h, w = net.encoder_output_hw(64, 64)
    mix = sample_mixing(2, 2, h, w, mixing="cut", alpha=2.0, cut_prob=1.0, generator=g, device="cpu")
    logits = net(torch.randn(2, 2, 3, 64, 64), mix)
    assert logits.shape == (2, 2, 7)
    logits.sum().backward()
    assert all(e.weight.grad is not None for e in net.encoders)
    net.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ens = net(x)
        folded = net.fold().eval()(x)
    assert ens.shape == (2, 2, 7)
    torch.testing.assert_close(folded, ens.mean(0), rtol=1e-4, atol=1e-5)


def test_eval_forward_sums_encoder_outputs():
    net = build_model("resnet18", 3, 5).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        z = sum(enc(x) for enc in net.encoders)
        torch.testing.assert_close(net(x), net.core_and_heads(z), rtol=1e-4, atol=1e-5)


def test_train_forward_applies_factor_m():
    """With all-equal linear masks 1/M, the training mix equals the eval sum for the same images."""
    net = build_model("resnet18", 2, 5).eval()
    x = torch.randn(3, 3, 32, 32)
    h, w = net.encoder_output_hw(32, 32)
    mix = sample_mixing(3, 2, h, w, mixing="none", alpha=2.0, cut_prob=0.0, generator=None, device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(net(torch.stack([x, x]), mix), net(x), rtol=1e-4, atol=1e-5)


def test_unsupported_arch_names_it():
    with pytest.raises(ValueError, match="not_an_arch"):
        build_model("not_an_arch", 2, 10)
    with pytest.raises(ValueError, match="vit_tiny_patch16_224"):
        build_model("vit_tiny_patch16_224", 2, 10)


def test_channels_last_end_to_end():
    net = build_model("resnet18", 2, 5).to(memory_format=torch.channels_last)
    x = torch.randn(2, 4, 3, 32, 32)
    x = torch.stack(
        [x[0].contiguous(memory_format=torch.channels_last), x[1].contiguous(memory_format=torch.channels_last)]
    )
    h, w = net.encoder_output_hw(32, 32)
    mix = sample_mixing(4, 2, h, w, mixing="cut", alpha=2.0, cut_prob=1.0, generator=None, device="cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = net(x, mix)
    w_ = reweight(mix.lam_MB, 3.0)
    (logits.float().sum(-1) * w_).sum().backward()
    assert net.encoders[0].weight.grad is not None


@pytest.mark.slow
def test_train_forward_compiles_fullgraph():
    torch._dynamo.reset()
    net = build_model("resnet18", 2, 5)
    h, w = net.encoder_output_hw(32, 32)
    g = torch.Generator().manual_seed(0)
    mix = sample_mixing(2, 2, h, w, mixing="cut", alpha=2.0, cut_prob=0.5, generator=g, device="cpu")
    x = torch.randn(2, 2, 3, 32, 32)
    compiled = torch.compile(net.forward_train, fullgraph=True)
    out = compiled(x, mix.boxes_B4, mix.coef_in_MB, mix.coef_out_MB)
    ref = net.forward_train(x, mix.boxes_B4, mix.coef_in_MB, mix.coef_out_MB)
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-4)
