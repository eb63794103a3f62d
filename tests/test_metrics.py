"""Tests of mixmo_dist.metrics and mixmo_dist.calibration against plain numpy references and hand-computed cases."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mixmo_dist.evaluation.calibration import fit_temperature, split_for_calibration, temperature_scaled_metrics
from mixmo_dist.evaluation.metrics import EvalAccumulator, brier, ece, nll

torch.set_num_threads(1)

COUNT_KEYS = ("count",)
FLOAT_KEYS = ("top1", "top5", "nll", "ece", "brier", "brier_unnormalised", "prob_ensemble_top1",
              "prob_ensemble_nll", "prob_ensemble_ece", "prob_ensemble_brier", "diversity", "disagreement")  # fmt: skip


# ---------------------------------------------------------------- numpy reference (straightforward, loop-based)


def _np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _np_ece(probs: np.ndarray, labels: np.ndarray, num_bins: int = 15) -> float:
    conf, acc = probs.max(1), probs.argmax(1) == labels
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            total += in_bin.mean() * abs(acc[in_bin].mean() - conf[in_bin].mean())
    return total


def _np_reference(logits: np.ndarray, labels: np.ndarray) -> dict:
    """All metrics from full [M,N,K] float64 logits, written as directly as possible."""
    m, n, k = logits.shape
    rows = np.arange(n)
    onehot = np.eye(k)[labels]
    ens = _np_softmax(logits.mean(0))
    prob = _np_softmax(logits).mean(0)
    top5 = np.argsort(-ens, axis=1)[:, : min(5, k)]
    ref = {
        "count": n,
        "top1": np.mean(ens.argmax(1) == labels),
        "top5": np.mean([labels[i] in top5[i] for i in range(n)]),
        "nll": -np.mean(np.log(ens[rows, labels])),
        "ece": _np_ece(ens, labels),
        "brier_unnormalised": np.mean(((ens - onehot) ** 2).sum(1)),
        "brier": np.mean(((ens - onehot) ** 2).sum(1)) / k,
        "prob_ensemble_top1": np.mean(prob.argmax(1) == labels),
        "prob_ensemble_nll": -np.mean(np.log(prob[rows, labels])),
        "prob_ensemble_ece": _np_ece(prob, labels),
        "prob_ensemble_brier": np.mean(((prob - onehot) ** 2).sum(1)) / k,
        "member_top1": [np.mean(logits[i].argmax(1) == labels) for i in range(m)],
        "member_nll": [-np.mean(np.log(_np_softmax(logits[i])[rows, labels])) for i in range(m)],
    }
    ratios, disagreements = [], []
    for i in range(m):
        for j in range(i + 1, m):
            wrong_i, wrong_j = logits[i].argmax(1) != labels, logits[j].argmax(1) != labels
            n00 = np.sum(wrong_i & wrong_j)
            n01_n10 = np.sum(wrong_i != wrong_j)
            ratios.append(n01_n10 / n00)
            disagreements.append(np.mean(logits[i].argmax(1) != logits[j].argmax(1)))
    ref["diversity"] = float(np.mean(ratios)) if ratios else None
    ref["disagreement"] = float(np.mean(disagreements)) if disagreements else None
    conf, acc = ens.max(1), ens.argmax(1) == labels
    edges = np.linspace(0.0, 1.0, 16)
    ref["bin_count"] = [int(np.sum((conf > lo) & (conf <= hi))) for lo, hi in zip(edges[:-1], edges[1:])]
    ref["bin_accuracy"] = [acc[(conf > lo) & (conf <= hi)].mean() if c else None
                           for lo, hi, c in zip(edges[:-1], edges[1:], ref["bin_count"])]  # fmt: skip
    return ref


def _random_case(m: int, n: int, k: int, seed: int, scale: float = 2.5) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    labels_N = torch.randint(0, k, (n,), generator=gen)
    logits_MNK = torch.randn(m, n, k, generator=gen, dtype=torch.float64) * scale
    # Make members better than chance so that both-wrong and exactly-one-wrong counts are both large.
    logits_MNK[:, torch.arange(n), labels_N] += 2.0
    return logits_MNK, labels_N


def _feed(acc: EvalAccumulator, logits_MNK: torch.Tensor, labels_N: torch.Tensor, sizes: list[int]) -> None:
    start = 0
    for size in sizes:
        acc.update(logits_MNK[:, start : start + size], labels_N[start : start + size])
        start += size
    assert start == labels_N.numel()


def _assert_matches(got: dict, ref: dict, rel: float) -> None:
    assert got["count"] == ref["count"]
    for key in FLOAT_KEYS:
        if ref[key] is None:
            assert got[key] is None, key
        else:
            assert got[key] == pytest.approx(ref[key], rel=rel, abs=1e-15), key
    assert got["member_top1"] == pytest.approx(ref["member_top1"], rel=rel)
    assert got["member_nll"] == pytest.approx(ref["member_nll"], rel=rel)
    assert got["reliability"]["count"] == ref["bin_count"]
    for a, b in zip(got["reliability"]["accuracy"], ref["bin_accuracy"]):
        assert (a is None and b is None) or a == pytest.approx(b, rel=rel)


# ---------------------------------------------------------------- EvalAccumulator vs reference


@pytest.mark.parametrize("m", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_accumulator_matches_numpy_reference(m: int, dtype: torch.dtype) -> None:
    logits_MNK, labels_N = _random_case(m, 203, 10, seed=m)
    logits_MNK = logits_MNK.to(dtype)  # the reference sees exactly the low-precision values, widened
    acc = EvalAccumulator(m, 10, "cpu")
    _feed(acc, logits_MNK, labels_N, [64, 1, 100, 38])
    got = acc.compute()
    ref = _np_reference(logits_MNK.double().numpy(), labels_N.numpy())
    _assert_matches(got, ref, rel=1e-9)
    assert json.loads(json.dumps(got)) == got  # plain python values only
    # Sanity of the reference itself: the members are better than chance, the case is not degenerate.
    assert 0.2 < got["top1"] < 0.95 and got["ece"] > 0


def test_prob_ensemble_differs_from_logit_ensemble() -> None:
    logits_MNK, labels_N = _random_case(2, 300, 10, seed=5)
    acc = EvalAccumulator(2, 10, "cpu")
    acc.update(logits_MNK, labels_N)
    got = acc.compute()
    assert got["prob_ensemble_nll"] != pytest.approx(got["nll"], rel=1e-3)
    assert all(0 <= got[k] <= 1 for k in ("top1", "top5", "ece", "prob_ensemble_top1", "prob_ensemble_ece"))
    assert got["top5"] >= got["top1"]


def test_two_ranks_summed_stats_equal_single_pass() -> None:
    logits_MNK, labels_N = _random_case(3, 250, 7, seed=11)
    single = EvalAccumulator(3, 7, "cpu")
    _feed(single, logits_MNK, labels_N, [100, 100, 50])
    rank0, rank1 = EvalAccumulator(3, 7, "cpu"), EvalAccumulator(3, 7, "cpu")
    _feed(rank0, logits_MNK[:, :37], labels_N[:37], [30, 7])  # deliberately uneven shards
    _feed(rank1, logits_MNK[:, 37:], labels_N[37:], [13, 200])
    summed = rank0.compute(reduce=lambda t: t + rank1.stats())
    expected = single.compute()
    # Counts are integers held in float64: exact. Float sums differ only by summation order.
    assert summed["count"] == expected["count"] == 250
    for key in ("top1", "top5", "prob_ensemble_top1", "member_top1", "disagreement", "diversity"):
        assert summed[key] == expected[key], key
    assert summed["reliability"]["count"] == expected["reliability"]["count"]
    for key in ("nll", "ece", "brier", "prob_ensemble_nll", "prob_ensemble_ece", "member_nll"):
        assert summed[key] == pytest.approx(expected[key], rel=1e-12), key
    # Without the reduction a rank sees only its shard: the comparison above is not trivially true.
    alone = rank0.compute()
    assert alone["count"] == 37 and alone["nll"] != pytest.approx(expected["nll"], rel=1e-6)


def _gloo_worker(rank: int, world_size: int, store_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size)
    try:
        logits_MNK, labels_N = _random_case(2, 181, 12, seed=3)
        shard = slice(0, 61) if rank == 0 else slice(61, 181)  # uneven: ranks yield different batch counts
        acc = EvalAccumulator(2, 12, "cpu")
        sizes = [32, 29] if rank == 0 else [32, 32, 32, 24]
        _feed(acc, logits_MNK[:, shard], labels_N[shard], sizes)

        def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            return t

        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(acc.compute(reduce=all_reduce_sum)))
    finally:
        dist.destroy_process_group()


def test_real_gloo_all_reduce_two_processes(tmp_path: Path) -> None:
    mp.spawn(_gloo_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    logits_MNK, labels_N = _random_case(2, 181, 12, seed=3)
    single = EvalAccumulator(2, 12, "cpu")
    single.update(logits_MNK, labels_N)
    expected = single.compute()
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["count"] == 181
        assert got["top1"] == expected["top1"] and got["diversity"] == expected["diversity"]
        assert got["reliability"]["count"] == expected["reliability"]["count"]
        assert got["nll"] == pytest.approx(expected["nll"], rel=1e-12)
        assert got["ece"] == pytest.approx(expected["ece"], rel=1e-12)


# ---------------------------------------------------------------- hand-computed cases


def test_ece_hand_computed() -> None:
    probs_NK = torch.tensor(
        [
            [0.9, 0.05, 0.05, 0.0],  # conf 0.9, correct  -> bin 13 (0.867, 0.933]
            [0.05, 0.9, 0.05, 0.0],  # conf 0.9, wrong    -> bin 13
            [0.5, 0.3, 0.2, 0.0],  # conf 0.5, correct    -> bin 7 (0.467, 0.533]
            [0.3, 0.25, 0.25, 0.2],  # conf 0.3, correct  -> bin 4 (0.267, 0.333]
        ],
        dtype=torch.float64,
    )
    labels_N = torch.tensor([0, 2, 0, 0])
    # bin 13: 2 samples, acc 0.5, conf 0.9; bin 7: acc 1, conf 0.5; bin 4: acc 1, conf 0.3
    expected = (2 * abs(0.5 - 0.9) + abs(1 - 0.5) + abs(1 - 0.3)) / 4
    assert ece(probs_NK, labels_N) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.5)

    acc = EvalAccumulator(1, 4, "cpu")
    acc.update(probs_NK.clamp_min(1e-30).log().unsqueeze(0), labels_N)
    got = acc.compute()
    assert got["ece"] == pytest.approx(expected, abs=1e-9)
    rel = got["reliability"]
    assert [i for i, c in enumerate(rel["count"]) if c] == [4, 7, 13]
    assert rel["count"][13] == 2 and rel["accuracy"][13] == 0.5 and rel["confidence"][13] == pytest.approx(0.9)
    assert rel["accuracy"][0] is None and rel["bin_lower"][4] == pytest.approx(4 / 15)
    assert rel["bin_upper"][-1] == 1.0 and len(rel["bin_lower"]) == 15


def test_ece_bins_are_closed_on_the_upper_edge() -> None:
    # num_bins=5: (0,.2] (.2,.4] (.4,.6] (.6,.8] (.8,1]. Confidence exactly 0.6 belongs to (.4,.6].
    probs_NK = torch.tensor([[0.6, 0.4], [0.7, 0.3]], dtype=torch.float64)
    labels_N = torch.tensor([0, 1])  # first correct, second wrong
    # (lo, hi]: separate bins -> (|1 - .6| + |0 - .7|) / 2 = 0.55. [lo, hi) would give |0.5 - 0.65| = 0.15.
    assert ece(probs_NK, labels_N, num_bins=5) == pytest.approx(0.55, abs=1e-12)


def test_nll_and_brier_hand_computed() -> None:
    probs_NK = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.2, 0.6]], dtype=torch.float64)
    labels_N = torch.tensor([0, 2])
    # (0.25 + 0.25 + 0) and (0.04 + 0.04 + 0.16) -> mean 0.37; divided by K = 3 as the reference does
    assert brier(probs_NK, labels_N, normalise=False) == pytest.approx(0.37)
    assert brier(probs_NK, labels_N) == pytest.approx(0.37 / 3)
    assert nll(probs_NK.log(), labels_N) == pytest.approx(-(math.log(0.5) + math.log(0.6)) / 2)


def _one_hot_logits(preds_MN: list[list[int]], k: int) -> torch.Tensor:
    """Logits whose argmax is the given prediction, with a clear margin."""
    return torch.nn.functional.one_hot(torch.tensor(preds_MN), k).double() * 10.0


def test_ratio_error_hand_computed_two_members() -> None:
    labels = [0, 1, 2, 0, 1, 2]
    preds = [
        [0, 1, 0, 0, 2, 0],  # member 0: right, right, wrong, right, wrong, wrong
        [0, 0, 2, 1, 2, 1],  # member 1: right, wrong, right, wrong, wrong, wrong
    ]
    # both wrong (N00): samples 4, 5 -> 2; exactly one wrong (N01 + N10): samples 1, 2, 3 -> 3; ratio 3 / 2
    # top-1 differ: samples 1, 2, 3, 5 (sample 4: both say 2) -> 4 / 6
    acc = EvalAccumulator(2, 3, "cpu")
    acc.update(_one_hot_logits(preds, 3), torch.tensor(labels))
    got = acc.compute()
    assert got["diversity"] == 1.5
    assert got["disagreement"] == pytest.approx(4 / 6)
    assert got["member_top1"] == [0.5, pytest.approx(2 / 6)]


def test_ratio_error_is_mean_over_pairs_for_three_members() -> None:
    labels = [0, 0, 0, 0]
    preds = [
        [1, 1, 0, 0],  # member 0 wrong on 0, 1
        [1, 0, 1, 0],  # member 1 wrong on 0, 2
        [1, 1, 1, 1],  # member 2 wrong everywhere
    ]
    # pair (0,1): N00 = 1 (sample 0), one wrong = 2 -> 2.0; disagree on samples 1, 2 -> 0.5
    # pair (0,2): N00 = 2, one wrong = 2 -> 1.0; disagree on 2, 3 -> 0.5
    # pair (1,2): N00 = 2, one wrong = 2 -> 1.0; disagree on 1, 3 -> 0.5
    acc = EvalAccumulator(3, 2, "cpu")
    acc.update(_one_hot_logits(preds, 2), torch.tensor(labels))
    got = acc.compute()
    assert got["diversity"] == pytest.approx((2.0 + 1.0 + 1.0) / 3)
    assert got["disagreement"] == pytest.approx(0.5)


def test_ratio_error_undefined_without_shared_errors() -> None:
    acc = EvalAccumulator(2, 3, "cpu")
    acc.update(_one_hot_logits([[0, 2, 2], [1, 1, 2]], 3), torch.tensor([0, 1, 2]))
    got = acc.compute()
    assert got["diversity"] is None  # N00 = 0: the ratio is infinite, reported as undefined
    assert got["disagreement"] == pytest.approx(2 / 3)


def test_single_member_has_no_diversity_and_both_ensembles_agree() -> None:
    logits_MNK, labels_N = _random_case(1, 120, 5, seed=9)
    acc = EvalAccumulator(1, 5, "cpu")
    acc.update(logits_MNK, labels_N)
    got = acc.compute()
    assert got["diversity"] is None and got["disagreement"] is None
    assert got["member_top1"] == [got["top1"]] and got["prob_ensemble_top1"] == got["top1"]
    assert got["member_nll"][0] == pytest.approx(got["nll"], rel=1e-12)
    assert got["prob_ensemble_nll"] == pytest.approx(got["nll"], rel=1e-12)
    assert got["prob_ensemble_ece"] == pytest.approx(got["ece"], rel=1e-12)


def test_top5_with_fewer_than_five_classes_is_top_k() -> None:
    logits_MNK, labels_N = _random_case(2, 50, 3, seed=1)
    acc = EvalAccumulator(2, 3, "cpu")
    acc.update(logits_MNK, labels_N)
    assert acc.compute()["top5"] == 1.0  # k = min(5, K) = 3 covers every class


def test_reset_and_empty_and_bad_inputs() -> None:
    acc = EvalAccumulator(2, 4, "cpu")
    with pytest.raises(ValueError, match="no samples"):
        acc.compute()
    logits_MNK, labels_N = _random_case(2, 10, 4, seed=0)
    acc.update(logits_MNK, labels_N)
    assert acc.compute()["count"] == 10
    acc.reset()
    with pytest.raises(ValueError, match="no samples"):
        acc.compute()
    with pytest.raises(ValueError, match=r"M=2, B, K=4"):
        acc.update(logits_MNK[:1], labels_N)
    with pytest.raises(ValueError, match="labels_B"):
        acc.update(logits_MNK, labels_N[:5])
    with pytest.raises(TypeError, match="floating-point"):
        acc.update(logits_MNK.long(), labels_N)
    with pytest.raises(TypeError, match="integer"):
        acc.update(logits_MNK, labels_N.float())
    with pytest.raises(TypeError, match="reduce must return"):
        acc.update(logits_MNK, labels_N)
        acc.compute(reduce=lambda t: None)
    for kwargs, culprit in (({"num_members": 0}, "num_members"), ({"num_classes": 1}, "num_classes"),
                            ({"num_bins": 0}, "num_bins")):  # fmt: skip
        args = {"num_members": 2, "num_classes": 4, "device": "cpu", **kwargs}
        with pytest.raises(ValueError, match=culprit):
            EvalAccumulator(**args)
    with pytest.raises(ValueError, match=r"probs_NK must be \[N,K\]"):
        ece(torch.rand(3, 4, 5), torch.zeros(3, dtype=torch.long))


# ---------------------------------------------------------------- temperature scaling


def _calibration_case(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """True logits and labels drawn from their softmax: T = 1 is the calibrated temperature."""
    gen = torch.Generator().manual_seed(seed)
    true_logits_NK = torch.randn(n, k, generator=gen, dtype=torch.float64) * 2.0
    labels_N = torch.multinomial(true_logits_NK.softmax(-1), 1, generator=gen).squeeze(-1)
    return true_logits_NK, labels_N


def test_fit_temperature_recovers_known_temperature() -> None:
    true_logits_NK, labels_N = _calibration_case(4000, 10, seed=0)
    assert fit_temperature(true_logits_NK * 3.0, labels_N) == pytest.approx(3.0, rel=0.08)
    assert fit_temperature(true_logits_NK / 2.0, labels_N) == pytest.approx(0.5, rel=0.08)
    assert fit_temperature(true_logits_NK.float(), labels_N) == pytest.approx(1.0, rel=0.08)


def test_fit_temperature_under_inference_mode() -> None:
    true_logits_NK, labels_N = _calibration_case(1000, 5, seed=1)
    with torch.inference_mode():
        logits_NK = true_logits_NK * 2.0  # an inference tensor, as evaluate.py would produce
        temperature = fit_temperature(logits_NK, labels_N)
    assert temperature == pytest.approx(2.0, rel=0.15)


def test_split_for_calibration_is_a_deterministic_half_split() -> None:
    fit_idx, report_idx = split_for_calibration(11, seed=4)
    assert len(fit_idx) == 5 and len(report_idx) == 6
    assert sorted(fit_idx.tolist() + report_idx.tolist()) == list(range(11))
    again = split_for_calibration(11, seed=4)
    assert torch.equal(again[0], fit_idx) and torch.equal(again[1], report_idx)
    assert not torch.equal(split_for_calibration(11, seed=5)[0], fit_idx)
    with pytest.raises(ValueError, match="n >= 2"):
        split_for_calibration(1, seed=0)


def test_temperature_scaled_metrics_uses_the_other_half() -> None:
    true_logits_NK, labels_N = _calibration_case(3000, 10, seed=2)
    # Two members whose mean logit is 3x the true logit: overconfident by T = 3.
    noise_NK = torch.randn(true_logits_NK.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    logits_MNK = torch.stack([true_logits_NK * 3 + noise_NK, true_logits_NK * 3 - noise_NK])
    got = temperature_scaled_metrics(logits_MNK, labels_N, seed=7)
    assert got["temperature"] == pytest.approx(3.0, rel=0.08)

    fit_idx, report_idx = split_for_calibration(3000, seed=7)
    ens_NK = logits_MNK.mean(0)
    t_a, t_b = fit_temperature(ens_NK[fit_idx], labels_N[fit_idx]), fit_temperature(ens_NK[report_idx],
                                                                                  labels_N[report_idx])  # fmt: skip
    assert got["temperature_halves"] == pytest.approx([t_a, t_b], rel=1e-9)
    expected_nll = nll(ens_NK[report_idx] / t_a, labels_N[report_idx]) + nll(ens_NK[fit_idx] / t_b, labels_N[fit_idx])
    assert got["calibrated_nll"] == pytest.approx(expected_nll / 2, rel=1e-9)
    # Fitting and reporting on the same half would be (slightly) optimistic: the protocol is not that.
    same_half = nll(ens_NK[report_idx] / t_b, labels_N[report_idx]) + nll(ens_NK[fit_idx] / t_a, labels_N[fit_idx])
    assert same_half / 2 < got["calibrated_nll"]
    # Scaling helps a lot against the raw overconfident ensemble and lands near the true model's NLL.
    raw_nll, true_nll = nll(ens_NK, labels_N), nll(true_logits_NK, labels_N)
    assert got["calibrated_nll"] < 0.8 * raw_nll
    assert got["calibrated_nll"] == pytest.approx(true_nll, rel=0.03)
    assert got["calibrated_ece"] < 0.5 * ece(ens_NK.softmax(-1), labels_N)
    assert json.loads(json.dumps(got)) == got


def test_temperature_scaled_metrics_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"logits_MNK must be a \[M,N,K\]"):
        temperature_scaled_metrics(torch.randn(10, 3), torch.zeros(10, dtype=torch.long))


@pytest.mark.parametrize("kwargs", [{}, {"num_bins": 10, "seed": 3}])
def test_temperature_scaled_metrics_every_number_against_a_float64_reference(kwargs) -> None:
    """bf16 member logits (as a bf16 evaluation gives them) and int32 labels (as DALI gives them); the defaults
    (15 bins, seed 0) and other values: every reported number against a reference computed here in float64 and numpy,
    so a mean taken in bf16, a default changed, the bins not passed on or the halves' ECE not averaged shows."""
    true_logits_NK, labels_N = _calibration_case(600, 10, seed=4)
    noise = torch.randn((3, 600, 10), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    logits_MNK = (true_logits_NK * 2.5 + noise).to(torch.bfloat16)
    got = temperature_scaled_metrics(logits_MNK, labels_N.to(torch.int32), **kwargs)

    num_bins, seed = kwargs.get("num_bins", 15), kwargs.get("seed", 0)
    ens_NK = logits_MNK.double().mean(0)
    halves = split_for_calibration(600, seed)
    temps = [fit_temperature(ens_NK[idx], labels_N[idx]) for idx in halves]
    assert got["temperature_halves"] == pytest.approx(temps, rel=1e-9)
    assert got["temperature"] == pytest.approx(sum(temps) / 2, rel=1e-12)
    nlls, eces = [], []
    for idx, temp in ((halves[1], temps[0]), (halves[0], temps[1])):
        scaled = (ens_NK[idx] / temp).numpy()
        probs, labels = _np_softmax(scaled), labels_N[idx].numpy()
        nlls.append(float(-np.log(probs[np.arange(len(labels)), labels]).mean()))
        eces.append(_np_ece(probs, labels, num_bins))
    assert got["calibrated_nll"] == pytest.approx(sum(nlls) / 2, rel=1e-9)
    assert got["calibrated_ece"] == pytest.approx(sum(eces) / 2, rel=1e-9)


def test_temperature_scaled_metrics_errors_name_the_input() -> None:
    with pytest.raises(ValueError, match=r"got \(10, 3\)$"):
        temperature_scaled_metrics(torch.randn(10, 3), torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match=r"got list$"):
        temperature_scaled_metrics([[[0.0]]], torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"^logits_MNK \(member mean\) must be \[N,K\]"):
        temperature_scaled_metrics(torch.randn(2, 10, 3), torch.zeros(9, dtype=torch.long))


def test_fit_temperature_equals_an_independent_minimiser() -> None:
    """bf16 logits and int32 labels in; T against scipy's bounded minimisation of the same NLL in float64 (not the
    code against itself): a fit done in the input's precision or with a float32 log T is off by far more than 1e-8."""
    optimize = pytest.importorskip("scipy.optimize")
    true_logits_NK, labels_N = _calibration_case(500, 10, seed=5)
    logits_NK = (true_logits_NK * 2.5).to(torch.bfloat16)
    exact_NK, labels = logits_NK.double().numpy(), labels_N.numpy()

    def nll_at(log_t: float) -> float:
        z = exact_NK / math.exp(log_t)
        z = z - z.max(1, keepdims=True)
        return float((np.log(np.exp(z).sum(1)) - z[np.arange(len(labels)), labels]).mean())

    best = optimize.minimize_scalar(nll_at, bounds=(-3.0, 3.0), method="bounded", options={"xatol": 1e-12})
    got = fit_temperature(logits_NK, labels_N.to(torch.int32))
    assert got == pytest.approx(math.exp(best.x), rel=1e-8)


def test_calibration_input_checks_at_their_boundaries() -> None:
    logits_NK, labels_N = _calibration_case(20, 3, seed=6)
    # 1 is the smallest budget allowed, and it is kept: one iteration stops short of the converged T.
    assert (
        0
        < fit_temperature(logits_NK * 4, labels_N, max_iter=1)
        != pytest.approx(fit_temperature(logits_NK * 4, labels_N), rel=1e-3)
    )
    for bad in (0, True, 2.5):
        with pytest.raises(ValueError, match=rf"^max_iter must be a positive int, got {bad!r}$"):
            fit_temperature(logits_NK, labels_N, max_iter=bad)
    with pytest.raises(ValueError, match=r"^logits_NK must be \[N,K\]"):
        fit_temperature(logits_NK, labels_N[:-1])
    with pytest.raises(ValueError, match=r"^temperature fitting diverged \(T = nan\); are the logits finite\?$"):
        fit_temperature(torch.full((4, 3), float("nan")), labels_N[:4])
    fit_idx, report_idx = split_for_calibration(2, seed=0)  # 2 is the smallest n allowed
    assert sorted(fit_idx.tolist() + report_idx.tolist()) == [0, 1] and len(fit_idx) == 1
    for bad in (True, 2.5):
        with pytest.raises(ValueError, match=rf"^split_for_calibration needs an int n >= 2 samples, got {bad!r}$"):
            split_for_calibration(bad, seed=0)
    for bad in (True, 1.0):
        with pytest.raises(TypeError, match=rf"^seed must be an int, got {bad!r}$"):
            split_for_calibration(4, seed=bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_accumulator_on_cuda_matches_cpu() -> None:
    logits_MNK, labels_N = _random_case(2, 300, 10, seed=21)
    cpu, gpu = EvalAccumulator(2, 10, "cpu"), EvalAccumulator(2, 10, "cuda")
    _feed(cpu, logits_MNK.float(), labels_N, [128, 128, 44])
    _feed(gpu, logits_MNK.float().cuda(), labels_N.cuda(), [128, 128, 44])
    got, expected = gpu.compute(), cpu.compute()
    assert got["count"] == expected["count"] and got["top1"] == expected["top1"]
    assert got["reliability"]["count"] == expected["reliability"]["count"]
    assert got["nll"] == pytest.approx(expected["nll"], rel=1e-9)
    assert got["ece"] == pytest.approx(expected["ece"], rel=1e-9)
