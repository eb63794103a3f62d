"""Temperature scaling of the ensemble, fitted on one half of an evaluation split and reported on the other.

Protocol (the reference fits T on half of the test set and swaps halves): the split is cut into two fixed halves
A and B (`split_for_calibration`); T_A is fitted on A and applied to B, T_B is fitted on B and applied to A. The
reported calibrated NLL / ECE are the average of the two halves' values, so no number is ever computed on the data
its temperature was fitted on. The ensemble is the reference's: softmax(mean of member logits / T).

Legend: M members, N samples, K classes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from mixmo_dist.evaluation.metrics import check_scores_and_labels, ece, nll


def fit_temperature(logits_NK: Tensor, labels_N: Tensor, max_iter: int = 100) -> float:
    """Temperature T > 0 minimising the NLL of softmax(logits / T), by L-BFGS on log T in float64.

    Optimising log T keeps T positive without a constraint. Works when called under `torch.no_grad()` or
    `torch.inference_mode()` (gradients are re-enabled locally, inference tensors are copied).

    Args:
        logits_NK: `[N,K]` logits (e.g. the mean of the member logits).
        labels_N: integer `[N]` class indices.
        max_iter: L-BFGS iteration budget.

    Returns:
        the fitted temperature as a python float.
    """
    check_scores_and_labels(logits_NK, labels_N, "logits_NK")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    with torch.inference_mode(False), torch.enable_grad():
        # clone(): an inference tensor cannot be saved for backward; a clone made here is an ordinary tensor.
        logits = logits_NK.detach().to(torch.float64).clone()
        labels = labels_N.detach().to(logits.device, torch.long).clone()
        log_t = torch.zeros((), dtype=torch.float64, device=logits.device, requires_grad=True)
        optimizer = torch.optim.LBFGS(
            [log_t], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-14,
            line_search_fn="strong_wolfe",
        )  # fmt: skip

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(logits * torch.exp(-log_t), labels)
            loss.backward()
            return loss

        optimizer.step(closure)
        temperature = math.exp(log_t.item())
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature fitting diverged (T = {temperature}); are the logits finite?")
    return temperature


def split_for_calibration(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """A deterministic random half split of `range(n)`.

    The first half (`n // 2` indices) is where a temperature is fitted, the second where it is reported;
    `temperature_scaled_metrics` uses the split in both directions. The same (n, seed) always gives the same split,
    on any machine (CPU generator).

    Args:
        n: number of samples (at least 2).
        seed: seed of the permutation.

    Returns:
        (fit_idx, report_idx): sorted int64 index tensors, disjoint, together `range(n)`.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"split_for_calibration needs an int n >= 2 samples, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    perm_N = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    half = n // 2
    return perm_N[:half].sort().values, perm_N[half:].sort().values


def temperature_scaled_metrics(logits_MNK: Tensor, labels_N: Tensor, num_bins: int = 15, seed: int = 0) -> dict:
    """Calibrated NLL and ECE of the mean-logit ensemble with swapped-halves temperature scaling.

    Args:
        logits_MNK: `[M,N,K]` member logits over the whole evaluation split (gathered from all ranks).
        labels_N: integer `[N]` class indices.
        num_bins: ECE bins.
        seed: seed of the half split.

    Returns:
        {"temperature": mean of the two fitted T (for information), "temperature_halves": [T_A, T_B],
        "calibrated_nll", "calibrated_ece": averages over the two halves, each scaled by the T of the other half}.
    """
    if not isinstance(logits_MNK, Tensor) or logits_MNK.dim() != 3:
        shape = tuple(logits_MNK.shape) if isinstance(logits_MNK, Tensor) else type(logits_MNK).__name__
        raise ValueError(f"logits_MNK must be a [M,N,K] tensor, got {shape}")
    ens_logits_NK = logits_MNK.to(torch.float64).mean(dim=0)
    check_scores_and_labels(ens_logits_NK, labels_N, "logits_MNK (member mean)")
    labels = labels_N.to(ens_logits_NK.device, torch.long)
    half_a, half_b = (idx.to(labels.device) for idx in split_for_calibration(ens_logits_NK.shape[0], seed))
    temps = [fit_temperature(ens_logits_NK[idx], labels[idx]) for idx in (half_a, half_b)]
    nlls, eces = [], []
    for report_idx, temp in ((half_b, temps[0]), (half_a, temps[1])):  # never report where T was fitted
        scaled_NK = ens_logits_NK[report_idx] / temp
        nlls.append(nll(scaled_NK, labels[report_idx]))
        eces.append(ece(scaled_NK.softmax(dim=-1), labels[report_idx], num_bins=num_bins))
    return {
        "temperature": sum(temps) / 2,
        "temperature_halves": temps,
        "calibrated_nll": sum(nlls) / 2,
        "calibrated_ece": sum(eces) / 2,
    }
