"""The trainer on a GPU, through its command line (`python -m mixmo_dist.train`), for the GPU runbook.

Two checks, each run as its own stage of `benchmarks.gpu_check` and each writing one JSON file:

- `bf16`: one process trains MixMo-ResNet-50 (M=2) on synthetic data (`data.backend=synthetic`, 224 px, 128 rows
  per step, 30 steps) in bf16 with channels_last; reports the trainer's own images/s (median over the steps after
  warm-up, from metrics.jsonl) and checks that run.json says cuda + bf16 and that every loss is finite.
- `fp16-resume`: fp16 with Accelerate's GradScaler. Run A trains 30 steps uninterrupted; run B (started alongside)
  is killed with SIGKILL after its step-10 checkpoint and before its end, then resumed. B's final weights, optimizer
  state and GradScaler state must equal A's bit for bit. Both run under `torch.use_deterministic_algorithms(True,
  warn_only=True)` with `CUBLAS_WORKSPACE_CONFIG=:4096:8` (the trainer has no switch for it: a wrapper sets it, then
  runs `mixmo_dist.train` as `python -m` would). Ops without a deterministic CUDA kernel are warned about, not fatal
  (one short lease must not end without figures); if any were reported and the weights differ, the comparison falls
  back to a relative L2 gap per tensor of at most `_TOLERANCE` and says so.

`--dry-run` runs the same plumbing on CPU at toy sizes (a 32 px test ResNet, a few steps): bf16 for both checks
(fp16 needs CUDA), so the kill/resume/compare path is exercised where there is no GPU.

    python -m benchmarks.gpu_trainer {bf16,fp16-resume} --out DIR [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import runpy
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Fallback comparison when the run reported nondeterministic ops: relative L2 gap per tensor.
_TOLERANCE = 1e-2
_NONDETERMINISTIC = re.compile(r"(\S+) does not have a deterministic implementation")

# (GPU size, dry-run size) of each knob.
_SIZES = {
    "bf16": {
        "arch": ("resnet50", "test_resnet"),
        "image_size": (224, 32),
        "batch_size": (128, 8),
        "synthetic_size": (4096, 64),
        "steps": (30, 4),
    },
    "fp16-resume": {
        "arch": ("resnet18", "test_resnet"),
        "image_size": (112, 32),
        "batch_size": (64, 8),
        "synthetic_size": (2048, 64),
        "steps": (30, 6),
        "every": (10, 2),
    },
}


def _size(check: str, key: str, dry_run: bool):
    return _SIZES[check][key][1 if dry_run else 0]


def _train_args(check: str, out: Path, precision: str, dry_run: bool, *extra: str) -> list[str]:
    """Command-line words for `mixmo_dist.train`: synthetic data, one process, channels_last, per-step metrics."""
    steps = _size(check, "steps", dry_run)
    return [
        "--data.backend=synthetic",
        f"--data.synthetic_size={_size(check, 'synthetic_size', dry_run)}",
        f"--data.image_size={_size(check, 'image_size', dry_run)}",
        f"--data.batch_size={_size(check, 'batch_size', dry_run)}",
        f"--model.arch={_size(check, 'arch', dry_run)}",
        "--model.channels_last=true",
        f"--run.mixed_precision={precision}",
        f"--run.output_dir={out}",
        "--schedule.epochs=100",  # the stop comes from max_steps; the LR schedule is the same for every run
        "--schedule.warmup_epochs=0",
        f"--schedule.max_steps={steps}",
        "--checkpoint.every_n_minutes=null",
        "--eval.every_n_epochs=100",
        "--log.every_n_steps=1",
        "--log.progress=lines",
        *extra,
    ]


def _env(deterministic: bool) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if deterministic:
        env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # what cuBLAS needs for deterministic GEMMs
    return env


def _start(args: list[str], log: Path, deterministic: bool) -> subprocess.Popen:
    """The trainer as a child in this process's group (a stage killed by the runbook takes its trainers along)."""
    if deterministic:
        cmd = [sys.executable, "-m", "benchmarks.gpu_trainer", "train-deterministic", *args]
    else:
        cmd = [sys.executable, "-m", "mixmo_dist.train", *args]
    handle = log.open("w")
    try:
        return subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=_env(deterministic))
    finally:
        handle.close()


def _wait(proc: subprocess.Popen, log: Path, what: str) -> str:
    rc = proc.wait()
    text = log.read_text(errors="replace")
    if rc != 0:
        raise RuntimeError(f"{what} exited {rc}; last lines of {log}:\n{text[-3000:]}")
    return text


def _train_records(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line being written while we read
            continue
        if rec.get("split") == "train":
            records.append(rec)
    return records


def check_bf16(out_dir: Path, dry_run: bool) -> dict:
    """One bf16 channels_last run; its throughput and sanity checks."""
    out = out_dir / "trainer_bf16"
    steps = _size("bf16", "steps", dry_run)
    start = time.monotonic()
    proc = _start(_train_args("bf16", out, "bf16", dry_run), out_dir / "trainer_bf16.train.log", False)
    _wait(proc, out_dir / "trainer_bf16.train.log", "the bf16 run")
    run = json.loads((out / "run.json").read_text())
    records = _train_records(out)
    losses = [r["loss"] for r in records]
    problems = []
    if [r["step"] for r in records] != list(range(1, steps + 1)):
        problems.append(f"train steps logged: {[r['step'] for r in records]}")
    if not all(isinstance(v, float) and v == v and abs(v) != float("inf") for v in losses):
        problems.append(f"non-finite loss: {losses}")
    if run["mixed_precision"] != "bf16":
        problems.append(f"run.json mixed_precision {run['mixed_precision']!r}")
    if not dry_run and not run["device"].startswith("cuda"):
        problems.append(f"run.json device {run['device']!r}")
    rates = [r["img_per_s"] for r in records[min(5, len(records) - 1) :]]  # after warm-up (cuDNN, Triton JIT)
    return {
        "ok": not problems,
        "problems": problems,
        "device": run["device"],
        "mixed_precision": run["mixed_precision"],
        "arch": run["config"]["model"]["arch"],
        "rows_per_step": run["plan"]["rows_per_rank"],
        "steps": len(records),
        "img_per_s_median": statistics.median(rates) if rates else None,
        "loss_first_last": [losses[0], losses[-1]] if losses else None,
        "seconds": time.monotonic() - start,
    }


def _complete_steps(out: Path) -> list[int]:
    return sorted(int(p.parent.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*/COMPLETE"))


def _compare(final_a: Path, final_b: Path) -> dict:
    """Bitwise and relative-L2 comparison of two checkpoints' tensors (model and trainer files)."""
    import torch
    from safetensors.torch import load_file

    equal, worst, worst_key = True, 0.0, None
    for name in ("model.safetensors", "trainer.safetensors"):
        a, b = load_file(final_a / name), load_file(final_b / name)
        if a.keys() != b.keys():
            return {"bit_identical": False, "max_rel_l2": float("inf"), "worst": f"{name}: different keys"}
        for key in a:
            if torch.equal(a[key], b[key]):
                continue
            equal = False
            x, y = a[key].double(), b[key].double()
            gap = float(torch.linalg.vector_norm(x - y) / torch.linalg.vector_norm(x).clamp_min(1e-30))
            if gap > worst:
                worst, worst_key = gap, f"{name}:{key}"
    return {"bit_identical": equal, "max_rel_l2": worst, "worst": worst_key}


def check_fp16_resume(out_dir: Path, dry_run: bool) -> dict:
    """A uninterrupted, B SIGKILLed after its first checkpoint and resumed; B's final state must equal A's."""
    precision = "bf16" if dry_run else "fp16"
    steps, every = _size("fp16-resume", "steps", dry_run), _size("fp16-resume", "every", dry_run)
    out_a, out_b = out_dir / "trainer_fp16_a", out_dir / "trainer_fp16_b"
    logs = {k: out_dir / f"trainer_fp16_{k}.train.log" for k in ("a", "b_killed", "b_resumed")}
    start = time.monotonic()
    extra = f"--checkpoint.every_n_steps={every}"
    proc_a = _start(_train_args("fp16-resume", out_a, precision, dry_run, extra), logs["a"], True)
    proc_b = _start(_train_args("fp16-resume", out_b, precision, dry_run, extra), logs["b_killed"], True)
    # Kill B one step past its first checkpoint: mid-run, with steps after the checkpoint to be redone on resume.
    while not (_complete_steps(out_b) and _train_records(out_b) and _train_records(out_b)[-1]["step"] > every):
        if proc_b.poll() is not None:
            raise RuntimeError(f"run B ended (exit {proc_b.returncode}) before it could be killed: {logs['b_killed']}")
        time.sleep(0.02)
    proc_b.send_signal(signal.SIGKILL)
    proc_b.wait()
    killed_at = _train_records(out_b)[-1]["step"]
    last_ckpt = _complete_steps(out_b)[-1]
    if last_ckpt >= steps:
        raise RuntimeError(f"run B was killed only after its final checkpoint (step {last_ckpt}): nothing to resume")
    proc_b = _start(_train_args("fp16-resume", out_b, precision, dry_run, extra), logs["b_resumed"], True)
    text_b = _wait(proc_b, logs["b_resumed"], "the resumed run B")
    text_a = _wait(proc_a, logs["a"], "run A")
    resumed = re.search(r"resumed from step (\d+)", text_b)
    final = f"step_{steps:08d}"
    result = _compare(out_a / "checkpoints" / final, out_b / "checkpoints" / final)
    state_a = json.loads((out_a / "checkpoints" / final / "state.json").read_text())
    state_b = json.loads((out_b / "checkpoints" / final / "state.json").read_text())
    nondeterministic = sorted(set(_NONDETERMINISTIC.findall(text_a + text_b)))
    problems = []
    if not resumed or int(resumed.group(1)) != last_ckpt:
        problems.append(f"run B did not resume from step {last_ckpt}")
    if state_a["scaler"] != state_b["scaler"]:
        problems.append(f"GradScaler state differs: {state_a['scaler']} vs {state_b['scaler']}")
    if not dry_run and not state_a["scaler"]:
        problems.append("no GradScaler state in the fp16 checkpoint")
    if result["bit_identical"]:
        comparison = "bit-identical (deterministic algorithms, CUBLAS_WORKSPACE_CONFIG=:4096:8)"
    elif nondeterministic and result["max_rel_l2"] <= _TOLERANCE:
        comparison = f"within relative L2 {_TOLERANCE:g} per tensor (nondeterministic ops: {nondeterministic})"
    else:
        comparison = "differs"
        problems.append(f"final weights differ: max relative L2 {result['max_rel_l2']:.3g} at {result['worst']}")
    half = _compare(out_a / "checkpoints" / f"step_{every:08d}", out_a / "checkpoints" / final)
    if half["bit_identical"]:
        problems.append("the first checkpoint equals the final one: the run did not train")
    return {
        "ok": not problems,
        "problems": problems,
        "mixed_precision": precision,
        "killed_at_step": killed_at,
        "resumed_from_step": last_ckpt,
        "final_step": steps,
        "comparison": comparison,
        **result,
        "nondeterministic_ops": nondeterministic,
        "scaler_final": state_a["scaler"],
        "seconds": time.monotonic() - start,
    }


def _train_deterministic(argv: list[str]) -> None:
    """`python -m mixmo_dist.train ARGV` with deterministic algorithms switched on first."""
    import torch

    torch.use_deterministic_algorithms(True, warn_only=True)
    sys.argv = ["mixmo_dist.train", *argv]
    runpy.run_module("mixmo_dist.train", run_name="__main__", alter_sys=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train-deterministic"]:
        _train_deterministic(argv[1:])
        return 0
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_trainer", description=__doc__.splitlines()[0])
    parser.add_argument("check", choices=["bf16", "fp16-resume"])
    parser.add_argument("--out", required=True, help="directory for the runs and <check>.json")
    parser.add_argument("--dry-run", action="store_true", help="CPU, toy sizes, bf16 instead of fp16")
    args = parser.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = {"bf16": "trainer_bf16", "fp16-resume": "trainer_fp16_resume"}[args.check]
    try:
        result = (check_bf16 if args.check == "bf16" else check_fp16_resume)(out_dir, args.dry_run)
    except (RuntimeError, OSError, KeyError, ValueError) as err:
        result = {"ok": False, "problems": [f"{type(err).__name__}: {err}"]}
    result["dry_run"] = args.dry_run
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
