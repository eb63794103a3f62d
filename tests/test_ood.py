"""OOD detection and selective prediction (evaluation/ood.py) against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from mixmo_dist.evaluation.ood import (
    aupr,
    auroc,
    fpr_at_tpr,
    ood_metrics,
    selective_metrics,
    uncertainty_scores,
)

POS = torch.tensor([0.9, 0.8, 0.4])  # OOD: higher = more uncertain
NEG = torch.tensor([0.7, 0.4, 0.1])


def test_auroc_counts_ties_one_half():
    # 0.9 and 0.8 beat the 3 negatives; 0.4 beats 0.1, ties 0.4, loses to 0.7: (3 + 3 + 1.5) / 9
    assert auroc(POS, NEG) == pytest.approx(7.5 / 9)
    assert auroc(NEG, POS) == pytest.approx(1.5 / 9)  # the complement
    assert auroc(torch.ones(4), torch.ones(3)) == 0.5


def test_aupr_sums_recall_gains_times_precision_at_each_distinct_threshold():
    # thresholds 0.9: P 1, R 1/3; 0.8: P 1, R 2/3; 0.7: no gain; 0.4 (a positive and a negative tie): P 3/5, R 1
    assert aupr(POS, NEG) == pytest.approx(1 / 3 + 1 / 3 + (1 / 3) * (3 / 5))
    assert aupr(torch.tensor([2.0, 1.0]), torch.tensor([0.0])) == 1.0


def test_fpr95_uses_the_highest_threshold_that_flags_95_percent_of_the_positives():
    # 3 positives: 95% needs all 3, threshold 0.4; negatives >= 0.4: 0.7 and 0.4
    assert fpr_at_tpr(POS, NEG) == pytest.approx(2 / 3)
    # 20 positives 1..20: 95% = 19 of them, threshold 2; negatives 1.5 and 2 -> only 2 is at or above it
    pos = torch.arange(1, 21, dtype=torch.float64)
    assert fpr_at_tpr(pos, torch.tensor([1.5, 2.0, 0.0, -1.0])) == pytest.approx(1 / 4)
    assert fpr_at_tpr(pos, torch.tensor([1.5, 2.0]), tpr=1.0) == 1.0  # threshold 1: every negative


def test_selective_risk_coverage_by_hand():
    # msp 0.9 (right), 0.8 (wrong), 0.6 (wrong), 0.3 (right), 0.2 (right), 0.1 (wrong):
    # risks 0, 1/2, 2/3, 2/4, 2/5, 3/6; 80% of 6 samples is 4.8: the 5 most confident
    rows = [[0.9, 0, 0, 1], [0.6, 0, 0, 0], [0.8, 0, 0, 0], [0.3, 0, 0, 1], [0.1, 0, 0, 0], [0.2, 0, 0, 1]]
    out = selective_metrics(torch.tensor(rows, dtype=torch.float64))
    assert out["aurc"] == pytest.approx((0 + 1 / 2 + 2 / 3 + 2 / 4 + 2 / 5 + 3 / 6) / 6)
    assert out["risk_at_80"] == pytest.approx(2 / 5)


def test_scores_of_two_members_by_hand():
    ln = math.log
    agree = torch.tensor([[[ln(0.8), ln(0.2)]], [[ln(0.8), ln(0.2)]]])  # [M=2, B=1, K=2]
    differ = torch.tensor([[[ln(0.8), ln(0.2)]], [[ln(0.2), ln(0.8)]]])
    h = -(0.8 * ln(0.8) + 0.2 * ln(0.2))
    s_agree = uncertainty_scores(agree, torch.tensor([0]))[0]
    s_differ = uncertainty_scores(differ, torch.tensor([1]))[0]
    assert s_agree.tolist() == pytest.approx([0.8, h, 0.0, 1.0])
    # mean logits are equal: the ensemble says 0.5/0.5 (argmax 0, label 1: wrong); the members disagree
    assert s_differ.tolist() == pytest.approx([0.5, ln(2), ln(2) - h, 0.0])


def test_ood_metrics_rank_msp_by_its_negation():
    """OOD samples with lower msp, higher entropy and disagreement are detected perfectly by each score."""
    ind = torch.tensor([[0.9, 0.2, 0.01, 1], [0.8, 0.3, 0.02, 1]], dtype=torch.float64)
    ood = torch.tensor([[0.5, 0.7, 0.2, 0], [0.4, 0.6, 0.3, 0]], dtype=torch.float64)
    out = ood_metrics(ind, ood)
    for score in ("msp", "entropy", "disagreement"):
        assert out[score] == {"auroc": 1.0, "aupr": 1.0, "fpr95": 0.0}, score
