"""Mixed precision and torch.compile through the trainer's command line, on CPU with real processes.

bf16 is what the ImageNet configs train in; every other trainer test runs in float32. Here a 2-rank gloo world
trains in bf16 chosen two ways (the launcher's `--mixed_precision bf16` under `run.mixed_precision=auto`, and an
explicit `--run.mixed_precision=bf16` that overrides a launcher's `no`), resumes bit-exactly, and fp16 is refused on
CPU as the README promises. A small model trains with `model.compile=true`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import read_metrics, run_train, tiny_args, train_env
from safetensors.torch import load_file

# Short runs: 4 steps, a checkpoint every 2, no evaluation (it is not what these tests check).
_SHORT = ("--checkpoint.every_n_steps=2", "--eval.at_end=false")


def _step_loss(out: Path, step: int) -> float:
    return next(r["loss"] for r in read_metrics(out) if r["split"] == "train" and r["step"] == step)


def _tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    return {**load_file(ckpt / "model.safetensors"), **load_file(ckpt / "trainer.safetensors")}


@pytest.fixture(scope="module")
def bf16_runs(tiny_data, tmp_path_factory) -> dict:
    """Three 2-rank runs: A (launcher bf16, auto, 4 steps); B stopped at 2 with the explicit flag under a launcher
    that says `no`, then resumed to 4 with the launcher's bf16."""
    root = tmp_path_factory.mktemp("bf16")
    a, b = root / "a", root / "b"
    rc, log_a = run_train(tiny_args(tiny_data, a, *_SHORT, "--schedule.max_steps=4"), mixed_precision="bf16",
                          timeout=300)  # fmt: skip
    assert rc == 0, log_a[-3000:]
    args_b1 = tiny_args(tiny_data, b, *_SHORT, "--schedule.max_steps=2", "--run.mixed_precision=bf16")
    rc, log_b1 = run_train(args_b1, mixed_precision="no", timeout=300)
    assert rc == 0, log_b1[-3000:]
    run_b1 = json.loads((b / "run.json").read_text())  # B2 rewrites it
    rc, log_b2 = run_train(tiny_args(tiny_data, b, *_SHORT, "--schedule.max_steps=4"), mixed_precision="bf16",
                           timeout=300)  # fmt: skip
    assert rc == 0, log_b2[-3000:]
    return {"a": a, "b": b, "run_b1": run_b1, "log_b2": log_b2}


def test_launcher_bf16_under_auto_trains_in_bf16(bf16_runs, reference_run):
    """run.json records bf16, and the first loss differs from the float32 reference run's (same weights, data and
    mixing draws), by less than bf16's rounding could explain away."""
    run = json.loads((bf16_runs["a"] / "run.json").read_text())
    assert run["mixed_precision"] == "bf16" and run["config"]["run"]["mixed_precision"] == "auto"
    # run.tf32=auto: TF32 on for a bf16 run, off for the fp32 reference (fp32 means fp32 on GPUs)
    assert run["tf32"] is True and json.loads((reference_run / "run.json").read_text())["tf32"] is False
    bf16, fp32 = _step_loss(bf16_runs["a"], 1), _step_loss(reference_run, 1)
    assert bf16 != fp32, "the bf16 run computed exactly the float32 loss: autocast did nothing"
    assert abs(bf16 - fp32) < 0.05 * abs(fp32), (bf16, fp32)


def test_explicit_bf16_flag_wins_over_the_launcher(bf16_runs):
    """`--run.mixed_precision=bf16` under `accelerate launch --mixed_precision no` trains in bf16: its first loss is
    the launcher-bf16 run's, bit for bit."""
    assert bf16_runs["run_b1"]["mixed_precision"] == "bf16"
    assert _step_loss(bf16_runs["b"], 1) == _step_loss(bf16_runs["a"], 1)


def test_bf16_resume_is_bit_exact(bf16_runs):
    """B (stopped at step 2, resumed) ends with A's weights and optimizer state bit for bit; the halfway checkpoint
    differs from the final one, so the comparison cannot pass on untrained weights."""
    a, b = bf16_runs["a"] / "checkpoints", bf16_runs["b"] / "checkpoints"
    assert "resumed from step 2" in bf16_runs["log_b2"]
    final_a, final_b = _tensors(a / "step_00000004"), _tensors(b / "step_00000004")
    assert final_a.keys() == final_b.keys()
    for key in final_a:
        assert torch.equal(final_a[key], final_b[key]), f"{key} differs after the bf16 resume"
    half = load_file(a / "step_00000002" / "model.safetensors")
    assert any(not torch.equal(half[k], final_a[k]) for k in half)
    steps = [r["step"] for r in read_metrics(bf16_runs["b"]) if r["split"] == "train"]
    assert steps == [1, 2, 3, 4]


def _refusal(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("error: ")]


def test_fp16_on_cpu_is_refused_naming_the_key(tiny_data, tmp_path):
    """README: fp16 (with a GradScaler) needs CUDA and is refused on CPU. One line, exit 2, nothing written."""
    out = tmp_path / "fp16"
    env = train_env(CUDA_VISIBLE_DEVICES="")  # a CPU run even where a GPU exists
    rc, log = run_train(tiny_args(tiny_data, out, "--run.mixed_precision=fp16"), nproc=1, env=env, timeout=300)
    errors = _refusal(log)
    assert rc == 2, log[-3000:]
    assert len(errors) == 1 and "run.mixed_precision=fp16 needs CUDA" in errors[0], log[-3000:]
    assert not (out / "checkpoints").exists() and not (out / "run.json").exists()


def test_launcher_fp16_under_auto_on_cpu_is_refused(tiny_data, tmp_path):
    """`accelerate launch --mixed_precision fp16` under run.mixed_precision=auto: both ranks refuse; launch fails."""
    out = tmp_path / "fp16_launcher"
    env = train_env(CUDA_VISIBLE_DEVICES="")
    rc, log = run_train(tiny_args(tiny_data, out), env=env, mixed_precision="fp16", timeout=300)
    assert rc != 0, log[-3000:]
    # Each rank prints the line, but the ranks share the output pipe (two lines can interleave) and the launcher may
    # stop the slower rank before it prints: at least one refusal, and no other error line.
    assert "error: accelerate launch --mixed_precision fp16 (run.mixed_precision=auto) needs CUDA" in log, log[-3000:]
    assert all("needs CUDA" in e for e in _refusal(log)), log[-3000:]
    assert not (out / "checkpoints").exists() and not (out / "run.json").exists()


def test_compile_trains_through_inductor(tiny_data, tmp_path):
    """`model.compile=true` on a small timm ResNet: Inductor compiles the training forward (its cache fills up), and
    the losses match an eager run with the same draws."""
    common = ("--model.arch=test_resnet", "--schedule.max_steps=2", "--eval.at_end=false")
    cache = tmp_path / "inductor"
    env = train_env(TORCHINDUCTOR_CACHE_DIR=str(cache))  # a cold compile, and proof that one happened
    compiled, eager = tmp_path / "compiled", tmp_path / "eager"
    rc, log = run_train(tiny_args(tiny_data, compiled, *common, "--model.compile=true"), nproc=1, env=env,
                        timeout=420)  # fmt: skip
    assert rc == 0, log[-3000:]
    rc, log = run_train(tiny_args(tiny_data, eager, *common, "--model.compile=false"), nproc=1, timeout=300)
    assert rc == 0, log[-3000:]
    graphs = list((cache / "fxgraph").rglob("*")) if (cache / "fxgraph").is_dir() else []
    assert any(p.is_file() for p in graphs), f"Inductor wrote no FX graph into {cache}"
    for step in (1, 2):
        got, want = _step_loss(compiled, step), _step_loss(eager, step)
        assert abs(got - want) <= 1e-4 * abs(want), (step, got, want)


@pytest.mark.parametrize(
    ("mode", "precision", "on"),
    [("auto", "no", False), ("auto", "bf16", True), ("auto", "fp16", True), ("on", "no", True), ("off", "bf16", False)],
)
def test_tf32_follows_the_key_and_the_precision(mode, precision, on):
    """`run.tf32` sets torch's two TF32 switches (matmuls and cuDNN convolutions) together; each case starts from the
    opposite state, so a switch left alone is seen."""
    from mixmo_dist.runtime.accelerator import use_tf32

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not on
        assert use_tf32(mode, precision) is on
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (on, on)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
