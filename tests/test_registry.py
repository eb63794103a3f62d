"""The paper's backbones registered with timm: parameter counts, timm interface, MixMo conversion, fold(), loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import mixmo_dist.model.registry as registry
from mixmo_dist.config import load_config
from mixmo_dist.data import timm_mean_std
from mixmo_dist.model import build_model
from mixmo_dist.ops import sample_mixing
from mixmo_dist.training.optim import scaled_lr

ARCHS = ("wide_resnet28_10", "preactresnet18_3")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# config -> (arch, peak LR at its global batch, normalisation mean): the recipes of the method doc, section 6.
RECIPES = {
    "imagenet_r50_cutmixmo.yaml": ("resnet50", 0.8, (0.485, 0.456, 0.406)),
    "imagenet_r50_vanilla.yaml": ("resnet50", 1.6, (0.485, 0.456, 0.406)),
    "cifar100_wrn28_10_cutmixmo.yaml": ("wide_resnet28_10", 0.0125, registry.CIFAR_MEAN),
    "tinyimagenet_r18_3_cutmixmo.yaml": ("preactresnet18_3", 0.05, (0.5, 0.5, 0.5)),
}


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_wrn28_10_has_the_reference_parameter_count():
    """The MixMo reference reports 36,601,416 parameters for WRN-28-10 with M=2 on CIFAR-100."""
    net = build_model("wide_resnet28_10", 2, 100)
    assert _count(net) == 36_601_416
    # The vanilla network: one 3x3x3x16 stem conv (432) and one 640x100 head (64,100) fewer.
    assert _count(net.core) + _count(net.encoders[0]) + _count(net.heads[0]) == 36_601_416 - 432 - 64_100


def test_preactresnet18_3_parameter_count_by_hand():
    # stem 3*64*9; stages 1..4 of two pre-act blocks at widths 192/384/768/1536 (1x1 projections where the shape
    # changes, no bias); no final BN; a 1536 -> 200 head. Summed by hand: 100,537,864; M=2 adds a stem and a head.
    net = build_model("preactresnet18_3", 2, 200)
    assert _count(net.core) + _count(net.encoders[0]) + _count(net.heads[0]) == 100_537_864
    assert _count(net) == 100_537_864 + 1_728 + 307_400


@pytest.mark.parametrize(
    ("arch", "size", "features", "mean"),
    [("wide_resnet28_10", 32, (640, 8, 8), registry.CIFAR_MEAN), ("preactresnet18_3", 32, (1536, 2, 2), (0.5,) * 3)],
)
def test_timm_interface_and_metadata(arch, size, features, mean):
    assert timm.is_model(arch)
    net = timm.create_model(arch, num_classes=5).eval()
    cfg = net.pretrained_cfg
    assert (cfg["first_conv"], cfg["classifier"]) == ("conv1", "fc")
    assert tuple(cfg["mean"]) == tuple(mean)
    assert net.conv1.bias is None and net.conv1.in_channels == 3 and net.get_classifier() is net.fc
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        feats = net.forward_features(x)
        assert feats.shape == (2, *features)
        pre = net.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, features[0])
        torch.testing.assert_close(pre, feats.mean(dim=(2, 3)))
        torch.testing.assert_close(net(x), net.fc(pre))
    net.reset_classifier(3)
    assert net.fc.out_features == 3


@pytest.mark.parametrize("arch", ARCHS)
def test_converts_trains_and_folds(arch):
    torch.manual_seed(0)
    net = build_model(arch, 2, 6)
    assert all(isinstance(e, torch.nn.Conv2d) and e.bias is None for e in net.encoders)
    gen = torch.Generator().manual_seed(0)
    h, w = net.encoder_output_hw(32, 32)
    assert (h, w) == ((32, 32) if arch == "wide_resnet28_10" else (16, 16))  # stride-1 vs stride-2 stem
    mix = sample_mixing(2, 2, h, w, mixing="cut", alpha=2.0, cut_prob=1.0, generator=gen, device="cpu")
    # Gradients only for the encoders: the check is that both receive one; the core's are the costly part.
    net.core.requires_grad_(False)
    logits = net(torch.randn(2, 2, 3, 32, 32), mix)
    assert logits.shape == (2, 2, 6)
    logits.sum().backward()
    assert all(e.weight.grad is not None and e.weight.grad.abs().sum() > 0 for e in net.encoders)
    net.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net.fold().eval()(x), net(x).mean(0), rtol=1e-4, atol=1e-5)


def test_folded_wrn_loads_through_timm_pretrained_file(tmp_path):
    """`pretrained=True` with a file overlay (what users of an exported model do) works for a registered arch."""
    torch.manual_seed(1)
    net = build_model("wide_resnet28_10", 2, 10).eval()
    for module in net.modules():  # non-trivial BN statistics, so a dropped buffer would show
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    file = tmp_path / "wrn.safetensors"
    save_file(net.folded_state_dict(), str(file))
    plain = timm.create_model(
        "wide_resnet28_10", num_classes=10, pretrained=True, pretrained_cfg_overlay=dict(file=str(file), num_classes=10)
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), net(x).mean(0), rtol=1e-4, atol=1e-5)


def test_bad_depth_is_refused():
    with pytest.raises(ValueError, match="6n \\+ 4"):
        registry.WideResNet(depth=27)


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_config_loads_and_is_documented(name):
    cfg = load_config(["--config", str(CONFIGS / name)])
    assert timm.is_model(cfg.model.arch)
    assert f"`{name}`" in (CONFIGS / "README.md").read_text()
    if name not in RECIPES:
        assert name in ("demo.yaml", "demo_vanilla.yaml")
        return
    arch, peak_lr, mean = RECIPES[name]
    assert cfg.model.arch == arch
    rows = cfg.data.global_batch_size  # recipes are fixed over all ranks
    assert rows is not None and rows % cfg.mixmo.batch_repetitions == 0
    unique = rows // cfg.mixmo.batch_repetitions
    assert scaled_lr(cfg.optim.lr, cfg.optim.lr_reference_batch, unique) == pytest.approx(peak_lr)
    assert timm_mean_std(arch)[0] == pytest.approx(mean)


@pytest.mark.parametrize(
    ("name", "head_std", "gpus"),
    [("cifar100_wrn28_10_cutmixmo.yaml", None, 1), ("tinyimagenet_r18_3_cutmixmo.yaml", 0.01, 1)],
)
def test_the_paper_recipes_train_what_the_authors_configs_train(name, head_std, gpus):
    """The points of issue 14 (configs/README.md lists them): one view per copy of every b x M copies, the
    authors' initialisation (heads: the conv rule on CIFAR, N(0, 0.01) on Tiny ImageNet), no input repetition,
    b=4 and M=2, one GPU assumed (SyncBN off: there is nothing to synchronise)."""
    cfg = load_config(["--config", str(CONFIGS / name)])
    assert cfg.data.copy_augmentation == "per_copy" and cfg.data.train_crop == "pad_random" and cfg.data.hflip
    assert cfg.model.init == "reference" and cfg.model.head_init_std == head_std
    assert (cfg.mixmo.batch_repetitions, cfg.mixmo.num_members, cfg.mixmo.input_repetition) == (4, 2, 0.0)
    assert cfg.slurm.gpus_per_node == gpus and cfg.slurm.nodes == 1 and not cfg.model.sync_bn
    text = (CONFIGS / name).read_text()
    assert "model.sync_bn=true" in text  # the recipe says what to set on more GPUs
