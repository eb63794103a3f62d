"""`python -m mixmo_dist.compare`: groups, mean +- std over seeds, deep ensembles, inference cost (issue 23).

Four real runs (2 seeds x {Cut-MixMo with 2 members, vanilla}) of 2 steps each on the tiny JPEG set; the figures of
the table are checked against `evaluate`'s own results, which compare caches.
"""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, tiny_args, train_env

from mixmo_dist.evaluation.compare import build_rows, group_runs, read_run

pytestmark = pytest.mark.slow

VANILLA = ("--mixmo.num_members=1", "--mixmo.mixing=none", "--mixmo.batch_repetitions=1", "--data.batch_size=4")


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory) -> dict[tuple[str, int], Path]:
    root = tmp_path_factory.mktemp("compare_runs")
    out = {}
    for kind, extra in (("mixmo", ()), ("vanilla", VANILLA)):
        for seed in (1, 2):
            run = root / f"{kind}-{seed}"
            # timm's 0.37M-parameter ResNet: the table's grouping, pooling and costs are checked, not the network.
            args = tiny_args(tiny_data, run, "--model.arch=test_resnet", "--schedule.max_steps=2", f"--run.seed={seed}",
                             *extra)  # fmt: skip
            res = subprocess.run([sys.executable, "-m", "mixmo_dist.train", *args], cwd=REPO, env=train_env(),
                                 capture_output=True, text=True, timeout=300)  # fmt: skip
            assert res.returncode == 0, res.stderr[-3000:]
            out[(kind, seed)] = run
    return out


def test_compare_table_groups_seeds_adds_deep_ensembles_and_costs(runs, tmp_path):
    out = tmp_path / "cmp"
    res = subprocess.run(
        [sys.executable, "-m", "mixmo_dist.compare", *map(str, runs.values()), "--out", str(out)],
        cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout == (out / "compare.md").read_text() and (out / "compare.png").stat().st_size > 0
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert [(r["kind"], r["n"]) for r in rows] == [("runs", "2"), ("runs", "2"), ("deep ensemble x2", "1")]
    mixmo, vanilla, ensemble = rows
    assert "mixmo.num_members=2" in mixmo["group"] and "mixmo.num_members=1" in vanilla["group"]
    assert ensemble["group"] == vanilla["group"]

    evals = {
        tuple(json.loads(p.read_text())["checkpoints"]): json.loads(p.read_text())
        for p in (out / "evals").glob("*.json")
    }
    assert len(evals) == 5  # 4 runs and the one pair
    by_run = {
        kind: [v for k, v in evals.items() if len(k) == 1 and f"/{kind}-" in k[0]] for kind in ("mixmo", "vanilla")
    }
    for row, kind in ((mixmo, "mixmo"), (vanilla, "vanilla")):
        top1 = [e["top1"] for e in by_run[kind]]
        assert float(row["top1_mean"]) == pytest.approx(statistics.fmean(top1))
        assert float(row["top1_std"]) == pytest.approx(statistics.stdev(top1))
        nll_ts = [e["calibrated_nll"] for e in by_run[kind]]
        assert float(row["nll_ts_mean"]) == pytest.approx(statistics.fmean(nll_ts))
    pair = next(v for k, v in evals.items() if len(k) == 2)
    assert pair["num_members"] == 2 and float(ensemble["top1_mean"]) == pytest.approx(pair["top1"])
    # Cost: MixMo's second encoder and head; an ensemble of 2 runs two networks
    assert float(mixmo["params"]) > float(vanilla["params"])
    assert float(ensemble["params"]) == 2 * float(vanilla["params"])
    assert float(ensemble["flops"]) == 2 * float(vanilla["flops"]) > 0
    assert float(mixmo["images_per_s"]) > 0


def test_compare_evaluates_only_what_is_missing_and_refuses_a_non_run(runs, tmp_path):
    loaded = [read_run(p) for p in runs.values()]
    assert [len(members) for _, members in group_runs(loaded)] == [2, 2]
    calls = []

    def evaluate(args):
        calls.append(args)
        subprocess.run([sys.executable, "-m", "mixmo_dist.evaluate", *args], cwd=REPO, env=train_env(),
                       capture_output=True, check=True, timeout=300)  # fmt: skip

    build_rows(loaded[:2], tmp_path / "evals", None, evaluate)
    assert len(calls) == 2
    build_rows(loaded[:2], tmp_path / "evals", None, evaluate)
    assert len(calls) == 2  # cached: nothing evaluated again
    res = subprocess.run([sys.executable, "-m", "mixmo_dist.compare", str(tmp_path)], cwd=REPO, env=train_env(),
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 2 and res.stderr.startswith(f"error: {tmp_path}: not a run directory")


def test_markdown_shows_a_spread_only_where_there_are_several_values():
    from mixmo_dist.evaluation.compare import Row, to_markdown

    cost = {"params": 2e6, "flops": 3e9, "images_per_s": 10.0}
    rows = [Row("a=1", "runs", [], {"top1": [0.5]}, cost), Row("a=2", "runs", [], {"top1": [0.5, 0.7]}, cost)]
    lines = to_markdown(rows).splitlines()
    assert lines[2] == "| a=1 | runs | 1 | 0.5000 | 2.00 | 3.000 | 10 |"
    assert lines[3] == f"| a=2 | runs | 2 | 0.6000 +- {statistics.stdev([0.5, 0.7]):.4f} | 2.00 | 3.000 | 10 |"


def test_the_plot_keeps_room_for_a_long_legend(tmp_path):
    """25 groups: the legend's room grows with the figure. A fixed fraction of the figure per row passes the whole
    figure at 17 rows; matplotlib then skips the layout with a warning and the legend covers the panels."""
    import warnings

    from mixmo_dist.evaluation.compare import Row, plot

    cost = {"params": 2e6, "flops": 3e9, "images_per_s": 10.0}
    rows = [Row(f"optim.lr={i}", "runs", [], {"top1": [0.5, 0.6], "nll": [1.0, 1.1]}, cost) for i in range(25)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Tight layout not applied" would be one
        plot(rows, tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 0
