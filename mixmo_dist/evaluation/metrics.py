"""Evaluation metrics of a MixMo ensemble, accumulated as sums so that they are exact under DDP.

`EvalAccumulator` keeps only sufficient statistics (counts and sums) in one flat float64 tensor on the evaluation
device. Summing that tensor over ranks and dividing once gives the same numbers as one pass over the whole split:
no mean of per-rank means, no per-batch host synchronisation. The pure functions `nll`, `ece` and `brier` compute the
same quantities on full tensors (used by temperature scaling and by tests).

Definitions (see docs of the method, sections 4 and 8):

- Ensemble (the reference's): softmax of the MEAN of the member logits. `top1`, `top5` (top-k with k = min(5, K)),
  `nll`, `ece`, `brier`, `brier_unnormalised`, `reliability`.
- Probability-average ensemble (MIMO's): mean of the member softmaxes. `prob_ensemble_top1`, `prob_ensemble_nll`,
  `prob_ensemble_ece`, `prob_ensemble_brier`.
- NLL: mean over samples of -log p_y.
- ECE: `num_bins` equal-width confidence bins on [0, 1], bin z = (z/Z, (z+1)/Z] (upper edge inclusive), confidence =
  max probability, ECE = sum_z (n_z / N) |accuracy_z - confidence_z|.
- Brier: sum over classes of (p_k - onehot_k)^2, averaged over samples (`brier_unnormalised`, in [0, 2]); `brier`
  divides it by K as the reference does.
- Diversity (`diversity`): ratio-error of Aksela (2003) in the form used by the reference code (DESlib's
  `ratio_errors`): for a pair of members (i, j), N00 = samples where both are wrong, N01 + N10 = samples where
  exactly one of the two is wrong; ratio = (N01 + N10) / N00. Higher means the two members rarely fail together.
  With M > 2 the value is the mean over the M(M-1)/2 pairs of the per-pair ratio (the reference averages the pairwise
  matrix); for M = 2 there is a single pair. Each pair's counts are summed over the whole split (and over ranks)
  before dividing. The ratio is undefined (None) when some pair has N00 = 0 (the reference then substitutes an
  arbitrary value, we do not).
- Disagreement: mean over pairs of the fraction of samples whose two top-1 predictions differ.
- With M = 1, `diversity` and `disagreement` are None.

All accuracies and ECE are fractions in [0, 1]. Legend: M members, B batch rows, N samples, K classes,
P member pairs, Z confidence bins.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

_TOPK = 5


def _bin_uppers(num_bins: int, device: torch.device | str | None = None) -> Tensor:
    """Upper edges z/Z, z = 1..Z, each correctly rounded (so 3/5 is the same double as the literal 0.6)."""
    return torch.arange(1, num_bins + 1, dtype=torch.float64, device=device) / num_bins


def _confidence_bins(conf_N: Tensor, correct_N: Tensor, num_bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-bin sums for a reliability diagram.

    Args:
        conf_N: float64 `[N]` confidences (max probability) in [0, 1].
        correct_N: bool `[N]` whether the top-1 prediction is right.
        num_bins: Z, equal-width bins (lo, hi] on [0, 1].

    Returns:
        (count_Z, conf_sum_Z, correct_sum_Z), float64 `[Z]` each.
    """
    # bucketize(right=False) returns z with uppers[z-1] < conf <= uppers[z]: exactly the (lo, hi] convention.
    bin_N = torch.bucketize(conf_N, _bin_uppers(num_bins, conf_N.device), right=False).clamp_(max=num_bins - 1)
    zeros_Z = torch.zeros(num_bins, dtype=torch.float64, device=conf_N.device)
    count_Z = zeros_Z.index_add(0, bin_N, torch.ones_like(conf_N))
    conf_sum_Z = zeros_Z.index_add(0, bin_N, conf_N)
    correct_sum_Z = zeros_Z.index_add(0, bin_N, correct_N.to(torch.float64))
    return count_Z, conf_sum_Z, correct_sum_Z


def check_scores_and_labels(values_NK: Tensor, labels_N: Tensor, name: str) -> None:
    """Raise a clear error when `values_NK` / `labels_N` are not a float `[N,K]` and an integer `[N]` tensor."""
    if not isinstance(values_NK, Tensor) or not isinstance(labels_N, Tensor):
        raise TypeError(
            f"{name} and labels_N must be torch.Tensors, got {type(values_NK).__name__} and {type(labels_N).__name__}"
        )
    if not values_NK.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {values_NK.dtype}")
    if labels_N.is_floating_point() or labels_N.is_complex() or labels_N.dtype == torch.bool:
        raise TypeError(f"labels_N must be an integer tensor, got {labels_N.dtype}")
    if values_NK.dim() != 2 or labels_N.dim() != 1 or values_NK.shape[0] != labels_N.shape[0]:
        raise ValueError(
            f"{name} must be [N,K] and labels_N [N]; got {tuple(values_NK.shape)} and {tuple(labels_N.shape)}"
        )
    if values_NK.shape[0] == 0:
        raise ValueError(f"{name} is empty (N = 0): metrics are undefined")


def _check_num_bins(num_bins: int) -> None:
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"num_bins must be a positive int, got {num_bins!r}")


def nll(logits_NK: Tensor, labels_N: Tensor) -> float:
    """Mean negative log-likelihood of the labels.

    Args:
        logits_NK: `[N,K]` unnormalised log-probabilities. Log-probabilities are accepted too (log_softmax is
            idempotent on them), e.g. the log of a probability-average ensemble.
        labels_N: integer `[N]` class indices.

    Returns:
        mean over samples of -log softmax(logits)[label], computed in float64.
    """
    check_scores_and_labels(logits_NK, labels_N, "logits_NK")
    return F.cross_entropy(logits_NK.to(torch.float64), labels_N.to(logits_NK.device, torch.long)).item()


def ece(probs_NK: Tensor, labels_N: Tensor, num_bins: int = 15) -> float:
    """Expected calibration error with equal-width confidence bins (lo, hi] on [0, 1].

    Args:
        probs_NK: `[N,K]` class probabilities.
        labels_N: integer `[N]` class indices.
        num_bins: number of bins Z.

    Returns:
        sum over bins of (n_z / N) |accuracy_z - mean confidence_z|, a fraction in [0, 1].
    """
    check_scores_and_labels(probs_NK, labels_N, "probs_NK")
    _check_num_bins(num_bins)
    conf_N, pred_N = probs_NK.to(torch.float64).max(dim=-1)
    correct_N = pred_N == labels_N.to(probs_NK.device, torch.long)
    _, conf_sum_Z, correct_sum_Z = _confidence_bins(conf_N, correct_N, num_bins)
    return ((correct_sum_Z - conf_sum_Z).abs().sum() / conf_N.numel()).item()


def brier(probs_NK: Tensor, labels_N: Tensor, normalise: bool = True) -> float:
    """Brier score: mean over samples of sum_k (p_k - onehot_k)^2.

    Args:
        probs_NK: `[N,K]` class probabilities.
        labels_N: integer `[N]` class indices.
        normalise: divide by K as the reference does (then the score lies in [0, 2/K]).

    Returns:
        the (normalised) Brier score.
    """
    check_scores_and_labels(probs_NK, labels_N, "probs_NK")
    probs = probs_NK.to(torch.float64)
    onehot_NK = F.one_hot(labels_N.to(probs.device, torch.long), probs.shape[1]).to(torch.float64)
    score = (probs - onehot_NK).square().sum(dim=-1).mean().item()
    return score / probs.shape[1] if normalise else score


class EvalAccumulator:
    """Accumulates ensemble, member and diversity statistics over batches; exact under DDP.

    Usage: `update()` per evaluation batch on every rank, then `compute(reduce)` on every rank, where `reduce`
    sums a flat tensor over ranks (e.g. `lambda t: accelerator.reduce(t, "sum")`, or an in-place
    `dist.all_reduce(t)` that returns `t`). `compute` is a collective when `reduce` is: call it on all ranks.

    Args:
        num_members: M, number of heads.
        num_classes: K.
        device: where the statistics live (the evaluation device; batches are moved there).
        num_bins: Z, confidence bins of the ECE and the reliability diagram.
    """

    def __init__(self, num_members: int, num_classes: int, device: torch.device | str, num_bins: int = 15) -> None:
        for key, value, low in (("num_members", num_members, 1), ("num_classes", num_classes, 2)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{key} must be an int >= {low}, got {value!r}")
        _check_num_bins(num_bins)
        self.num_members = num_members
        self.num_classes = num_classes
        self.num_bins = num_bins
        self.device = torch.device(device)
        self.topk = min(_TOPK, num_classes)
        pairs = num_members * (num_members - 1) // 2
        z = num_bins
        # Every statistic is a sum over samples, so summing this layout over ranks is the exact global value.
        sizes = {
            "count": 1,
            "ens_top1": 1, "ens_topk": 1, "ens_nll": 1, "ens_brier": 1,
            "ens_bin_count": z, "ens_bin_conf": z, "ens_bin_correct": z,
            "prob_top1": 1, "prob_nll": 1, "prob_brier": 1,
            "prob_bin_count": z, "prob_bin_conf": z, "prob_bin_correct": z,
            "member_correct": num_members, "member_nll": num_members,
            "pair_both_wrong": pairs, "pair_one_wrong": pairs, "pair_disagree": pairs,
        }  # fmt: skip
        self._slices: dict[str, slice] = {}
        start = 0
        for name, size in sizes.items():
            self._slices[name] = slice(start, start + size)
            start += size
        # float64 counts are exact up to 2^53 samples; one dtype keeps the whole state a single all_reduce.
        self._stats = torch.zeros(start, dtype=torch.float64, device=self.device)
        self._pair_i, self._pair_j = torch.triu_indices(num_members, num_members, offset=1, device=self.device)

    def _view(self, name: str) -> Tensor:
        return self._stats[self._slices[name]]

    def reset(self) -> None:
        """Zero every statistic (start a new evaluation)."""
        self._stats.zero_()

    def stats(self) -> Tensor:
        """A copy of the flat float64 statistics tensor (what `compute` sums over ranks)."""
        return self._stats.clone()

    @torch.no_grad()
    def update(self, logits_MBK: Tensor, labels_B: Tensor) -> None:
        """Add one batch.

        Args:
            logits_MBK: `[M,B,K]` member logits, any floating dtype, any device (moved to `self.device`, float64).
            labels_B: integer `[B]` class indices.
        """
        if not isinstance(logits_MBK, Tensor) or not isinstance(labels_B, Tensor):
            raise TypeError("logits_MBK and labels_B must be torch.Tensors")
        if not logits_MBK.is_floating_point():
            raise TypeError(f"logits_MBK must be a floating-point tensor, got {logits_MBK.dtype}")
        if labels_B.is_floating_point() or labels_B.is_complex() or labels_B.dtype == torch.bool:
            raise TypeError(f"labels_B must be an integer tensor, got {labels_B.dtype}")
        m, k = self.num_members, self.num_classes
        if logits_MBK.dim() != 3 or logits_MBK.shape[0] != m or logits_MBK.shape[2] != k:
            raise ValueError(f"logits_MBK must be [M={m}, B, K={k}], got {tuple(logits_MBK.shape)}")
        if labels_B.shape != logits_MBK.shape[1:2]:
            raise ValueError(f"labels_B must be [B={logits_MBK.shape[1]}], got {tuple(labels_B.shape)}")
        b = logits_MBK.shape[1]
        if b == 0:
            return
        # float64 so that sums over a whole split do not depend on the batch split or the rank count (to rounding).
        logits = logits_MBK.to(self.device, torch.float64)
        labels = labels_B.to(self.device, torch.long)

        logp_MBK = logits.log_softmax(dim=-1)
        ens_logp_BK = logits.mean(dim=0).log_softmax(dim=-1)
        # log of the mean of probabilities, without leaving log space (stable for tiny p).
        prob_logp_BK = torch.logsumexp(logp_MBK, dim=0) - math.log(m)
        self._view("count").add_(b)
        self._add_ensemble("ens", ens_logp_BK, labels, with_topk=True)
        self._add_ensemble("prob", prob_logp_BK, labels, with_topk=False)

        pred_MB = logits.argmax(dim=-1)
        correct_MB = pred_MB == labels
        self._view("member_correct").add_(correct_MB.sum(dim=1))
        label_logp_MB = logp_MBK.gather(-1, labels.expand(m, b).unsqueeze(-1)).squeeze(-1)
        self._view("member_nll").sub_(label_logp_MB.sum(dim=1))
        if m > 1:
            wrong_MB = ~correct_MB
            wrong_i_PB, wrong_j_PB = wrong_MB[self._pair_i], wrong_MB[self._pair_j]
            self._view("pair_both_wrong").add_((wrong_i_PB & wrong_j_PB).sum(dim=1))
            self._view("pair_one_wrong").add_((wrong_i_PB ^ wrong_j_PB).sum(dim=1))
            self._view("pair_disagree").add_((pred_MB[self._pair_i] != pred_MB[self._pair_j]).sum(dim=1))

    def _add_ensemble(self, prefix: str, logp_BK: Tensor, labels_B: Tensor, with_topk: bool) -> None:
        """Add accuracy, NLL, Brier and bin sums of one ensemble's log-probabilities `[B,K]`."""
        max_logp_B, pred_B = logp_BK.max(dim=-1)
        correct_B = pred_B == labels_B
        probs_BK = logp_BK.exp()
        self._view(f"{prefix}_top1").add_(correct_B.sum())
        if with_topk:
            topk_BT = logp_BK.topk(self.topk, dim=-1).indices
            self._view(f"{prefix}_topk").add_((topk_BT == labels_B.unsqueeze(-1)).any(dim=-1).sum())
        self._view(f"{prefix}_nll").sub_(logp_BK.gather(-1, labels_B.unsqueeze(-1)).sum())
        onehot_BK = F.one_hot(labels_B, self.num_classes).to(torch.float64)
        self._view(f"{prefix}_brier").add_((probs_BK - onehot_BK).square().sum())
        count_Z, conf_Z, correct_Z = _confidence_bins(max_logp_B.exp(), correct_B, self.num_bins)
        self._view(f"{prefix}_bin_count").add_(count_Z)
        self._view(f"{prefix}_bin_conf").add_(conf_Z)
        self._view(f"{prefix}_bin_correct").add_(correct_Z)

    def compute(self, reduce: Callable[[Tensor], Tensor] | None = None) -> dict:
        """Metrics over everything added since the last `reset()` (on all ranks when `reduce` is given).

        Args:
            reduce: sums a flat tensor over ranks and returns the sum (may work in place; it gets a copy).

        Returns:
            a JSON-able dict of plain floats / lists / None (see the module docstring for the definitions).
        """
        stats = self._stats.clone()
        if reduce is not None:
            stats = reduce(stats)
            if not isinstance(stats, Tensor) or stats.shape != self._stats.shape:
                raise TypeError(f"reduce must return a tensor of shape {tuple(self._stats.shape)}, got {stats!r}")
        values = stats.to("cpu", torch.float64).tolist()  # the only host synchronisation
        s = {name: values[sl] for name, sl in self._slices.items()}
        n = s["count"][0]
        if n <= 0:
            raise ValueError("EvalAccumulator.compute: no samples were added (count = 0)")
        out: dict = {"count": int(round(n))}
        ens, prob = self._ensemble_metrics(s, "ens", n), self._ensemble_metrics(s, "prob", n)
        out.update(top1=ens["top1"], top5=s["ens_topk"][0] / n, nll=ens["nll"], ece=ens["ece"])
        out.update(brier=ens["brier_unnormalised"] / self.num_classes, brier_unnormalised=ens["brier_unnormalised"])
        for key in ("top1", "nll", "ece"):
            out[f"prob_ensemble_{key}"] = prob[key]
        out["prob_ensemble_brier"] = prob["brier_unnormalised"] / self.num_classes
        out["member_top1"] = [c / n for c in s["member_correct"]]
        out["member_nll"] = [v / n for v in s["member_nll"]]
        out["diversity"], out["disagreement"] = self._diversity(s, n)
        out["reliability"] = ens["reliability"]
        return out

    def _ensemble_metrics(self, s: dict[str, list[float]], prefix: str, n: float) -> dict:
        count_Z, conf_Z, correct_Z = (s[f"{prefix}_bin_{name}"] for name in ("count", "conf", "correct"))
        z = self.num_bins
        return {
            "top1": s[f"{prefix}_top1"][0] / n,
            "nll": s[f"{prefix}_nll"][0] / n,
            "ece": sum(abs(a - c) for a, c in zip(correct_Z, conf_Z)) / n,
            "brier_unnormalised": s[f"{prefix}_brier"][0] / n,
            "reliability": {
                "bin_lower": [i / z for i in range(z)],
                "bin_upper": [(i + 1) / z for i in range(z)],
                # Empty bins have no accuracy or confidence: None, not a made-up 0.
                "accuracy": [a / c if c > 0 else None for a, c in zip(correct_Z, count_Z)],
                "confidence": [f / c if c > 0 else None for f, c in zip(conf_Z, count_Z)],
                "count": [int(round(c)) for c in count_Z],
            },
        }

    def _diversity(self, s: dict[str, list[float]], n: float) -> tuple[float | None, float | None]:
        """(ratio-error diversity, disagreement), both means over member pairs; None where undefined."""
        if self.num_members == 1:
            return None, None
        both, one = s["pair_both_wrong"], s["pair_one_wrong"]
        ratio = None if min(both) == 0 else sum(o / w for o, w in zip(one, both)) / len(both)
        disagreement = sum(d / n for d in s["pair_disagree"]) / len(s["pair_disagree"])
        return ratio, disagreement
