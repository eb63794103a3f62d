"""A 0.01M-parameter ResNet registered with timm for the in-process Trainer tests: resnet18's keys and layout
(timm's own builder) at widths 8-16 and one block per stage, so a step costs milliseconds, not a second."""

from __future__ import annotations

import timm
from timm.models import register_model
from timm.models.resnet import BasicBlock, _create_resnet

ARCH = "mixmo_test_tiny_resnet"

if not timm.is_model(ARCH):

    @register_model
    def mixmo_test_tiny_resnet(pretrained: bool = False, **kwargs):
        args = dict(block=BasicBlock, layers=(1, 1, 1, 1), channels=(8, 16, 16, 16), stem_width=8)
        return _create_resnet("resnet18", pretrained, **dict(args, **kwargs))
