"""Resuming on another number of processes (what a preempted user does when only half the nodes are free).

With `data.global_batch_size` set, one run is carried mid-epoch through 4 -> 2 -> 1 -> 2 gloo ranks and finishes
its schedule: every step is logged once, the resumed runs say they resharded, validation still sees every image once.
That the samples of the epoch are exactly those of an uninterrupted run is checked on the loaders themselves (the
`another_world_size` tests of test_data_torch.py and test_data_dali.py). Without `data.global_batch_size`, a
world-size change is refused with a message that says how to allow it.
"""

from __future__ import annotations

import json

import pytest
from conftest import read_metrics, run_train, tiny_args

GLOBAL = ("--data.global_batch_size=16",)  # 8 unique images per step at b=2: 9 steps per epoch of 70 images
# timm's own 0.37M-parameter ResNet (resnet18 is 11M): what is checked here is the plan and the state across world
# sizes, not the network, and 4 ranks of resnet18 on 2 cores made this file's runs a minute.
ARCH = "--model.arch=test_resnet"


def _args(tiny_data, out, *extra):
    return tiny_args(
        tiny_data,
        out,
        ARCH,
        *GLOBAL,
        "--checkpoint.every_n_steps=1000",
        "--eval.every_n_epochs=1",
        "--eval.at_end=false",
        *extra,
    )


@pytest.fixture(scope="module")
def resharded_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("world") / "run"
    logs = []
    for nproc, stop in ((4, 5), (2, 8), (1, 12), (2, 18)):
        rc, log = run_train(_args(tiny_data, out, f"--schedule.max_steps={stop}"), nproc=nproc)
        assert rc == 0, log[-4000:]
        logs.append(log)
    return out, logs


def test_a_run_carried_through_4_2_1_2_ranks_finishes_its_schedule(resharded_run):
    out, logs = resharded_run
    for log, (old, new, step) in zip(logs[1:], ((4, 2, 5), (2, 1, 8), (1, 2, 12))):
        assert f"saved by {old} ranks, on {new} ranks" in log, log[-3000:]
        assert f"resumed from step {step}" in log
    records = read_metrics(out)
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, 19))
    val = [r for r in records if r["split"] == "val"]
    assert [r["step"] for r in val] == [9, 18] and all(r["count"] == 49 for r in val)
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 2 and run["plan"]["rows_per_rank"] == 8 and run["plan"]["total_steps"] == 18
    state = json.loads((out / "checkpoints" / "step_00000018" / "state.json").read_text())
    assert state["shape"]["world_size"] == 2 and state["plan"]["unique_per_step"] == 8


def test_world_size_change_without_a_global_batch_is_refused(tiny_data, resharded_run, tmp_path):
    out, _ = resharded_run
    # Same global batch (2 x 8 rows), but given per rank: the run cannot know it is meant to stay the same.
    args = tiny_args(tiny_data, out, ARCH, "--data.batch_size=16",
                     "--schedule.max_steps=19", "--checkpoint.resume=auto")  # fmt: skip
    rc, log = run_train(args, nproc=1)
    assert rc == 2, log[-3000:]
    assert "world_size: checkpoint 2 vs now 1" in log and "set data.global_batch_size=16" in log, log[-3000:]
    rc, log = run_train(_args(tiny_data, out, "--data.global_batch_size=8", "--schedule.max_steps=19"), nproc=1)
    assert rc == 2 and "global batch: checkpoint 16 rows vs now 8" in log, log[-3000:]
