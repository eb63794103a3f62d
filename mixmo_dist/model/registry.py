"""The paper's CIFAR and Tiny ImageNet backbones, registered with timm so `build_model` converts them like any ResNet.

- `wide_resnet28_10`: WRN-28-10 as in the MixMo reference CIFAR code: a 3x3 stem conv 3->16 (stride 1, no bias, no
  max-pool), three stages of 4 pre-activation wide basic blocks (widths 160/320/640, strides 1/2/2), a final
  BN-ReLU, global average pooling and a linear classifier. Inside a block: BN-ReLU-conv3x3 (stride 1), BN-ReLU-conv3x3
  (the stage's stride; a stride-2 conv pads only right and bottom, like TensorFlow's SAME), plus a 1x1 projection
  of the block's raw input when the shape changes. With M=2 heads on CIFAR-100 it has exactly the reference's
  36,601,416 parameters.
- `preactresnet18_3`: the reference's Tiny ImageNet PreActResNet-18 of width x3: a 3x3 stride-2 stem conv 3->64,
  four stages of 2 pre-activation basic blocks (widths 192/384/768/1536, strides 1/2/2/2; the 1x1 projection sees
  the pre-activated input), global average pooling and a linear classifier. Like the reference, there is no BN-ReLU
  after the last stage.

Both expose timm's interface (`forward_features`, `forward_head(x, pre_logits=True)`, `get_classifier`,
`reset_classifier`) and a `pretrained_cfg` whose `first_conv` ("conv1", bias-free) and `classifier` ("fc") name the
layers MixMo duplicates. Their `mean`/`std` are the reference's normalisation of the dataset each was made for (the
trainer normalises with the arch's statistics). Built alone they get timm's ResNet initialisation (He normal,
fan_out; `_init_weights`); the CIFAR and Tiny ImageNet recipes set `model.init: reference`, which re-initialises every
conv and head as the authors do (truncated He fan_in, `model/init.py`), so the recipes train the reference's init.

Importing this module registers the names; `mixmo_dist.model` imports it.

Shape legend: B batch, C channels, H/W spatial, D pooled features, K classes.
"""

from __future__ import annotations

import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import Tensor, nn

__all__ = ["CIFAR_MEAN", "CIFAR_STD", "TINYIMAGENET_MEAN", "TINYIMAGENET_STD", "PreActResNet", "WideResNet"]

# The reference's normalisation constants (its CIFAR mean is 125.3/255, 123.0/255, 113.9/255).
CIFAR_MEAN = (0.4913725490196078, 0.4823529411764706, 0.4466666666666667)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
TINYIMAGENET_MEAN = (0.5, 0.5, 0.5)
TINYIMAGENET_STD = (0.5, 0.5, 0.5)


def _init_weights(model: nn.Module) -> None:
    """timm's ResNet initialisation: He normal (fan_out) convs, unit-scale BN; linear layers keep torch's default."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class _TimmClassifier(nn.Module):
    """The classifier half of timm's model interface, shared by both backbones (subclasses set conv1 and stages)."""

    num_classes: int
    num_features: int
    fc: nn.Module

    def _make_head(self, num_features: int, num_classes: int) -> None:
        self.num_features = num_features
        self.num_classes = num_classes
        self.fc = nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        self._make_head(self.num_features, num_classes)

    def forward_head(self, x_BCHW: Tensor, pre_logits: bool = False) -> Tensor:
        """Global average pooling, then the classifier unless `pre_logits`: [B,C,H,W] -> [B,D] or [B,K]."""
        feats_BD = x_BCHW.mean(dim=(2, 3))
        return feats_BD if pre_logits else self.fc(feats_BD)

    def forward(self, x_BCHW: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x_BCHW))


class WideBasicBlock(nn.Module):
    """Pre-activation wide basic block of the reference WRN: BN-ReLU-conv3x3, BN-ReLU-conv3x3(stride), + shortcut."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        # A strided conv pads right/bottom only (the reference's ZeroPad2d((0, 1, 0, 1)) + padding 0).
        self.pad_right_bottom = stride != 1
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=stride, padding=0 if stride != 1 else 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_channels != channels:
            # The projection reads the block's raw input, not its pre-activation (as in the reference).
            self.shortcut = nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False)

    def forward(self, x_BCHW: Tensor) -> Tensor:
        out = self.conv1(F.relu(self.bn1(x_BCHW)))
        out = F.relu(self.bn2(out))
        if self.pad_right_bottom:
            out = F.pad(out, (0, 1, 0, 1))
        out = self.conv2(out)
        return out + (x_BCHW if self.shortcut is None else self.shortcut(x_BCHW))


class WideResNet(_TimmClassifier):
    """Wide ResNet for 32x32 inputs (Zagoruyko & Komodakis 2016) in the layout of the MixMo reference code.

    Args:
        depth: 6n + 4 layers (28 -> 4 blocks per stage).
        widen_factor: stage widths are 16k, 32k, 64k.
        num_classes: K; 0 leaves the classifier out (`fc` is an identity).
        in_chans: input channels.
    """

    def __init__(self, depth: int = 28, widen_factor: int = 10, num_classes: int = 100, in_chans: int = 3) -> None:
        super().__init__()
        if (depth - 4) % 6 or depth < 10:
            raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1, got {depth}")
        blocks_per_stage = (depth - 4) // 6
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.in_chans = in_chans
        self.conv1 = nn.Conv2d(in_chans, 16, 3, stride=1, padding=1, bias=False)
        stages, in_channels = [], 16
        for width, stride in zip(widths, (1, 2, 2)):
            blocks = []
            for i in range(blocks_per_stage):
                blocks.append(WideBasicBlock(in_channels, width, stride if i == 0 else 1))
                in_channels = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.final_bn = nn.BatchNorm2d(in_channels)
        self._make_head(in_channels, num_classes)
        _init_weights(self)

    def forward_features(self, x_BCHW: Tensor) -> Tensor:
        """[B,3,H,W] -> [B,64k,H/4,W/4] (after the final BN-ReLU)."""
        x = self.conv1(x_BCHW)
        x = self.layer3(self.layer2(self.layer1(x)))
        return F.relu(self.final_bn(x))


class PreActBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU, then conv3x3(stride) and BN-ReLU-conv3x3, + shortcut of the
    pre-activated input (a 1x1 projection when the shape changes)."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False)

    def forward(self, x_BCHW: Tensor) -> Tensor:
        pre = F.relu(self.bn1(x_BCHW))
        shortcut = x_BCHW if self.shortcut is None else self.shortcut(pre)
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        return out + shortcut


class PreActResNet(_TimmClassifier):
    """PreActResNet of the MixMo reference's Tiny ImageNet code (stride-2 3x3 stem, no max-pool).

    Args:
        layers: blocks per stage.
        width: stage widths are 64w, 128w, 256w, 512w (the stem stays at 64 channels, as in the reference).
        num_classes: K; 0 leaves the classifier out.
        in_chans: input channels.
    """

    def __init__(
        self, layers: tuple[int, ...] = (2, 2, 2, 2), width: int = 3, num_classes: int = 200, in_chans: int = 3
    ) -> None:
        super().__init__()
        self.in_chans = in_chans
        self.conv1 = nn.Conv2d(in_chans, 64, 3, stride=2, padding=1, bias=False)
        stages, in_channels = [], 64
        for depth, width_1x, stride in zip(layers, (64, 128, 256, 512), (1, 2, 2, 2)):
            blocks = []
            for i in range(depth):
                blocks.append(PreActBlock(in_channels, width_1x * width, stride if i == 0 else 1))
                in_channels = width_1x * width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self._make_head(in_channels, num_classes)
        _init_weights(self)

    def forward_features(self, x_BCHW: Tensor) -> Tensor:
        """[B,3,H,W] -> [B,512w,H/16,W/16] (no final BN-ReLU, as in the reference)."""
        x = self.conv1(x_BCHW)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _cfg(**kwargs) -> dict:
    """Pretrained cfg without weights (url ''): `pretrained=True` needs `pretrained_cfg_overlay=dict(file=...)`."""
    return {
        "url": "",
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "first_conv": "conv1",
        "classifier": "fc",
        **kwargs,
    }


# Must exist before the @register_model functions below: timm reads it when they are decorated.
default_cfgs = generate_default_cfgs(
    {
        "wide_resnet28_10": _cfg(
            num_classes=100, input_size=(3, 32, 32), pool_size=(8, 8), mean=CIFAR_MEAN, std=CIFAR_STD
        ),
        "preactresnet18_3": _cfg(
            num_classes=200, input_size=(3, 64, 64), pool_size=(4, 4), mean=TINYIMAGENET_MEAN, std=TINYIMAGENET_STD
        ),
    }
)


@register_model
def wide_resnet28_10(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-28-10 of the MixMo reference CIFAR code (36.5M parameters with one 100-way head)."""
    return build_model_with_cfg(WideResNet, "wide_resnet28_10", pretrained, **dict(depth=28, widen_factor=10, **kwargs))


@register_model
def preactresnet18_3(pretrained: bool = False, **kwargs) -> PreActResNet:
    """PreActResNet-18 of width x3 of the MixMo reference Tiny ImageNet code."""
    return build_model_with_cfg(
        PreActResNet, "preactresnet18_3", pretrained, **dict(layers=(2, 2, 2, 2), width=3, **kwargs)
    )
