"""User errors of a training run, tried as a user meets them, with real launches: every one is a single `error:` line
naming the culprit and the fix, printed once per run (by global rank 0, or by the rank that found the bad file),
exit status 2 on every rank, every rank gone in bounded time, and nothing created or lost.

Read-only cases use a real read-only tmpfs mount (root ignores file modes), made and removed by the test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import (
    REPO,
    launch,
    launch_two_machines,
    read_metrics,
    read_only_mount,
    tiny_args,
    train_cli,
    without_root_file_access,
)

from mixmo_dist.checkpoint import CheckpointWarning
from mixmo_dist.checkpoint.store import CheckpointStore
from mixmo_dist.config import DataConfig
from mixmo_dist.data import check_root, scan_split
from mixmo_dist.data.plan import EpochPlan
from mixmo_dist.model import build_model

BACKENDS = ["torch", "dali-cpu"]
# Generous: a healthy failing run ends in well under a minute; a rank left waiting in a collective would hang until
# the process group's timeout (30 minutes).
EXIT_TIMEOUT_S = 400
# An error line as the user sees it; torchrun may prefix a rank's lines with "[rankN]:".
ERROR_LINE = re.compile(r"^(?:\[rank\d+\]:)?\s*error: ", re.MULTILINE)


def _finish(procs: list[subprocess.Popen]) -> list[str]:
    """Every process's output; a process still running after EXIT_TIMEOUT_S fails the test (its group is killed)."""
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=EXIT_TIMEOUT_S)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
            raise AssertionError(
                f"a launcher did not exit within {EXIT_TIMEOUT_S} s: a rank was left waiting"
            ) from None
    return outputs


def _error_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if ERROR_LINE.match(line)]


def _one_error(outputs: list[str], *needles: str) -> str:
    """The one error line of a run (over all its launchers); it must contain every needle and no traceback."""
    text = "\n".join(outputs)
    lines = _error_lines(text)
    assert len(lines) == 1, text[-6000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    # The launcher's own traceback and failure summary (accelerate -> torchrun's ChildFailedError) may follow; no
    # traceback through this package may.
    assert re.search(r'File ".*mixmo_dist/', text) is None, text[-6000:]
    return lines[0]


def _rank_exit_codes(outputs: list[str]) -> set[int]:
    """Exit codes of the failed ranks that torchrun's summary reports ("exitcode  : 2")."""
    return {int(code) for code in re.findall(r"exitcode\s*:\s*(-?\d+)", "\n".join(outputs))}


def _ranks_stopped(proc: subprocess.Popen, outputs: list[str]) -> None:
    """One launcher of 2 ranks: a rank exited 2; torchrun then stops a rank still ending with SIGTERM (-15)."""
    codes = _rank_exit_codes(outputs)
    assert proc.returncode != 0 and 2 in codes and codes <= {2, -signal.SIGTERM}, outputs[0][-3000:]


def _corrupt(path: Path) -> None:
    """Cut a JPEG after its first 300 bytes: the header parses, the decode fails."""
    path.write_bytes(path.read_bytes()[:300])


# ----------------------------------------------------------------------------------------------------------------
# No arguments and no demo data.
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nproc,extra", [(1, []), (2, ["--data.backend=torch"])], ids=["plain-auto", "2ranks-torch"])
def test_no_arguments_without_demo_data_says_how_to_make_it_and_creates_nothing(tmp_path, nproc, extra):
    """`python -m mixmo_dist.train` (the defaults: data/demo, runs/demo) in a directory without the demo data."""
    proc = launch(extra, nproc=nproc, cwd=tmp_path)
    outputs = _finish([proc])
    line = _one_error(
        outputs, "data.root=data/demo does not exist", "make demo", "python -m mixmo_dist.data.demo --out data/demo"
    )
    assert line.startswith("error: ")
    if nproc == 1:
        assert proc.returncode == 2, outputs[0][-3000:]
    else:
        _ranks_stopped(proc, outputs)
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "the run left files behind"


# ----------------------------------------------------------------------------------------------------------------
# A read-only run.output_dir.
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_only_output_dir_is_one_line_naming_the_key(tiny_data, tmp_path, backend):
    with read_only_mount(tmp_path / "ro") as ro:
        # torch: a directory to create on the read-only mount; dali-cpu: the mount itself (its lock file fails).
        out = ro / "run" if backend == "torch" else ro
        proc = launch(tiny_args(tiny_data, out, f"--data.backend={backend}"), nproc=2)
        outputs = _finish([proc])
    _one_error(outputs, f"run.output_dir={out} cannot be written", "Read-only file system", "--run.output_dir=DIR")
    _ranks_stopped(proc, outputs)


# ----------------------------------------------------------------------------------------------------------------
# A corrupt image, found by one rank.
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def data_copy(tiny_data, tmp_path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    return root


def _first_train_file_of_rank_1(root: Path) -> Path:
    """The file that rank 1 of 2 decodes first with the torch backend (tiny_args: 4 unique images per rank)."""
    _, samples = scan_split(root, "train")
    plan = EpochPlan(len(samples), unique_per_rank=4, rank=1, world_size=2, seed=0)
    index = int(plan.global_order(0)[plan.rank_positions()[0, 0]])
    return Path(samples[index][0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_train_image_on_one_rank_stops_every_rank_with_one_line(data_copy, tmp_path, backend):
    """Two launchers (one per "machine"), so only the agreement between the ranks can end the other rank's wait."""
    if backend == "torch":
        bad = _first_train_file_of_rank_1(data_copy)  # a rank other than 0 must be the one that reports
    else:
        bad = sorted((data_copy / "train").rglob("*.JPEG"))[17]  # read by one rank within the first epoch
    _corrupt(bad)
    out = tmp_path / "run"
    # One epoch is 9 steps: the file is read by exactly one rank, once.
    args = tiny_args(data_copy, out, f"--data.backend={backend}", "--schedule.max_steps=9", "--eval.at_end=false")
    outputs = _finish(launch_two_machines(args))
    _one_error(outputs, f"cannot decode image {bad}", "Replace the file with an intact copy")
    assert _rank_exit_codes(outputs) == {2}, outputs  # each launcher's one rank exited 2 on its own
    # Every rank stopped in the step whose batch held the file: that step and the later ones were never logged.
    steps = [r["step"] for r in read_metrics(out) if r["split"] == "train"]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) < 9, steps
    if backend == "torch":
        assert steps == []  # rank 1 reads the file in the first step
    assert not (out / "checkpoints" / "step_00000009").exists()


def test_data_missing_on_one_machine_stops_both_with_one_line(tiny_data, tmp_path):
    """A relative data.root that only machine 0's working directory holds: machine 1's rank fails to build its
    data alone, and machine 0's rank must not go on to wait for it in the next collective."""
    with_data, without = tmp_path / "node0", tmp_path / "node1"
    (with_data / "data").mkdir(parents=True)
    (with_data / "data" / "demo").symlink_to(tiny_data)
    without.mkdir()
    out = tmp_path / "run"
    args = [a for a in tiny_args(tiny_data, out) if not a.startswith("--data.root=")] + ["--data.root=data/demo"]
    outputs = _finish(launch_two_machines(args, cwds=(with_data, without)))
    _one_error(outputs, "data.root=data/demo does not exist", "make demo")
    assert _rank_exit_codes(outputs) == {2}, outputs
    assert not out.exists()


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_val_image_on_one_rank_stops_every_rank_with_one_line(data_copy, tmp_path, backend):
    files = sorted((data_copy / "val").rglob("*.JPEG"))
    # Rank 1 of 2 reads samples 1::2 with torch, the second half with DALI.
    bad = files[1] if backend == "torch" else files[-1]
    _corrupt(bad)
    out = tmp_path / "run"
    args = tiny_args(data_copy, out, f"--data.backend={backend}", "--schedule.max_steps=1")
    outputs = _finish(launch_two_machines(args))
    _one_error(outputs, f"cannot decode image {bad}")
    assert _rank_exit_codes(outputs) == {2}, outputs
    assert not any(r["split"] == "val" for r in read_metrics(out))


# ----------------------------------------------------------------------------------------------------------------
# Resuming from a checkpoint whose weights do not fit its stored settings.
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_with_weights_that_do_not_fit_is_one_line_naming_the_checkpoint(
    tiny_data, reference_run, tmp_path, backend
):
    out = tmp_path / "run"
    src = reference_run / "checkpoints" / "step_00000006"
    store = CheckpointStore(out / "checkpoints", keep_last=3)
    tmp = store.begin(6)
    for file in src.iterdir():
        if file.name not in ("COMPLETE", "model.safetensors"):
            shutil.copy(file, tmp / file.name)
    # A verified checkpoint whose weights are a 5-class network while its state.json says 10 classes.
    store.write_tensors(tmp, "model.safetensors", build_model("resnet18", 2, 5).state_dict())
    step_dir = store.commit(tmp, 6)
    before = sorted(p.name for p in step_dir.iterdir())
    proc = launch(tiny_args(tiny_data, out, f"--data.backend={backend}"), nproc=2)
    outputs = _finish([proc])
    _one_error(outputs, f"cannot resume from {step_dir}", "do not fit", "size mismatch", "another run.output_dir")
    _ranks_stopped(proc, outputs)
    assert sorted(p.name for p in step_dir.iterdir()) == before  # nothing moved or deleted


# ----------------------------------------------------------------------------------------------------------------
# Running a finished run again.
# ----------------------------------------------------------------------------------------------------------------


def test_running_a_finished_run_again_adds_no_rows(tiny_data, reference_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    jsonl, csv = (out / "metrics.jsonl").read_text(), (out / "metrics.csv").read_text()
    assert [r["step"] for r in read_metrics(out) if r["split"] == "val"] == [9, 18]
    proc = launch(tiny_args(tiny_data, out), nproc=2)
    outputs = _finish([proc])
    assert proc.returncode == 0, outputs[0][-3000:]
    assert "resumed from step 18" in outputs[0]
    assert (out / "metrics.jsonl").read_text() == jsonl
    assert (out / "metrics.csv").read_text() == csv


def test_a_missing_data_root_names_the_key_and_what_belongs_there(tmp_path, monkeypatch):
    """The data check that runs before anything is created, for each kind of root (no process needed)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"data\.root=data/demo does not exist: .*`make demo`.*--out data/demo`"):
        check_root(DataConfig())
    with pytest.raises(ValueError, match=r"data\.root=\./data/\.\./data/demo does not exist: .*`make demo`"):
        check_root(DataConfig(root="./data/../data/demo"))  # the same place, spelt another way
    nope = tmp_path / "nope"
    with pytest.raises(ValueError, match=rf"data\.root={nope} does not exist: set --data\.root=DIR .*/train/<class>"):
        check_root(DataConfig(root=str(nope)))
    with pytest.raises(ValueError, match=r"the cifar100 files \(the layouts are in README\.md, Data\)"):
        check_root(DataConfig(root=str(nope), dataset="cifar100", backend="torch"))
    check_root(DataConfig(root=str(nope), backend="synthetic"))  # synthetic data reads no folder
    assert (
        "\n## Training" in (REPO / "README.md").read_text()
        and "**Data.** `data.dataset`" in (REPO / "README.md").read_text()
    )


# ----------------------------------------------------------------------------------------------------------------
# Files the run cannot use: a config that is not UTF-8.
# ----------------------------------------------------------------------------------------------------------------


def test_a_config_file_that_is_not_utf8_is_one_line_naming_the_file(tmp_path):
    config = tmp_path / "latin1.yaml"
    config.write_bytes("run:\n  name: caf\u00e9\n".encode("latin-1"))  # saved by an editor in Latin-1
    res = train_cli("--config", str(config))
    assert res.returncode == 2, res.stderr[-3000:]
    assert res.stderr.strip().splitlines() == [
        f"error: config file {config} is not UTF-8 text (byte 0xe9 on line 2); save it as UTF-8"
    ], res.stderr[-3000:]


def test_rerunning_a_run_whose_last_checkpoint_is_its_last_step_adds_no_rows(tiny_data, tmp_path):
    """checkpoint.every_n_steps lands on the last step, which is no validation step: the end-of-run validation
    must be in that checkpoint, or every rerun validates again and appends one more row (issue 20)."""
    out = tmp_path / "run"
    args = tiny_args(tiny_data, out, "--schedule.max_steps=2", "--checkpoint.every_n_steps=2")
    first = launch(args, nproc=1)
    text = _finish([first])[0]
    assert first.returncode == 0, text[-3000:]
    rows = read_metrics(out)
    assert [(r["split"], r["step"]) for r in rows] == [("train", 1), ("train", 2), ("val", 2)], rows
    jsonl, csv = (out / "metrics.jsonl").read_text(), (out / "metrics.csv").read_text()
    again = launch(args, nproc=1)
    text = _finish([again])[0]
    assert again.returncode == 0 and "resumed from step 2" in text, text[-3000:]
    assert (out / "metrics.jsonl").read_text() == jsonl
    assert (out / "metrics.csv").read_text() == csv
    # A run finished by an older version: its last checkpoint was saved before the end-of-run validation, so its
    # state.json has no last_eval (or an older one); metrics.jsonl's row at that step must count as done.
    store = CheckpointStore(out / "checkpoints", keep_last=3)
    step_dir = out / "checkpoints" / "step_00000002"
    state = json.loads((step_dir / "state.json").read_text())
    assert state.pop("last_eval") == 2
    tmp = store.begin(2)
    for file in step_dir.iterdir():
        if file.name not in ("COMPLETE", "state.json"):
            shutil.copy(file, tmp / file.name)
    store.write_json(tmp, "state.json", state)
    with pytest.warns(CheckpointWarning, match="replaces it"):
        store.commit(tmp, 2)
    old = launch(args, nproc=1)
    text = _finish([old])[0]
    assert old.returncode == 0 and "resumed from step 2" in text, text[-3000:]
    assert (out / "metrics.jsonl").read_text() == jsonl


# ----------------------------------------------------------------------------------------------------------------
# Every checkpoint corrupt; a fresh start over an earlier run.
# ----------------------------------------------------------------------------------------------------------------


def _corrupt_checkpoint(out: Path, step: int) -> Path:
    """A step directory whose marker is garbage: it fails verification and is moved aside by the trainer."""
    step_dir = out / "checkpoints" / f"step_{step:08d}"
    step_dir.mkdir(parents=True)
    (step_dir / "model.safetensors").write_bytes(b"\0" * 64)
    (step_dir / "COMPLETE").write_bytes(b"\x00{not json")
    return step_dir


def test_every_checkpoint_corrupt_is_refused_not_a_silent_restart_at_step_0(tiny_data, tmp_path):
    out = tmp_path / "run"
    bad = _corrupt_checkpoint(out, 6)
    rows = '{"split": "train", "step": 6, "loss": 1.0}\n'
    (out / "metrics.jsonl").write_text(rows)
    args = tiny_args(tiny_data, out, "--schedule.max_steps=1", "--eval.at_end=false")
    for attempt in range(2):  # the second start finds only the moved-aside directory, and still refuses
        proc = launch(args, nproc=1)
        line = _one_error(
            _finish([proc]), "no checkpoint under", "passes its sha256 check", "--checkpoint.resume=never"
        )
        assert proc.returncode == 2, line
        aside = [p for p in bad.parent.iterdir() if p.name.startswith("step_00000006.corrupt-")]
        assert len(aside) == 1 and aside[0].name in line and not bad.exists(), (attempt, line)
        assert (aside[0] / "COMPLETE").read_bytes() == b"\x00{not json"  # moved, never deleted
        assert (out / "metrics.jsonl").read_text() == rows  # nothing lost
    fresh = launch([*args, "--checkpoint.resume=never"], nproc=1)
    text = _finish([fresh])[0]
    assert fresh.returncode == 0, text[-3000:]
    assert [r["step"] for r in read_metrics(out)] == [1]


def test_resume_never_over_an_earlier_run_keeps_its_metrics_and_says_where(tiny_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    old_jsonl = '{"split": "train", "step": 1, "loss": 2.0}\n{"split": "val", "step": 1, "top1": 0.5}\n'
    old_csv = "split,step\ntrain,1\nval,1\n"
    (out / "metrics.jsonl").write_text(old_jsonl)
    (out / "metrics.csv").write_text(old_csv)
    proc = launch(
        tiny_args(tiny_data, out, "--schedule.max_steps=1", "--eval.at_end=false", "--checkpoint.resume=never"), nproc=1
    )
    text = _finish([proc])[0]
    assert proc.returncode == 0, text[-3000:]
    kept = sorted(p.name for p in out.iterdir() if ".superseded-" in p.name)
    assert [name.split(".superseded-")[0] for name in kept] == ["metrics.csv", "metrics.jsonl"], kept
    assert (out / kept[1]).read_text() == old_jsonl and (out / kept[0]).read_text() == old_csv
    assert re.search(
        rf"holds the metrics of an earlier run: kept as {re.escape(kept[1])} and {re.escape(kept[0])}", text
    )
    assert [(r["split"], r["step"]) for r in read_metrics(out)] == [("train", 1)]


def test_a_batch_larger_than_the_dataset_trains_with_one_warning_naming_the_key_and_the_sizes(tiny_data, tmp_path):
    """70 training images, 80 unique images per step: training works (the plan wraps inside the step), but a user
    who meant another data.root or dataset must be told (issue 20)."""
    out = tmp_path / "run"
    args = tiny_args(tiny_data, out, "--data.batch_size=160", "--schedule.max_steps=1", "--eval.at_end=false")
    proc = launch(args, nproc=1)
    text = _finish([proc])[0]
    assert proc.returncode == 0, text[-3000:]
    warnings = [line for line in text.splitlines() if "more than the" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0], text[-3000:]
    assert (
        "config key data.batch_size=160: a step reads 80 unique images (160 rows per rank / "
        "mixmo.batch_repetitions=2 x 1 ranks), more than the 70 training images of data.root="
    ) in warnings[0], warnings[0]


def test_an_unreadable_class_directory_is_named_unreadable_not_empty(data_copy, tmp_path):
    """A class folder the training user may not list (chmod 000): the one line says it cannot be read, naming it, not
    that it is empty (issue 20). The run is a child that has lost root's right to ignore file modes."""
    locked = data_copy / "train" / sorted(p.name for p in (data_copy / "train").iterdir())[3]
    locked.chmod(0)
    try:
        out = tmp_path / "run"
        proc = launch(tiny_args(data_copy, out), nproc=1, preexec_fn=without_root_file_access)
        line = _one_error(_finish([proc]), f"class directory {locked} cannot be read: Permission denied", "chmod")
    finally:
        locked.chmod(0o755)
    assert proc.returncode == 2 and "empty" not in line, line
    assert not out.exists()


def test_an_unreadable_image_stops_the_torch_backend_naming_it_unreadable(data_copy, tmp_path):
    """The same file through the torch backend's DataLoader workers: the one line says permission, not damage."""
    locked = sorted((data_copy / "train").rglob("*.JPEG"))[5]
    locked.chmod(0)
    try:
        args = tiny_args(data_copy, tmp_path / "run", "--schedule.max_steps=18", "--eval.at_end=false")
        proc = launch(args, nproc=1, preexec_fn=without_root_file_access)
        line = _one_error(_finish([proc]), f"cannot read image {locked}: Permission denied", "chmod a+r")
    finally:
        locked.chmod(0o644)
    assert proc.returncode == 2 and "decode" not in line and "Replace the file" not in line, line


# ----------------------------------------------------------------------------------------------------------------
# A full disk at the start of a run.
# ----------------------------------------------------------------------------------------------------------------


@contextmanager
def nearly_full_mount(path: Path, free_pages: int):
    """`path` as a small tmpfs with exactly `free_pages` pages left, for the block (unmounted afterwards)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    path.mkdir(parents=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        st = os.statvfs(path)
        (path / "filler").write_bytes(b"\0" * (st.f_bavail - free_pages) * st.f_bsize)
        assert os.statvfs(path).f_bavail == free_pages
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_a_full_disk_while_writing_config_yaml_is_one_line_naming_it(tiny_data, tmp_path):
    """Two pages left: the run lock's owner record takes one, metrics.csv's header the other, then config.yaml finds
    no space (ENOSPC, issue 20)."""
    with nearly_full_mount(tmp_path / "disk", free_pages=2) as disk:
        out = disk / "run"
        proc = launch(tiny_args(tiny_data, out, "--schedule.max_steps=1"), nproc=1)
        line = _one_error(
            _finish([proc]), f"cannot write {out / 'config.yaml'}: No space left on device", "run.output_dir"
        )
        assert proc.returncode == 2, line
        assert not (out / "config.yaml").exists() and not any(p.name.startswith(".config") for p in out.iterdir())
