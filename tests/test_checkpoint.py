"""Tests of the checkpoint storage layer and the run lock, on real files and real processes (SIGKILL included)."""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

from mixmo_dist import checkpoint as ckpt_package
from mixmo_dist.checkpoint import CheckpointError, CheckpointWarning
from mixmo_dist.checkpoint.lock import RunLock
from mixmo_dist.checkpoint.store import CheckpointStore, parse_step_dir_name
from mixmo_dist.runtime.files import sha256_file

REPO = Path(__file__).resolve().parents[1]
# Child processes import torch: one thread each keeps them from fighting over the 2 cores.
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def save(store: CheckpointStore, step: int, n: int = 8) -> Path:
    """Commit a small checkpoint whose values encode `step`, so a test can tell which one it loaded."""
    tmp = store.begin(step)
    store.write_tensors(tmp, "model.safetensors", {"w": torch.full((n,), float(step))}, metadata={"step": str(step)})
    store.write_json(tmp, "state.json", {"step": step})
    return store.commit(tmp, step)


def dir_names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def no_checkpoint_warnings(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)
        return fn(*args)


# ---------------------------------------------------------------------------------------------------- round trip


def test_round_trip_of_tensors_and_json(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints", keep_last=3)
    weight = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tensors = {
        "weight": weight,
        "tied": weight,  # same tensor twice: safetensors alone refuses shared memory
        "row": weight[1],  # a view into the same storage
        "transposed": weight.t(),  # not contiguous
        "half": torch.tensor([1.5, -2.25], dtype=torch.bfloat16),
        "counter": torch.tensor(7, dtype=torch.int64),
        "flags": torch.tensor([True, False]),
        "empty": torch.zeros(0, 5),
        "grad_param": torch.nn.Parameter(torch.ones(2, 2)),
    }
    state = {"step": 3, "config": {"lr": 0.1, "name": "r50"}, "classes": ["a", "b"], "inf": float("inf")}
    tmp = store.begin(3)
    assert re.fullmatch(rf"\.tmp_step_00000003_{os.getpid()}", tmp.name)
    store.write_tensors(tmp, "model.safetensors", tensors, metadata={"format": "mixmo"})
    store.write_json(tmp, "state.json", state)
    final = store.commit(tmp, 3)

    assert final == tmp_path / "checkpoints" / "step_00000003"
    assert no_checkpoint_warnings(store.find_latest) == final
    assert (final.parent / "latest").read_text() == "step_00000003\n"
    assert dir_names(final.parent) == ["latest", "step_00000003"]  # no temporary left behind
    marker = json.loads((final / "COMPLETE").read_text())
    assert marker == {
        "step": 3,
        "model.safetensors": sha256_file(final / "model.safetensors"),
        "state.json": sha256_file(final / "state.json"),
    }
    assert store.verify(final) is None

    loaded = store.read_tensors(final, "model.safetensors")
    assert loaded.keys() == tensors.keys()
    for key, value in tensors.items():
        assert loaded[key].dtype == value.dtype, key
        assert torch.equal(loaded[key], value.detach()), key
    # The tied entries were stored as independent copies, not aliases of one buffer.
    loaded["weight"][0, 0] = 100.0
    assert loaded["tied"][0, 0] == 0.0
    assert store.read_metadata(final, "model.safetensors") == {"format": "mixmo"}
    assert store.read_json(final, "state.json") == state


def test_safetensors_file_is_not_pickle_and_module_never_pickles(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=1)
    final = save(store, 1)
    header_len = int.from_bytes((final / "model.safetensors").read_bytes()[:8], "little")
    header = json.loads((final / "model.safetensors").read_bytes()[8 : 8 + header_len])
    assert header["w"]["dtype"] == "F32" and header["w"]["shape"] == [8]
    for module in sorted(Path(ckpt_package.__file__).parent.glob("*.py")):
        source = module.read_text()
        for forbidden in ("import pickle", "torch.save(", "torch.load("):
            assert forbidden not in source, module


def test_sha256_file_streams_large_file(tmp_path):
    import hashlib

    data = os.urandom((1 << 20) * 2 + 123)  # crosses the 1 MiB chunk boundary
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_other_rank_writes_into_tmp_dir_found_by_step(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints", keep_last=2)
    tmp = store.begin(5)
    store.write_json(tmp, "rank_0.json", {"rank": 0})
    rank1 = textwrap.dedent(
        """
        import sys, torch
        from mixmo_dist.checkpoint.store import CheckpointStore
        store = CheckpointStore(sys.argv[1], keep_last=2)
        tmp = store.tmp_dir(5)
        store.write_json(tmp, "rank_1.json", {"rank": 1})
        store.write_tensors(tmp, "rank_1.safetensors", {"gen": torch.tensor([1, 2, 3], dtype=torch.uint8)})
        """
    )
    subprocess.run([sys.executable, "-c", rank1, str(store.root)], env=CHILD_ENV, check=True, timeout=120)
    final = store.commit(tmp, 5)
    marker = json.loads((final / "COMPLETE").read_text())
    assert sorted(marker) == ["rank_0.json", "rank_1.json", "rank_1.safetensors", "step"]
    assert store.read_json(final, "rank_1.json") == {"rank": 1}
    assert store.read_tensors(final, "rank_1.safetensors")["gen"].tolist() == [1, 2, 3]


# ---------------------------------------------------------------------------------------------------- pruning


def test_keep_last_prunes_old_complete_checkpoints_only(tmp_path):
    root = tmp_path / "checkpoints"
    store = CheckpointStore(root, keep_last=2)
    save(store, 1)
    with pytest.warns(CheckpointWarning, match="moved aside to step_00000002.corrupt-.*: by hand"):
        aside = store.move_aside(save(store, 2), "by hand")  # must survive every prune
    for step in (3, 4, 5):
        save(store, step)
    assert [p.name for _, p in store.step_dirs()] == ["step_00000004", "step_00000005"]
    assert aside is not None and aside.is_dir() and (aside / "model.safetensors").is_file()
    assert store.read_json(store.find_latest(), "state.json") == {"step": 5}

    keep_one = CheckpointStore(root, keep_last=1)
    save(keep_one, 6)
    assert [p.name for _, p in keep_one.step_dirs()] == ["step_00000006"]
    assert not any(name.startswith(".trash_") for name in dir_names(root))


def test_commit_of_existing_step_moves_old_aside_and_later_steps_are_superseded(tmp_path):
    root = tmp_path / "checkpoints"
    store = CheckpointStore(root, keep_last=5)
    for step in (1, 2, 3):
        save(store, step)
    # Resuming from step 1 and saving step 2 again forks the run: old 2 is replaced, 3 belongs to the old branch.
    with pytest.warns(CheckpointWarning) as record:
        tmp = store.begin(2)
        store.write_json(tmp, "state.json", {"step": 2, "branch": "new"})
        store.commit(tmp, 2)
    messages = " ".join(str(w.message) for w in record)
    assert "step_00000002" in messages and "step_00000003" in messages
    assert [p.name for _, p in store.step_dirs()] == ["step_00000001", "step_00000002"]
    assert store.read_json(store.find_latest(), "state.json") == {"step": 2, "branch": "new"}
    names = dir_names(root)
    assert sum(n.startswith("step_00000002.replaced-") for n in names) == 1
    assert sum(n.startswith("step_00000003.superseded-") for n in names) == 1


# ---------------------------------------------------------------------------------------------------- corruption


def _truncate(path: Path) -> None:
    file = path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-10])


def _flip_byte(path: Path) -> None:
    file = path / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF
    file.write_bytes(bytes(data))


def _drop_marker(path: Path) -> None:
    (path / "COMPLETE").unlink()


def _garbage_marker(path: Path) -> None:
    (path / "COMPLETE").write_bytes(b"\x00{not json")


def _marker_lists_missing(path: Path) -> None:
    marker = json.loads((path / "COMPLETE").read_text())
    marker["rank_1.json"] = "0" * 64
    (path / "COMPLETE").write_text(json.dumps(marker))


CORRUPTIONS = {
    "truncated": (_truncate, "sha256 mismatch for model.safetensors"),
    "flipped_byte": (_flip_byte, "sha256 mismatch for model.safetensors"),
    "no_marker": (_drop_marker, "no COMPLETE marker"),
    "garbage_marker": (_garbage_marker, "not valid JSON"),
    "missing_listed_file": (_marker_lists_missing, "listed file rank_1.json is missing"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_newest_is_moved_aside_and_previous_returned(tmp_path, case):
    corrupt, reason = CORRUPTIONS[case]
    root = tmp_path / "checkpoints"
    store = CheckpointStore(root, keep_last=3)
    good = save(store, 1)
    bad = save(store, 2)
    corrupt(bad)
    assert reason in store.verify(bad)
    files_before = sorted(p.name for p in bad.iterdir())

    with pytest.warns(CheckpointWarning, match=rf"step_00000002.*{re.escape(reason)}"):
        assert store.find_latest() == good

    assert not bad.exists()
    aside = [p for p in root.iterdir() if p.name.startswith("step_00000002.corrupt-")]
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == files_before  # kept, not deleted
    assert re.fullmatch(r"step_00000002\.corrupt-\d{8}T\d{6}\.\d{6}Z", aside[0].name)
    assert (root / "latest").read_text().strip() == "step_00000001"  # the hint is repaired
    assert no_checkpoint_warnings(store.find_latest) == good  # nothing left to move


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_a_reader_skips_corrupt_checkpoints_without_writing(tmp_path, case):
    """find_latest(repair=False), what evaluate/export/init_from use: the previous complete checkpoint, a warning
    naming each skipped one, and not a byte changed (the run may be a read-only copy)."""
    corrupt, reason = CORRUPTIONS[case]
    root = tmp_path / "checkpoints"
    store = CheckpointStore(root, keep_last=3)
    good = save(store, 1)
    bad = save(store, 2)
    newer_bad = save(store, 3)
    corrupt(bad)
    corrupt(newer_bad)
    (root / "latest").write_text("step_00000003\n")
    before = _snapshot(root)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert store.find_latest(repair=False) == good
    messages = [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]
    assert len(messages) == 2, messages  # each corrupt one named once
    for path, message in zip((newer_bad, bad), messages):
        assert f"checkpoint {path} is not usable (" in message and reason in message and "skipped" in message
    assert _snapshot(root) == before
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001", "step_00000002", "step_00000003"]


def test_latest_pointing_at_corrupt_dir_falls_back_to_scan(tmp_path):
    root = tmp_path / "checkpoints"
    store = CheckpointStore(root, keep_last=3)
    old = save(store, 1)
    new = save(store, 2)
    (root / "latest").write_text("step_00000001\n")
    # A hint that verifies is used even though a newer directory exists.
    assert no_checkpoint_warnings(store.find_latest) == old
    _flip_byte(old)
    with pytest.warns(CheckpointWarning, match="step_00000001"):
        assert store.find_latest() == new
    assert not old.exists()
    assert (root / "latest").read_text().strip() == "step_00000002"


@pytest.mark.parametrize("hint", ["step_00000009\n", "../../etc/passwd\n", "\xff\xfe garbage"])
def test_latest_naming_missing_or_garbage_falls_back_to_scan(tmp_path, hint):
    root = tmp_path / "checkpoints"
    store = CheckpointStore(root, keep_last=3)
    newest = save(store, 1)
    (root / "latest").write_bytes(hint.encode("latin-1"))
    with pytest.warns(CheckpointWarning, match="scanning"):
        assert store.find_latest() == newest


def test_all_corrupt_or_empty_gives_none(tmp_path):
    store = CheckpointStore(tmp_path / "missing", keep_last=1)
    assert store.find_latest() is None
    store = CheckpointStore(tmp_path / "checkpoints", keep_last=2)
    _drop_marker(save(store, 1))
    with pytest.warns(CheckpointWarning):
        assert store.find_latest() is None
    assert store.step_dirs() == []


# ---------------------------------------------------------------------------------------------------- permissions


def test_checkpoint_and_config_files_follow_the_umask(tmp_path):
    # safetensors alone writes 0o600 and mkstemp too: the group, or a container running under another uid, could
    # not read the weights of a run they can otherwise read (found by `make docker-check`).
    from mixmo_dist.config import Config, dump_config

    old = os.umask(0o022)
    try:
        shared = save(CheckpointStore(tmp_path / "shared", keep_last=1), 1)
        dump_config(Config(), tmp_path / "shared" / "config.yaml")
        os.umask(0o077)
        private = save(CheckpointStore(tmp_path / "private", keep_last=1), 1)
        dump_config(Config(), tmp_path / "private" / "config.yaml")
    finally:
        os.umask(old)
    for final, mode in ((shared, 0o644), (private, 0o600)):
        files = [*final.iterdir(), final.parent / "latest", final.parent / "config.yaml"]
        assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: oct(mode) for p in files}


_FIND_LATEST = textwrap.dedent(
    """
    import sys, warnings
    from mixmo_dist.checkpoint import CheckpointError
    from mixmo_dist.checkpoint.store import CheckpointStore
    warnings.simplefilter("error")
    try:
        print("found", CheckpointStore(sys.argv[1], keep_last=3).find_latest())
    except CheckpointError as err:
        print("CheckpointError:", err)
    """
)


def _find_latest_as_another_user(root: Path) -> str:
    """find_latest() in a child process for which file permissions apply (root reads and renames anything)."""
    prefix = []
    if os.geteuid() == 0:
        # Still root (the interpreter may live under /root), but without the capabilities that bypass file modes.
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("needs setpriv (util-linux) to drop root's permission override")
        prefix = [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--"]
    res = subprocess.run(
        [*prefix, sys.executable, "-c", _FIND_LATEST, str(root)],
        env=CHILD_ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_unreadable_checkpoint_is_an_error_and_is_not_moved_aside(tmp_path):
    root = tmp_path / "checkpoints"
    store = CheckpointStore(root, keep_last=3)
    save(store, 1)
    newest = save(store, 2)
    (newest / "model.safetensors").chmod(0o000)  # as another user's private file: not damage
    out = _find_latest_as_another_user(root)
    assert out.startswith("CheckpointError:") and "no permission to read model.safetensors" in out, out
    assert str(newest) in out
    assert dir_names(root) == ["latest", "step_00000001", "step_00000002"]  # nothing moved aside
    (newest / "model.safetensors").chmod(0o644)
    assert _find_latest_as_another_user(root) == f"found {newest}"


def test_corrupt_checkpoint_that_cannot_be_moved_aside_is_an_error(tmp_path):
    root = tmp_path / "checkpoints"
    store = CheckpointStore(root, keep_last=3)
    save(store, 1)
    _drop_marker(save(store, 2))
    root.chmod(0o555)  # as a read-only mount (a container that mounts runs/ with :ro)
    try:
        out = _find_latest_as_another_user(root)
    finally:
        root.chmod(0o755)
    assert out.startswith("CheckpointError:") and "step_00000002 is unusable: no COMPLETE marker" in out, out
    assert "cannot be moved aside" in out
    assert dir_names(root) == ["latest", "step_00000001", "step_00000002"]


def test_tmp_dirs_are_never_candidates_and_cleanup_removes_them(tmp_path):
    root = tmp_path / "checkpoints"
    store = CheckpointStore(root, keep_last=3)
    good = save(store, 1)
    # A save of step 2 killed after its marker was written but before the rename.
    stale = root / ".tmp_step_00000002_999999"
    stale.mkdir()
    (stale / "state.json").write_text('{"step": 2}')
    (stale / "COMPLETE").write_text(json.dumps({"step": 2, "state.json": sha256_file(stale / "state.json")}))
    (root / ".trash_step_00000000_abc").mkdir()
    (root / "latest").unlink()
    assert no_checkpoint_warnings(store.find_latest) == good
    assert store.tmp_dir(2) == stale
    removed = store.cleanup_tmp()
    assert sorted(p.name for p in removed) == [".tmp_step_00000002_999999", ".trash_step_00000000_abc"]
    assert dir_names(root) == ["latest", "step_00000001"]
    with pytest.raises(CheckpointError, match="begin"):
        store.tmp_dir(2)


def test_begin_replaces_stale_tmp_of_same_step(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=1)
    stale = tmp_path / ".tmp_step_00000004_123"
    stale.mkdir()
    (stale / "junk.json").write_text("{}")
    tmp = store.begin(4)
    assert not stale.exists() and store.tmp_dir(4) == tmp
    store.write_json(tmp, "state.json", {})
    assert sorted(json.loads((store.commit(tmp, 4) / "COMPLETE").read_text())) == ["state.json", "step"]


# ---------------------------------------------------------------------------------------------------- errors


def test_bad_input_raises_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointStore(tmp_path, keep_last=0)
    with pytest.raises(TypeError, match="keep_last"):
        CheckpointStore(tmp_path, keep_last="2")
    store = CheckpointStore(tmp_path / "checkpoints", keep_last=2)
    with pytest.raises(ValueError, match=">= 0"):
        store.begin(-1)
    with pytest.raises(TypeError, match="step"):
        store.step_dir_name(1.0)
    final = save(store, 1)
    with pytest.raises(CheckpointError, match="never into a committed checkpoint"):
        store.write_json(final, "extra.json", {})
    tmp = store.begin(2)
    for name in ("../x.json", ".hidden.json", "COMPLETE", "state.txt"):
        with pytest.raises(ValueError, match="checkpoint file name"):
            store.write_json(tmp, name, {})
    with pytest.raises(TypeError, match="bad.json"):
        store.write_json(tmp, "bad.json", {"t": torch.ones(1)})
    with pytest.raises(TypeError, match="'x'.*torch.Tensor"):
        store.write_tensors(tmp, "m.safetensors", {"x": [1.0]})
    with pytest.raises(TypeError, match="metadata"):
        store.write_tensors(tmp, "m.safetensors", {"x": torch.ones(1)}, metadata={"a": 1})
    with pytest.raises(CheckpointError, match="empty"):
        store.commit(tmp, 2)
    with pytest.raises(CheckpointError, match="not for step 3"):
        store.commit(tmp, 3)
    (tmp / ".state.json.part-x").write_text("half")
    with pytest.raises(CheckpointError, match="unfinished"):
        store.commit(tmp, 2)

    with pytest.raises(CheckpointError, match=rf"{re.escape(str(final))}.*rank_3\.json"):
        store.read_json(final, "rank_3.json")
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(final))}.*trainer\.safetensors"):
        store.read_tensors(final, "trainer.safetensors")
    (final / "state.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="state.json"):
        store.read_json(final, "state.json")
    assert parse_step_dir_name("step_00000042") == 42
    assert parse_step_dir_name("step_42") is None
    assert parse_step_dir_name("step_00000042.corrupt-x") is None


def test_resolve(tmp_path):
    root = tmp_path / "checkpoints"
    store = CheckpointStore(root, keep_last=3)
    assert store.resolve("auto") is None  # fresh run
    first = save(store, 1)
    second = save(store, 2)
    assert store.resolve("never") is None
    assert store.resolve("auto") == second
    assert store.resolve(str(first)) == first  # an explicit older checkpoint wins over the newest
    with pytest.raises(CheckpointError, match=re.escape(str(root / "step_00000007"))):
        store.resolve(str(root / "step_00000007"))
    _truncate(first)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(first))}.*sha256 mismatch"):
        store.resolve(str(first))
    assert first.is_dir()  # an explicit path is the user's: reported, never moved
    with pytest.raises(CheckpointError, match="is not step_"):
        store.resolve(str(root))
    with pytest.raises(TypeError, match="checkpoint.resume"):
        store.resolve(None)


# ---------------------------------------------------------------------------------------------------- SIGKILL

SAVER = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(1)
    from mixmo_dist.checkpoint.lock import RunLock
    from mixmo_dist.checkpoint.store import CheckpointStore
    out, n = sys.argv[1], int(sys.argv[2])
    with RunLock(out):
        store = CheckpointStore(out + "/checkpoints", keep_last=2)
        store.cleanup_tmp()
        latest = store.find_latest()
        step = 0 if latest is None else store.read_json(latest, "state.json")["step"]
        while True:
            step += 1
            tmp = store.begin(step)
            model = {"a": torch.full((n,), float(step)), "b": torch.arange(n) + step}
            store.write_tensors(tmp, "model.safetensors", model)
            store.write_tensors(tmp, "trainer.safetensors", {"c": torch.full((n // 4,), -float(step))})
            store.write_json(tmp, "state.json", {"step": step})
            store.commit(tmp, step)
            print(step, flush=True)
    """
)


def _read_all(file) -> str:
    file.seek(0)
    return file.read().decode(errors="replace")


@pytest.mark.skipif(
    "MUTANT_UNDER_TEST" in os.environ,
    reason="20 SIGKILLed writer processes (17 s): under make mutation it would run for every mutant of the store, "
    "and the writers' own calls are in subprocesses, which mutmut does not record",
)
def test_sigkill_during_saves_always_leaves_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "run"
    n = 1 << 21  # 8 MiB + 16 MiB + 2 MiB per checkpoint: saves take long enough to be hit mid-write
    rng = random.Random(1234)
    store = CheckpointStore(out / "checkpoints", keep_last=2)
    previous = 0
    for kill in range(6):
        with open(tmp_path / f"stderr_{kill}.txt", "w+b") as stderr:
            child = subprocess.Popen(
                [sys.executable, "-c", SAVER, str(out), str(n)], stdout=subprocess.PIPE, stderr=stderr, env=CHILD_ENV
            )
            try:
                first = child.stdout.readline()  # one more commit than at the last kill: the run makes progress
                assert first.strip(), f"saver died: {_read_all(stderr)}"
                time.sleep(rng.uniform(0.0, 0.6))
                assert child.poll() is None, f"saver died: {_read_all(stderr)}"
            finally:
                child.send_signal(signal.SIGKILL)
                child.wait()
                child.stdout.close()
            assert "Traceback" not in _read_all(stderr)
        # Nothing committed can be corrupt, whatever moment the kill hit: no warning, nothing moved aside.
        latest = no_checkpoint_warnings(store.find_latest)
        assert latest is not None and store.verify(latest) is None
        step = parse_step_dir_name(latest.name)
        assert step >= max(previous, int(first))
        previous = step
        model = store.read_tensors(latest, "model.safetensors")
        assert torch.equal(model["a"], torch.full((n,), float(step)))
        assert torch.equal(model["b"], torch.arange(n) + step)
        assert torch.equal(store.read_tensors(latest, "trainer.safetensors")["c"], torch.full((n // 4,), -float(step)))
        assert store.read_json(latest, "state.json") == {"step": step}
        assert not any(".corrupt-" in name for name in dir_names(store.root))
        # Renames are the only steps that touch committed names, so every step directory is whole, not just latest.
        assert all(store.verify(path) is None for _, path in store.step_dirs())
        assert len(store.step_dirs()) <= store.keep_last + 1  # a kill may come between rename and prune
    # The last saver was killed holding the run lock: the kernel released it, the next run takes it at once.
    with RunLock(out):
        assert json.loads((out / ".lock").read_text())["pid"] == os.getpid()


# ---------------------------------------------------------------------------------------------------- run lock

HOLDER = textwrap.dedent(
    """
    import sys
    from mixmo_dist.checkpoint.lock import RunLock
    lock = RunLock(sys.argv[1])
    lock.acquire()  # never released by the program: only the process's end releases it
    print("locked", flush=True)
    sys.stdin.read()
    """
)


def _start_holder(out: Path) -> subprocess.Popen:
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=CHILD_ENV,
        text=True,
    )
    assert child.stdout.readline().strip() == "locked"
    return child


def test_run_lock_refused_while_other_process_lives_then_free_at_its_exit(tmp_path):
    out = tmp_path / "run"
    child = _start_holder(out)
    try:
        holder = json.loads((out / ".lock").read_text())
        assert holder["pid"] == child.pid and holder["host"] == socket.gethostname()
        with pytest.raises(CheckpointError) as err:
            RunLock(out).acquire()
        message = str(err.value)
        assert f"another run (pid {child.pid} on host {socket.gethostname()} since {holder['started']})" in message
        assert str(out) in message and "run.output_dir" in message
    finally:
        child.stdin.close()
        assert child.wait(timeout=60) == 0
    with RunLock(out) as lock:
        assert lock.held
        assert json.loads((out / ".lock").read_text())["pid"] == os.getpid()
    assert not lock.held


@pytest.mark.parametrize("how", ["SIGKILL", "zombie"])
def test_run_lock_of_killed_process_is_free_at_once(tmp_path, how):
    """The kernel drops a flock when the process dies; a zombie (killed, not yet reaped) holds nothing either."""
    out = tmp_path / "run"
    child = _start_holder(out)
    child.send_signal(signal.SIGKILL)
    try:
        if how == "SIGKILL":
            child.wait()
        else:
            deadline = time.monotonic() + 30
            while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z":
                assert time.monotonic() < deadline
                time.sleep(0.01)
        with RunLock(out) as lock:
            assert lock.held
    finally:
        child.wait()


def test_run_lock_ignores_the_content_of_a_lock_file_nobody_holds(tmp_path):
    """A lock file written on another host, or garbage, holds nothing: only the kernel lock counts."""
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(json.dumps({"pid": 4242, "host": "some-other-node", "started": "2020"}))
    with RunLock(out):
        assert json.loads((out / ".lock").read_text())["host"] == socket.gethostname()
    (out / ".lock").write_text("not json")
    with RunLock(out):
        pass


def test_run_lock_is_exclusive_within_one_process_too(tmp_path):
    out = tmp_path / "run"
    lock = RunLock(out)
    lock.acquire()
    lock.acquire()  # no-op while held
    with pytest.raises(CheckpointError, match=f"pid {os.getpid()}"):
        RunLock(out).acquire()
    lock.release()
    lock.release()  # safe twice
    with RunLock(out):
        pass


def test_run_lock_is_not_inherited_by_exec(tmp_path):
    """A program the rank starts (git, scontrol) must not keep the lock alive after the rank ends."""
    out = tmp_path / "run"
    with RunLock(out):
        sleeper = subprocess.Popen(["sleep", "60"])
    try:
        with RunLock(out):  # the sleeper, started while the lock was held, does not hold it
            pass
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS])
def test_run_lock_on_a_file_system_without_locks_is_a_clear_error(tmp_path, monkeypatch, code):
    """Lustre without -o flock, NFS with nolock: flock fails with one of these; the run must not go on unlocked."""
    import fcntl

    def refuse(fd, op):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", refuse)
    with pytest.raises(CheckpointError, match=r"refuses file locks .*flock support"):
        RunLock(tmp_path / "run").acquire()


def test_auto_refuses_when_every_checkpoint_is_corrupt_and_never_starts_fresh(tmp_path):
    """A silent restart at step 0 would throw the run away (issue 20): refused, now and at the next start, while the
    corrupt directories are kept (moved aside); `never` is how a user asks for the restart."""
    store = CheckpointStore(tmp_path / "checkpoints", keep_last=3)
    _truncate(save(store, 1))
    _drop_marker(save(store, 2))
    refusal = (
        r"no checkpoint under .* passes its sha256 check.*"
        r"step_00000001\.corrupt-.*, step_00000002\.corrupt-.*--checkpoint\.resume=never"
    )
    with pytest.warns(CheckpointWarning, match="moved aside"), pytest.raises(CheckpointError, match=refusal):
        store.resolve("auto")
    assert store.step_dirs() == [] and len(list(store.root.glob("step_*.corrupt-*"))) == 2
    with pytest.raises(CheckpointError, match=refusal):  # the next start finds only the moved-aside ones
        store.resolve("auto")
    assert store.resolve("never") is None
    assert save(store, 1) and store.resolve("auto") == store.root / "step_00000001"  # a new checkpoint ends it


def test_a_changed_class_list_is_named_by_its_difference_not_by_two_whole_lists(tmp_path):
    """Resuming on data whose class folders changed: the counts and a few names of what was added and removed, on
    one short line, not 2 x 1000 names (issue 20)."""
    from mixmo_dist.checkpoint.state import CheckpointManager

    classes = [f"n{i:08d}" for i in range(1000)]
    now = [*classes[:10], "n_renamed_a", *classes[11:500], "n_renamed_b", *classes[501:], "n_new_1", "n_new_2"]
    model = torch.nn.Linear(2, 2)
    shape = {"arch": "resnet18", "num_members": 2, "num_classes": 1002, "rows_per_rank": 8, "world_size": 1}
    manager = CheckpointManager(
        CheckpointStore(tmp_path / "checkpoints", keep_last=1),
        None,  # check_compatible runs no collective
        rank=0,
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        ema=None,
        scaler=None,
        counters=model,
        rank_states={},
        shape={**shape, "classes": now},
        describe=dict,
    )
    saved = {"shape": {**shape, "num_classes": 1000, "classes": classes}}
    with pytest.raises(CheckpointError) as info:
        manager.check_compatible(saved, tmp_path / "step_00000006")
    message = str(info.value)
    assert (
        "classes: the checkpoint has 1000, the data 1002; 4 not in the checkpoint ('n_renamed_a', 'n_renamed_b', "
        "'n_new_1', ... (1 more)); 2 missing from the data ('n00000010', 'n00000500')"
    ) in message, message
    assert "num_classes: checkpoint 1000 vs now 1002" in message and "\n" not in message and len(message) < 700
    reordered = [now[1], now[0], *now[2:]]
    with pytest.raises(CheckpointError, match=r"another order \(label 0: checkpoint 'n00000001', now 'n00000000'\)"):
        manager.check_compatible({"shape": {**shape, "classes": reordered}}, "step")
