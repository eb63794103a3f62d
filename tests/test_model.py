"""MixMo conversion of timm ResNets: shapes, parameter counts, fold(), channels_last, fullgraph compile."""

import os

import pytest
import timm
import torch

from mixmo_dist.model import TESTED_ARCHS, MixMoNet, build_model
from mixmo_dist.model.init import reference_init_
from mixmo_dist.model.registry import WideResNet
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
    # Encoders never hold BN/ReLU: plain convs (a bias only where the arch's stem has one), 3 input channels.
    for enc in net.encoders:
        assert isinstance(enc, torch.nn.Conv2d) and enc.in_channels == 3
        assert (enc.bias is not None) == arch.startswith("convnext"), arch
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


def test_a_stem_with_a_bias_trains_and_folds_with_its_biases():
    """ConvNeXt's stem conv has a bias: each encoder is affine, W_m x + b_m. Eval sums weights and biases; the
    training mix of two equal linear masks is the eval sum; the folded timm model gives the mean logits. The biases
    are made large and different so that a dropped or unscaled bias shows."""
    torch.manual_seed(0)
    net = build_model("convnext_atto", 2, 5).eval()
    with torch.no_grad():
        for i, enc in enumerate(net.encoders):
            enc.bias.copy_(torch.linspace(-1.0, 1.0, enc.out_channels) * (i + 1))
    x = torch.randn(3, 3, 64, 64)
    h, w = net.encoder_output_hw(64, 64)
    mix = sample_mixing(3, 2, h, w, mixing="none", alpha=2.0, cut_prob=0.0, generator=None, device="cpu")
    with torch.no_grad():
        z = sum(enc(x) for enc in net.encoders)
        torch.testing.assert_close(net(x), net.core_and_heads(z), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(net(torch.stack([x, x]), mix), net(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(net.fold().eval()(x), net(x).mean(0), rtol=1e-4, atol=1e-5)


def test_a_vanilla_convnext_starts_a_mixmo_one_with_its_stem_bias_split(tmp_path):
    """`model.init_from` for a stem with a bias: each encoder takes the vanilla weight and bias divided by M, so the
    members' mean logits start equal to the vanilla network's."""
    from safetensors.torch import save_file

    from mixmo_dist.model.weights import init_from_vanilla

    torch.manual_seed(1)
    vanilla = timm.create_model("convnext_atto", num_classes=5).eval()
    with torch.no_grad():
        vanilla.stem[0].bias.copy_(torch.linspace(-2.0, 2.0, vanilla.stem[0].out_channels))
    path = tmp_path / "vanilla.safetensors"
    save_file({k: v.contiguous() for k, v in vanilla.state_dict().items()}, str(path))
    net = build_model("convnext_atto", 2, 5).eval()
    with torch.no_grad():
        init_from_vanilla(net, path)
        x = torch.randn(2, 3, 64, 64)
        torch.testing.assert_close(net(x).mean(0), vanilla(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(net.encoders[1].bias, vanilla.stem[0].bias / 2)


@pytest.mark.parametrize("arch", ["nf_resnet50", "tf_efficientnet_b0", "vit_tiny_patch16_224"])
def test_a_stem_whose_conv_computes_something_else_is_refused(arch):
    """NFNet's stem is a ScaledStdConv2d (standardised with a gain, its own forward) and a tf_ EfficientNet's a
    Conv2dSame (padding computed from the input): run as a plain conv or as timm's StdConv2d either would compute
    something else; a ViT's first conv sits inside its patch embedding."""
    with pytest.raises(ValueError, match=f"model.arch '{arch}' is not supported: its first conv"):
        build_model(arch, 2, 10)


@pytest.mark.parametrize(("family", "convert"), [("convnext*", 28), ("resnetv2*", 20)])
def test_every_model_of_a_timm_family_converts_or_is_refused_by_name(family, convert):
    """Structure only (parameters on the meta device, nothing computed): which models of a family convert. The
    counts are the ones docs/CONFIG.md states for `model.arch`."""
    names = timm.list_models(family)
    converted, refused = [], []
    for name in names:
        with torch.device("meta"):
            base = timm.create_model(name, pretrained=False, num_classes=10)
            try:
                MixMoNet(base, name, 2)
                converted.append(name)
            except ValueError as err:
                assert f"model.arch {name!r} is not supported" in str(err)
                refused.append(name)
    print(f"{family}: {len(converted)} of {len(names)} convert")
    assert len(converted) == convert and len(names) == convert + len(refused) and len(names) >= 20


def _standardize(weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Weight standardisation written out (per output channel, biased variance), independent of the code's."""
    flat = weight.reshape(weight.shape[0], -1).double()
    mean, var = flat.mean(1, keepdim=True), flat.var(1, unbiased=False, keepdim=True)
    return ((flat - mean) / torch.sqrt(var + eps)).reshape(weight.shape).to(weight.dtype)


@pytest.mark.parametrize("members", [1, 3])
def test_a_weight_standardised_stem_trains_and_folds_exactly(members):
    """BiT's stem conv is timm's StdConv2d: every encoder is one, run through its standardisation. Eval sums the
    encoders' own (timm) outputs; the training mix of equal linear masks equals that sum (the factor M is applied
    after standardising); with M > 1 the folded first conv is a plain conv holding the sum of the standardised
    weights, which no StdConv2d could compute (its channels' variance is about M, not 1), and the folded model gives
    the mean logits; with M = 1 the fold keeps timm's StdConv2d and its raw weight."""
    torch.manual_seed(0)
    net = build_model("resnetv2_50x1_bit", members, 5).eval()
    assert all(type(enc) is timm.layers.StdConv2d for enc in net.encoders)
    x = torch.randn(2, 3, 64, 64)
    h, w = net.encoder_output_hw(64, 64)
    mix = sample_mixing(2, members, h, w, mixing="none", alpha=2.0, cut_prob=0.0, generator=None, device="cpu")
    with torch.no_grad():
        z = sum(enc(x) for enc in net.encoders)
        ens = net(x)
        torch.testing.assert_close(ens, net.core_and_heads(z), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(net(torch.stack([x] * members), mix), ens, rtol=1e-4, atol=1e-5)
        folded = net.fold().eval()
        stem = folded.stem.conv
        summed = sum(_standardize(enc.weight, enc.eps) for enc in net.encoders)
        if members > 1:
            assert type(stem) is torch.nn.Conv2d and net.fold_needs_plain_stem
            channel_var = summed.reshape(summed.shape[0], -1).var(1, unbiased=False)
            assert channel_var.min() > 1.2  # S is far from any standardised weight (variance < 1)
            torch.testing.assert_close(stem.weight, summed, rtol=1e-5, atol=1e-6)
        else:
            assert type(stem) is timm.layers.StdConv2d and not net.fold_needs_plain_stem
            torch.testing.assert_close(stem.weight, net.encoders[0].weight, rtol=0, atol=0)
        torch.testing.assert_close(stem(x), z, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(folded(x), ens.mean(0), rtol=1e-4, atol=1e-5)
    assert folded.head.fc.weight.shape == (5, 2048, 1, 1)  # timm's 1x1-conv classifier, the heads' mean


@pytest.mark.parametrize(("arch", "members"), [("resnetv2_50x1_bit", 3), ("resnetv2_18", 2)])
def test_a_vanilla_resnetv2_starts_a_mixmo_one_exactly(arch, members, tmp_path):
    """`model.init_from` with a 1x1-conv classifier (every head takes its [K,D,1,1] weight) and, for BiT, a
    weight-standardised stem: the encoders' standardised weights must sum to the vanilla one, and std(W / M) = std(W)
    would give M times it; the encoders start different. Checked on the stem's output (a GroupNorm after the stem's
    max-pool would hide a global factor in the logits) and on the logits."""
    from safetensors.torch import save_file

    from mixmo_dist.model.weights import init_from_vanilla

    torch.manual_seed(1)
    vanilla = timm.create_model(arch, num_classes=5).eval()
    with torch.no_grad():
        vanilla.head.fc.bias.uniform_(-1.0, 1.0)
    path = tmp_path / "vanilla.safetensors"
    save_file({k: v.contiguous() for k, v in vanilla.state_dict().items()}, str(path))
    net = build_model(arch, members, 5).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        init_from_vanilla(net, path)
        torch.testing.assert_close(sum(enc(x) for enc in net.encoders), vanilla.stem.conv(x), rtol=1e-4, atol=1e-4)
        members_MBK, want = net(x), vanilla(x)
        torch.testing.assert_close(members_MBK.mean(0), want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(members_MBK[members - 1], want, rtol=1e-4, atol=1e-5)
    if arch.endswith("_bit"):
        assert not torch.allclose(net.encoders[0].weight, net.encoders[1].weight, atol=1e-3)
        # To float32 rounding: an eps of 1e-8 left in the wrong place shows here (3e-5), not in the outputs.
        summed = sum(_standardize(enc.weight, enc.eps) for enc in net.encoders)
        want = _standardize(vanilla.stem.conv.weight, vanilla.stem.conv.eps)
        torch.testing.assert_close(summed, want, rtol=0, atol=2e-6)
    torch.testing.assert_close(net.heads[1].weight, vanilla.head.fc.weight.reshape(5, -1), rtol=0, atol=0)


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
@pytest.mark.skipif(
    "MUTANT_UNDER_TEST" in os.environ,
    reason="under make mutation every function is a mutmut trampoline, which torch.compile cannot trace (fullgraph)",
)
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


# ----------------------------------------------------------------------------------------------------------------
# model.init=reference: the MixMo authors' initialisation, checked layer by layer against their formula.
# ----------------------------------------------------------------------------------------------------------------

# The authors' rule: normal of std sigma / 0.8796 truncated at +-2 of that std, sigma = sqrt(2 / fan_in).
_TRUNC = 0.87962566103423978


def _layers(net: torch.nn.Module):
    for name, module in net.named_modules():
        if isinstance(module, torch.nn.Conv2d | torch.nn.Linear):
            yield name, module


@pytest.mark.parametrize(("classes", "head_std"), [(100, None), (200, 0.01)], ids=["cifar_heads", "tiny_heads"])
def test_reference_init_matches_the_authors_formula(classes, head_std):
    """Every conv (the M encoders included) and, as on CIFAR, every head: sample std = sqrt(2 / fan_in) within its
    sampling error, no weight beyond the truncation at 2 sigma / 0.8796, which large layers nearly reach; heads as
    on Tiny ImageNet: N(0, 0.01), untruncated; biases 0, BN weight 1 and bias 0. (resnet18: the rule goes by module
    type, so every arch gets the same; the paper's archs take a minute to build and draw here.)"""
    torch.manual_seed(0)
    net = build_model("resnet18", 2, classes, init="reference", head_init_std=head_std)
    checked = 0
    for name, module in _layers(net):
        w = module.weight.detach().flatten()
        n = w.numel()
        is_head = name.startswith("heads.")
        sigma = head_std if is_head and head_std is not None else (2.0 / module.weight[0].numel()) ** 0.5
        # Relative standard error of a sample std: sqrt((kurtosis - 1) / 4n), kurtosis 2.36 for a normal cut at
        # +-2 and 3 for a plain one, so at most 0.5 / sqrt(n): 5 standard errors.
        assert abs(w.std().item() / sigma - 1) < 2.5 / n**0.5 + 1e-3, (name, w.std().item(), sigma)
        assert abs(w.mean().item()) < 5 * sigma / n**0.5, name
        bound = 2 * sigma / _TRUNC
        if is_head and head_std is not None:
            assert w.abs().max().item() > 1.2 * bound, name  # a plain normal: 102,400 draws reach ~4.4 sigma
        else:
            assert w.abs().max().item() <= bound * (1 + 1e-6), name
            if n >= 20_000:
                assert w.abs().max().item() > 0.97 * bound, name  # truncated there, not earlier
        if module.bias is not None:
            assert not module.bias.any(), name
        checked += 1
    assert checked == 2 + 19 + 2  # 2 encoders, the core's 19 convs (3 of them shortcuts), 2 heads
    assert not torch.equal(net.encoders[0].weight, net.encoders[1].weight)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            assert (module.weight == 1).all() and not module.bias.any()


def test_reference_init_differs_from_timms_on_the_wrn_stem():
    """The issue's example: WRN's 3x3 stem conv 3->16 gets std sqrt(2/27) = 0.27 from the authors' rule (fan_in),
    sqrt(2/144) = 0.12 from timm's (fan_out). A WRN-10-1 has the same stem and is quick to build."""
    torch.manual_seed(0)
    stems = {}
    for init in ("timm", "reference"):
        base = WideResNet(depth=10, widen_factor=1, num_classes=10)
        base.pretrained_cfg = {"first_conv": "conv1", "classifier": "fc"}  # what timm's registry would attach
        net = MixMoNet(base, "wide_resnet10_1", 2)
        if init == "reference":
            reference_init_(net)
        stems[init] = torch.cat([e.weight.flatten() for e in net.encoders]).std().item()
    assert abs(stems["reference"] / (2 / 27) ** 0.5 - 1) < 0.1
    assert abs(stems["timm"] / (2 / 144) ** 0.5 - 1) < 0.1


def test_unknown_init_is_refused():
    with pytest.raises(ValueError, match="model.init"):
        build_model("resnet18", 2, 5, init="xavier")


def test_reference_init_resets_batchnorm():
    net = build_model("resnet18", 2, 5)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 2.0)
                module.bias.uniform_(-1.0, 1.0)
    reference_init_(net)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all((m.weight == 1).all() and not m.bias.any() for m in norms)
