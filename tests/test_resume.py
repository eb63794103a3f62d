"""Fault tolerance with real processes (2 gloo ranks): SIGKILL mid-epoch, SIGUSR2/SIGTERM preemption, corrupt
checkpoints, NaN on one rank, config mismatch and the run lock. Every resumed run must end bit-identical to the
uninterrupted reference run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import launch, read_metrics, run_train, tiny_args, train_env
from safetensors.torch import load_file

FINAL = "step_00000018"


def _assert_same_weights(a: Path, b: Path) -> None:
    for name in ("model.safetensors", "trainer.safetensors"):
        ta, tb = load_file(a / name), load_file(b / name)
        assert ta.keys() == tb.keys()
        for key in ta:
            assert torch.equal(ta[key], tb[key]), f"{name}:{key} differs"


# timm's own 0.37M-parameter ResNet, for the tests whose runs are compared with each other, not with `reference_run`
# (resnet18) and not signalled at an observed step (a faster run could end first): the state is checked, not the net.
SMALL_NET = "--model.arch=test_resnet"


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.monotonic()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"run ended early (rc {proc.returncode}): {proc.stdout.read()[-3000:]}")
        if time.monotonic() - t0 > timeout:
            raise AssertionError("timed out waiting")
        time.sleep(0.2)


def _last_train_step(out: Path) -> int:
    try:
        lines = read_metrics(out)
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    steps = [r["step"] for r in lines if r["split"] == "train"]
    return steps[-1] if steps else 0


def _rank_pids(out: Path) -> list[int]:
    res = subprocess.run(["pgrep", "-f", f"run.output_dir={out}"], capture_output=True, text=True)
    return [int(p) for p in res.stdout.split()]


def _train_steps_once(out: Path) -> None:
    steps = [r["step"] for r in read_metrics(out) if r["split"] == "train"]
    assert steps == list(range(1, 19)), steps


def test_checkpoints_differ_across_steps(reference_run):
    a = load_file(reference_run / "checkpoints" / "step_00000006" / "model.safetensors")
    b = load_file(reference_run / "checkpoints" / FINAL / "model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_sigkill_mid_epoch_then_resume_is_bit_identical(tiny_data, reference_run, tmp_path):
    out = tmp_path / "killed"
    args = tiny_args(tiny_data, out, "--checkpoint.every_n_steps=2")
    proc = launch(args)
    _wait_for(lambda: (out / "checkpoints" / "step_00000004" / "COMPLETE").exists(), proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher only: the ranks live in their own sessions
    proc.wait()
    t0 = time.monotonic()
    while _rank_pids(out) and time.monotonic() - t0 < 20:
        time.sleep(0.2)
    assert not _rank_pids(out), "ranks outlived their launcher (PR_SET_PDEATHSIG)"
    rc, log = run_train(args)
    assert rc == 0, log[-3000:]
    assert "resumed from step" in log
    _assert_same_weights(out / "checkpoints" / FINAL, reference_run / "checkpoints" / FINAL)
    _train_steps_once(out)


@pytest.mark.parametrize("sig", [signal.SIGUSR2, signal.SIGTERM, signal.SIGINT])
def test_preemption_signal_saves_within_a_step_and_resumes(sig, tiny_data, reference_run, tmp_path):
    """SIGUSR2/SIGTERM (preemption) and SIGINT (Ctrl-C in the terminal: the whole foreground group gets it)."""
    out = tmp_path / sig.name
    args = tiny_args(tiny_data, out)
    proc = launch(args)
    _wait_for(lambda: _last_train_step(out) >= 3, proc)
    at = _last_train_step(out)
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)  # what a terminal does; the ranks sit in sessions of their own, torchrun forwards
    else:
        proc.send_signal(sig)  # the launcher forwards it (TORCHELASTIC_SIGNALS_TO_HANDLE includes SIGUSR2)
    log, _ = proc.communicate(timeout=300)
    stopped = {line.split("stopped at step ")[1].split()[0] for line in log.splitlines() if "stopped at step" in line}
    assert len(stopped) == 1 and log.count("stopped at step") == 2, log[-3000:]  # both ranks, at the same step
    marker = json.loads((out / "PREEMPTED").read_text())
    assert marker["signal"] == sig.name
    assert at <= marker["step"] <= at + 2, (at, marker)
    assert (out / "checkpoints" / f"step_{marker['step']:08d}" / "COMPLETE").exists()
    # The ranks exit 0 after the agreed save; accelerate launch (torchrun) itself reports the signal it got.
    assert proc.returncode != 0 or "stopped at step" in log
    rc, log2 = run_train(args)
    assert rc == 0, log2[-3000:]
    assert f"resumed from step {marker['step']}" in log2
    assert not (out / "PREEMPTED").exists()
    _assert_same_weights(out / "checkpoints" / FINAL, reference_run / "checkpoints" / FINAL)
    _train_steps_once(out)


def test_corrupt_latest_checkpoint_is_moved_aside_and_previous_used(tiny_data, reference_run, tmp_path):
    out = tmp_path / "corrupt"
    shutil.copytree(reference_run, out)
    weights = out / "checkpoints" / FINAL / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    rc, log = run_train(tiny_args(tiny_data, out))
    assert rc == 0, log[-3000:]
    assert "resumed from step 12" in log and FINAL in log  # the warning names what was skipped
    assert list((out / "checkpoints").glob(f"{FINAL}.corrupt-*"))
    _assert_same_weights(out / "checkpoints" / FINAL, reference_run / "checkpoints" / FINAL)
    _train_steps_once(out)


def test_nan_on_one_rank_skips_the_step_everywhere(tiny_data, tmp_path):
    out = tmp_path / "nan"
    args = tiny_args(tiny_data, out, SMALL_NET, "--schedule.max_steps=6")
    rc, log = run_train(args, env=train_env(MIXMO_FAULT_NAN="1:2"))
    assert rc == 0, log[-3000:]
    train = [r for r in read_metrics(out) if r["split"] == "train"]
    assert [r["nonfinite_skipped"] for r in train] == [0, 0, 1, 1, 1, 1]
    ckpt = out / "checkpoints" / "step_00000006"
    prints = {json.loads((ckpt / f"rank_{r}.json").read_text())["param_fingerprint"] for r in range(2)}
    assert len(prints) == 1
    assert all(torch.isfinite(t).all() for t in load_file(ckpt / "model.safetensors").values())


def test_consecutive_nan_aborts_with_a_clear_message(tiny_data, tmp_path):
    out = tmp_path / "nan_abort"
    args = tiny_args(tiny_data, out, "--optim.max_nonfinite_steps=2")
    rc, log = run_train(args, nproc=1, env=train_env(MIXMO_FAULT_NAN="0:1,2"))
    assert rc != 0 and "2 consecutive non-finite losses" in log and "optim.max_nonfinite_steps" in log


def test_resume_with_changed_shape_is_refused(tiny_data, reference_run, tmp_path):
    out = tmp_path / "mismatch"
    shutil.copytree(reference_run, out)
    rc, log = run_train(tiny_args(tiny_data, out, "--mixmo.num_members=3"), nproc=1)
    assert rc == 2, log[-3000:]
    assert "num_members: checkpoint 2 vs now 3" in log and "global batch: checkpoint 16 rows vs now 8" in log
    assert (out / "checkpoints" / FINAL / "COMPLETE").exists()  # nothing lost


def test_second_run_on_same_output_dir_is_refused(tiny_data, tmp_path):
    from mixmo_dist.checkpoint.lock import RunLock

    out = tmp_path / "locked"
    out.mkdir()
    with RunLock(out):
        rc, log = run_train(tiny_args(tiny_data, out), nproc=1)
    assert rc == 2 and "another run" in log and str(out) in log


def test_dali_cpu_two_ranks_resume_with_a_raised_stop_cap(tiny_data, tmp_path):
    """2-rank gloo training on the DALI CPU pipeline with one view per copy; a run stopped by schedule.max_steps=4 and
    resumed with max_steps=7 (mid-epoch, a changed stop cap) ends bit-identical to a run of 7 steps."""
    pytest.importorskip("nvidia.dali")
    common = (
        SMALL_NET,
        "--data.backend=dali-cpu",
        "--data.copy_augmentation=per_copy",
        "--checkpoint.every_n_steps=100",
        "--eval.every_n_epochs=100",
    )
    full, split = tmp_path / "full", tmp_path / "split"
    rc, log = run_train(tiny_args(tiny_data, full, *common, "--schedule.max_steps=7"))
    assert rc == 0, log[-3000:]
    rc, log = run_train(tiny_args(tiny_data, split, *common, "--schedule.max_steps=4"))
    assert rc == 0, log[-3000:]
    assert json.loads((split / "run.json").read_text())["plan"]["views_per_image"] == 2 * 2  # b x M
    rc, log = run_train(tiny_args(tiny_data, split, *common, "--schedule.max_steps=7"))
    assert rc == 0 and "resumed from step 4" in log, log[-3000:]
    run = json.loads((split / "run.json").read_text())
    assert run["backend"] == "dali-cpu"
    _assert_same_weights(split / "checkpoints" / "step_00000007", full / "checkpoints" / "step_00000007")
    val = [r for r in read_metrics(split) if r["split"] == "val"]
    assert val and all(v["count"] == 49 for v in val)


def test_views_per_copy_resume_bit_identical_and_the_best_validation_survives(tiny_data, tmp_path):
    """One view per copy, the reference initialisation and input repetition: a run stopped at step 4 and resumed
    to 7 ends bit-identical to a run of 7 steps, and the best validation top-1 (evaluated at steps 2, 4 and 6) and
    its step are carried across the stop in the checkpoint's counters. One process (18 steps per epoch): the
    2-rank resume tests above cover the ranks; this one the per-copy data path and the counters."""
    common = (
        SMALL_NET,
        "--data.copy_augmentation=per_copy",
        "--model.init=reference",
        "--mixmo.input_repetition=0.5",
        "--checkpoint.every_n_steps=100",
        "--eval.every_n_epochs=0.12",  # every 2 steps (18 per epoch on one rank)
        "--eval.at_end=false",
    )
    full, split = tmp_path / "full", tmp_path / "split"
    rc, log = run_train(tiny_args(tiny_data, full, *common, "--schedule.max_steps=7"), nproc=1)
    assert rc == 0, log[-3000:]
    rc, log = run_train(tiny_args(tiny_data, split, *common, "--schedule.max_steps=4"), nproc=1)
    assert rc == 0, log[-3000:]
    assert json.loads((split / "run.json").read_text())["plan"]["views_per_image"] == 2 * 2  # b x M
    stopped = json.loads((split / "checkpoints" / "step_00000004" / "state.json").read_text())
    val = [r for r in read_metrics(split) if r["split"] == "val"]
    best = max(val, key=lambda r: (r["top1"], -r["step"]))
    assert (stopped["best_top1"], stopped["best_step"]) == (best["top1"], best["step"])
    rc, log = run_train(tiny_args(tiny_data, split, *common, "--schedule.max_steps=7"), nproc=1)
    assert rc == 0 and "resumed from step 4" in log, log[-3000:]
    _assert_same_weights(split / "checkpoints" / "step_00000007", full / "checkpoints" / "step_00000007")
    val_full = [r for r in read_metrics(full) if r["split"] == "val"]
    val_split = [r for r in read_metrics(split) if r["split"] == "val"]
    assert [r["step"] for r in val_full] == [r["step"] for r in val_split] == [2, 4, 6]
    for a, b in zip(val_full, val_split):
        assert (a["top1"], a["best_top1"], a["best_step"], a["val_split"]) == (
            b["top1"],
            b["best_top1"],
            b["best_step"],
            b["val_split"],
        )
    # The records really track the best so far (the comparison above could otherwise hold by construction).
    running = max(val_full, key=lambda r: (r["top1"], -r["step"]))
    assert (val_full[-1]["best_top1"], val_full[-1]["best_step"]) == (running["top1"], running["step"])
    ends = [json.loads((d / "checkpoints" / "step_00000007" / "state.json").read_text()) for d in (full, split)]
    assert ends[0]["best_step"] == ends[1]["best_step"] == running["step"]
