"""SyncBatchNorm (`model.sync_bn`): BatchNorm statistics over the global batch instead of each rank's part."""

from __future__ import annotations

import torch
from timm.layers import convert_sync_batchnorm
from torch import nn

from mixmo_dist.config import ConfigError

__all__ = ["require_cuda_for_sync_bn", "use_sync_batchnorm"]


def use_sync_batchnorm(model: nn.Module, device: torch.device | str) -> nn.Module:
    """`model` with every BatchNorm replaced by a SyncBatchNorm holding the same parameters and buffers.

    timm's conversion, not torch's: a timm `BatchNormAct2d` (BN and activation in one module, e.g. in ResNet-v2)
    becomes a `SyncBatchNormAct` that keeps the activation; torch's makes it a bare SyncBatchNorm and drops it.

    The state_dict keys do not change, so a checkpoint trained this way loads into the plain model (evaluate and
    export build one, on any device).

    Raises:
        ConfigError: the device is not CUDA (torch's SyncBatchNorm refuses CPU tensors in training).
    """
    require_cuda_for_sync_bn(device)
    return convert_sync_batchnorm(model)


def require_cuda_for_sync_bn(device: torch.device | str) -> None:
    """Refuse `model.sync_bn` on a device other than CUDA (the trainer asks before it creates the output directory).

    Raises:
        ConfigError: naming the key.
    """
    device = torch.device(device)
    if device.type != "cuda":
        raise ConfigError(
            f"config key model.sync_bn: torch's SyncBatchNorm needs a CUDA device, and this run trains on {device}; "
            "set model.sync_bn=false (with one process per GPU, BN then sees the per-rank batch)",
            key="model.sync_bn",
        )
