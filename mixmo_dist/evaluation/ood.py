"""Out-of-distribution detection and selective prediction: per-sample uncertainty scores and the metrics over them.

Scores of one batch (`uncertainty_scores`), from the member logits; the ensemble is the softmax of the mean member
logits, as everywhere in this package:

    msp           max softmax probability of the ensemble (a confidence: high = in-distribution)
    entropy       entropy of the ensemble's distribution, in nats (an uncertainty)
    disagreement  mutual information between the prediction and the member: the entropy of the members' mean
                  probabilities minus the mean of their entropies (0 when every member says the same; an uncertainty)

Detection (`ood_metrics`) treats out-of-distribution samples as the positive class and ranks samples by
uncertainty (-msp, entropy, disagreement): AUROC (ties count one half), AUPR (average precision over the distinct
thresholds, OOD positive) and FPR95 (the share of in-distribution samples at or above the highest threshold that
still flags 95% of the OOD samples). Selective prediction (`selective_metrics`) ranks the in-distribution samples by
msp: AURC is the mean, over k = 1..N, of the error rate among the k most confident samples (ties keep dataset
order), and `risk_at_80` the error rate among the ceil(0.8 N) most confident. Every function takes every sample of
the split (the evaluator gathers them over ranks), so the figures do not depend on the number of ranks.

Shape legend: M members, B batch rows, K classes, N samples.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SCORES = ("msp", "entropy", "disagreement")


def uncertainty_scores(logits_MBK: Tensor, labels_B: Tensor) -> Tensor:
    """Per-sample [B,4] float64: msp, entropy, disagreement and correct (1.0 where the ensemble's argmax is the
    label; labels of an out-of-distribution set are ignored by the metrics)."""
    logits = logits_MBK.double()
    log_p_BK = torch.log_softmax(logits.mean(0), dim=-1)
    p_BK = log_p_BK.exp()
    msp_B, pred_B = p_BK.max(-1)
    entropy_B = -(p_BK * log_p_BK).sum(-1)
    log_pm_MBK = torch.log_softmax(logits, dim=-1)
    pm_MBK = log_pm_MBK.exp()
    mean_pm_BK = pm_MBK.mean(0)
    h_mean_B = -(mean_pm_BK * mean_pm_BK.clamp_min(1e-300).log()).sum(-1)
    mean_h_B = -(pm_MBK * log_pm_MBK).sum(-1).mean(0)
    disagreement_B = (h_mean_B - mean_h_B).clamp_min(0.0)
    correct_B = (pred_B == labels_B.to(pred_B.device)).double()
    return torch.stack([msp_B, entropy_B, disagreement_B, correct_B], dim=1)


def _midranks(values_N: Tensor) -> Tensor:
    """1-based ranks of `values_N`, tied values sharing the mean of their ranks."""
    order = torch.argsort(values_N, stable=True)
    sorted_v = values_N[order]
    ranks = torch.empty_like(values_N, dtype=torch.float64)
    _, counts = torch.unique_consecutive(sorted_v, return_counts=True)
    ends = counts.cumsum(0)
    starts = ends - counts
    mid = (starts + ends + 1).double() / 2  # mean of the 1-based ranks starts+1 .. ends
    ranks[order] = torch.repeat_interleave(mid, counts)
    return ranks


def auroc(pos_N: Tensor, neg_N: Tensor) -> float:
    """P(a positive scores above a negative), ties counting one half (Mann-Whitney U / (n_pos n_neg))."""
    n_pos, n_neg = pos_N.numel(), neg_N.numel()
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = _midranks(torch.cat([pos_N.double(), neg_N.double()]))
    u = ranks[:n_pos].sum().item() - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def aupr(pos_N: Tensor, neg_N: Tensor) -> float:
    """Average precision with `pos` as the positive class: sum over the distinct thresholds, from the highest, of
    (recall gained) x (precision there)."""
    n_pos = pos_N.numel()
    if n_pos == 0 or neg_N.numel() == 0:
        return math.nan
    scores = torch.cat([pos_N.double(), neg_N.double()])
    is_pos = torch.cat([torch.ones(n_pos, dtype=torch.float64), torch.zeros(neg_N.numel(), dtype=torch.float64)])
    order = torch.argsort(scores, descending=True, stable=True)
    scores, is_pos = scores[order], is_pos[order]
    _, counts = torch.unique_consecutive(scores, return_counts=True)
    last = counts.cumsum(0) - 1  # the last index of each group of equal scores: one threshold per group
    tp = is_pos.cumsum(0)[last]
    precision = tp / (last + 1).double()
    recall = tp / n_pos
    gained = torch.diff(recall, prepend=recall.new_zeros(1))
    return float((gained * precision).sum())


def fpr_at_tpr(pos_N: Tensor, neg_N: Tensor, tpr: float = 0.95) -> float:
    """The share of negatives scoring at or above the highest threshold that flags at least `tpr` of the positives."""
    n_pos = pos_N.numel()
    if n_pos == 0 or neg_N.numel() == 0:
        return math.nan
    k = math.ceil(tpr * n_pos - 1e-9)
    threshold = torch.sort(pos_N.double(), descending=True).values[k - 1]
    return float((neg_N.double() >= threshold).double().mean())


def ood_metrics(in_scores_N4: Tensor, out_scores_N4: Tensor) -> dict[str, dict[str, float]]:
    """{score: {auroc, aupr, fpr95}} for msp, entropy and disagreement, OOD positive, higher = more uncertain."""
    result = {}
    for i, name in enumerate(SCORES):
        sign = -1.0 if name == "msp" else 1.0  # msp is a confidence: its negation ranks by uncertainty
        pos, neg = sign * out_scores_N4[:, i], sign * in_scores_N4[:, i]
        result[name] = {"auroc": auroc(pos, neg), "aupr": aupr(pos, neg), "fpr95": fpr_at_tpr(pos, neg)}
    return result


def selective_metrics(scores_N4: Tensor) -> dict[str, float]:
    """AURC and the risk (error rate) at 80% coverage of the samples ranked by msp (the most confident first)."""
    n = scores_N4.shape[0]
    if n == 0:
        return {"aurc": math.nan, "risk_at_80": math.nan}
    order = torch.argsort(-scores_N4[:, 0], stable=True)
    errors = 1.0 - scores_N4[order, 3]
    risk_k = errors.cumsum(0) / torch.arange(1, n + 1, dtype=torch.float64)
    k = math.ceil(0.8 * n - 1e-9)
    return {"aurc": float(risk_k.mean()), "risk_at_80": float(risk_k[k - 1])}
