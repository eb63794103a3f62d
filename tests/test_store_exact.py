"""checkpoint/store at the inputs its first `make mutation` pass found untested (issue 22): every refusal's whole
message, the names moved-aside directories get, the exact bytes of the marker and of JSON files, tied tensors,
step 0, and `resolve_checkpoint`. In process and fast."""

from __future__ import annotations

import json
import os
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch

from mixmo_dist.checkpoint import CheckpointError, CheckpointWarning
from mixmo_dist.checkpoint.store import CheckpointStore, parse_step_dir_name, resolve_checkpoint
from mixmo_dist.runtime.files import sha256_file

# Run by `make mutation`: the package is mutmut's copy under mutants/, every function behind a trampoline.
_UNDER_MUTMUT = "mutants" in Path(sys.modules[CheckpointStore.__module__].__file__).parts


def _store(tmp_path, keep=3):
    return CheckpointStore(tmp_path / "checkpoints", keep_last=keep)


def _save(store, step, value=1.0):
    tmp = store.begin(step)
    store.write_tensors(tmp, "model.safetensors", {"w": torch.full((2,), value)})
    store.write_json(tmp, "state.json", {"step": step, "b": [1, 2], "a": {"z": 1, "y": 2}})
    return store.commit(tmp, step)


def _error(fn, *args, kind=Exception):
    with pytest.raises(kind) as err:
        fn(*args)
    return str(err.value)


def test_step_zero_is_a_step_and_names_are_canonical(tmp_path):
    store = _store(tmp_path)
    assert _save(store, 0).name == "step_00000000"
    assert parse_step_dir_name("step_00000000") == 0 and parse_step_dir_name("step_00000042") == 42
    assert parse_step_dir_name("step_42") is None and parse_step_dir_name("step_000000042") is None
    assert _error(store.begin, -1, kind=ValueError) == "checkpoint step must be >= 0, got -1"
    assert _error(store.begin, 1.0, kind=TypeError) == "checkpoint step must be an int, got float (1.0)"
    assert _error(store.begin, True, kind=TypeError) == "checkpoint step must be an int, got bool (True)"


@pytest.mark.parametrize(
    "name, message",
    [
        (".", "checkpoint file name '.' must be a plain, non-hidden file name (no directories)"),
        ("..", "checkpoint file name '..' must be a plain, non-hidden file name (no directories)"),
        (".hidden.json", "checkpoint file name '.hidden.json' must be a plain, non-hidden file name (no directories)"),
        ("a/b.json", "checkpoint file name 'a/b.json' must be a plain, non-hidden file name (no directories)"),
        ("", "checkpoint file name '' must be a plain, non-hidden file name (no directories)"),
        ("COMPLETE", "checkpoint file name 'COMPLETE' is reserved by the checkpoint store"),
        ("state.txt", "checkpoint file name 'state.txt' must end with '.json'"),
    ],
)
def test_file_names_are_refused_by_name(tmp_path, name, message):
    store = _store(tmp_path)
    tmp = store.begin(1)
    assert _error(store.write_json, tmp, name, {}, kind=ValueError) == message
    assert _error(store.write_json, tmp, 3, {}, kind=TypeError) == "checkpoint file name must be a str, got int (3)"
    tensors = "model.json" if name == "state.txt" else name
    if name == "state.txt":
        msg = "checkpoint file name 'model.json' must end with '.safetensors'"
        assert _error(store.write_tensors, tmp, tensors, {"w": torch.ones(1)}, kind=ValueError) == msg


def test_tensors_to_store_are_checked_by_name_and_tied_ones_kept_apart(tmp_path):
    store = _store(tmp_path)
    tmp = store.begin(1)
    file = tmp / "m.safetensors"
    assert _error(store.write_tensors, tmp, "m.safetensors", [1], kind=TypeError) == (
        f"{file}: tensors must be a dict[str, Tensor], got list"
    )
    assert _error(store.write_tensors, tmp, "m.safetensors", {1: torch.ones(1)}, kind=TypeError) == (
        f"{file}: tensor key 1 must be a str, got int"
    )
    assert _error(store.write_tensors, tmp, "m.safetensors", {"a": [1.0]}, kind=TypeError) == (
        f"{file}: value of 'a' must be a torch.Tensor, got list"
    )
    sparse = torch.eye(2).to_sparse()
    assert _error(store.write_tensors, tmp, "m.safetensors", {"s": sparse}, kind=TypeError) == (
        f"{file}: tensor 's' has layout torch.sparse_coo; only dense tensors can be stored"
    )
    base = torch.arange(6.0)
    tensors = {
        "a": base,
        "b": base,
        "c": base[2:4],
        "e1": torch.zeros(0),
        "e2": torch.zeros(0, 3),
        "d": base.view(2, 3).t(),
    }
    store.write_tensors(tmp, "m.safetensors", tensors)
    back = store.read_tensors(tmp, "m.safetensors")
    for key, value in tensors.items():
        assert torch.equal(back[key], value), key


def test_json_and_marker_bytes(tmp_path):
    store = _store(tmp_path)
    path = _save(store, 5)
    text = (path / "state.json").read_text()
    assert text == json.dumps({"step": 5, "b": [1, 2], "a": {"z": 1, "y": 2}}, indent=1, sort_keys=True) + "\n"
    tmp = store.begin(6)
    file, digest = store.write_json_digest(tmp, "rank_0.json", {"x": 1})
    assert store.write_json(tmp, "other.json", {"x": 1}) == tmp / "other.json"  # the path, not the digest
    assert digest == sha256_file(file)
    marker = {"step": 5, "model.safetensors": sha256_file(path / "model.safetensors")}
    marker["state.json"] = sha256_file(path / "state.json")
    assert (path / "COMPLETE").read_text() == json.dumps(marker, indent=1, sort_keys=True) + "\n"
    # A writer's digest is recorded as given, not recomputed (so a wrong one fails the verification).
    store.write_tensors(tmp, "model.safetensors", {"w": torch.ones(1)})
    committed = store.commit(tmp, 6, {"rank_0.json": "0" * 64})
    assert json.loads((committed / "COMPLETE").read_text())["rank_0.json"] == "0" * 64
    assert store.verify(committed) == "sha256 mismatch for rank_0.json (truncated or modified after the save)"


def test_commit_refuses_entries_that_are_no_checkpoint_files_and_missing_reported_ones(tmp_path):
    store = _store(tmp_path)
    tmp = store.begin(1)
    (tmp / "sub").mkdir()
    (tmp / "a.json").write_text("{}")
    assert _error(store.commit, tmp, 1, kind=CheckpointError) == (
        f"{tmp} holds entries that cannot be checkpoint files: ['sub']"
    )
    (tmp / "sub").rmdir()
    os.symlink(tmp / "a.json", tmp / "link.json")
    assert _error(store.commit, tmp, 1, kind=CheckpointError) == (
        f"{tmp} holds entries that cannot be checkpoint files: ['link.json']"
    )
    (tmp / "link.json").unlink()
    reported = {f"rank_{r}.json": "0" * 64 for r in range(7)}
    assert _error(store.commit, tmp, 1, reported, kind=CheckpointError) == (
        f"{tmp} lacks files its writers reported: ['rank_0.json', 'rank_1.json', 'rank_2.json', 'rank_3.json', "
        "'rank_4.json']"
    )


def test_moved_aside_directories_get_numbered_names(tmp_path, monkeypatch):
    store = _store(tmp_path)
    path = _save(store, 1)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        first = store.move_aside(path, "a reason")
        _save(store, 1)
        second = store.move_aside(path, "again", tag="replaced")
    assert re.fullmatch(r"step_00000001\.corrupt-\d{8}T\d{6}\.\d{6}Z", first.name), first.name
    assert re.fullmatch(r"step_00000001\.replaced-\d{8}T\d{6}\.\d{6}Z", second.name), second.name
    assert [str(w.message) for w in seen] == [
        f"checkpoint {path} moved aside to {first.name}: a reason",
        f"checkpoint {path} moved aside to {second.name}: again",
    ]
    # The same stamp again (a fast machine, a clock step): a counter after it makes the name new.
    stamp = first.name.split(".corrupt-")[1]
    (tmp_path / "checkpoints" / f"step_00000002.corrupt-{stamp}").mkdir()
    (tmp_path / "checkpoints" / f"step_00000002.corrupt-{stamp}-1").mkdir()
    monkeypatch.setattr("mixmo_dist.checkpoint.store._utc_stamp", lambda: stamp)  # the clock, not the store
    _save(store, 2)
    with pytest.warns(CheckpointWarning):
        moved = store.move_aside(tmp_path / "checkpoints" / "step_00000002", "r")
    assert moved.name == f"step_00000002.corrupt-{stamp}-2"


def test_an_auto_resume_over_many_corrupt_checkpoints_names_the_last_three(tmp_path):
    store = _store(tmp_path, keep=10)
    for step in range(1, 6):
        (_save(store, step) / "model.safetensors").write_bytes(b"broken")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)
        message = _error(store.resolve, "auto", kind=CheckpointError)
    names = sorted(p.name for p in store.root.iterdir() if ".corrupt-" in p.name)
    assert len(names) == 5
    assert message == (
        f"checkpoint.resume=auto: no checkpoint under {store.root} passes its sha256 check; the corrupt ones are kept "
        f"there, moved aside ({', '.join(names[-3:])} and 2 more), and the run was not restarted from step 0. Put back "
        "an intact copy of a checkpoint, or start again from step 0 with --checkpoint.resume=never"
    )
    store2 = _store(tmp_path / "three", keep=10)
    for step in range(1, 4):
        (_save(store2, step) / "model.safetensors").write_bytes(b"broken")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)
        message = _error(store2.resolve, "auto", kind=CheckpointError)
    assert "more" not in message and message.count(".corrupt-") == 3


def test_explicit_resume_paths_and_their_messages(tmp_path):
    store = _store(tmp_path)
    path = _save(store, 3)
    assert store.resolve(str(path)) == path and store.resolve(path) == path
    assert store.resolve("never") is None
    assert _error(store.resolve, 3, kind=TypeError) == "checkpoint.resume must be 'auto', 'never' or a path, got int"
    absent = tmp_path / "nope"
    assert _error(store.resolve, str(absent), kind=CheckpointError) == (
        f"checkpoint.resume={str(absent)!r}: {absent} does not exist"
    )
    (path / "COMPLETE").unlink()
    assert _error(store.resolve, str(path), kind=CheckpointError) == (
        f"checkpoint.resume={str(path)!r}: {path} is not a usable checkpoint: no COMPLETE marker (the save did not "
        "finish); pass another step directory, or 'auto' to take the newest one that verifies"
    )


@pytest.mark.parametrize(
    "marker, reason",
    [
        ({"step": True, "a.json": "0" * 64}, "COMPLETE marker says step True, the directory is step 1"),
        ({"step": 2, "a.json": "0" * 64}, "COMPLETE marker says step 2, the directory is step 1"),
        ({"step": 1}, "COMPLETE marker lists no files"),
        ({"step": 1, ".a.json": "0" * 64}, "COMPLETE marker lists an invalid file name '.a.json'"),
        ({"step": 1, "d/a.json": "0" * 64}, "COMPLETE marker lists an invalid file name 'd/a.json'"),
        ({"step": 1, "a.json": "xyz"}, "COMPLETE marker has no valid sha256 for a.json"),
        ({"step": 1, "a.json": 5}, "COMPLETE marker has no valid sha256 for a.json"),
        ({"step": 1, "b.json": "0" * 64}, "listed file b.json is missing"),
        ([1, 2], "COMPLETE marker is not a JSON object"),
    ],
)
def test_verify_names_what_is_wrong(tmp_path, marker, reason):
    store = _store(tmp_path)
    path = store.root / "step_00000001"
    path.mkdir(parents=True)
    (path / "a.json").write_text("{}")
    (path / "COMPLETE").write_text(json.dumps(marker))
    assert store.verify(path) == reason
    (tmp_path / "step_00000009").write_text("a file")
    assert store.verify(tmp_path / "step_00000009") == "not a directory"
    assert store.verify(tmp_path / "step_9") == "directory name 'step_9' is not step_<8 digits>"


def test_reading_refuses_other_suffixes_and_names_unreadable_files(tmp_path):
    store = _store(tmp_path)
    path = _save(store, 1)
    assert _error(store.read_json, path, "model.safetensors", kind=ValueError) == (
        "checkpoint file name 'model.safetensors' must end with '.json'"
    )
    assert _error(store.read_tensors, path, "state.json", kind=ValueError) == (
        "checkpoint file name 'state.json' must end with '.safetensors'"
    )
    assert _error(store.read_metadata, path, "state.json", kind=ValueError) == (
        "checkpoint file name 'state.json' must end with '.safetensors'"
    )
    (path / "bad.safetensors").write_bytes(b"not safetensors at all")
    for read in (store.read_tensors, store.read_metadata):
        message = _error(read, path, "bad.safetensors", kind=CheckpointError)
        assert message.startswith(f"checkpoint {path}: cannot read bad.safetensors: ")


def test_latest_hints_that_cannot_be_used_are_named(tmp_path):
    store = _store(tmp_path)
    path = _save(store, 2)
    (store.root / "latest").write_text("x" * 100)
    with pytest.warns(CheckpointWarning) as seen:
        assert store.find_latest() == path
    assert str(seen[0].message) == (
        f"{store.root / 'latest'} holds {'x' * 80!r}, not a checkpoint name; scanning {store.root}"
    )
    (store.root / "latest").write_bytes("step_0000000é".encode())
    with pytest.warns(CheckpointWarning, match=r"latest is unreadable \('ascii' codec"):
        assert store.find_latest() == path


def test_cleanup_removes_every_leftover_and_keeps_the_rest(tmp_path):
    store = _store(tmp_path)
    keep = _save(store, 1)
    dead = [store.root / f".tmp_step_00000003_{2**22 + n}" for n in (1, 2)]
    for d in dead:
        d.mkdir()
    mine = store.begin(4)
    trash = store.root / ".trash_step_00000001_x"
    trash.mkdir()
    part = store.root / ".latest.part-abc"
    part.write_text("step_")
    other = store.root / "notes.txt"
    other.write_text("kept")
    stray = store.root / ".a_stray"  # sorts before every leftover: the scan goes on past what it keeps
    stray.write_text("kept")
    removed = store.cleanup_tmp()
    assert sorted(removed) == sorted([*dead, trash, part])
    kept = ["latest", keep.name, mine.name, "notes.txt", ".a_stray"]
    assert sorted(p.name for p in store.root.iterdir()) == sorted(kept)


def test_resolve_checkpoint_by_step_or_run_directory(tmp_path):
    run = tmp_path / "run"
    store = CheckpointStore(run / "checkpoints", keep_last=3)
    first, second = _save(store, 1), _save(store, 2)
    assert resolve_checkpoint(run) == second and resolve_checkpoint(first) == first
    assert resolve_checkpoint(str(first)) == first
    absent = tmp_path / "absent"
    assert _error(resolve_checkpoint, absent, kind=CheckpointError) == f"checkpoint {absent}: no such file or directory"
    (first / "state.json").write_text("changed")
    assert _error(resolve_checkpoint, first, kind=CheckpointError) == (
        f"checkpoint {first} is not usable: sha256 mismatch for state.json (truncated or modified after the save)"
    )
    assert first.exists()  # a reader never moves anything
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    assert _error(resolve_checkpoint, empty, kind=CheckpointError) == (
        f"run directory {empty} holds no complete checkpoint under {empty / 'checkpoints'}"
    )
    neither = tmp_path / "neither"
    neither.mkdir()
    for path in (neither, Path(second / "state.json")):
        assert _error(resolve_checkpoint, path, kind=CheckpointError) == (
            f"checkpoint {path} is neither a step directory (checkpoints/step_<8 digits>) nor a run output directory "
            "(one holding checkpoints/)"
        )


# --- from the pass of 2026-12-06 (session 4): the survivors a test can tell apart ------------------------------


def test_a_stamp_taken_once_gets_the_first_counter(tmp_path, monkeypatch):
    store = _store(tmp_path)
    stamp = "20261206T000000.000000Z"
    monkeypatch.setattr("mixmo_dist.checkpoint.store._utc_stamp", lambda: stamp)
    (store.root).mkdir(parents=True, exist_ok=True)
    (store.root / f"step_00000003.corrupt-{stamp}").mkdir()
    path = _save(store, 3)
    with pytest.warns(CheckpointWarning):
        assert store.move_aside(path, "r").name == f"step_00000003.corrupt-{stamp}-1"


def test_the_move_aside_stamp_is_utc_whatever_the_local_zone(tmp_path, monkeypatch):
    import time as time_module
    from datetime import datetime, timezone

    monkeypatch.setenv("TZ", "Asia/Tokyo")  # UTC+9, no summer time
    time_module.tzset()
    try:
        from mixmo_dist.checkpoint.store import _utc_stamp

        before = datetime.now(timezone.utc).replace(tzinfo=None)
        taken = datetime.strptime(_utc_stamp(), "%Y%m%dT%H%M%S.%fZ")
        after = datetime.now(timezone.utc).replace(tzinfo=None)
        assert before <= taken <= after
    finally:
        monkeypatch.undo()
        time_module.tzset()


def test_a_refused_restart_names_four_corrupt_checkpoints_as_three_and_one_more_and_three_exactly(tmp_path):
    for count, more in ((4, " and 1 more"), (3, "")):
        store = _store(tmp_path / str(count), keep=10)
        for step in range(1, count + 1):
            (_save(store, step) / "model.safetensors").write_bytes(b"broken")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CheckpointWarning)
            message = _error(store.resolve, "auto", kind=CheckpointError)
        names = sorted(p.name for p in store.root.iterdir() if ".corrupt-" in p.name)
        assert message == (
            f"checkpoint.resume=auto: no checkpoint under {store.root} passes its sha256 check; the corrupt ones are "
            f"kept there, moved aside ({', '.join(names[-3:])}{more}), and the run was not restarted from step 0. "
            "Put back an intact copy of a checkpoint, or start again from step 0 with --checkpoint.resume=never"
        )


def test_warnings_point_at_the_caller_of_the_store(tmp_path):
    """Each CheckpointWarning is attributed to the code that called the store (its `stacklevel`), not to store.py."""
    store = _store(tmp_path, keep=10)
    older, newer = _save(store, 1), _save(store, 2)
    (newer / "model.safetensors").write_bytes(b"broken")
    (store.root / "latest").write_text("step_00000009")  # names a checkpoint that does not exist
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert store.find_latest(repair=False) == older  # the hint's warning, then the broken one passed over
        (store.root / "latest").write_bytes(b"\xff")
        assert store.find_latest(repair=False) == older  # an unreadable hint
        (store.root / "latest").write_text("x" * 100)
        assert store.find_latest(repair=False) == older  # a hint that names no checkpoint
        store.move_aside(newer, "by hand")
    assert len(seen) >= 6, [str(w.message) for w in seen]
    if _UNDER_MUTMUT:
        return  # mutmut's trampolines add frames between the store and its caller: a stacklevel counts them too
    assert [w.filename for w in seen] == [__file__] * len(seen), [(w.filename, str(w.message)) for w in seen]


def test_resolving_a_run_directory_moves_nothing_aside(tmp_path):
    run = tmp_path / "run"
    store = CheckpointStore(run / "checkpoints", keep_last=3)
    older, newer = _save(store, 1), _save(store, 2)
    (newer / "model.safetensors").write_bytes(b"broken")
    with pytest.warns(CheckpointWarning, match="skipped, trying the previous one"):
        assert resolve_checkpoint(run) == older
    assert newer.is_dir() and not [p for p in store.root.iterdir() if ".corrupt-" in p.name]
    assert not (store.root / "latest").exists() or (store.root / "latest").read_text().strip() == newer.name


def test_files_this_process_may_not_read_are_named_not_treated_as_damage(tmp_path, monkeypatch):
    """As root every file is readable, so the file system's PermissionError is raised where the store reads."""
    store = _store(tmp_path)
    path = _save(store, 1)
    denied = PermissionError(13, "Permission denied")
    real_read_bytes = Path.read_bytes

    def read_bytes(self):
        if self.name == "COMPLETE":
            raise denied
        return real_read_bytes(self)

    with monkeypatch.context() as m:
        m.setattr(Path, "read_bytes", read_bytes)
        assert _error(store.verify, path, kind=CheckpointError) == (
            f"checkpoint {path}: no permission to read COMPLETE (Permission denied); it was left where it is. "
            "Run as the user who wrote it, or have its files made readable (e.g. chmod -R g+rX)"
        )
    import mixmo_dist.checkpoint.store as store_module

    real_sha = store_module.sha256_file

    def sha256_file(file):
        if Path(file).name == "state.json":
            raise denied
        return real_sha(file)

    monkeypatch.setattr(store_module, "sha256_file", sha256_file)
    assert _error(store.verify, path, kind=CheckpointError) == (
        f"checkpoint {path}: no permission to read state.json (Permission denied); it was left where it is. "
        "Run as the user who wrote it, or have its files made readable (e.g. chmod -R g+rX)"
    )
    assert path.is_dir()


def test_a_checkpoint_that_cannot_be_moved_aside_is_named_and_left(tmp_path, monkeypatch):
    store = _store(tmp_path)
    path = _save(store, 1)

    def refuse(src, dst):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(os, "rename", refuse)
    assert _error(store.move_aside, path, "a reason", kind=CheckpointError) == (
        f"checkpoint {path} is unusable: a reason; it cannot be moved aside (Read-only file system): move or remove "
        "it by hand"
    )
    assert path.is_dir()


def test_one_element_tensors_sharing_a_storage_are_both_stored(tmp_path):
    store = _store(tmp_path)
    shared = torch.tensor([3.5])
    tmp = store.begin(1)
    store.write_tensors(tmp, "model.safetensors", {"a": shared, "b": shared, "c": shared.view(1)})
    path = store.commit(tmp, 1)
    back = store.read_tensors(path, "model.safetensors")
    assert {k: v.tolist() for k, v in back.items()} == {"a": [3.5], "b": [3.5], "c": [3.5]}


def test_a_commit_lists_every_file_in_its_marker_whether_its_digest_was_given_or_computed(tmp_path):
    store = _store(tmp_path)
    tmp = store.begin(1)
    _, given = store.write_json_digest(tmp, "a.json", {"x": 1})
    store.write_json(tmp, "b.json", {"y": 2})
    store.write_json(tmp, "c.json", {"z": 3})
    path = store.commit(tmp, 1, digests={"a.json": given})
    marker = json.loads((path / "COMPLETE").read_text())
    assert marker == {"step": 1, **{n: sha256_file(path / n) for n in ("a.json", "b.json", "c.json")}}


def test_replaced_and_superseded_checkpoints_are_moved_aside_with_their_reasons(tmp_path):
    store = _store(tmp_path, keep=10)
    _save(store, 1), _save(store, 2), _save(store, 3)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _save(store, 2)  # a resume from step 1 that reached step 2 again: 2 is replaced, 3 superseded
    moved = sorted(p.name for p in store.root.iterdir() if "-" in p.name)
    assert [m.split("-")[0] for m in moved] == ["step_00000002.replaced", "step_00000003.superseded"]
    assert [str(w.message) for w in seen] == [
        f"checkpoint {store.root / 'step_00000002'} moved aside to {moved[0]}: a new checkpoint of step 2 replaces it",
        f"checkpoint {store.root / 'step_00000003'} moved aside to {moved[1]}: step 3 is later than the new "
        "checkpoint step_00000002",
    ]


def test_a_prune_that_fails_is_a_warning_at_the_callers_line_and_the_save_stands(tmp_path, monkeypatch):
    import shutil

    store = _store(tmp_path, keep=1)
    _save(store, 1)

    def refuse(path, *args, **kwargs):
        raise OSError(16, "Device or resource busy")

    monkeypatch.setattr(shutil, "rmtree", refuse)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        tmp = store.begin(2)
        store.write_json(tmp, "state.json", {"step": 2})
        newest = store.commit(tmp, 2)
    assert [str(w.message) for w in seen] == [
        f"could not prune old checkpoint {store.root / 'step_00000001'}: [Errno 16] Device or resource busy"
    ]
    assert [w.category for w in seen] == [CheckpointWarning]
    assert seen[0].filename == __file__ or _UNDER_MUTMUT  # (trampoline frames, above)
    assert store.find_latest() == newest


def test_a_store_of_the_wrong_types_and_a_foreign_temporary_directory_are_refused_by_name(tmp_path):
    assert _error(CheckpointStore, 3, 1, kind=TypeError) == "checkpoint root must be a str or Path, got int"
    message = _error(CheckpointStore, tmp_path, "2", kind=TypeError)
    assert message == "checkpoint keep_last must be an int, got str ('2')"
    store, other = _store(tmp_path / "a"), _store(tmp_path / "b")
    foreign = other.begin(1)  # a real temporary directory, of another store
    assert _error(store.write_json, foreign, "state.json", {}, kind=CheckpointError) == (
        f"{foreign} is not a temporary checkpoint directory made by begin() under {store.root}; files go into the "
        "directory that begin()/tmp_dir() returned, never into a committed checkpoint"
    )
