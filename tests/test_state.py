"""checkpoint/state's CheckpointManager in process, on one rank (the real `Collectives` at world size 1, a real
CheckpointStore on disk): every kind of state restored exactly with every optional part on (EMA, GradScaler,
momentum, a second per-rank object), the order of the restores, the size bookkeeping, the refusals and their
messages. Fast, so `make mutation` can select them (issue 22); the multi-rank paths are in test_checkpoint_ranks.py
and test_faults.py."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import types

import pytest
import torch
from torch import nn

from mixmo_dist.checkpoint import CheckpointError
from mixmo_dist.checkpoint.state import (
    SHAPE_KEYS,
    CheckpointManager,
    SaveError,
    class_difference,
    fingerprint,
    optimizer_state,
    optimizer_tensors,
)
from mixmo_dist.checkpoint.store import CheckpointStore
from mixmo_dist.data.plan import EpochPlan
from mixmo_dist.runtime.collectives import Collectives, StopAllRanks
from mixmo_dist.runtime.seeds import RankRNG
from mixmo_dist.training.optim import EMA

SHAPE = {
    "arch": "tiny",
    "num_members": 2,
    "num_classes": 3,
    "rows_per_rank": 8,
    "world_size": 1,
    "classes": ["a", "b", "c"],
}


class Counters:
    def __init__(self, step=0):
        self.step, self.best = step, None

    def state_dict(self):
        return {"step": self.step, "best": self.best}

    def load_state_dict(self, state):
        self.step, self.best = state["step"], state["best"]


class Recorder:
    """A per-rank state that records when it is restored (into a shared list) and with what."""

    def __init__(self, name, log, value=0):
        self.name, self.log, self.value = name, log, value

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.log.append((self.name, "load", state["value"]))
        self.value = state["value"]

    def load_resharded(self, states, step):
        self.log.append((self.name, "resharded", [s["value"] for s in states], step))
        self.value = states[0]["value"]


def _net():
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3))


def _run(tmp_path, *, seed=0, shape=None, elastic=False, rank_states=None, ema=True, scaler=True):
    torch.manual_seed(seed)
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    gen = torch.Generator().manual_seed(seed)
    plan = EpochPlan(40, unique_per_rank=4, rank=0, world_size=1, seed=seed)
    states = rank_states if rank_states is not None else {"data": plan, "rng": RankRNG(gen, seed=seed, rank=0)}
    run = types.SimpleNamespace(
        model=model,
        opt=opt,
        gen=gen,
        plan=plan,
        ema=EMA(model, 0.75) if ema else None,
        scaler=torch.amp.GradScaler("cpu", init_scale=2.0**seed + 1) if scaler else None,
        counters=Counters(),
        store=CheckpointStore(tmp_path / "checkpoints", keep_last=2),
    )
    run.manager = CheckpointManager(
        run.store,
        Collectives(types.SimpleNamespace(num_processes=1, process_index=0)),
        rank=0,
        model=model,
        optimizer=opt,
        ema=run.ema,
        scaler=run.scaler,
        counters=run.counters,
        rank_states=states,
        shape=shape or SHAPE,
        describe=lambda: {"epoch": 1.5, "note": "described"},
        elastic=elastic,
    )
    return run


def _train(run, steps):
    for _ in range(steps):
        x = torch.randn(8, 4, generator=run.gen)
        run.opt.zero_grad()
        run.model.train()(x).pow(2).mean().backward()
        run.opt.step()
        if run.ema is not None:
            run.ema.update(run.model)
        run.plan.advance()
        run.counters.step += 1


def test_save_then_resume_restores_every_state_exactly(tmp_path):
    a = _run(tmp_path, seed=1)
    _train(a, 3)
    a.counters.best = 0.25
    a.scaler.scale(torch.ones(()))  # a scaler holds a scale only once it has scaled something
    a.scaler.update(new_scale=8.0)
    path = a.manager.save()
    assert path == tmp_path / "checkpoints" / "step_00000003"
    expected_files = ["COMPLETE", "model.safetensors", "rank_0.json", "state.json", "trainer.safetensors"]
    assert sorted(p.name for p in path.iterdir()) == expected_files
    state = json.loads((path / "state.json").read_text())
    assert state["epoch"] == 1.5 and state["note"] == "described" and state["step"] == 3 and state["best"] == 0.25
    assert state["shape"] == SHAPE and state["scaler"]["scale"] == 8.0
    assert state["reshard"]["data"] == {"epoch": 0, "batch": 3} and "param_fingerprint" not in state["reshard"]
    rank0 = json.loads((path / "rank_0.json").read_text())
    assert rank0["param_fingerprint"] == fingerprint(a.model) and rank0["data"] == {"epoch": 0, "batch": 3}
    # The size the next save must find free: what this save wrote (every file but the marker).
    assert a.manager.latest == path
    assert a.manager.latest_bytes == sum((path / n).stat().st_size for n in expected_files if n != "COMPLETE")
    # What comes next in the uninterrupted run.
    rng_after = torch.randn(3, generator=a.gen)
    _train(a, 2)

    b = _run(tmp_path, seed=2)  # another seed: every state differs before the resume
    assert b.manager.resume("auto") == path
    assert b.counters.state_dict() == {"step": 3, "best": 0.25}
    assert b.plan.state_dict() == {"epoch": 0, "batch": 3}
    assert b.scaler.get_scale() == 8.0
    assert fingerprint(b.model) == rank0["param_fingerprint"]
    assert b.manager.latest == path
    assert b.manager.latest_bytes == sum(p.stat().st_size for p in path.iterdir())
    assert torch.equal(torch.randn(3, generator=b.gen), rng_after)
    _train(b, 2)
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(va, vb), k
    for (k, va), vb in zip(a.ema.state_dict().items(), b.ema.state_dict().values()):
        assert torch.equal(va, vb), k
    sa, sb = a.opt.state_dict(), b.opt.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for idx in sa["state"]:
        assert torch.equal(sa["state"][idx]["momentum_buffer"], sb["state"][idx]["momentum_buffer"]), idx


def test_resume_without_optional_state_and_policy_never(tmp_path):
    a = _run(tmp_path, ema=False, scaler=False)
    _train(a, 1)
    path = a.manager.save()
    assert json.loads((path / "state.json").read_text())["scaler"] is None
    b = _run(tmp_path, seed=3, ema=False, scaler=False)
    assert b.manager.resume("never") is None and b.counters.step == 0 and b.manager.latest is None
    assert b.manager.resume("auto") == path and b.counters.step == 1


def test_resume_restores_data_first_rng_last_and_the_rest_sorted_between(tmp_path):
    log = []
    states = {name: Recorder(name, log, value=i + 1) for i, name in enumerate(["rng", "zeta", "data", "alpha"])}
    a = _run(tmp_path, rank_states=states)
    path = a.manager.save()
    assert json.loads((path / "rank_0.json").read_text())["zeta"] == {"value": 2}
    fresh = {name: Recorder(name, log) for name in states}
    b = _run(tmp_path, rank_states=fresh)
    b.manager.resume("auto")
    assert log == [("data", "load", 3), ("alpha", "load", 4), ("zeta", "load", 2), ("rng", "load", 1)]


def test_resume_on_another_world_size_reshards_from_rank_0s_shared_state(tmp_path):
    log = []
    old = {**SHAPE, "rows_per_rank": 4, "world_size": 2}
    a = _run(tmp_path, shape=old, rank_states={"data": Recorder("data", log, 7), "rng": Recorder("rng", log, 9)})
    a.counters.step = 5
    a.manager.save()
    new = {**SHAPE, "rows_per_rank": 8, "world_size": 1}
    fresh = {"data": Recorder("data", log), "rng": Recorder("rng", log)}
    b = _run(tmp_path, shape=new, elastic=True, rank_states=fresh)
    reads = []
    read_json = b.store.read_json
    b.store.read_json = lambda path, name: (reads.append(name), read_json(path, name))[1]
    b.manager.resume("auto")
    assert log == [("data", "resharded", [7], 5), ("rng", "resharded", [9], 5)]
    assert "rank_0.json" not in reads  # the shared state comes from state.json: no rank reads rank 0's file
    # The same world size never reshards, elastic or not.
    log.clear()
    c = _run(
        tmp_path, shape=old, elastic=True, rank_states={"data": Recorder("data", log), "rng": Recorder("rng", log)}
    )
    c.manager.resume("auto")
    assert log == [("data", "load", 7), ("rng", "load", 9)]


def _manager(shape, elastic=False, rank_states=None):
    model = nn.Linear(2, 2)
    return CheckpointManager(
        CheckpointStore("/nonexistent/checkpoints", keep_last=1),
        None,
        rank=0,
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        ema=None,
        scaler=None,
        counters=Counters(),
        rank_states=rank_states if rank_states is not None else {"data": Recorder("data", [])},
        shape=shape,
        describe=dict,
        elastic=elastic,
    )


@pytest.mark.parametrize("key", ["arch", "num_members", "num_classes"])
def test_each_shape_key_that_differs_is_named(key):
    saved = {**SHAPE, key: {"arch": "other", "num_members": 3, "num_classes": 4}[key]}
    with pytest.raises(CheckpointError) as err:
        _manager(SHAPE).check_compatible({"shape": saved}, "ck")
    message = str(err.value)
    assert message.startswith(f"cannot resume from ck: {key}: checkpoint {saved[key]!r} vs now {SHAPE[key]!r}. ")
    assert message.endswith("or set checkpoint.resume=never")


def test_world_size_changes_need_elastic_and_the_same_global_batch():
    saved = {**SHAPE, "rows_per_rank": 4, "world_size": 2}
    assert _manager(SHAPE).check_compatible({"shape": SHAPE}, "ck") is None
    with pytest.raises(CheckpointError, match=r"world_size: checkpoint 2 vs now 1 \(.*data.global_batch_size=8, the"):
        _manager(SHAPE).check_compatible({"shape": saved}, "ck")
    assert _manager(SHAPE, elastic=True).check_compatible({"shape": saved}, "ck") == 2
    other = {**saved, "rows_per_rank": 3}
    with pytest.raises(CheckpointError, match=r"^cannot resume from ck: global batch: checkpoint 6 rows vs now 8\. "):
        _manager(SHAPE, elastic=True).check_compatible({"shape": other}, "ck")
    # rows_per_rank alone differs at the same world size: another global batch.
    with pytest.raises(CheckpointError, match=r"global batch: checkpoint 16 rows vs now 8"):
        _manager(SHAPE, elastic=True).check_compatible({"shape": {**SHAPE, "rows_per_rank": 16}}, "ck")
    with pytest.raises(CheckpointError, match=r"^cannot resume from ck on another world size: \['counters'\] cannot"):
        _manager(SHAPE, elastic=True, rank_states={"counters": Counters()}).check_compatible({"shape": saved}, "ck")
    # A checkpoint without a shape at all: every key named, nothing assumed.
    with pytest.raises(CheckpointError) as err:
        _manager(SHAPE).check_compatible({}, "ck")
    assert "arch: checkpoint None vs now 'tiny'" in str(err.value) and "stores no class list" in str(err.value)
    assert SHAPE_KEYS == ("arch", "num_members", "num_classes", "rows_per_rank", "world_size", "classes")


def test_class_difference_counts_names_and_order():
    assert (
        class_difference(["a", "b"], ["a", "b", "c"])
        == "classes: the checkpoint has 2, the data 3; 1 not in the checkpoint ('c')"
    )
    assert (
        class_difference(["a", "b", "c"], ["a"])
        == "classes: the checkpoint has 3, the data 1; 2 missing from the data ('b', 'c')"
    )
    assert class_difference(["a", "b", "c"], ["a", "c", "b"]) == (
        "classes: the checkpoint has 3, the data 3, the same names in another order (label 1: checkpoint 'b', now 'c')"
    )
    many = [f"x{i}" for i in range(5)]
    assert class_difference([], many, shown=2).endswith("; 5 not in the checkpoint ('x0', 'x1', ... (3 more))")
    assert class_difference([], many[:2], shown=2).endswith("; 2 not in the checkpoint ('x0', 'x1')")
    assert class_difference(None, many) == "classes: the checkpoint stores no class list (NoneType), the data has 5"
    assert class_difference("a,b", many) == "classes: the checkpoint stores no class list (str), the data has 5"
    # Renamed in place: a difference of names, not an order (the order clause is only for the same names).
    assert class_difference(["a", "b"], ["a", "c"]) == (
        "classes: the checkpoint has 2, the data 2; 1 not in the checkpoint ('c'); 1 missing from the data ('b')"
    )


def test_optimizer_split_and_join_are_inverse_for_sgd_and_adam():
    model = _net()
    for opt in (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), torch.optim.Adam(model.parameters())):
        model(torch.randn(8, 4)).sum().backward()
        opt.step()
        sd = opt.state_dict()
        tensors, meta = optimizer_tensors(sd)
        assert all(k.startswith("optimizer/") for k in tensors)
        json.dumps(meta)  # JSON-able, no pickle
        back = optimizer_state(tensors, meta)
        assert back["param_groups"] == sd["param_groups"] and set(back["state"]) == set(sd["state"])
        for idx, per in sd["state"].items():
            assert set(back["state"][idx]) == set(per)
            for key, value in per.items():
                assert torch.equal(back["state"][idx][key], value), (idx, key)
    # A non-tensor entry of a parameter's state goes to the metadata and comes back.
    sd = {"state": {0: {"momentum_buffer": torch.ones(2), "count": 3}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    tensors, meta = optimizer_tensors(sd)
    assert meta["state"] == {"0": {"count": 3}} and list(tensors) == ["optimizer/0/momentum_buffer"]
    back = optimizer_state({**tensors, "ema/w": torch.zeros(1)}, meta)  # other prefixes are not the optimizer's
    assert back["state"][0]["count"] == 3 and torch.equal(back["state"][0]["momentum_buffer"], torch.ones(2))
    assert set(back["state"]) == {0}


def test_fingerprint_sees_one_bit_of_any_tensor_and_the_names():
    a = _net()
    b = _net()
    b.load_state_dict(a.state_dict())
    assert fingerprint(a) == fingerprint(b) and len(fingerprint(a)) == 64
    with torch.no_grad():
        b[1].running_var[2] = torch.nextafter(b[1].running_var[2], torch.tensor(2.0))
    assert fingerprint(a) != fingerprint(b)
    renamed = nn.Sequential()
    for name, module in zip(["x", "1", "2"], a):
        renamed.add_module(name, module)
    assert fingerprint(renamed) != fingerprint(a)  # the same bytes under other names


def test_a_save_that_cannot_fit_is_refused_before_a_byte_is_written(tmp_path):
    a = _run(tmp_path)
    first = a.manager.save()
    a.counters.step = 1
    a.manager.latest_bytes = 10**18  # the previous save's size: more than any disk here has free
    with pytest.raises(StopAllRanks) as err:
        a.manager.save()
    message = str(err.value)
    assert message.startswith("checkpoint save at step 1 not started: the file system of ")
    assert "a checkpoint of this run takes 1000000000000.0 MB (1000000000000000000 bytes)" in message
    assert f"the newest complete checkpoint, {first}, stays the latest" in message
    assert sorted(p.name for p in a.store.root.iterdir()) == ["latest", "step_00000000"]


def test_a_rank_file_that_cannot_be_written_fails_the_save_and_leaves_no_temporary(tmp_path):
    class Unsaveable:
        def state_dict(self):
            return {"a set": {1, 2}}  # not JSON

        def load_state_dict(self, state):
            pass

    a = _run(tmp_path, rank_states={"odd": Unsaveable()})
    with pytest.raises(StopAllRanks) as err:
        a.manager.save()
    message = str(err.value)
    # Rank 0's own state.json (which holds rank 0's state for a reshard) fails first, and says so.
    assert message.startswith("checkpoint save at step 0 failed: cannot write ")
    assert "state.json: Object of type set is not JSON serializable" in message
    assert "Nothing was committed; the newest complete checkpoint, " in message and "<none yet>" in message
    assert list(a.store.root.iterdir()) == []
    assert a.manager.latest is None and a.manager.latest_bytes is None


def test_another_ranks_failed_file_fails_the_commit_and_removes_the_temporary(tmp_path):
    a = _run(tmp_path)
    first = a.manager.save()
    tmp = a.store.begin(1)
    (tmp / "model.safetensors").write_bytes(b"whole")
    reports = [("0" * 64, 10, None), (None, 0, (errno.ENOSPC, "rank 1 could not write rank_1.json: disk full"))]
    with pytest.raises(SaveError) as err:
        a.manager._commit(tmp, 1, reports, needed=2_000_000, shared=5, failure=None)
    assert str(err.value).startswith("checkpoint save at step 1 failed: no space left on the file system of ")
    assert "(a checkpoint takes about 2.0 MB (2000000 bytes)" in str(err.value)
    assert not tmp.exists() and a.manager.latest == first
    tmp = a.store.begin(1)
    reports = [("0" * 64, 10, None), (None, 0, (None, "rank 1 could not write rank_1.json: a TypeError"))]
    with pytest.raises(SaveError, match=r"failed: rank 1 could not write rank_1.json: a TypeError\. Nothing was"):
        a.manager._commit(tmp, 1, reports, needed=1, shared=5, failure=None)
    assert not tmp.exists()
    tmp = a.store.begin(1)  # another errno: its text is the detail
    reports = [("0" * 64, 10, None), (None, 0, (errno.EIO, "rank 1 could not write rank_1.json: I/O error"))]
    with pytest.raises(SaveError, match=r"failed: \[Errno 5\] rank 1 could not write rank_1.json: I/O error\. Nothing"):
        a.manager._commit(tmp, 1, reports, needed=1, shared=5, failure=None)


def test_failure_messages_name_a_full_disk_and_shorten_the_rest(tmp_path):
    a = _run(tmp_path)
    full = a.manager._failure(4, OSError(errno.ENOSPC, "No space left on device"), needed=3_000_000)
    assert full.startswith(
        f"checkpoint save at step 4 failed: no space left on the file system of {a.store.root} (a checkpoint takes "
        "about 3.0 MB (3000000 bytes), "
    )
    assert "free after removing the partial save). Nothing was committed" in full
    quota = a.manager._failure(4, OSError(errno.EDQUOT, "Disk quota exceeded"), needed=1)
    assert "no space left on" in quota
    rust = a.manager._failure(4, RuntimeError("safetensors: os error 28"), needed=1)
    assert "no space left on" in rust
    other = a.manager._failure(4, OSError(errno.EIO, "I/O error"), needed=1)
    assert other.startswith("checkpoint save at step 4 failed: [Errno 5] I/O error. Nothing was committed")
    cause = CheckpointError("cannot write model.safetensors")
    cause.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert "no space left on" in a.manager._failure(4, cause, needed=1)  # the errno of the cause counts
    assert "no space left on" in a.manager._failure(4, RuntimeError("write: No space left on device"), needed=1)
    assert re.search(r"\d+\.\d MB \(\d+ bytes\) free after removing the partial save\)", full)

    def detail(text):
        return a.manager._failure(4, RuntimeError(text), needed=1).split("failed: ", 1)[1].split(". Nothing", 1)[0]

    assert detail("x" * 300) == "x" * 300  # up to 300 characters: whole
    assert detail("x" * 301) == "x" * 300 + " ..."
    # Longer: cut at the last whole word within 300 characters. Words of 6 letters and a space put a space at
    # index 300, so the cut is at 300, not 301, and one word earlier than a cut that kept it.
    words = [f"t{i:05d}" for i in range(100)]
    assert detail(" ".join(words)) == " ".join(words[:42]) + " ..."


def test_a_full_disk_whose_free_space_cannot_be_read_says_unknown(tmp_path, monkeypatch):
    a = _run(tmp_path)
    monkeypatch.setattr("mixmo_dist.checkpoint.state._free_bytes", lambda root: None)
    full = a.manager._failure(4, OSError(errno.ENOSPC, "No space left on device"), needed=1)
    assert "(a checkpoint takes about 0.0 MB (1 bytes), unknown free after removing the partial save)" in full


def test_load_details_are_cut_at_400_characters_on_a_word():
    from mixmo_dist.checkpoint.state import _LOAD_DETAIL_CHARS, _shortened

    assert _LOAD_DETAIL_CHARS == 400
    assert _shortened("y" * 400, 400) == "y" * 400
    assert _shortened("y" * 401, 400) == "y" * 400 + " ..."
    words = [f"w{i:05d}" for i in range(100)]  # a space at every 7th index: index 399 is one, 400 is not
    assert _shortened(" ".join(words), 400) == " ".join(words[:57]) + " ..."


def test_tensors_that_do_not_fit_are_refused_naming_the_shape(tmp_path):
    a = _run(tmp_path)
    a.manager.save()
    b = _run(tmp_path)
    b.model[2] = nn.Linear(6, 5)  # another number of classes than the file
    b.manager.model = b.model
    with pytest.raises(CheckpointError) as err:
        b.manager.resume("auto")
    message = str(err.value)
    assert message.startswith(
        f"cannot resume from {tmp_path / 'checkpoints' / 'step_00000000'}: its tensors do not fit"
    )
    assert "(arch='tiny', num_members=2, num_classes=3, rows_per_rank=8, world_size=1)" in message
    assert "\n" not in message


def test_an_explicit_path_that_does_not_verify_is_an_error_on_resume(tmp_path):
    a = _run(tmp_path)
    path = a.manager.save()
    (path / "model.safetensors").write_bytes(b"changed")
    b = _run(tmp_path)
    with pytest.raises(CheckpointError, match="sha256"):
        b.manager.resume(str(path))
    assert b.counters.step == 0


def test_resume_removes_the_temporary_directories_of_killed_saves(tmp_path):
    a = _run(tmp_path)
    a.manager.save()
    # A save killed mid-write by a process that is gone (pid 2**22 + 1 is above Linux's pid_max default).
    leftover = a.store.root / f".tmp_step_00000009_{2**22 + 1}"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    _run(tmp_path).manager.resume("auto")
    assert sorted(os.listdir(a.store.root)) == ["latest", "step_00000000"]


def test_refusal_messages_whole(tmp_path):
    saved = {**SHAPE, "arch": "other", "classes": ["a", "b", "d"], "rows_per_rank": 4, "world_size": 2}
    with pytest.raises(CheckpointError) as err:
        _manager(SHAPE).check_compatible({"shape": saved}, "ck")
    assert str(err.value) == (
        "cannot resume from ck: arch: checkpoint 'other' vs now 'tiny'; classes: the checkpoint has 3, the data 3; "
        "1 not in the checkpoint ('c'); 1 missing from the data ('d'); world_size: checkpoint 2 vs now 1 (to resume "
        "on another number of processes, set data.global_batch_size=8, the checkpoint's global batch, so every "
        "rank's share is recomputed). Resuming needs the same shape-defining settings; start a new run in another "
        "run.output_dir (model.init_from can start it from these weights) or set checkpoint.resume=never"
    )
    a = _run(tmp_path)
    assert a.manager._kept() == (
        f"Nothing was committed; the newest complete checkpoint, {tmp_path / 'checkpoints' / '<none yet>'}, stays "
        "the latest. Free space (or fix the file system) and run the same command again to resume from it"
    )


def test_class_difference_shows_three_names_by_default():
    assert class_difference([], list("abcde")).endswith("; 5 not in the checkpoint ('a', 'b', 'c', ... (2 more))")


def test_a_checkpoint_with_more_tensors_than_the_model_is_refused_and_long_details_cut(tmp_path):
    a = _run(tmp_path)
    path = a.manager.save()
    b = _run(tmp_path)
    b.manager.model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6))  # the checkpoint's last layer is unexpected
    with pytest.raises(CheckpointError) as err:
        b.manager.resume("auto")
    message = str(err.value)
    head = f"cannot resume from {path}: its tensors do not fit the network its state.json describes "
    assert message.startswith(head + "(arch='tiny', num_members=2, num_classes=3, rows_per_rank=8, world_size=1): ")
    tail = (
        ". It was written by another version of mixmo_dist or timm, or changed by hand; resume from another checkpoint "
        "(--checkpoint.resume=<run>/checkpoints/step_<N>) or start a new run in another run.output_dir"
    )
    assert message.endswith(tail)
    detail = message[len(head) :].split("): ", 1)[1][: -len(tail)]
    assert (
        detail
        == 'Error(s) in loading state_dict for Sequential: Unexpected key(s) in state_dict: "2.bias", "2.weight".'
    )
    # A long detail is cut at a word within 400 characters.
    c = _run(tmp_path)
    c.manager.model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(40)])
    with pytest.raises(CheckpointError) as err:
        c.manager.resume("auto")
    detail = str(err.value).split("world_size=1): ", 1)[1][: -len(tail)]
    with pytest.raises(RuntimeError) as load:
        c.manager.model.load_state_dict(a.store.read_tensors(path, "model.safetensors"))
    words = " ".join(str(load.value).split())
    assert len(words) > 400
    cut = words[:400]
    assert detail == cut[: cut.rindex(" ")] + " ..."  # the last whole word within 400 characters


def test_optimizer_state_keys_with_slashes_and_parameters_without_tensors():
    tensors = {"optimizer/0/a/b": torch.ones(1), "optimizer/1/m": torch.zeros(1)}
    meta = {"param_groups": [{"params": [0, 1, 2]}], "state": {"2": {"count": 4}, "1": {"flag": True}}}
    state = optimizer_state(tensors, meta)
    assert set(state["state"]) == {0, 1, 2}
    assert torch.equal(state["state"][0]["a/b"], torch.ones(1))
    assert state["state"][2] == {"count": 4} and state["state"][1]["flag"] is True


def test_a_save_whose_directory_cannot_be_opened_names_the_step_and_the_error(tmp_path):
    a = _run(tmp_path)
    a.store.root.parent.mkdir(parents=True, exist_ok=True)
    a.store.root.write_text("a file where the checkpoints folder should be")
    with pytest.raises(StopAllRanks) as err:
        a.manager.save()
    message = str(err.value)
    assert message.startswith("checkpoint save at step 0 failed: ") and "Nothing was committed" in message
    assert "Errno" in message and str(a.store.root) in message


def test_the_first_save_needs_the_tensors_bytes_and_later_ones_the_last_saves(tmp_path):
    a = _run(tmp_path)
    _train(a, 1)
    model = sum(t.numel() * t.element_size() for t in a.model.state_dict().values())
    trainer = sum(v.numel() * v.element_size() for s in a.opt.state_dict()["state"].values() for v in s.values())
    ema = sum(t.numel() * t.element_size() for t in a.ema.state_dict().values())
    tmp, needed = a.manager._begin(1)
    assert needed == model + trainer + ema
    tmp.rmdir()
    a.manager.latest_bytes = 12345
    tmp, needed = a.manager._begin(1)
    assert needed == 12345


def test_a_rank_file_that_fails_reports_its_errno_and_message(tmp_path):
    a = _run(tmp_path)
    own = {"data": {"epoch": 0, "batch": 0}}
    tmp = a.store.begin(0)
    (tmp / "rank_0.json").mkdir()  # something in the way: the rename onto it fails with EISDIR
    (tmp / "rank_0.json" / "x").write_text("x")
    digest, size, error = a.manager._write_rank_file(tmp, own)
    assert (digest, size) == (None, 0)
    code, message = error
    assert code == errno.EISDIR
    assert message.startswith("rank 0 could not write rank_0.json: [Errno 21] Is a directory: ")
    shutil.rmtree(tmp)
    here = a.store.begin(0)
    digest, size, error = a.manager._write_rank_file(here, own)
    assert error is None and size == (here / "rank_0.json").stat().st_size and len(digest) == 64


def test_resume_without_a_scaler_ignores_the_saved_one_and_elastic_is_off_by_default(tmp_path):
    a = _run(tmp_path)
    a.manager.save()
    b = _run(tmp_path, scaler=False)
    assert b.manager.resume("auto") is not None  # the saved scaler state is not forced on a run without one
    c = _run(tmp_path, shape={**SHAPE, "world_size": 2, "rows_per_rank": 4})
    manager = CheckpointManager(
        c.store,
        None,
        rank=0,
        model=c.model,
        optimizer=c.opt,
        ema=None,
        scaler=None,
        counters=Counters(),
        rank_states={},
        shape={**SHAPE, "world_size": 2, "rows_per_rank": 4},
        describe=dict,
    )
    with pytest.raises(CheckpointError, match=r"world_size: checkpoint 1 vs now 2 \(to resume"):
        manager.check_compatible({"shape": SHAPE}, "ck")


def test_a_refused_resume_names_the_checkpoint_path(tmp_path):
    a = _run(tmp_path)
    path = a.manager.save()
    b = _run(tmp_path, shape={**SHAPE, "arch": "other"})
    with pytest.raises(CheckpointError) as err:
        b.manager.resume("auto")
    assert str(err.value).startswith(f"cannot resume from {path}: arch: checkpoint 'tiny' vs now 'other'")


def test_a_reshard_of_a_checkpoint_without_the_shared_state_reads_rank_0s_file(tmp_path, caplog):
    log = []
    old = {**SHAPE, "rows_per_rank": 4, "world_size": 2}
    a = _run(tmp_path, shape=old, rank_states={"data": Recorder("data", log, 7), "rng": Recorder("rng", log, 9)})
    a.counters.step = 5
    path = a.manager.save()
    # What an older version wrote: state.json without "reshard" (rewritten through the store: a verified checkpoint).
    tmp = a.store.begin(6)
    for name in ("model.safetensors", "trainer.safetensors"):
        a.store.write_tensors(tmp, name, a.store.read_tensors(path, name))
    state = a.store.read_json(path, "state.json")
    state.pop("reshard")
    state["step"] = 6
    a.store.write_json(tmp, "state.json", state)
    rank0 = a.store.read_json(path, "rank_0.json")
    rank0["data"]["value"] = 8
    a.store.write_json(tmp, "rank_0.json", rank0)
    a.store.commit(tmp, 6)
    fresh = {"data": Recorder("data", log), "rng": Recorder("rng", log)}
    b = _run(tmp_path, shape={**SHAPE, "rows_per_rank": 8, "world_size": 1}, elastic=True, rank_states=fresh)
    with caplog.at_level("WARNING", logger="mixmo_dist"):
        b.manager.resume("auto")
    assert log == [("data", "resharded", [8], 6), ("rng", "resharded", [9], 6)]
    assert (
        f"resuming {tmp_path / 'checkpoints' / 'step_00000006'}, saved by 2 ranks, on 1 ranks with the same global "
        "batch of 8 rows: the remaining samples of the epoch are the same, but per-rank batches, member pairings and "
        "RNG streams differ from an uninterrupted run (the streams are re-derived from run.seed, each rank and the "
        "step)"
    ) in caplog.text


def test_a_commit_takes_the_ranks_digests_and_a_failed_commit_is_a_save_error(tmp_path, monkeypatch):
    import mixmo_dist.checkpoint.store as store_module

    a = _run(tmp_path)
    hashed = []
    sha256_file = store_module.sha256_file
    monkeypatch.setattr(store_module, "sha256_file", lambda p: (hashed.append(os.path.basename(p)), sha256_file(p))[1])
    path = a.manager.save()
    assert "rank_0.json" not in hashed  # its writer's digest is used: rank 0 does not read every rank's file again
    assert json.loads((path / "COMPLETE").read_text())["rank_0.json"] == sha256_file(path / "rank_0.json")

    def refuse(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(a.store, "commit", refuse)
    with pytest.raises(Exception, match="checkpoint save at step 0 failed: no space left on"):  # every rank stops
        a.manager.save()
    assert a.manager.latest == path and not list(a.store.root.glob(".tmp_*"))


def test_space_checks_logs_and_the_errno_behind_a_rank_files_failure(tmp_path, monkeypatch, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="mixmo_dist")
    a = _run(tmp_path)
    first = a.manager.save()
    assert f"saved checkpoint {first}" in [r.getMessage() for r in caplog.records]
    # Exactly as much free space as the last save took is enough.
    monkeypatch.setattr("mixmo_dist.checkpoint.state._free_bytes", lambda root: a.manager.latest_bytes)
    a.counters.step = 1
    assert a.manager.save().name == "step_00000001"
    monkeypatch.setattr("mixmo_dist.checkpoint.state._free_bytes", lambda root: 0)
    a.counters.step = 2
    with pytest.raises(Exception, match=f"not started: the file system of {re.escape(str(a.store.root))} has 0.0 MB"):
        a.manager.save()
    monkeypatch.undo()
    # A rank file whose write fails with a CheckpointError caused by a full disk: the full disk is named.
    write_json_digest = a.store.write_json_digest

    def full(tmp, name, obj):
        if name.startswith("rank_"):
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError as cause:
                raise CheckpointError(f"cannot write {name}") from cause
        return write_json_digest(tmp, name, obj)

    a.store.write_json_digest = full
    with pytest.raises(Exception, match="checkpoint save at step 2 failed: no space left on the file system of"):
        a.manager.save()
    # A begin that fails for lack of space names the size a checkpoint takes.
    a.store.write_json_digest = write_json_digest

    def no_begin(step):
        raise OSError(errno.ENOSPC, "No space left on device")

    a.store.begin = no_begin
    with pytest.raises(Exception, match=r"no space left on .* \(a checkpoint takes about \d+\.\d MB"):
        a.manager.save()
