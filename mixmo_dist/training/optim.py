"""Parameter groups, the SGD optimizer and the per-step LR schedule (warmup, then cosine or step decay)."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

# Module types whose parameters are normalisation scales/shifts (weight decay off by default).
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def param_groups(model: nn.Module, weight_decay: float, exclude_norm_bias: bool) -> list[dict]:
    """Split parameters into decayed and non-decayed groups, selected by module type (not by name)."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            skip = exclude_norm_bias and (isinstance(module, _NORM_TYPES) or name == "bias")
            (no_decay if skip else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg, lr: float) -> torch.optim.Optimizer:
    """SGD (Nesterov by default) on `param_groups`; `cfg` is the `optim` config section, `lr` the scaled LR."""
    groups = param_groups(model, cfg.weight_decay, cfg.wd_exclude_norm_bias)
    nesterov = cfg.nesterov and cfg.momentum > 0
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=nesterov)


def scaled_lr(base_lr: float, reference_batch: int, unique_per_step: int) -> float:
    """Linear scaling with the number of UNIQUE images per optimizer step (batch repetition does not count)."""
    return base_lr * unique_per_step / reference_batch


@dataclass(frozen=True)
class LRSchedule:
    """LR as a pure function of the optimizer step, so resuming can never decay twice.

    Linear warmup per step (peak * (step + 1) / warmup_steps), then cosine to 0 at `total_steps`, or a factor
    `gamma` at each milestone (given in steps).
    """

    peak_lr: float
    warmup_steps: int
    total_steps: int
    kind: str = "cosine"
    milestones: Sequence[int] = ()
    gamma: float = 0.1

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        if self.kind == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            progress = min(1.0, (step - self.warmup_steps) / span)
            return 0.5 * self.peak_lr * (1.0 + math.cos(math.pi * progress))
        passed = sum(1 for m in self.milestones if step >= m)
        return self.peak_lr * self.gamma**passed


def build_schedule(cfg, peak_lr: float, steps_per_epoch: float, total_steps: int) -> LRSchedule:
    """From the `schedule` config section (epochs may be fractional); milestones in epochs become steps."""
    return LRSchedule(
        peak_lr=peak_lr,
        warmup_steps=int(round(cfg.warmup_epochs * steps_per_epoch)),
        total_steps=total_steps,
        kind=cfg.kind,
        milestones=tuple(int(round(m * steps_per_epoch)) for m in cfg.milestones),
        gamma=cfg.gamma,
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class EMA:
    """Exponential moving average of a model (a frozen copy whose float parameters and buffers are lerped)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        floats_ema, floats_new = [], []
        live = model.state_dict()
        for key, value in self.module.state_dict().items():
            if value.dtype.is_floating_point:
                floats_ema.append(value)
                floats_new.append(live[key].detach())
            else:
                value.copy_(live[key])
        torch._foreach_lerp_(floats_ema, floats_new, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state, strict=True)
