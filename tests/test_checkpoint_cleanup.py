"""Pruning (`keep_last`) and `cleanup_tmp` with incomplete directories present never delete a complete checkpoint.

Long random histories of saves, interleaved with what killed saves and hand copies leave behind: marker-less
`step_N` directories (older and newer than the complete ones) and `.tmp_step_N_<pid>` directories, some with a
`COMPLETE` inside. After every commit the complete checkpoints are exactly the newest `keep_last` of those
committed (a reference list kept by the test), each still verifies, and no incomplete step directory was deleted.
`keep_last` takes 1, 2 and 3: an off-by-one in the prune's slice is invisible at only one of them.
"""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

from mixmo_dist.checkpoint.store import MARKER, CheckpointStore


def _save(store: CheckpointStore, step: int) -> None:
    tmp = store.begin(step)
    store.write_tensors(tmp, "model.safetensors", {"w": torch.full((4,), float(step))})
    store.write_json(tmp, "state.json", {"step": step})
    store.commit(tmp, step)


def _leave_incomplete(store: CheckpointStore, rng: random.Random, step: int) -> str:
    """An incomplete directory of `step`: marker-less step dir, or a killed save's tmp dir (with or without marker)."""
    kind = rng.choice(["markerless", "tmp", "tmp_with_marker"])
    if kind == "markerless":
        path = store.root / store.step_dir_name(step)
    else:
        path = store.root / f".tmp_{store.step_dir_name(step)}_{rng.randint(1, 10**6) + os.getpid() + 1}"
    path.mkdir(parents=True)
    (path / "state.json").write_text(json.dumps({"step": step}))
    if kind == "tmp_with_marker":
        (path / MARKER).write_text(json.dumps({"step": step}))
    return path.name


def _complete(store: CheckpointStore) -> list[int]:
    return [step for step, p in store.step_dirs() if (p / MARKER).is_file()]


@pytest.mark.parametrize("keep_last", [1, 2, 3])
def test_prune_and_cleanup_never_delete_a_complete_checkpoint_beside_incomplete_dirs(tmp_path, keep_last):
    rng = random.Random(keep_last)
    for history in range(6):
        store = CheckpointStore(tmp_path / f"k{keep_last}_{history}" / "checkpoints", keep_last=keep_last)
        committed: list[int] = []
        markerless: set[str] = set()
        step = 0
        for _ in range(14):
            step += rng.randint(1, 3)
            if committed and rng.random() < 0.45:
                # Below the next commit's step: a later one would be moved aside as superseded, by design.
                name = _leave_incomplete(store, rng, step)
                if name.startswith("step_"):
                    markerless.add(name)
                continue
            _save(store, step)
            committed.append(step)
            assert _complete(store) == committed[-keep_last:], (history, committed)
            present = {p.name for p in store.root.iterdir()}
            assert markerless <= present, f"an incomplete step directory was deleted: {markerless - present}"
            for s in _complete(store):
                assert store.verify(store.root / store.step_dir_name(s)) is None
        removed = {p.name for p in store.cleanup_tmp()}
        assert all(name.startswith(".tmp_") for name in removed), removed
        assert not any(p.name.startswith(".tmp_") for p in store.root.iterdir())
        assert _complete(store) == committed[-keep_last:]
        assert markerless <= {p.name for p in store.root.iterdir()}
        assert store.find_latest(repair=False) == store.root / store.step_dir_name(committed[-1])
