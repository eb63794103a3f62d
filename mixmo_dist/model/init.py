"""The MixMo authors' random initialisation (`model.init=reference`).

The reference initialisation (mixmo-pytorch, `weights_init_hetruncatednormal`, applied to every module):
- every convolution, the M encoders included: a normal of std sqrt(2 / fan_in) / 0.8796 truncated at +-2 of that
  std; 0.8796 is the std of a standard normal truncated to [-2, 2], so the realised std is sqrt(2 / fan_in)
  (He, fan_in, ReLU gain);
- every linear layer (the heads): the same rule (their CIFAR WRN), or N(0, head_std) (their Tiny ImageNet
  PreActResNet: 0.01);
- biases 0; BatchNorm weight 1 and bias 0.
timm's default, kept with `model.init=timm`, draws convs He normal with fan_out and leaves Linear layers at torch's
default (uniform, std 1/sqrt(3 fan_in)): e.g. the WRN stem conv gets std 0.12 there against 0.27 here.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["TRUNCATED_STD", "reference_init_", "reference_std"]

# Std of a standard normal truncated to [-2, 2] (the authors' constant, to the digits they use).
TRUNCATED_STD = 0.87962566103423978
# The truncation, in stds of the untruncated normal.
_BOUND = 2.0


def reference_std(weight: torch.Tensor) -> float:
    """The realised std the reference rule gives a conv or linear weight: sqrt(2 / fan_in).

    fan_in = input channels per group x kernel area for a conv [O, I/g, kh, kw], in_features for a linear [O, I].
    """
    fan_in = weight[0].numel()
    return math.sqrt(2.0 / fan_in)


def _he_truncated_(weight: torch.Tensor) -> None:
    """N(0, 1) cut to [-2, 2] by redrawing the values outside (exact rejection sampling), scaled by
    sqrt(2 / fan_in) / 0.8796. One pass finds the ~4.6% of values outside, then only those are redrawn until none
    is left; torch's inverse-erf `trunc_normal_` is several times slower on a CPU (tens of seconds for WRN-28-10's
    36M weights on a loaded 2-core machine)."""
    # In place when possible: a fresh 100 MB buffer costs more in page faults than the sampling itself.
    flat = weight.view(-1) if weight.is_contiguous() else torch.empty_like(weight).view(-1)
    flat.normal_(0.0, 1.0)
    redraw = (flat.abs() > _BOUND).nonzero().squeeze(1)
    while redraw.numel():
        draws = torch.randn(redraw.numel(), dtype=flat.dtype, device=flat.device)
        flat[redraw] = draws
        redraw = redraw[draws.abs() > _BOUND]
    flat.mul_(reference_std(weight) / TRUNCATED_STD)
    if flat.data_ptr() != weight.data_ptr():
        weight.copy_(flat.view_as(weight))


@torch.no_grad()
def reference_init_(model: nn.Module, head_std: float | None = None) -> None:
    """Re-initialise `model` in place with the reference rules (module docstring); draws from torch's global RNG.

    Args:
        model: any module (a MixMoNet: encoders, core and heads alike).
        head_std: None = linear layers follow the conv rule; else they are drawn from N(0, head_std).
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            if isinstance(module, nn.Linear) and head_std is not None:
                nn.init.normal_(module.weight, mean=0.0, std=head_std)
            else:
                _he_truncated_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, _BatchNorm) and module.affine:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
