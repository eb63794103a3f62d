"""model/mixmo in process on small timm models (timm's own builders at small widths; 0.1-0.4M parameters), so
`make mutation` can select them for model/mixmo (issue 22): the training and evaluation forwards against their
definitions written with timm's own layers, the fold of every stem kind (plain, with a bias, weight-standardised
with M = 1 and M = 3; a 1x1-conv classifier), and every refusal's whole message. M = 3 throughout: a sum and a
mean differ, and a factor M differs from 2."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from mixmo_dist.model import build_model
from mixmo_dist.model.mixmo import MixMoNet, standardized_weight
from mixmo_dist.ops.mixing import member_masks, sample_mixing

M, K = 3, 5
SMALL = {
    "resnet18": {"layers": (1, 1, 1, 1), "channels": (8, 16, 32, 64), "stem_width": 8},
    "convnext_atto": {"depths": (1, 1, 1, 1), "dims": (8, 16, 16, 16)},
    "resnetv2_18": {"layers": (1, 1, 1, 1), "channels": (32, 32, 32, 32), "stem_chs": 32},
    "resnetv2_50x1_bit": {"channels": (128, 128, 128, 128), "stem_chs": 32},
}
STEM = {"resnet18": "conv1", "convnext_atto": "stem.0", "resnetv2_18": "stem.conv", "resnetv2_50x1_bit": "stem.conv"}


def _model(arch, members=M):
    torch.manual_seed(0)
    model = build_model(arch, members, K, **SMALL[arch])
    with torch.no_grad():  # random heads and biases: a lost bias or a swapped head shows
        for head in model.heads:
            head.weight.normal_(0, 0.3)
            if head.bias is not None:
                head.bias.uniform_(-0.5, 0.5)
        for enc in model.encoders:
            if enc.bias is not None:
                enc.bias.uniform_(-0.5, 0.5)
    return model.eval()


def _tol(arch):
    """BiT's GroupNorm scales float32 rounding of the summed stem up to ~1e-3 on these tiny widths."""
    return 2e-3 if arch.endswith("_bit") else 1e-4


def _features(model, z):
    return model.core.forward_head(model.core.forward_features(z), pre_logits=True)


@pytest.mark.parametrize("arch", list(SMALL))
def test_train_forward_is_m_times_the_masked_sum_of_the_encoders(arch):
    model = _model(arch)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(M, 2, 3, 32, 32, generator=gen)
    h, w = model.encoder_output_hw(32, 32)
    mix = sample_mixing(2, M, h, w, mixing="cut", alpha=2.0, cut_prob=1.0, generator=gen, device="cpu")
    with torch.no_grad():
        got = model(x, mix)
        # The definition, with timm's own layers: l_m = encoder_m(x_m) (timm's forward, StdConv2d included), z =
        # M * sum_m mask_m * l_m, then the core and every head.
        masks = member_masks(mix.boxes_B4, mix.coef_in_MB, mix.coef_out_MB, h, w)
        z = M * sum(masks[m] * model.encoders[m](x[m]) for m in range(M))
        feats = _features(model, z)
        expected = torch.stack([head(feats) for head in model.heads])
        torch.testing.assert_close(got, expected, rtol=_tol(arch), atol=_tol(arch))
        assert torch.equal(model(x, mix.boxes_B4, mix.coef_in_MB, mix.coef_out_MB), got)  # DDP's form


@pytest.mark.parametrize("arch", list(SMALL))
def test_eval_forward_is_the_sum_of_the_encoders_and_the_fold_its_mean(arch):
    model = _model(arch)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = model(x)
        feats = _features(model, sum(enc(x) for enc in model.encoders))
        expected = torch.stack([head(feats) for head in model.heads])
        assert got.shape == (M, 2, K)
        torch.testing.assert_close(got, expected, rtol=_tol(arch), atol=_tol(arch))
        folded = model.fold().eval()
        torch.testing.assert_close(folded(x), got.mean(0), rtol=_tol(arch), atol=_tol(arch))
    assert folded.training is False


def test_fold_keeps_train_mode_and_device_dtype():
    model = _model("resnet18").train()
    assert model.fold().training is True
    double = _model("resnet18").double()
    assert next(double.fold().parameters()).dtype == torch.float64


@pytest.mark.parametrize("arch", list(SMALL))
def test_folded_state_dict_in_timms_shapes(arch):
    model = _model(arch)
    state = model.folded_state_dict()
    plain = timm.create_model(arch, num_classes=K, pretrained=False, **SMALL[arch])
    reference = plain.state_dict()
    assert set(state) == set(reference)
    for key, value in state.items():
        assert value.shape == reference[key].shape, key
    stem, cls = STEM[arch], model.classifier_name
    bit = arch.endswith("_bit")
    parts = [standardized_weight(e) if bit else e.weight for e in model.encoders]
    torch.testing.assert_close(state[f"{stem}.weight"], sum(parts), rtol=0, atol=1e-6)
    heads = torch.stack([h.weight for h in model.heads]).mean(0)
    torch.testing.assert_close(
        state[f"{cls}.weight"], heads.reshape(reference[f"{cls}.weight"].shape), rtol=0, atol=1e-7
    )
    if model.heads[0].bias is not None:
        torch.testing.assert_close(state[f"{cls}.bias"], torch.stack([h.bias for h in model.heads]).mean(0))
    if model.encoders[0].bias is not None:
        torch.testing.assert_close(state[f"{stem}.bias"], sum(e.bias for e in model.encoders), rtol=0, atol=1e-6)
    for key in reference:
        if not key.startswith((stem + ".", cls + ".")):
            assert torch.equal(state[key], model.core.state_dict()[key]), key


def test_bit_with_one_member_folds_into_timms_own_layer_and_with_three_into_a_plain_conv():
    one, three = _model("resnetv2_50x1_bit", members=1), _model("resnetv2_50x1_bit")
    assert one.fold_needs_plain_stem is False and three.fold_needs_plain_stem is True
    assert _model("resnet18").fold_needs_plain_stem is False
    assert type(one.fold().stem.conv) is timm.layers.StdConv2d
    torch.testing.assert_close(one.folded_state_dict()["stem.conv.weight"], one.encoders[0].weight, rtol=0, atol=0)
    stem = three.fold().stem.conv
    assert type(stem) is nn.Conv2d and stem.stride == three.encoders[0].stride
    assert stem.padding == three.encoders[0].padding and stem.bias is None


def test_standardized_weight_is_timms_and_a_plain_conv_is_untouched():
    std = timm.layers.StdConv2d(3, 4, 3, eps=1e-3)
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        std.weight.normal_(0.2, 0.5)
        torch.testing.assert_close(
            nn.functional.conv2d(x, standardized_weight(std), None, std.stride, std.padding), std(x), rtol=0, atol=1e-6
        )
    plain = nn.Conv2d(3, 4, 3)
    assert standardized_weight(plain) is plain.weight


def test_conversion_layout_heads_and_encoders():
    base = timm.create_model("resnetv2_18", num_classes=K, pretrained=False, **SMALL["resnetv2_18"])
    timm_head = base.head.fc.weight.detach().clone()
    timm_stem = base.stem.conv
    model = MixMoNet(base, "resnetv2_18", M, {"x": 1})
    assert model.classifier_shape == (K, 32, 1, 1) and model.num_classes == K and model.num_members == M
    assert (model.first_conv_name, model.classifier_name, model.timm_kwargs) == ("stem.conv", "head.fc", {"x": 1})
    assert model.encoders[0] is timm_stem and len(model.encoders) == M
    assert not torch.equal(model.encoders[1].weight, model.encoders[0].weight)
    assert not torch.equal(model.encoders[2].weight, model.encoders[1].weight)
    assert all(type(h) is nn.Linear and h.in_features == 32 and h.out_features == K for h in model.heads)
    assert torch.equal(model.heads[0].weight, timm_head.reshape(K, 32))  # timm's initialisation kept
    assert all(h.bias is not None for h in model.heads)
    assert isinstance(model.core.stem.conv, nn.Identity) and isinstance(model.core.head.fc, nn.Identity)
    assert model.pretrained_cfg["first_conv"] == "stem.conv"
    no_bias = build_model("resnet18", M, K, **SMALL["resnet18"])
    assert no_bias.encoders[0].bias is None and no_bias.heads[2].bias is not None


@pytest.mark.parametrize("size", [(32, 32), (33, 17), (8, 9)])
def test_encoder_output_size_is_the_convs(size):
    for arch in ("resnet18", "convnext_atto", "resnetv2_50x1_bit"):
        model = _model(arch)
        with torch.no_grad():
            out = model.encoders[0](torch.zeros(1, 3, *size))
        assert model.encoder_output_hw(*size) == tuple(out.shape[-2:]), (arch, size)


class _Toy(nn.Module):
    """A network with timm's metadata and head API, for the refusals."""

    def __init__(self, stem: nn.Module, fc: nn.Module, cfg: dict | None = None):
        super().__init__()
        self.stem, self.fc = stem, fc
        self.pretrained_cfg = {"first_conv": "stem", "classifier": "fc"} if cfg is None else cfg

    def forward_features(self, x):
        return self.stem(x)

    def forward_head(self, x, pre_logits=False):
        return x.mean((2, 3))


class _OwnForward(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


@pytest.mark.parametrize(
    "toy, message",
    [
        (
            _Toy(nn.Conv2d(3, 4, 3), nn.Linear(4, 2), cfg={}),
            "model.arch 'toy': timm metadata names no single first_conv/classifier",
        ),
        (
            _Toy(nn.Conv2d(3, 4, 3), nn.Linear(4, 2), cfg={"first_conv": ["stem"], "classifier": "fc"}),
            "model.arch 'toy': timm metadata names no single first_conv/classifier",
        ),
        (
            _Toy(nn.Conv2d(3, 4, 3), nn.Linear(4, 2), cfg={"first_conv": "stem", "classifier": "head"}),
            "model.arch 'toy': metadata names a missing module (_Toy has no attribute `head`)",
        ),
        (
            _Toy(nn.Conv2d(3, 4, 3, groups=1), nn.Conv2d(4, 2, 3)),
            "model.arch 'toy' is not supported: classifier 'fc' is neither a Linear layer nor a plain 1x1 conv",
        ),
        (
            _Toy(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 1, stride=2)),
            "model.arch 'toy' is not supported: classifier 'fc' is neither a Linear layer nor a plain 1x1 conv",
        ),
        (
            _Toy(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 1, padding=1)),
            "model.arch 'toy' is not supported: classifier 'fc' is neither a Linear layer nor a plain 1x1 conv",
        ),
        (
            _Toy(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 1, groups=2)),
            "model.arch 'toy' is not supported: classifier 'fc' is neither a Linear layer nor a plain 1x1 conv",
        ),
        (
            _Toy(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 1, dilation=2)),
            "model.arch 'toy' is not supported: classifier 'fc' is neither a Linear layer nor a plain 1x1 conv",
        ),
    ],
)
def test_refusals_name_the_arch_and_the_reason(toy, message):
    with pytest.raises(ValueError) as err:
        MixMoNet(toy, "toy", 2)
    assert str(err.value) == message


@pytest.mark.parametrize("stem", [nn.Conv2d(4, 4, 3, groups=2), _OwnForward(3, 4, 3)])
def test_first_convs_that_compute_something_else_are_refused(stem):
    with pytest.raises(ValueError) as err:
        MixMoNet(_Toy(stem, nn.Linear(4, 2)), "toy", 2)
    assert str(err.value).startswith(
        "model.arch 'toy' is not supported: its first conv 'stem' must be an ungrouped Conv2d with the plain forward "
        "or timm's StdConv2d, outside a transformer's patch embedding (MixMo needs encoders that sum into one conv "
        "before a convolutional core); tested archs: resnet18, resnet34,"
    )


def test_a_conv_in_a_patch_embedding_is_refused():
    toy = _Toy(nn.Conv2d(3, 4, 3), nn.Linear(4, 2), cfg={"first_conv": "patch_embed.proj", "classifier": "fc"})
    toy.patch_embed = nn.Module()
    toy.patch_embed.proj = nn.Conv2d(3, 4, 3)
    with pytest.raises(ValueError, match=r"its first conv 'patch_embed.proj' must be an ungrouped Conv2d"):
        MixMoNet(toy, "toy", 2)
    MixMoNet(_Toy(nn.Conv2d(3, 4, 3), nn.Linear(4, 2)), "toy", 2)  # the toy itself converts


def test_build_model_refuses_by_name_and_applies_the_reference_init():
    for kwargs, message in (
        ({"init": "kaiming"}, "model.init must be timm or reference, got 'kaiming'"),
        ({"num_members": 0}, "mixmo.num_members must be >= 1, got 0"),
        ({"arch": "resnet_nonesuch"}, "model.arch 'resnet_nonesuch' is not a timm model (tested archs: resnet18, "),
    ):
        args = {"arch": "resnet18", "num_members": 2, "num_classes": K} | kwargs
        with pytest.raises(ValueError) as err:
            build_model(args.pop("arch"), args.pop("num_members"), args.pop("num_classes"), **args, **SMALL["resnet18"])
        assert str(err.value).startswith(message)
    assert build_model("resnet18", 1, K, **SMALL["resnet18"]).num_members == 1  # one member is a vanilla network
    torch.manual_seed(0)
    ref = build_model("resnet18", M, K, init="reference", head_init_std=0.01, **SMALL["resnet18"])
    assert all(h.bias.abs().max() == 0 for h in ref.heads)  # the authors' init: biases 0
    assert 0.005 < float(torch.stack([h.weight for h in ref.heads]).std()) < 0.015  # N(0, 0.01) heads
    assert ref.timm_kwargs == SMALL["resnet18"]


@pytest.mark.parametrize("arch", ["resnet18", "convnext_atto"])
def test_one_member_is_the_vanilla_network_in_both_forwards(arch):
    """M = 1 (a vanilla run through the same code): no second encoder to read the geometry or the bias from."""
    model = _model(arch, members=1)
    x = torch.randn(1, 2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    h, w = model.encoder_output_hw(32, 32)
    assert (h, w) == tuple(model.encoders[0](x[0]).shape[-2:])
    mix = sample_mixing(2, 1, h, w, mixing="cut", alpha=2.0, cut_prob=1.0, generator=torch.Generator(), device="cpu")
    with torch.no_grad():
        expected = model.heads[0](_features(model, model.encoders[0](x[0])))
        torch.testing.assert_close(model(x, mix)[0], expected, rtol=_tol(arch), atol=_tol(arch))
        torch.testing.assert_close(model(x[0])[0], expected, rtol=_tol(arch), atol=_tol(arch))


def test_the_extra_encoders_are_drawn_as_timms_resnet_stem_kaiming_fan_out():
    torch.manual_seed(0)
    model = build_model("resnet18", M, K)  # the full stem: 64 x 3 x 7 x 7 weights per encoder
    fan_out = 64 * 7 * 7
    for enc in model.encoders[1:]:
        assert abs(float(enc.weight.std()) / (2.0 / fan_out) ** 0.5 - 1) < 0.05  # fan_in (147) would be 4.6x


def test_a_1x1_conv_classifier_becomes_a_first_head_with_timms_own_initial_weight_and_bias():
    torch.manual_seed(0)
    base = timm.create_model("resnetv2_18", num_classes=K, **SMALL["resnetv2_18"])
    torch.manual_seed(0)
    model = build_model("resnetv2_18", M, K, **SMALL["resnetv2_18"])
    fc = base.get_classifier()
    assert isinstance(fc, nn.Conv2d) and fc.bias is not None
    assert torch.equal(model.heads[0].weight, fc.weight.reshape(K, -1))
    assert torch.equal(model.heads[0].bias, fc.bias)
