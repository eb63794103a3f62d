"""evaluation/metrics at the inputs where plausible bugs differ (issue 22, from its first `make mutation` pass):
float32 inputs against a float64 reference at 1e-12 (a computation left in the input's precision is ~1e-7 off),
int32 labels (a lost cast to int64), labels that never name the last class (a one-hot whose width is inferred),
a confidence between a bin edge's float32 and float64 values, single samples and single-sample bins, and every
input check's exact message."""

from __future__ import annotations

import pytest
import torch

from mixmo_dist.evaluation.metrics import EvalAccumulator, brier, check_scores_and_labels, ece, nll


def _float32_case(seed=0, n=64, k=7):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, k, generator=gen, dtype=torch.float64) * 3).to(torch.float32)
    labels = torch.randint(0, k - 1, (n,), generator=gen).to(torch.int32)  # class k-1 never appears
    return logits, labels


def test_nll_is_float64_of_the_float32_input_and_takes_int32_labels():
    logits, labels = _float32_case()
    x = logits.to(torch.float64)
    reference = -(x.log_softmax(-1)[torch.arange(len(labels)), labels.long()]).mean().item()
    assert nll(logits, labels) == pytest.approx(reference, rel=1e-13, abs=0)
    assert nll(logits, labels) != pytest.approx(
        torch.nn.functional.cross_entropy(logits, labels.long()).item(), rel=1e-12, abs=0
    )  # the float32 computation really differs at this tolerance


def test_brier_is_float64_with_the_full_width_one_hot_and_int32_labels():
    logits, labels = _float32_case(1)
    probs = logits.softmax(-1)  # float32
    p = probs.to(torch.float64)
    onehot = torch.zeros_like(p)
    onehot[torch.arange(len(labels)), labels.long()] = 1.0
    per_sample = ((p - onehot) ** 2).sum(-1)
    assert brier(probs, labels, normalise=False) == pytest.approx(per_sample.mean().item(), rel=1e-13, abs=0)
    assert brier(probs, labels) == pytest.approx(per_sample.mean().item() / 7, rel=1e-13, abs=0)


def test_ece_is_float64_and_its_default_is_15_bins():
    logits, labels = _float32_case(2, n=200)
    probs = logits.softmax(-1)
    conf, pred = probs.to(torch.float64).max(-1)
    # Under-confident above 1/2 (always right), over-confident below (always wrong): the bins that straddle 1/2
    # hold both kinds, so the binning matters (15 bins straddle it, 16 have an edge there).
    labels = torch.where(conf > 0.5, pred, (pred + 1) % 7).to(torch.int32)
    correct = (pred == labels.long()).to(torch.float64)

    def reference(z):
        total = 0.0
        for b in range(z):
            lo, hi = b / z, (b + 1) / z
            inside = (conf > lo) & (conf <= hi)
            total += abs(float(correct[inside].sum() - conf[inside].sum()))
        return total / len(conf)

    assert ece(probs, labels) == pytest.approx(reference(15), rel=1e-12, abs=0)
    assert ece(probs, labels, num_bins=16) == pytest.approx(reference(16), rel=1e-12, abs=0)
    assert reference(15) != pytest.approx(reference(16), rel=1e-6)  # the default is really tested


def test_ece_bins_at_float64_edges():
    """0.3000000005 is above the float64 edge 3/10 and below its float32 value 0.30000001: bin (0.3, 0.4] here."""
    probs = torch.tensor([[0.3000000005, 0.2999999995, 0.2, 0.2], [0.35, 0.25, 0.2, 0.2]], dtype=torch.float64)
    labels = torch.tensor([0, 1])  # the first right, the second wrong: one bin holds both
    expected = abs(1.0 - (0.3000000005 + 0.35)) / 2
    assert ece(probs, labels, num_bins=10) == pytest.approx(expected, rel=1e-12, abs=0)


def test_one_sample_is_enough():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    labels = torch.tensor([0])
    expected = -torch.log_softmax(logits.double(), -1)[0, 0].item()
    assert nll(logits, labels) == pytest.approx(expected, rel=1e-13)
    probs = logits.softmax(-1)
    assert ece(probs, labels, num_bins=1) == pytest.approx(1 - probs.double().max().item(), rel=1e-9)
    acc = EvalAccumulator(num_members=2, num_classes=3, device="cpu", num_bins=4)
    acc.update(torch.stack([logits, logits]), labels)
    out = acc.compute()
    assert out["count"] == 1 and out["top1"] == 1.0


def test_a_bin_with_one_sample_reports_its_confidence_and_accuracy():
    acc = EvalAccumulator(num_members=1, num_classes=2, device="cpu", num_bins=2)
    logits = torch.tensor([[[3.0, 0.0], [0.1, 0.0], [0.0, 0.2]]])  # confidences 0.95, 0.52, 0.55
    acc.update(logits, torch.tensor([0, 1, 1]))
    rel = acc.compute()["reliability"]
    conf = torch.tensor([[3.0, 0.0], [0.1, 0.0], [0.0, 0.2]], dtype=torch.float64).softmax(-1).max(-1).values
    assert rel["count"] == [0, 3]
    acc1 = EvalAccumulator(num_members=1, num_classes=2, device="cpu", num_bins=4)
    acc1.update(logits, torch.tensor([0, 1, 1]))
    rel = acc1.compute()["reliability"]
    assert rel["count"] == [0, 0, 2, 1]
    assert rel["confidence"][3] == pytest.approx(conf[0].item(), rel=1e-6)  # one sample in the bin
    assert rel["accuracy"][3] == 1.0 and rel["accuracy"][2] == 0.5
    assert rel["confidence"][0] is None and rel["accuracy"][0] is None


@pytest.mark.parametrize("fn, name", [(nll, "logits_NK"), (ece, "probs_NK"), (brier, "probs_NK")])
def test_every_input_check_names_the_argument(fn, name):
    good, labels = torch.rand(4, 3), torch.tensor([0, 1, 2, 0])
    cases = [
        (([[0.5]], labels), TypeError, f"{name} and labels_N must be torch.Tensors, got list and Tensor"),
        ((good, [0, 1, 2, 0]), TypeError, f"{name} and labels_N must be torch.Tensors, got Tensor and list"),
        ((good.long(), labels), TypeError, f"{name} must be a floating-point tensor, got torch.int64"),
        ((good, labels.float()), TypeError, "labels_N must be an integer tensor, got torch.float32"),
        ((good, labels.bool()), TypeError, "labels_N must be an integer tensor, got torch.bool"),
        ((good, labels[:3]), ValueError, f"{name} must be [N,K] and labels_N [N]; got (4, 3) and (3,)"),
        ((torch.rand(0, 3), labels[:0]), ValueError, f"{name} is empty (N = 0): metrics are undefined"),
    ]
    for args, error, message in cases:
        with pytest.raises(error) as err:
            fn(*args)
        assert str(err.value) == message


def test_check_scores_accepts_one_row_and_refuses_an_empty_class_axis_by_shape():
    check_scores_and_labels(torch.rand(1, 3), torch.tensor([2]), "x")
    check_scores_and_labels(torch.rand(2, 1), torch.tensor([0, 0], dtype=torch.int16), "x")


@pytest.mark.parametrize("bad", [0, -1, True, 2.0, "3"])
def test_num_bins_must_be_a_positive_int(bad):
    with pytest.raises(ValueError) as err:
        ece(torch.rand(2, 3), torch.tensor([0, 1]), num_bins=bad)
    assert str(err.value) == f"num_bins must be a positive int, got {bad!r}"
    with pytest.raises(ValueError, match=r"^num_bins must be a positive int"):
        EvalAccumulator(num_members=1, num_classes=2, device="cpu", num_bins=bad)


def test_one_bin_is_allowed():
    probs = torch.tensor([[0.9, 0.1], [0.4, 0.6]], dtype=torch.float64)
    assert ece(probs, torch.tensor([0, 0]), num_bins=1) == pytest.approx(abs(0.5 - 0.75), rel=1e-12)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_members": 0}, "num_members must be an int >= 1, got 0"),
        ({"num_members": True}, "num_members must be an int >= 1, got True"),
        ({"num_classes": 1}, "num_classes must be an int >= 2, got 1"),
        ({"num_classes": 2.0}, "num_classes must be an int >= 2, got 2.0"),
    ],
)
def test_accumulator_sizes_are_checked_by_name(kwargs, message):
    args = {"num_members": 2, "num_classes": 3, "device": "cpu"} | kwargs
    with pytest.raises(ValueError) as err:
        EvalAccumulator(**args)
    assert str(err.value) == message


def test_compute_without_samples_says_so():
    acc = EvalAccumulator(num_members=2, num_classes=3, device="cpu")
    with pytest.raises(ValueError) as err:
        acc.compute()
    assert str(err.value) == "EvalAccumulator.compute: no samples were added (count = 0)"


def test_accumulator_float32_logits_against_a_float64_reference():
    gen = torch.Generator().manual_seed(5)
    logits = (torch.randn(3, 40, 6, generator=gen, dtype=torch.float64) * 2).to(torch.float32)
    labels = torch.randint(0, 5, (40,), generator=gen).to(torch.int32)  # class 5 never appears
    acc = EvalAccumulator(num_members=3, num_classes=6, device="cpu")
    acc.update(logits[:, :17], labels[:17])
    acc.update(logits[:, 17:], labels[17:])
    out = acc.compute()
    x = logits.to(torch.float64)
    ens_logp = x.log_softmax(-1).mean(0).log_softmax(-1)
    prob_logp = x.softmax(-1).mean(0).log()
    idx = torch.arange(40)
    assert out["nll"] == pytest.approx(-ens_logp[idx, labels.long()].mean().item(), rel=1e-12)
    assert out["prob_ensemble_nll"] == pytest.approx(-prob_logp[idx, labels.long()].mean().item(), rel=1e-12)
    onehot = torch.zeros(40, 6, dtype=torch.float64)
    onehot[idx, labels.long()] = 1
    expected_brier = ((prob_logp.exp() - onehot) ** 2).sum(-1).mean().item()
    assert out["prob_ensemble_brier"] == pytest.approx(expected_brier / 6, rel=1e-12)
    expected_ens = ((ens_logp.exp() - onehot) ** 2).sum(-1).mean().item()
    assert out["brier_unnormalised"] == pytest.approx(expected_ens, rel=1e-12)
    assert out["brier"] == pytest.approx(expected_ens / 6, rel=1e-12)
