"""MixMo conversion of a timm ResNet: M encoders, the mixing block, one shared core, M heads; and fold().

Shape legend: M members, B batch, C channels, H/W spatial, D pooled features, K classes.

The conversion reads timm's own metadata (`pretrained_cfg['first_conv']`, `pretrained_cfg['classifier']`), so any
timm ResNet-family model converts, deep stems included: for `resnet50d` the metadata names `conv1.0`, the stem's
first bias-free conv, so an encoder never contains BN or ReLU and the eval-time folding stays exact. A first conv
with a bias (ConvNeXt's 4x4 patchify stem) converts too: an encoder is affine, W_m x + b_m, so the eval path sums
the biases with the weights and the training mix scales both by M; the folding stays exact.

ResNet-v2 and BiT (`resnetv2_*`): the classifier is a 1x1 convolution on the pooled features; it is exactly a
linear layer, so the heads are `nn.Linear` and the fold writes their mean back in the 1x1 conv's shape. BiT's stem
conv is timm's weight-standardised `StdConv2d`: encoder m computes conv(x, std(W_m)) with std(W) = per output
channel (W - mean) / sqrt(var + eps), exactly as timm's forward. The eval path sums the standardised weights,
S = sum_m std(W_m), and the training mix scales std(W_m) by M (standardising M W_m would undo the factor). S is not
the standardisation of anything (its channels have variance about M, a standardised weight's are below 1), so a
StdConv2d holding any weight cannot compute it: for M > 1 the folded network's first conv is a plain `nn.Conv2d`
holding S, exact, and the fold cannot be rebuilt by `timm.create_model` from a weights file (export refuses it,
naming the reason). With M = 1 the fold keeps timm's StdConv2d with the raw weight, which timm rebuilds exactly.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import timm
import torch
import torch.nn.functional as F
from timm.layers import StdConv2d
from torch import Tensor, nn

from mixmo_dist.ops.mixing import MixParams, mix_features

from .init import reference_init_

# Every arch the project promises to convert (any timm model passing the structural checks converts too).
TESTED_ARCHS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnet50d",
    "resnet26t",
    "wide_resnet50_2",
    "resnext50_32x4d",
    "seresnet50",
    "convnext_atto",
    "resnetv2_18",
    "resnetv2_50x1_bit",
)


def standardized_weight(conv: nn.Conv2d) -> Tensor:
    """The weight a conv computes with: timm's StdConv2d standardises it per output channel (its own forward, same
    ops, so the result is bit-identical to what timm computes); a plain conv's weight is returned as it is."""
    if type(conv) is not StdConv2d:
        return conv.weight
    flat = conv.weight.reshape(1, conv.out_channels, -1)
    return F.batch_norm(flat, None, None, training=True, momentum=0.0, eps=conv.eps).reshape_as(conv.weight)


def _is_plain(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and type(module).forward is nn.Conv2d.forward


class MixMoNet(nn.Module):
    """M encoders (copies of the first conv), a mixing block, a shared core, M linear heads.

    Attributes:
        encoders: M copies of the original first conv (a plain `nn.Conv2d` or timm's `StdConv2d`, with its bias if it
            has one).
        core: the timm model with its first conv and classifier replaced by `nn.Identity`.
        heads: M `nn.Linear(D, K)` (a 1x1-conv classifier becomes a Linear with the same weights).
        classifier_shape: the shape of the timm classifier's weight ([K, D] or [K, D, 1, 1]), used by the fold.
    """

    def __init__(self, base: nn.Module, arch: str, num_members: int, timm_kwargs: dict | None = None):
        super().__init__()
        cfg = getattr(base, "pretrained_cfg", None) or {}
        first_conv, classifier = cfg.get("first_conv"), cfg.get("classifier")
        if not isinstance(first_conv, str) or not isinstance(classifier, str):
            raise ValueError(f"model.arch {arch!r}: timm metadata names no single first_conv/classifier")
        try:
            conv = base.get_submodule(first_conv)
            fc = base.get_submodule(classifier)
        except AttributeError as err:
            raise ValueError(f"model.arch {arch!r}: metadata names a missing module ({err})") from None
        # The encoders run as F.conv2d with the conv's static geometry and `standardized_weight`: any other subclass
        # with a forward of its own (Conv2dSame's dynamic padding, NFNet's ScaledStdConv2d) would compute something
        # else, silently.
        known = _is_plain(conv) or type(conv) is StdConv2d
        if not known or conv.groups != 1 or first_conv.startswith("patch_embed"):
            raise ValueError(
                f"model.arch {arch!r} is not supported: its first conv {first_conv!r} must be an ungrouped Conv2d "
                f"with the plain forward or timm's StdConv2d, outside a transformer's patch embedding (MixMo needs "
                f"encoders that sum into one conv before a convolutional core); tested archs: {', '.join(TESTED_ARCHS)}"
            )
        # A 1x1 conv on the pooled [B,D,1,1] map is a linear layer; forward_head(pre_logits=True) gives [B,D].
        conv_head = _is_plain(fc) and fc.kernel_size == (1, 1) and fc.stride == (1, 1) and fc.padding == (0, 0)
        conv_head = conv_head and fc.groups == 1 and fc.dilation == (1, 1)
        if not (isinstance(fc, nn.Linear) or conv_head) or not hasattr(base, "forward_head"):
            raise ValueError(
                f"model.arch {arch!r} is not supported: classifier {classifier!r} is neither a Linear layer nor a "
                f"plain 1x1 conv"
            )
        self.arch = arch
        self.num_members = num_members
        self.num_classes = fc.weight.shape[0]
        self.classifier_shape = tuple(fc.weight.shape)
        self.first_conv_name = first_conv
        self.classifier_name = classifier
        self.timm_kwargs = dict(timm_kwargs or {})
        encoders = [conv]
        for _ in range(num_members - 1):
            enc = copy.deepcopy(conv)
            # Same init family as timm's ResNets, but independent draws so members start different.
            nn.init.kaiming_normal_(enc.weight, mode="fan_out", nonlinearity="relu")
            encoders.append(enc)
        self.encoders = nn.ModuleList(encoders)
        num_features = fc.weight.shape[1]
        if not isinstance(fc, nn.Linear):
            linear = nn.Linear(num_features, self.num_classes, bias=fc.bias is not None)
            with torch.no_grad():  # keep timm's initialisation of the first head
                linear.weight.copy_(fc.weight.reshape(self.num_classes, num_features))
                if fc.bias is not None:
                    linear.bias.copy_(fc.bias)
            fc = linear
        heads = [fc]
        for _ in range(num_members - 1):
            head = nn.Linear(num_features, self.num_classes, bias=fc.bias is not None)
            heads.append(head)
        self.heads = nn.ModuleList(heads)
        base.set_submodule(first_conv, nn.Identity())
        base.set_submodule(classifier, nn.Identity())
        self.core = base
        self.pretrained_cfg = dict(cfg)

    # -- the flow ---------------------------------------------------------------------------------------------
    def encoder_output_hw(self, height: int, width: int) -> tuple[int, int]:
        """Spatial size of an encoder's output for an input of height x width (the masks' resolution)."""
        conv = self.encoders[0]
        sizes = []
        for size, k, s, p, d in zip((height, width), conv.kernel_size, conv.stride, conv.padding, conv.dilation):
            sizes.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
        return sizes[0], sizes[1]

    def _conv(self, x_BCHW: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        conv = self.encoders[0]
        return F.conv2d(x_BCHW, weight, bias, conv.stride, conv.padding, conv.dilation)

    def core_and_heads(self, z_BCHW: Tensor) -> Tensor:
        """Shared core on the mixed map, then every head: [B,C,H,W] -> logits [M,B,K]."""
        feats_BD = self.core.forward_head(self.core.forward_features(z_BCHW), pre_logits=True)
        return torch.stack([head(feats_BD) for head in self.heads])

    def forward_train(
        self, x_MBCHW: Tensor | Sequence[Tensor], boxes_B4: Tensor, coef_in_MB: Tensor, coef_out_MB: Tensor
    ) -> Tensor:
        """Training forward: member m's images through encoder m, mixed, core, heads -> logits [M,B,K].

        The factor M of `z = M * sum_m mask_m * l_m` is folded into the encoder weights and biases (an encoder is
        affine), which costs nothing and is exact for power-of-two M.
        """
        m = self.num_members
        feats = []
        for i in range(m):
            enc = self.encoders[i]
            weight = standardized_weight(enc) * m  # standardise first: std(m W) = std(W) would drop the factor
            feats.append(self._conv(x_MBCHW[i], weight, None if enc.bias is None else enc.bias * m))
        z_BCHW = mix_features(feats, boxes_B4, coef_in_MB, coef_out_MB)
        return self.core_and_heads(z_BCHW)

    def forward_eval(self, x_BCHW: Tensor) -> Tensor:
        """Eval forward: the same image to every encoder, outputs summed = one conv with the summed (standardised)
        weights."""
        weight = torch.stack([standardized_weight(enc) for enc in self.encoders]).sum(0)
        bias = None if self.encoders[0].bias is None else torch.stack([enc.bias for enc in self.encoders]).sum(0)
        return self.core_and_heads(self._conv(x_BCHW, weight, bias))

    def forward(
        self,
        x: Tensor,
        mix: MixParams | Tensor | None = None,
        coef_in_MB: Tensor | None = None,
        coef_out_MB: Tensor | None = None,
    ) -> Tensor:
        """`forward(x_MBCHW, mix)` trains (mixing), `forward(x_BCHW)` evaluates; both return logits [M,B,K].

        `mix` may also be given as its three tensors `(boxes_B4, coef_in_MB, coef_out_MB)`, the form DDP passes on.
        """
        if mix is None:
            return self.forward_eval(x)
        if isinstance(mix, MixParams):
            return self.forward_train(x, mix.boxes_B4, mix.coef_in_MB, mix.coef_out_MB)
        return self.forward_train(x, mix, coef_in_MB, coef_out_MB)

    # -- zero-cost inference ------------------------------------------------------------------------------------
    @property
    def fold_needs_plain_stem(self) -> bool:
        """True when the folded first conv must be a plain conv holding the sum of M > 1 standardised weights
        (module docstring): then `timm.create_model(arch)` with these weights would standardise them again."""
        return type(self.encoders[0]) is StdConv2d and self.num_members > 1

    def folded_state_dict(self) -> dict[str, Tensor]:
        """State dict of the timm model equivalent to the ensemble's mean logits (keys and shapes of
        `timm.create_model(arch)`; see `fold_needs_plain_stem` for the one first conv it does not fit as is)."""
        state = {k: v.detach().clone() for k, v in self.core.state_dict().items()}
        first, cls = self.first_conv_name, self.classifier_name
        if self.fold_needs_plain_stem:
            stem = [standardized_weight(e).detach() for e in self.encoders]
        else:  # raw weights: with M = 1 a StdConv2d standardises its raw weight itself
            stem = [e.weight.detach() for e in self.encoders]
        state[f"{first}.weight"] = torch.stack(stem).sum(0)
        if self.encoders[0].bias is not None:
            state[f"{first}.bias"] = torch.stack([e.bias.detach() for e in self.encoders]).sum(0)
        head_weight = torch.stack([h.weight.detach() for h in self.heads]).mean(0)
        state[f"{cls}.weight"] = head_weight.reshape(self.classifier_shape)
        if self.heads[0].bias is not None:
            state[f"{cls}.bias"] = torch.stack([h.bias.detach() for h in self.heads]).mean(0)
        return state

    def fold(self) -> nn.Module:
        """A plain timm model (same arch) whose logits equal the mean of the member logits: encoders summed into one
        first conv, head weights and biases averaged. With `fold_needs_plain_stem` (BiT, M > 1) its first conv is a
        plain `nn.Conv2d` (same geometry) holding the sum of the standardised encoder weights."""
        plain = timm.create_model(self.arch, num_classes=self.num_classes, pretrained=False, **self.timm_kwargs)
        if self.fold_needs_plain_stem:
            std_conv = plain.get_submodule(self.first_conv_name)
            stem = nn.Conv2d(
                std_conv.in_channels,
                std_conv.out_channels,
                std_conv.kernel_size,
                stride=std_conv.stride,
                padding=std_conv.padding,
                dilation=std_conv.dilation,
                bias=std_conv.bias is not None,
            )
            plain.set_submodule(self.first_conv_name, stem)
        plain.load_state_dict(self.folded_state_dict(), strict=True)
        ref = next(self.parameters())
        return plain.to(device=ref.device, dtype=ref.dtype).train(self.training)


def build_model(
    arch: str,
    num_members: int,
    num_classes: int,
    *,
    init: str = "timm",
    head_init_std: float | None = None,
    **timm_kwargs,
) -> MixMoNet:
    """`timm.create_model(arch, num_classes=...)` (no pretrained weights) converted to MixMo form.

    Args:
        init: "timm" keeps the backbone's initialisation (encoders copies re-drawn like timm's convs); "reference"
            re-draws every weight with the MixMo authors' rules (`model/init.py`), heads from N(0, head_init_std)
            when it is given.

    Raises:
        ValueError: unknown arch or init, or an arch that cannot be converted (named in the message).
    """
    if init not in ("timm", "reference"):
        raise ValueError(f"model.init must be timm or reference, got {init!r}")
    if num_members < 1:
        raise ValueError(f"mixmo.num_members must be >= 1, got {num_members}")
    if not timm.is_model(arch):
        raise ValueError(f"model.arch {arch!r} is not a timm model (tested archs: {', '.join(TESTED_ARCHS)})")
    base = timm.create_model(arch, num_classes=num_classes, pretrained=False, **timm_kwargs)
    model = MixMoNet(base, arch, num_members, timm_kwargs)
    if init == "reference":
        reference_init_(model, head_init_std)
    return model
