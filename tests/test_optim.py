"""training/optim against hand-computed values: parameter groups, the optimizer's options, LR scaling, the
schedule at every kind of step, and the EMA's update. In process and fast, so `make mutation` can select them
(issue 22); every option is tested at a value where the plausible bugs differ (a decay of 0.75, not 0.5, where d
and 1 - d would agree; a gamma of 0.2 with two milestones, so gamma and gamma**passed differ)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mixmo_dist.config.schema import OptimConfig, ScheduleConfig
from mixmo_dist.training.optim import (
    EMA,
    LRSchedule,
    build_optimizer,
    build_schedule,
    param_groups,
    scaled_lr,
    set_lr,
)


class _Net(nn.Module):
    """Every kind of parameter param_groups tells apart: conv weights (with and without a bias), a linear layer,
    BatchNorm, GroupNorm, LayerNorm, a frozen weight and one weight shared by two modules."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.conv_b = nn.Conv2d(4, 4, 1, bias=True)
        self.bn = nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.ln = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 5)
        self.frozen = nn.Linear(5, 5, bias=False).requires_grad_(False)
        self.half_frozen = nn.Linear(5, 5)  # a frozen weight before a trainable bias of the same module
        self.half_frozen.weight.requires_grad_(False)
        self.tied = nn.Linear(5, 5, bias=False)
        self.tied2 = nn.Linear(5, 5, bias=False)
        self.tied2.weight = self.tied.weight


def _ids(params):
    return sorted(id(p) for p in params)


def test_param_groups_split_by_module_type_and_name():
    net = _Net()
    groups = param_groups(net, weight_decay=0.3, exclude_norm_bias=True)
    assert len(groups) == 2
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.3 and no_decay["weight_decay"] == 0.0
    assert _ids(decay["params"]) == _ids([net.conv.weight, net.conv_b.weight, net.fc.weight, net.tied.weight])
    assert _ids(no_decay["params"]) == _ids(
        [net.conv_b.bias, net.bn.weight, net.bn.bias, net.gn.weight, net.gn.bias, net.ln.weight, net.ln.bias]
        + [net.fc.bias, net.half_frozen.bias]
    )
    # The shared weight once, the frozen one never.
    every = [p for g in groups for p in g["params"]]
    assert len(every) == len({id(p) for p in every}) == 13


def test_param_groups_without_exclusion_is_one_group_of_every_trainable_parameter():
    net = _Net()
    groups = param_groups(net, weight_decay=0.3, exclude_norm_bias=False)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.3
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    assert _ids(groups[0]["params"]) == sorted(trainable)


def test_param_groups_of_a_model_without_norms_or_biases_has_no_empty_group():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.Linear(4, 2, bias=False))
    groups = param_groups(net, weight_decay=0.1, exclude_norm_bias=True)
    assert len(groups) == 1 and len(groups[0]["params"]) == 2


@pytest.mark.parametrize(
    "momentum, nesterov, expect_nesterov",
    [(0.7, True, True), (0.7, False, False)],
)
def test_build_optimizer_passes_every_option(momentum, nesterov, expect_nesterov):
    net = _Net()
    cfg = OptimConfig(momentum=momentum, nesterov=nesterov, weight_decay=0.02, wd_exclude_norm_bias=True)
    opt = build_optimizer(net, cfg, lr=0.37)
    assert isinstance(opt, torch.optim.SGD)
    assert [g["lr"] for g in opt.param_groups] == [0.37, 0.37]
    assert [g["momentum"] for g in opt.param_groups] == [momentum, momentum]
    assert [g["nesterov"] for g in opt.param_groups] == [expect_nesterov] * 2
    assert [g["weight_decay"] for g in opt.param_groups] == [0.02, 0.0]


def test_build_optimizer_drops_nesterov_without_momentum():
    # A config object that skipped the schema's rule (e.g. built by a caller): SGD itself would refuse it.
    class Cfg:
        momentum, nesterov, weight_decay, wd_exclude_norm_bias = 0.0, True, 0.0, False

    opt = build_optimizer(_Net(), Cfg, lr=0.1)
    assert opt.param_groups[0]["nesterov"] is False and opt.param_groups[0]["momentum"] == 0.0


def test_build_optimizer_without_exclusion_decays_everything():
    cfg = OptimConfig(weight_decay=0.02, wd_exclude_norm_bias=False)
    opt = build_optimizer(_Net(), cfg, lr=0.1)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.02]


def test_scaled_lr_is_linear_in_unique_images():
    assert scaled_lr(0.1, 256, 512) == pytest.approx(0.2)
    assert scaled_lr(0.1, 256, 64) == pytest.approx(0.025)
    assert scaled_lr(0.8, 100, 100) == pytest.approx(0.8)


def test_warmup_is_linear_per_step_and_reaches_the_peak_on_its_last_step():
    s = LRSchedule(peak_lr=2.0, warmup_steps=4, total_steps=20)
    assert [s(i) for i in range(4)] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert s(4) == pytest.approx(2.0)  # first cosine step: progress 0


def test_cosine_after_warmup_by_hand():
    s = LRSchedule(peak_lr=2.0, warmup_steps=4, total_steps=14)
    for step in (4, 6, 9, 13, 14):
        progress = (step - 4) / 10
        assert s(step) == pytest.approx(0.5 * 2.0 * (1 + math.cos(math.pi * progress)), abs=1e-12), step
    assert s(9) == pytest.approx(1.0)
    assert s(14) == pytest.approx(0.0, abs=1e-12)
    # Past the end it stays at 0 (a resume that overshoots never climbs back up).
    assert s(20) == pytest.approx(0.0, abs=1e-12) and s(30) == pytest.approx(0.0, abs=1e-12)


def test_cosine_without_warmup_and_with_no_room_after_it():
    s = LRSchedule(peak_lr=1.0, warmup_steps=0, total_steps=4)
    assert [s(i) for i in range(5)] == pytest.approx(
        [1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 - math.cos(math.pi / 4)) / 2, 0.0]
    )
    # total == warmup: the span is clamped to one step, no division by zero.
    s = LRSchedule(peak_lr=1.0, warmup_steps=3, total_steps=3)
    assert s(2) == pytest.approx(1.0) and s(3) == pytest.approx(1.0) and s(4) == pytest.approx(0.0, abs=1e-12)


def test_step_decay_multiplies_by_gamma_at_each_milestone():
    s = LRSchedule(peak_lr=2.0, warmup_steps=2, total_steps=20, kind="step", milestones=(5, 8), gamma=0.2)
    expected = {0: 1.0, 1: 2.0, 2: 2.0, 4: 2.0, 5: 0.4, 7: 0.4, 8: 0.08, 19: 0.08, 25: 0.08}
    for step, lr in expected.items():
        assert s(step) == pytest.approx(lr), step


def test_build_schedule_turns_epochs_into_steps():
    cfg = ScheduleConfig(epochs=4.0, warmup_epochs=1.5, kind="step", milestones=(1.2, 2.7), gamma=0.3)
    s = build_schedule(cfg, peak_lr=0.9, steps_per_epoch=10.0, total_steps=40)
    assert s == LRSchedule(peak_lr=0.9, warmup_steps=15, total_steps=40, kind="step", milestones=(12, 27), gamma=0.3)
    # Rounding, not truncation: 0.96 epochs of 25 steps is 24 steps, 1.99 of 25 is 49.75 -> 50.
    cfg = ScheduleConfig(epochs=3.0, warmup_epochs=0.96, kind="step", milestones=(1.99,))
    s = build_schedule(cfg, peak_lr=1.0, steps_per_epoch=25.0, total_steps=75)
    assert s.warmup_steps == 24 and s.milestones == (50,) and s.kind == "step" and s.gamma == 0.1


def test_set_lr_sets_every_group():
    opt = build_optimizer(_Net(), OptimConfig(), lr=0.5)
    set_lr(opt, 0.125)
    assert [g["lr"] for g in opt.param_groups] == [0.125, 0.125]


def test_ema_update_by_hand_at_an_asymmetric_decay():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    ema = EMA(net, decay=0.75)
    assert not ema.module.training
    assert all(not p.requires_grad for p in ema.module.parameters())
    before = {k: v.clone() for k, v in net.state_dict().items()}
    # Move every float parameter, and run a training forward so the BatchNorm buffers move and the counter ticks.
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
        net.train()(torch.randn(2, 3, 6, 6))
    live = net.state_dict()
    # A deep copy: the live model's change did not reach the EMA before update().
    for k, v in ema.state_dict().items():
        assert torch.equal(v, before[k]), k
    ema.update(net)
    for k, v in ema.state_dict().items():
        if v.dtype.is_floating_point:
            torch.testing.assert_close(v, 0.75 * before[k] + 0.25 * live[k], rtol=0, atol=1e-6, msg=k)
            assert not torch.equal(v, live[k]), k
        else:  # num_batches_tracked: copied, not averaged
            assert torch.equal(v, live[k]) and int(v) == 1, k


def test_ema_state_round_trip_is_strict():
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = EMA(net, decay=0.9)
    state = {k: v + 1 if v.dtype.is_floating_point else v for k, v in ema.state_dict().items()}
    other = EMA(net, decay=0.9)
    other.load_state_dict(state)
    for k, v in other.state_dict().items():
        assert torch.equal(v, state[k]), k
    state.pop("0.bias")
    with pytest.raises(RuntimeError, match="0.bias"):
        other.load_state_dict(state)
