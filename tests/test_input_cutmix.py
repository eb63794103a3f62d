"""Input-level CutMix with MixMo-region label correction: against a naive per-sample loop, by hand, in a train step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mixmo_dist.model import build_model
from mixmo_dist.ops.input_cutmix import InputCutMix, apply_input_cutmix, input_cutmix, sample_input_cutmix
from mixmo_dist.ops.mixing import MixParams, sample_mixing
from mixmo_dist.training.loss import mixmo_loss, reweight
from mixmo_dist.training.members import member_inputs

K = 7


def _naive(x_MRCHW, y_MR, mix: MixParams, draws: InputCutMix, stride: int):
    """The reference's per-sample procedure, written as plainly as possible (MSDADataset.call_msda)."""
    m_count, r_count, _, height, width = x_MRCHW.shape
    h, w = height // stride, width // stride
    out = x_MRCHW.clone()
    targets = torch.zeros(m_count, r_count, K)
    for m in range(m_count):
        for r in range(r_count):
            own, y_own = x_MRCHW[m, r], int(y_MR[m, r])
            p = int(draws.partner_MR[m, r])
            partner, y_partner = x_MRCHW[m, p], int(y_MR[m, p])
            if not bool(draws.apply_MR[m, r]):
                targets[m, r, y_own] = 1.0
                continue
            y0, y1, x0, x1 = draws.boxes_MR4[m, r].tolist()
            cut = torch.zeros(height, width)
            cut[y0:y1, x0:x1] = 1.0
            # Member m's MixMo mask at the encoder resolution.
            my0, my1, mx0, mx1 = mix.boxes_B4[r].tolist()
            mixmo = torch.full((h, w), float(mix.coef_out_MB[m, r]))
            mixmo[my0:my1, mx0:mx1] = float(mix.coef_in_MB[m, r])
            # The reference average-pools the CutMix mask to the encoder resolution when conv1 halves the size.
            pooled = F.avg_pool2d(cut[None, None], stride)[0, 0] if stride > 1 else cut
            share_in = float((pooled * mixmo).mean() / (mixmo.mean() + 1e-12))
            if share_in < 0.5:  # reverse_if_first_minor: the own image goes outside the box
                mixed = cut * partner + (1 - cut) * own
                share = 1.0 - share_in
            else:
                mixed = cut * own + (1 - cut) * partner
                share = share_in
            out[m, r] = mixed
            targets[m, r, y_own] += share
            targets[m, r, y_partner] += 1.0 - share
    return out, targets


@pytest.mark.parametrize(
    ("members", "cut_prob", "stride"),
    [(2, 1.0, 2), (2, 0.0, 2), (3, 1.0, 2), (2, 1.0, 1), (3, 0.5, 1)],
)
def test_matches_naive_per_sample_loop(members, cut_prob, stride):
    gen = torch.Generator().manual_seed(members * 10 + stride)
    rows, size = 12, 16
    x = torch.randn(members, rows, 3, size, size, generator=gen)
    y = torch.randint(0, K, (members, rows), generator=gen)
    h = size // stride
    mix = sample_mixing(rows, members, h, h, mixing="cut", alpha=2.0, cut_prob=cut_prob, generator=gen, device="cpu")
    draws = sample_input_cutmix(members, rows, size, size, 0.7, gen, "cpu")
    assert 0 < int(draws.apply_MR.sum()) < members * rows  # both branches are exercised
    got_x, got_t = apply_input_cutmix(x, y, mix, draws, K, (h, h))
    want_x, want_t = _naive(x, y, mix, draws, stride)
    torch.testing.assert_close(got_x, want_x)
    torch.testing.assert_close(got_t, want_t, rtol=1e-5, atol=1e-5)
    # Some applied row is reversed and some is not: the role reversal is exercised.
    reversed_any = (got_x != x).any() and (got_t.max(-1).values < 1).any()
    assert reversed_any


def test_share_is_measured_inside_the_members_mixmo_region():
    """Hand-made case: member 0 keeps the left half of the map, member 1 the right half; CutMix pastes the top-left
    quadrant. Over the whole image both would get ratio 0.25; inside their regions member 0 gets 0.5, member 1 0."""
    x = torch.stack([torch.full((2, 3, 8, 8), float(v)) for v in (1.0, 2.0)])  # member value 1 / 2 ...
    x[:, 1] += 10.0  # ... and row 1 differs from row 0
    y = torch.tensor([[0, 1], [2, 3]])
    mix = MixParams(
        boxes_B4=torch.tensor([[0, 4, 0, 2], [0, 4, 0, 2]]),  # encoder 4x4: all rows, left two columns
        coef_in_MB=torch.tensor([[1.0, 1.0], [0.0, 0.0]]),
        coef_out_MB=torch.tensor([[0.0, 0.0], [1.0, 1.0]]),
        lam_MB=torch.full((2, 2), 0.5),
        is_cut=torch.tensor(True),
        cut_prob=1.0,
    )
    draws = InputCutMix(
        apply_MR=torch.tensor([[True, False], [True, False]]),
        partner_MR=torch.tensor([[1, 0], [1, 0]]),
        boxes_MR4=torch.tensor([[[0, 4, 0, 4], [0, 8, 0, 8]], [[0, 4, 0, 4], [0, 8, 0, 8]]]),
    )
    out, targets = apply_input_cutmix(x, y, mix, draws, 4, (4, 4))
    # Member 0: share 0.5 inside its region -> own image stays inside the box (ties keep the reference's order).
    torch.testing.assert_close(targets[0, 0], torch.tensor([0.5, 0.5, 0.0, 0.0]))
    assert torch.equal(out[0, 0, :, :4, :4], x[0, 0, :, :4, :4])
    assert torch.equal(out[0, 0, :, 4:, :], x[0, 1, :, 4:, :])
    # Member 1: the box misses its region entirely -> reversed, it keeps all of its region: its own label only.
    torch.testing.assert_close(targets[1, 0], torch.tensor([0.0, 0.0, 1.0, 0.0]))
    assert torch.equal(out[1, 0, :, :4, :4], x[1, 1, :, :4, :4])
    assert torch.equal(out[1, 0, :, :, 4:], x[1, 0, :, :, 4:])
    # Rows without CutMix are untouched, with one-hot targets.
    assert torch.equal(out[:, 1], x[:, 1])
    torch.testing.assert_close(targets[:, 1], F.one_hot(y[:, 1], 4).float())


def test_probability_semantics_and_targets():
    gen = torch.Generator().manual_seed(3)
    members, rows, size = 2, 512, 8
    x = torch.randn(members, rows, 3, size, size, generator=gen)
    y = torch.randint(0, K, (members, rows), generator=gen)
    mix = sample_mixing(rows, members, 4, 4, mixing="cut", alpha=2.0, cut_prob=0.5, generator=gen, device="cpu")
    out0, t0 = input_cutmix(x, y, mix, K, 0.0, gen, encoder_hw=(4, 4))
    assert torch.equal(out0, x)
    torch.testing.assert_close(t0, F.one_hot(y, K).float())

    draws = sample_input_cutmix(members, rows, size, size, 0.5, torch.Generator().manual_seed(5), "cpu")
    assert abs(draws.apply_MR.float().mean().item() - 0.5) < 0.05  # a per-(member, row) coin
    out, targets = apply_input_cutmix(x, y, mix, draws, K, (4, 4))
    torch.testing.assert_close(targets.sum(-1), torch.ones(members, rows))
    own = targets.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    assert (own >= 0.5 - 1e-6).all()  # the own image always keeps at least half of its region
    assert (own[draws.apply_MR] < 1).float().mean() > 0.5  # and most CutMix rows really mix labels
    # Partners come from the same member batch: every output pixel is the own or the partner pixel.
    partner = x[torch.arange(members)[:, None], draws.partner_MR]
    assert ((out == x) | (out == partner)).all()


def test_draws_do_not_depend_on_prob_and_are_reproducible():
    a, b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    da = sample_input_cutmix(2, 16, 32, 32, 0.1, a, "cpu")
    db = sample_input_cutmix(2, 16, 32, 32, 0.9, b, "cpu")
    assert torch.equal(a.get_state(), b.get_state())  # same number of draws: the RNG stream is stable
    assert torch.equal(da.boxes_MR4, db.boxes_MR4) and torch.equal(da.partner_MR, db.partner_MR)
    assert int(da.apply_MR.sum()) < int(db.apply_MR.sum())


def test_channels_last_members_stay_channels_last():
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    x, y = member_inputs(images, torch.arange(4), num_members=2, repetitions=2, input_repetition=0.0, generator=gen)
    mix = sample_mixing(8, 2, 8, 8, mixing="cut", alpha=2.0, cut_prob=1.0, generator=gen, device="cpu")
    out, _ = input_cutmix(x, y, mix, 4, 1.0, gen, encoder_hw=(8, 8))
    assert out[0].is_contiguous(memory_format=torch.channels_last) and not out[0].is_contiguous()


def test_bad_inputs_name_the_culprit():
    gen = torch.Generator().manual_seed(0)
    mix = sample_mixing(4, 2, 4, 4, mixing="cut", alpha=2.0, cut_prob=1.0, generator=gen, device="cpu")
    x = torch.randn(2, 4, 3, 8, 8)
    with pytest.raises(ValueError, match="input_cutmix_prob"):
        input_cutmix(x, torch.zeros(2, 4, dtype=torch.long), mix, K, 1.5, gen, encoder_hw=(4, 4))
    with pytest.raises(ValueError, match="y_MR"):
        input_cutmix(x, torch.zeros(2, 3, dtype=torch.long), mix, K, 0.5, gen, encoder_hw=(4, 4))


def test_one_real_training_step_uses_the_soft_targets():
    """member inputs -> mixing draw -> input CutMix -> MixMoNet -> reweighted soft CE -> backward, as the trainer."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    net = build_model("resnet18", 2, K)
    images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, K, (4,))
    x, y = member_inputs(images, labels, num_members=2, repetitions=2, input_repetition=0.0, generator=gen)
    hw = net.encoder_output_hw(32, 32)
    mix = sample_mixing(8, 2, *hw, mixing="cut", alpha=2.0, cut_prob=1.0, generator=gen, device="cpu")
    x, targets = input_cutmix(x, y, mix, K, 1.0, gen, encoder_hw=hw)
    logits = net(x, mix)
    weights = reweight(mix.lam_MB, 3.0)
    loss, per_member = mixmo_loss(logits, targets, weights)
    manual = (-(targets * logits.log_softmax(-1)).sum(-1) * weights).mean(1)
    torch.testing.assert_close(per_member, manual)
    assert (targets.max(-1).values < 1).any()  # soft labels really reached the loss
    loss.backward()
    assert torch.isfinite(loss) and all(e.weight.grad.abs().sum() > 0 for e in net.encoders)
