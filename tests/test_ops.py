"""Mixing path: batched masks, the sampler, the mixing block, against naive per-sample references."""

import math

import numpy as np
import pytest
import torch

from mixmo_dist.ops import (
    box_masks,
    cut_probability,
    cutmix_masks,
    member_masks,
    mix_features_torch,
    sample_boxes,
    sample_mixing,
)


def _reference_box(lam: float, cy: int, cx: int, h: int, w: int) -> np.ndarray:
    """The reference's per-sample box, written as a loop: cut size from sqrt(lam), centre anywhere, clipped."""
    cut_h, cut_w = int(h * math.sqrt(lam)), int(w * math.sqrt(lam))
    y0, y1 = np.clip(cy - cut_h // 2, 0, h), np.clip(cy + cut_h // 2, 0, h)
    x0, x1 = np.clip(cx - cut_w // 2, 0, w), np.clip(cx + cut_w // 2, 0, w)
    mask = np.zeros((h, w), dtype=np.float32)
    mask[y0:y1, x0:x1] = 1.0
    return mask


def test_boxes_match_per_sample_reference():
    h, w, b = 13, 17, 64
    lam = torch.rand(b, generator=torch.Generator().manual_seed(1))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    mask, realised = cutmix_masks(lam, h, w, g1)
    cy = torch.randint(0, h, (b,), generator=g2)
    cx = torch.randint(0, w, (b,), generator=g2)
    for i in range(b):
        ref = _reference_box(float(lam[i]), int(cy[i]), int(cx[i]), h, w)
        np.testing.assert_array_equal(mask[i, 0].numpy(), ref)
        assert realised[i].item() == pytest.approx(ref.mean(), abs=1e-7)


def test_masks_into_a_reused_buffer_equal_fresh_ones_and_bad_buffers_are_named():
    lam = torch.rand(6, generator=torch.Generator().manual_seed(2))
    fresh, realised = cutmix_masks(lam, 9, 11, torch.Generator().manual_seed(3))
    buffer = torch.full((6, 1, 9, 11), 7.0)  # stale content must be overwritten everywhere
    mask, realised_out = cutmix_masks(lam, 9, 11, torch.Generator().manual_seed(3), out=buffer)
    assert mask.data_ptr() == buffer.data_ptr()
    assert torch.equal(mask, fresh) and torch.equal(realised_out, realised)
    with pytest.raises(ValueError, match=r"out must be float32 \[6, 1, 9, 11\], got torch.float32 \[6, 1, 9, 10\]"):
        cutmix_masks(lam, 9, 11, out=torch.empty(6, 1, 9, 10))
    with pytest.raises(ValueError, match="got torch.float16"):
        cutmix_masks(lam, 9, 11, out=torch.empty(6, 1, 9, 11, dtype=torch.float16))


def test_realised_area_equals_mask_mean_and_reference_mean():
    g = torch.Generator().manual_seed(0)
    lam = torch.distributions.Beta(2.0, 2.0).sample((20000,))
    mask, realised = cutmix_masks(lam, 112, 112, g)
    torch.testing.assert_close(mask.mean((1, 2, 3)), realised)
    # The reference's clipped boxes realise far less than E[lam] = 0.5: about 0.32 at 112x112.
    assert 0.31 < realised.mean().item() < 0.33


def test_boxes_are_not_kept_inside_the_map():
    g = torch.Generator().manual_seed(0)
    boxes = sample_boxes(torch.full((4000,), 0.5), 32, 32, g)
    assert (boxes[:, 0] == 0).any() and (boxes[:, 1] == 32).any()
    assert ((boxes[:, 1] - boxes[:, 0]) < int(32 * math.sqrt(0.5)) // 2 * 2).any()


@pytest.mark.parametrize("members", [2, 3, 4])
@pytest.mark.parametrize("mixing,cut_prob", [("cut", 1.0), ("linear", 1.0), ("cut", 0.0), ("none", 0.0)])
def test_sampler_invariants(members, mixing, cut_prob):
    g = torch.Generator().manual_seed(members)
    p = sample_mixing(32, members, 9, 11, mixing=mixing, alpha=2.0, cut_prob=cut_prob, generator=g, device="cpu")
    masks = member_masks(p.boxes_B4, p.coef_in_MB, p.coef_out_MB, 9, 11)
    torch.testing.assert_close(masks.sum(0), torch.ones_like(masks[0]))
    torch.testing.assert_close(p.lam_MB.sum(0), torch.ones(32))
    torch.testing.assert_close(masks.mean((2, 3, 4)), p.lam_MB)
    expect_cut = mixing == "cut" and cut_prob == 1.0
    assert bool(p.is_cut) == expect_cut
    if expect_cut:
        # Binary for the member inside the box; M > 2: the others share the complement linearly.
        inside = p.coef_in_MB.argmax(0)
        assert (inside == inside[0]).all()
        assert set(p.coef_in_MB.unique().tolist()) <= {0.0, 1.0}
    if mixing == "none":
        torch.testing.assert_close(p.lam_MB, torch.full_like(p.lam_MB, 1 / members))


def test_role_shuffle_and_dirichlet_statistics():
    g = torch.Generator().manual_seed(3)
    roles = []
    for _ in range(200):
        p = sample_mixing(4, 2, 8, 8, mixing="cut", alpha=2.0, cut_prob=1.0, generator=g, device="cpu")
        roles.append(int(p.coef_in_MB[:, 0].argmax()))
    assert 60 < sum(roles) < 140
    p = sample_mixing(20000, 2, 8, 8, mixing="linear", alpha=2.0, cut_prob=1.0, generator=g, device="cpu")
    kappa = p.lam_MB[0]
    # Beta(2, 2): mean 1/2, variance 1/20.
    assert abs(kappa.mean().item() - 0.5) < 0.01 and abs(kappa.var().item() - 0.05) < 0.005


def test_sampler_is_reproducible_from_generator_state():
    g = torch.Generator().manual_seed(11)
    state = g.get_state()
    a = sample_mixing(16, 2, 8, 8, mixing="cut", alpha=2.0, cut_prob=0.5, generator=g, device="cpu")
    g.set_state(state)
    b = sample_mixing(16, 2, 8, 8, mixing="cut", alpha=2.0, cut_prob=0.5, generator=g, device="cpu")
    torch.testing.assert_close(a.boxes_B4, b.boxes_B4)
    torch.testing.assert_close(a.lam_MB, b.lam_MB)


def test_cut_probability_schedule():
    assert cut_probability(0.0, 0.5) == 0.5
    assert cut_probability(0.9, 0.5) == 0.5
    assert cut_probability(11 / 12, 0.5) == pytest.approx(0.5)
    assert cut_probability(1 - 1 / 24, 0.5) == pytest.approx(0.25)
    assert cut_probability(1.0, 0.5) == 0.0
    assert cut_probability(1.2, 0.5) == 0.0


@pytest.mark.parametrize("members", [2, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_mixing_matches_naive_loop(members, channels_last):
    g = torch.Generator().manual_seed(7)
    b, c, h, w = 6, 5, 9, 10
    p = sample_mixing(b, members, h, w, mixing="cut", alpha=2.0, cut_prob=1.0, generator=g, device="cpu")
    feats = [torch.randn(b, c, h, w, generator=g, requires_grad=True) for _ in range(members)]
    inputs = [f.contiguous(memory_format=torch.channels_last) if channels_last else f for f in feats]
    z = mix_features_torch(inputs, p.boxes_B4, p.coef_in_MB, p.coef_out_MB)
    expect = torch.zeros(b, c, h, w)
    for i in range(b):
        y0, y1, x0, x1 = p.boxes_B4[i].tolist()
        for m in range(members):
            mask = torch.full((h, w), p.coef_out_MB[m, i].item())
            mask[y0:y1, x0:x1] = p.coef_in_MB[m, i].item()
            expect[i] += mask * feats[m][i].detach()
    torch.testing.assert_close(z, expect, rtol=1e-5, atol=1e-6)
    if channels_last:
        assert z.is_contiguous(memory_format=torch.channels_last)
    grad = torch.randn(b, c, h, w, generator=g)
    z.backward(grad)
    masks = member_masks(p.boxes_B4, p.coef_in_MB, p.coef_out_MB, h, w)
    for m in range(members):
        torch.testing.assert_close(feats[m].grad, masks[m] * grad, rtol=1e-5, atol=1e-6)


def test_box_masks_half_open():
    boxes = torch.tensor([[1, 3, 0, 2], [0, 0, 0, 4]])
    mask = box_masks(boxes, 4, 4)
    assert mask[0].sum() == 4 and mask[0, 1, 0] and not mask[0, 3, 0] and mask[1].sum() == 0
