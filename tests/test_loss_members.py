"""Loss reweighting and member inputs (batch repetition, permutations, input repetition, views per copy).

Member inputs are checked against the MixMo authors' definitions (mixmo-pytorch's `BatchRepetitionSampler` and
`randperm_static`, restated in `_authors_member_images` below), by counting over many draws.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mixmo_dist.training.loss import mixmo_loss, reweight
from mixmo_dist.training.members import member_inputs, member_rows, member_views, shared_rows


@pytest.mark.parametrize("lam,expect", [(0.10, 0.649), (0.25, 0.819), (0.5, 1.0), (0.75, 1.181), (0.90, 1.351)])
def test_reweight_reference_values(lam, expect):
    w = reweight(torch.tensor([[lam], [1 - lam]]), 3.0)
    assert w[0, 0].item() == pytest.approx(expect, abs=5e-4)
    assert w.sum().item() == pytest.approx(2.0)


def test_reweight_root_one_and_mimo():
    lam = torch.tensor([[0.2, 0.7], [0.8, 0.3]])
    torch.testing.assert_close(reweight(lam, 1.0), 2 * lam)
    torch.testing.assert_close(reweight(torch.full((3, 4), 1 / 3), 3.0), torch.ones(3, 4))


def test_loss_is_weighted_sum_over_members():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 4, generator=g)
    labels = torch.randint(0, 4, (2, 5), generator=g)
    w = torch.rand(2, 5, generator=g)
    total, per = mixmo_loss(logits, labels, w)
    expect = [(F.cross_entropy(logits[m], labels[m], reduction="none") * w[m]).mean() for m in range(2)]
    torch.testing.assert_close(per, torch.stack(expect))
    torch.testing.assert_close(total, per.sum())
    soft = F.one_hot(labels, 4).float()
    torch.testing.assert_close(mixmo_loss(logits, soft, w)[0], total)
    smooth_hard = mixmo_loss(logits, labels, w, label_smoothing=0.1)[0]
    torch.testing.assert_close(mixmo_loss(logits, soft, w, label_smoothing=0.1)[0], smooth_hard)


def test_reweight_root_below_one_by_hand():
    """r = 0.5 (allowed: r > 0): w = 2 lam^2 / (0.8^2 + 0.2^2); the powered sum 0.68 is below 1, so a guard that
    clamps the denominator at 1 instead of at a tiny epsilon shows here and nowhere with r >= 1."""
    w = reweight(torch.tensor([[0.8], [0.2]]), 0.5)
    assert w[:, 0].tolist() == pytest.approx([2 * 0.64 / 0.68, 2 * 0.04 / 0.68], rel=1e-6)


def test_label_smoothing_against_the_formula_by_hand():
    """One row, p = (1, 2, 5) / 8, label 0, eps = 0.2 (not a value where smoothing and none could agree):
    (1 - eps) * log 8 + eps * (log 8 + log 4 + log 8/5) / 3. The older test compared hard and soft targets, both
    through the same call, so dropping the smoothing from that call passed it."""
    logits = torch.log(torch.tensor([[[1.0, 2.0, 5.0]]]))
    expect = 0.8 * math.log(8) + 0.2 * (math.log(8) + math.log(4) + math.log(8 / 5)) / 3
    for targets in (torch.tensor([[0]]), torch.tensor([[[1.0, 0.0, 0.0]]])):
        total, _ = mixmo_loss(logits, targets, torch.ones(1, 1), label_smoothing=0.2)
        assert total.item() == pytest.approx(expect, rel=1e-6)


def _unique_of(rows_MR: torch.Tensor, b: int) -> torch.Tensor:
    return rows_MR // b


def test_every_member_reads_every_image_b_times_in_its_own_order():
    g = torch.Generator().manual_seed(0)
    rows = member_rows(8, 3, 4, 0.0, g, "cpu")
    assert rows.shape == (3, 32)
    for m in range(3):
        assert sorted(rows[m].tolist()) == list(range(32))  # a permutation of the repeated batch
        assert torch.equal(torch.bincount(_unique_of(rows[m], 4), minlength=8), torch.full((8,), 4))
    assert not torch.equal(rows[0], rows[1])


def _authors_member_images(unique: int, members: int, b: int, rho: float, rng: np.random.Generator) -> np.ndarray:
    """Image index per member and row, [M,R], the way the authors' sampler builds a batch.

    The repeated batch lists image i b times in a row; a "static" permutation keeps its first int(R * rho) entries
    in place and shuffles the rest; member 0 reads the batch through one static permutation, member m >= 1 reads
    member 0's rows through another.
    """
    rows = unique * b
    repeated = np.repeat(np.arange(unique), b)
    static = int(rows * rho)

    def randperm_static() -> np.ndarray:
        return np.concatenate([np.arange(static), static + rng.permutation(rows - static)])

    first = repeated[randperm_static()]
    return np.stack([first] + [first[randperm_static()] for _ in range(1, members)])


def _same_image_rows(images_MR: np.ndarray) -> int:
    return int((images_MR == images_MR[:1]).all(0).sum())


@pytest.mark.parametrize(("unique", "members", "b", "rho"), [(16, 2, 4, 0.6), (8, 3, 2, 0.3), (25, 2, 4, 0.5)])
def test_input_repetition_shares_the_authors_rows(unique, members, b, rho):
    """The rows every member reads the same image on: exactly the first int(rho * R) (never fewer, whatever the
    draw), plus chance coincidences as frequent as in the authors' sampler (same mean count over many draws)."""
    rows, draws = unique * b, 2000
    static = shared_rows(rows, rho)
    assert static == int(rows * rho) and static > 0
    g = torch.Generator().manual_seed(0)
    ours = []
    for _ in range(draws):
        images_MR = _unique_of(member_rows(unique, members, b, rho, g, "cpu"), b).numpy()
        assert (images_MR[:, :static] == images_MR[:1, :static]).all()
        ours.append(_same_image_rows(images_MR))
    rng = np.random.default_rng(0)
    theirs = [_same_image_rows(_authors_member_images(unique, members, b, rho, rng)) for _ in range(draws)]
    assert min(ours) >= static and min(theirs) >= static
    ours_mean, theirs_mean = np.mean(ours), np.mean(theirs)
    spread = np.sqrt((np.var(ours) + np.var(theirs)) / draws)
    assert abs(ours_mean - theirs_mean) < 4 * spread + 1e-9, (ours_mean, theirs_mean, spread)
    assert theirs_mean > static  # chance coincidences exist, so the comparison has something to compare


def test_input_repetition_zero_and_one():
    g = torch.Generator().manual_seed(0)
    assert torch.equal(member_rows(4, 2, 2, 1.0, g, "cpu"), torch.arange(8).expand(2, 8))
    no_shared = member_rows(1000, 2, 1, 0.0, g, "cpu")
    assert (no_shared[0] == no_shared[1]).sum() < 10  # 1 expected by chance
    # The stream does not depend on rho: the same number of draws whatever its value.
    a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    member_rows(8, 2, 4, 0.0, a, "cpu"), member_rows(8, 2, 4, 0.7, b, "cpu")
    assert torch.equal(a.get_state(), b.get_state())


@pytest.mark.parametrize("rho", [0.0, 0.5])
def test_one_view_per_copy_each_copy_reads_its_own_view(rho):
    """With V = b*M views per image, the b x M copies of an image in a step (every row of every member showing
    it) read b*M different views of that image, shared rows included; with V = 1 they all read view 0."""
    unique, members, b = 6, 2, 4
    views = b * members
    g = torch.Generator().manual_seed(1)
    rows_MR = member_rows(unique, members, b, rho, g, "cpu")
    view_MR = member_views(rows_MR, b, views)
    assert sorted(view_MR.flatten().tolist()) == list(range(unique * views))  # every view read exactly once
    assert torch.equal(view_MR // views, _unique_of(rows_MR, b))  # ... and it is a view of the right image
    static = shared_rows(unique * b, rho)
    if static:
        shared = view_MR[:, :static]
        assert torch.equal(shared[0] // views, shared[1] // views) and (shared[0] != shared[1]).all()
    assert torch.equal(member_views(rows_MR, b, 1), _unique_of(rows_MR, b))
    with pytest.raises(ValueError, match=r"^3 views per image: expected 1 \(shared\) or b\*M = 8$"):
        member_views(rows_MR, b, 3)


@pytest.mark.parametrize("views", [1, 4])
def test_member_inputs_gathers_images_and_labels(views):
    """Image v of the loader batch holds the value v; the labels follow the image each row shows."""
    g = torch.Generator().manual_seed(1)
    images = torch.arange(4.0 * views).view(-1, 1, 1, 1).expand(-1, 3, 2, 2).contiguous()
    labels = torch.tensor([10, 11, 12, 13])
    x, y = member_inputs(images, labels, num_members=2, repetitions=2, input_repetition=0.0, generator=g)
    assert x.shape == (2, 8, 3, 2, 2)
    shown = x[:, :, 0, 0, 0].long()
    torch.testing.assert_close(shown // views + 10, y)
    assert len(set(shown.flatten().tolist())) == 4 * views  # one view per copy: every view read once
    cl = images.contiguous(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(1)
    x2, y2 = member_inputs(cl, labels, num_members=2, repetitions=2, input_repetition=0.0, generator=g)
    torch.testing.assert_close(x2, x)
    assert x2[0].is_contiguous(memory_format=torch.channels_last)
    # The run planned other views than the loader gave: the message counts the images, not their channels.
    wrong = 4 // views
    with pytest.raises(ValueError, match=rf"^the loader gave {4 * views} images for 4 labels, not {wrong} views each$"):
        member_inputs(images, labels, num_members=2, repetitions=2, input_repetition=0.0, generator=g, views=wrong)
