"""Checkpoint state that travels once: a `CheckpointManager` saved and resumed by real gloo ranks (tests/ckpt_ranks.py).

Each rank writes its own `rank_<r>.json`, and nothing of a rank's state reaches another rank: the bytes the
collectives hand a rank other than 0 stay far below one rank's state (~20 KB of RNG streams). A resume on another
world size reads the position from state.json, not from the old ranks' files; one written before state.json held it
resumes from rank 0's file. Rows gathered for temperature scaling reach rank 0 only.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pytest
from conftest import run_train

from mixmo_dist.checkpoint.store import MARKER, CheckpointStore
from mixmo_dist.runtime.files import sha256_file


def _ranks(mode: str, root: Path, nproc: int, *flags: str) -> list[dict]:
    rc, log = run_train([mode, str(root), *flags], nproc=nproc, module="ckpt_ranks", timeout=300)
    assert rc == 0, log[-4000:]
    return [json.loads((root.parent / f"{mode}-rank{r}.json").read_text()) for r in range(nproc)]


def _reseal(ckpt: Path) -> None:
    """Rewrite the marker after a test edited files (what a checkpoint of another version would hold)."""
    marker = json.loads((ckpt / MARKER).read_text())
    marker.update({name: sha256_file(ckpt / name) for name in marker if name != "step"})
    (ckpt / MARKER).write_text(json.dumps(marker))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranks") / "checkpoints"
    return root, _ranks("save", root, 3)


def test_each_rank_writes_its_own_state_and_receives_none_of_the_others(saved):
    root, reports = saved
    ckpt = root / "step_00000007"
    assert [r["path"] for r in reports] == [str(ckpt), "None", "None"]
    assert CheckpointStore(root, keep_last=2).verify(ckpt) is None
    for r, report in enumerate(reports):
        written = json.loads((ckpt / f"rank_{r}.json").read_text())
        assert {k: written[k] for k in ("rng", "data")} == report["state"]
    one_state = len(json.dumps(reports[1]["state"]))
    assert one_state > 10_000
    # Ranks 1 and 2 receive the fingerprint all-reduce, the directory's name and the agreement (one all-reduce of
    # a flag), and from the gather to rank 0 nothing at all.
    for report in reports[1:]:
        received = report["received"]
        assert received.get("gather_to_main") == len(pickle.dumps(None)) and sum(received.values()) < 300, received
        assert "gather_objects" not in received, received  # no all-gather, whose bytes grow with the world
    assert reports[0]["received"]["gather_to_main"] > 3 * 64  # the three ranks' sha256 digests
    state = json.loads((ckpt / "state.json").read_text())
    assert state["reshard"]["data"] == {"epoch": 1, "batch": 3}


def test_replicas_that_differ_stop_every_rank_and_commit_nothing(tmp_path):
    reports = _ranks("save", tmp_path / "checkpoints", 2, "desync")
    for report in reports:
        assert report["error"].startswith("model replicas differ across ranks at step 7"), report
    assert not (tmp_path / "checkpoints").exists()


def test_a_rank_that_cannot_write_its_file_stops_every_rank_with_one_message(saved, tmp_path):
    root = tmp_path / "checkpoints"
    shutil.copytree(saved[0], root)
    reports = _ranks("save", root, 3, "unwritable")  # step 7 again: the committed step 7 must stay as it is
    message = "checkpoint save at step 7 failed: rank 1 could not write rank_1.json: cannot write "
    assert all(r["error"].startswith(message) for r in reports), [r["error"] for r in reports]
    assert "not JSON serializable" in reports[0]["error"]
    assert [r["reports"] for r in reports] == [True, False, False]  # rank 0 prints it; the others stop quietly
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000007"]  # no temporary directory left
    assert CheckpointStore(root, keep_last=2).verify(root / "step_00000007") is None


def test_same_world_resume_restores_each_ranks_own_streams(saved, tmp_path):
    root, before = saved
    after = _ranks("resume", root, 3)
    for r, report in enumerate(after):
        assert report["data"] == {"epoch": 1, "batch": 3} and report["step"] == 7
        saved_rng = json.loads((root / "step_00000007" / f"rank_{r}.json").read_text())["rng"]
        assert report["rng_sha"] == hashlib.sha256(json.dumps(saved_rng, sort_keys=True).encode()).hexdigest()


@pytest.mark.parametrize("written_by", ["this version", "the previous version"])
def test_another_world_size_reads_the_shared_position_not_the_old_ranks_files(saved, tmp_path, written_by):
    root, _ = saved
    copy = tmp_path / "checkpoints"
    shutil.copytree(root, copy)
    ckpt = copy / "step_00000007"
    for r in (1, 2):  # old ranks' files no resume may need: a position no plan has
        state = json.loads((ckpt / f"rank_{r}.json").read_text())
        state["data"] = {"epoch": 99, "batch": 99}
        (ckpt / f"rank_{r}.json").write_text(json.dumps(state))
    if written_by == "the previous version":
        state = json.loads((ckpt / "state.json").read_text())
        del state["reshard"]
        (ckpt / "state.json").write_text(json.dumps(state))
    _reseal(ckpt)
    after = _ranks("resume", copy, 2)
    assert [r["data"] for r in after] == [{"epoch": 1, "batch": 3}] * 2
    assert [r["step"] for r in after] == [7, 7]


def test_rows_gathered_to_rank_0_only(tmp_path):
    """What temperature scaling gathers (N x K logits) goes to the one rank that fits, not to every rank."""
    reports = _ranks("rows", tmp_path / "checkpoints", 3)
    expected = [[[100.0 * r + 3 * i + j for j in range(3)] for i in range(r + 1)] for r in range(3)]
    assert reports[0]["parts"] == expected
    assert [r["parts"] for r in reports[1:]] == [None, None]
