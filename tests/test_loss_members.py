"""Loss reweighting and member inputs (batch repetition, permutations, input repetition)."""

import pytest
import torch
import torch.nn.functional as F

from mixmo_dist.training.loss import mixmo_loss, reweight
from mixmo_dist.training.members import member_indices, member_inputs


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


def test_member_indices_repetition_and_permutations():
    g = torch.Generator().manual_seed(0)
    idx = member_indices(8, 3, 4, 0.0, g, "cpu")
    assert idx.shape == (3, 32)
    for m in range(3):
        # every member sees every unique image exactly b times, in its own order
        assert torch.equal(torch.bincount(idx[m], minlength=8), torch.full((8,), 4))
    assert not torch.equal(idx[0], idx[1])


def test_input_repetition_fraction():
    g = torch.Generator().manual_seed(0)
    idx = member_indices(1000, 2, 1, 0.6, g, "cpu")
    same = (idx[0] == idx[1]).float().mean().item()
    assert 0.55 < same < 0.66  # 0.6 forced plus chance collisions (~0.4/1000)
    assert (member_indices(1000, 2, 1, 0.0, g, "cpu")[0] == 0).sum() == 1


def test_member_inputs_gathers_images_and_labels():
    g = torch.Generator().manual_seed(1)
    images = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 2, 2).contiguous()
    labels = torch.tensor([10, 11, 12, 13])
    x, y = member_inputs(images, labels, num_members=2, repetitions=2, input_repetition=0.0, generator=g)
    assert x.shape == (2, 8, 3, 2, 2)
    torch.testing.assert_close(x[:, :, 0, 0, 0].long() + 10, y)
    cl = images.contiguous(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(1)
    x2, y2 = member_inputs(cl, labels, num_members=2, repetitions=2, input_repetition=0.0, generator=g)
    torch.testing.assert_close(x2, x)
    assert x2[0].is_contiguous(memory_format=torch.channels_last)
