"""ops/mixing against a reference written here from the method's definition (issue 22, from the first
`make mutation` pass of ops/mixing): every quantity `sample_mixing` draws, from the same generator, for cut, linear
and none, M = 2 and 3; boxes whose side rounds to 0 at the map's edge; empty boxes; the Dirichlet at alpha = 0
and 1; bf16 features; and the CPU dispatch of `mix_features`."""

from __future__ import annotations

import pytest
import torch

from mixmo_dist.ops.mixing import (
    box_area,
    mix_features,
    mix_features_torch,
    sample_boxes,
    sample_dirichlet,
    sample_mixing,
)


def _reference_boxes(lam, height, width, gen):
    root = lam.float().sqrt()
    ch, cw = (height * root).floor().long(), (width * root).floor().long()
    cy = torch.randint(0, height, (len(lam),), generator=gen)
    cx = torch.randint(0, width, (len(lam),), generator=gen)
    rows = []
    for b in range(len(lam)):
        y0, y1 = max(int(cy[b] - ch[b] // 2), 0), min(int(cy[b] + ch[b] // 2), height)
        x0, x1 = max(int(cx[b] - cw[b] // 2), 0), min(int(cx[b] + cw[b] // 2), width)
        rows.append([y0, y1, x0, x1])
    return torch.tensor(rows, dtype=torch.int64)


def _reference(batch, members, height, width, mixing, alpha, cut_prob, seed):
    """The method's draws in the module's documented order: kappas, one coin, one role, the boxes."""
    gen = torch.Generator().manual_seed(seed)
    if mixing == "none" or alpha <= 0:
        kappa = torch.full((members, batch), 1.0 / members)
    else:
        kappa = torch._sample_dirichlet(torch.full((batch, members), float(alpha)), generator=gen).t()
    if mixing != "cut":
        cut_prob = 0.0
    is_cut = bool(torch.rand((), generator=gen) < cut_prob)
    role = int(torch.randint(0, members, (), generator=gen))
    boxes = _reference_boxes(kappa[role], height, width, gen)
    area = torch.tensor([(b[1] - b[0]) * (b[3] - b[2]) / (height * width) for b in boxes.tolist()])
    if is_cut:
        coef_in = torch.zeros(members, batch)
        coef_in[role] = 1.0
        others = kappa.clone()
        others[role] = 0.0
        coef_out = others / others.sum(0, keepdim=True)
    else:
        coef_in = coef_out = kappa
    lam = area * coef_in + (1 - area) * coef_out
    return boxes, coef_in, coef_out, lam, is_cut, role


@pytest.mark.parametrize("members", [2, 3])
@pytest.mark.parametrize(
    "mixing, alpha, cut_prob", [("cut", 2.0, 1.0), ("cut", 2.0, 0.0), ("linear", 1.5, 1.0), ("none", 2.0, 1.0)]
)
def test_sample_mixing_equals_the_reference_draw_for_draw(members, mixing, alpha, cut_prob):
    for seed in range(6):
        got = sample_mixing(
            12, members, 7, 9, mixing=mixing, alpha=alpha, cut_prob=cut_prob,
            generator=torch.Generator().manual_seed(seed), device="cpu",
        )  # fmt: skip
        boxes, coef_in, coef_out, lam, is_cut, role = _reference(12, members, 7, 9, mixing, alpha, cut_prob, seed)
        assert torch.equal(got.boxes_B4, boxes), seed
        torch.testing.assert_close(got.coef_in_MB, coef_in, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got.coef_out_MB, coef_out, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got.lam_MB, lam, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got.lam_MB.sum(0), torch.ones(12))
        assert bool(got.is_cut) is is_cut
        expected_prob = cut_prob if mixing == "cut" else 0.0
        assert got.cut_prob == expected_prob and isinstance(got.cut_prob, float)
        if is_cut:  # the member pasted in the box owns the box, and nothing outside it
            assert torch.equal(got.coef_in_MB[role], torch.ones(12)) and got.coef_out_MB[role].abs().max() == 0


def test_the_coin_comes_from_the_generator_not_the_global_stream():
    coins = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        gen = torch.Generator().manual_seed(4)
        coins.append([
            bool(sample_mixing(4, 2, 5, 5, mixing="cut", alpha=2.0, cut_prob=0.5, generator=gen, device="cpu").is_cut)
            for _ in range(40)
        ])  # fmt: skip
    assert coins[0] == coins[1] and 5 < sum(coins[0]) < 35


def test_sample_boxes_at_the_edges_and_with_sides_that_round_to_zero():
    # lam = 0.01 on 4 x 4: side floor(0.4) = 0, so every box is empty wherever its centre falls (row 0 included).
    for lam_value, seed in ((0.01, 0), (0.3, 1), (1.0, 2)):
        lam = torch.full((64,), lam_value)
        got = sample_boxes(lam, 4, 6, torch.Generator().manual_seed(seed))
        assert torch.equal(got, _reference_boxes(lam, 4, 6, torch.Generator().manual_seed(seed))), lam_value
    empty = sample_boxes(torch.full((64,), 0.01), 4, 4, torch.Generator().manual_seed(0))
    assert (empty[:, 1] == empty[:, 0]).all() and (box_area(empty, 4, 4) == 0).all()


def test_box_area_of_empty_and_inverted_boxes_is_zero():
    boxes = torch.tensor([[0, 2, 3, 3], [2, 2, 0, 5], [3, 1, 0, 2], [1, 3, 4, 2], [0, 4, 0, 5]])
    assert box_area(boxes, 4, 5).tolist() == [0.0, 0.0, 0.0, 0.0, 1.0]


def test_dirichlet_at_alpha_zero_is_one_over_m_and_at_one_is_random():
    fixed = sample_dirichlet(0.0, 5, 3, None, "cpu")
    assert fixed.shape == (3, 5) and torch.equal(fixed, torch.full((3, 5), 1.0 / 3))
    assert torch.equal(sample_dirichlet(-1.0, 2, 3, None, "cpu"), torch.full((3, 2), 1.0 / 3))
    drawn = sample_dirichlet(1.0, 200, 3, torch.Generator().manual_seed(0), "cpu")
    torch.testing.assert_close(drawn.sum(0), torch.ones(200))
    assert drawn.std() > 0.15  # Dirichlet(1, 1, 1): std of a share sqrt(2/36) = 0.236


def test_unknown_mixing_is_named():
    with pytest.raises(ValueError) as err:
        sample_mixing(2, 2, 4, 4, mixing="cutmix", alpha=1.0, cut_prob=0.5, generator=None, device="cpu")
    assert str(err.value) == "mixmo.mixing must be one of cut|linear|none, got 'cutmix'"


@pytest.mark.parametrize("members", [2, 3])
def test_bf16_features_mix_in_bf16(members):
    gen = torch.Generator().manual_seed(3)
    params = sample_mixing(4, members, 6, 6, mixing="cut", alpha=2.0, cut_prob=1.0, generator=gen, device="cpu")
    feats = [torch.randn(4, 5, 6, 6, generator=gen).to(torch.bfloat16) for _ in range(members)]
    out = mix_features_torch(feats, params.boxes_B4, params.coef_in_MB, params.coef_out_MB)
    assert out.dtype == torch.bfloat16
    ref = mix_features_torch([f.float() for f in feats], params.boxes_B4, params.coef_in_MB, params.coef_out_MB)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("members", [2, 3])
def test_mix_features_on_the_cpu_is_the_torch_path(members):
    gen = torch.Generator().manual_seed(8)
    params = sample_mixing(3, members, 5, 5, mixing="cut", alpha=2.0, cut_prob=1.0, generator=gen, device="cpu")
    feats = [torch.randn(3, 4, 5, 5, generator=gen) for _ in range(members)]
    got = mix_features(feats, params.boxes_B4, params.coef_in_MB, params.coef_out_MB)
    assert torch.equal(got, mix_features_torch(feats, params.boxes_B4, params.coef_in_MB, params.coef_out_MB))
