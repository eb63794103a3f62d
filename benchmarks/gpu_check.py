"""The GPU runbook (`make gpu-check`): every GPU check in stages with hard time budgets, within one short lease.

Stages, in order (budget in seconds; the whole run ends by itself within `TOTAL_BUDGET_S`, default 345 s):

| stage | budget | what |
|---|---|---|
| environment | 20 | GPU name, versions; stops the run when torch sees no CUDA |
| pytest_gpu | 75 | `pytest -m gpu` on every test file that has `gpu`-marked tests |
| trainer_bf16 | 45 | `python -m mixmo_dist.train`: synthetic data, bf16, channels_last, one process |
| trainer_fp16_resume | 80 | fp16 + GradScaler: SIGKILL mid-run, resume, compare with an uninterrupted run |
| bench_ops | 30 | the mixing block on the GPU against `a + b` (`benchmarks.bench_ops --gpu-only`) |
| bench_overhead | 40 | the trainer (`accelerate launch`) against a bare loop, one process, A B (`--quick`) |
| bench_gpu | 50 + time left over | MixMo vs vanilla train steps, folded inference (`benchmarks.bench_gpu`) |

The trainer stages are `benchmarks.gpu_trainer`. Each stage is a child process in its own process group: at its
budget it gets SIGTERM, 3 s later SIGKILL (with every process it started), and the next stage starts on time. A
stage never starts with less than 5 s to go, and none runs past the total deadline. `gpu_check.json` is rewritten
atomically before and after every stage (status running / passed / failed / timeout / skipped, exit code, seconds,
budget, and the stage's own JSON result when it wrote one), so a kill of the whole run keeps what was measured.
Logs: `<stage>.log`.

Dry run (`MIXMO_GPU_CHECK_DRY_RUN=1`): the same stages on CPU at toy sizes, to test the plumbing where there is no
GPU: pytest only collects (`--collect-only`), the trainer checks run on a 32 px test ResNet (bf16 for both), bench_gpu
runs its CPU smoke configuration, and the CUDA-only bench_ops stage is marked skipped; stage budgets and the
deadline are 4 times the GPU ones. `MIXMO_GPU_CHECK_BUDGETS="stage=seconds,..."` overrides budgets (tests use it
to cut a stage off).

This module needs only the standard library; the stages need torch (CUDA), Triton, timm, accelerate, pytest,
safetensors; no DALI, no submitit, no network.

    python -m benchmarks.gpu_check [OUT_DIR]      (default: $OUT if set, else runs/gpu_check)
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DRY_RUN_ENV = "MIXMO_GPU_CHECK_DRY_RUN"
BUDGETS_ENV = "MIXMO_GPU_CHECK_BUDGETS"
# Default deadline of the whole run: ends by itself within 6 minutes, kill graces included.
DEFAULT_TOTAL_S = 345.0
# Stage budgets and the total deadline are multiplied by this in a dry run.
DRY_RUN_BUDGET_SCALE = 4.0
_MIN_STAGE_S = 5.0
_KILL_GRACE_S = 3.0

_ENVIRONMENT = r"""
import json, platform, sys
import torch
dry = sys.argv[1] == "1"
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available()}
for name in ("triton", "timm", "accelerate", "safetensors", "pytest"):
    try:
        info[name] = __import__(name).__version__
    except ImportError:
        info[name] = None
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_mem_GiB=round(p.total_memory / 2**30, 1),
                device_count=torch.cuda.device_count())
print(json.dumps(info, indent=2))
with open(sys.argv[2], "w") as f:
    json.dump(info, f, indent=2)
if not dry and not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA device")
if not dry and info["triton"] is None:
    sys.exit("gpu_check: Triton is missing")
"""


@dataclass
class Stage:
    """One step of the runbook: a command, its budget, and where its JSON result (if any) lands."""

    name: str
    budget_s: float
    cmd: list[str] | None  # None: skipped (CUDA-only stage in a dry run)
    result_file: str | None = None
    parse_log: Callable[[str], dict] | None = None  # for stages without a JSON file of their own
    takes_slack: bool = False  # the last stage may use the time earlier stages left unused
    skip_reason: str = ""


def _pytest_summary(text: str) -> dict:
    """Per-test outcomes from `pytest -v` lines (they are written as tests end, so a cut-off run keeps them)."""
    outcomes: dict[str, str] = {}
    collected = []
    for line in text.splitlines():
        line = line.strip()
        if "::" not in line:
            continue
        words = line.split()
        if len(words) >= 2 and words[1] in ("PASSED", "FAILED", "SKIPPED", "ERROR", "XFAIL", "XPASS"):
            outcomes[words[0]] = words[1]
        elif len(words) == 1 and line.startswith("tests/"):  # --collect-only -q: one node id per line
            collected.append(line)
    counts: dict[str, int] = {}
    for outcome in outcomes.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    return {"counts": counts, "outcomes": outcomes, "collected": collected}


def gpu_test_files(root: Path = ROOT) -> list[str]:
    """Test files holding `gpu`-marked tests, test_gpu.py last: its compiled test is the slowest, and a cut-off at
    the stage's budget then costs only what comes after it."""
    files = sorted(p.relative_to(root).as_posix() for p in (root / "tests").glob("test_*.py")
                   if re.search(r"mark\.gpu\b", p.read_text()))  # fmt: skip
    return sorted(files, key=lambda f: f.endswith("/test_gpu.py"))


def build_stages(out: Path, dry_run: bool, python: str = sys.executable) -> list[Stage]:
    """The runbook's stages for this machine (GPU) or for a CPU dry run."""
    dry = ["--dry-run"] if dry_run else []
    pytest = [python, "-m", "pytest", "-m", "gpu", *gpu_test_files(), "-p", "no:cacheprovider", "-o", "addopts=",
              "--continue-on-collection-errors"]  # fmt: skip
    pytest += ["--collect-only", "-q"] if dry_run else ["-v", "-rA", "--durations=10"]
    if dry_run:
        bench_gpu = ["--device", "cpu", "--arch", "resnet18", "--batch", "2", "--image-size", "32",
                     "--num-classes", "5", "--steps", "2", "--warmup", "1", "--rounds", "2", "--dtypes", "bf16",
                     "--compile", "off"]  # fmt: skip
    else:
        bench_gpu = []
    overhead = ["--quick", "--ranks", "1", "--device", "cpu" if dry_run else "cuda"]
    return [
        Stage(
            "environment",
            20,
            [python, "-c", _ENVIRONMENT, "1" if dry_run else "0", str(out / "environment.json")],
            result_file="environment.json",
        ),
        Stage("pytest_gpu", 75, pytest, parse_log=_pytest_summary),
        Stage(
            "trainer_bf16",
            45,
            [python, "-m", "benchmarks.gpu_trainer", "bf16", "--out", str(out), *dry],
            result_file="trainer_bf16.json",
        ),
        Stage(
            "trainer_fp16_resume",
            80,
            [python, "-m", "benchmarks.gpu_trainer", "fp16-resume", "--out", str(out), *dry],
            result_file="trainer_fp16_resume.json",
        ),
        Stage(
            "bench_ops",
            30,
            None
            if dry_run
            else [python, "-m", "benchmarks.bench_ops", "--gpu-only", "--json", str(out / "bench_ops.json")],
            result_file="bench_ops.json",
            skip_reason="CUDA only (dry run)",
        ),  # fmt: skip
        # The trainer against a bare loop on one GPU (a CPU dry run: the same on CPU); quick: one A B turn, 2 epochs.
        Stage(
            "bench_overhead",
            40,
            [python, "-m", "benchmarks.bench_overhead", *overhead, "--json", str(out / "bench_overhead.json")],
            result_file="bench_overhead.json",
        ),
        # --budget-s is filled in at start time from the stage's own budget.
        Stage(
            "bench_gpu",
            50,
            [python, "-m", "benchmarks.bench_gpu", "--out", str(out), *bench_gpu],
            result_file="bench_gpu.json",
            takes_slack=True,
        ),  # fmt: skip
    ]


def _budgets_override(stages: list[Stage], spec: str) -> None:
    names = {s.name: s for s in stages}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, value = item.partition("=")
        if name not in names:
            raise SystemExit(f"{BUDGETS_ENV}: unknown stage {name!r}; stages: {', '.join(names)}")
        names[name].budget_s = float(value)


class Report:
    """gpu_check.json, rewritten atomically (temp file + rename) at every change."""

    def __init__(self, path: Path, header: dict):
        self.path = path
        self.data = {**header, "stages": {}}
        self.write()

    def write(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        os.replace(tmp, self.path)

    def stage(self, name: str, **fields) -> None:
        self.data["stages"].setdefault(name, {}).update(fields)
        self.write()


def _run_stage(stage: Stage, budget_s: float, out: Path, env: dict) -> tuple[str, int | None, float]:
    """Run one stage under its budget. Returns (status, exit code or None when killed, seconds)."""
    log = out / f"{stage.name}.log"
    start = time.monotonic()
    with log.open("w") as handle:
        proc = subprocess.Popen(stage.cmd, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        try:
            rc = proc.wait(timeout=max(budget_s - _KILL_GRACE_S, 1.0))
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return "timeout", None, time.monotonic() - start
    return ("passed" if rc == 0 else "failed"), rc, time.monotonic() - start


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the stage's process group, SIGKILL after the grace period (children included)."""
    for sig, wait_s in ((signal.SIGTERM, _KILL_GRACE_S), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:  # the leader is gone; its children may not be
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return


def run(out: Path, dry_run: bool, total_budget_s: float, budgets: str = "") -> dict:
    """Run every stage in order; returns the final report (also in `out/gpu_check.json`)."""
    out.mkdir(parents=True, exist_ok=True)
    stages = build_stages(out, dry_run)
    if dry_run:  # a shared 2-core CPU machine is far slower than the GPU machine's 16 cores for the same plumbing
        total_budget_s *= DRY_RUN_BUDGET_SCALE
        for stage in stages:
            stage.budget_s *= DRY_RUN_BUDGET_SCALE
    _budgets_override(stages, budgets)
    started = time.monotonic()
    deadline = started + total_budget_s
    report = Report(out / "gpu_check.json", {"dry_run": dry_run, "total_budget_s": total_budget_s,
                                             "started_unix": time.time(), "finished": False})  # fmt: skip
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("TRITON_INTERPRET", None)  # interpreted "GPU" kernels would prove nothing
    if dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""
    for stage in stages:
        left = deadline - time.monotonic()
        budget = left if stage.takes_slack else min(stage.budget_s, left)
        if stage.cmd is None:
            report.stage(stage.name, status="skipped", reason=stage.skip_reason, budget_s=stage.budget_s)
            continue
        if left < _MIN_STAGE_S:
            report.stage(stage.name, status="skipped", reason=f"{left:.0f} s left of {total_budget_s:.0f} s",
                         budget_s=stage.budget_s)  # fmt: skip
            continue
        cmd = list(stage.cmd)
        if stage.name == "bench_gpu":
            cmd += ["--budget-s", f"{max(budget - 20.0, 10.0):.0f}"]  # its own skip logic, inside the hard cap
        stage.cmd = cmd
        report.stage(stage.name, status="running", budget_s=round(budget, 1), log=f"{stage.name}.log",
                     started_s=round(time.monotonic() - started, 1))  # fmt: skip
        print(f"=== {stage.name} (budget {budget:.0f} s, {time.monotonic() - started:.0f} s elapsed)", flush=True)
        status, rc, seconds = _run_stage(stage, budget, out, env)
        fields = {"status": status, "exit_code": rc, "seconds": round(seconds, 1)}
        if stage.result_file and (out / stage.result_file).exists():
            try:
                fields["result"] = json.loads((out / stage.result_file).read_text())
            except json.JSONDecodeError as err:
                fields["result_error"] = f"{stage.result_file}: {err}"
        if stage.parse_log is not None:
            fields["result"] = stage.parse_log((out / f"{stage.name}.log").read_text(errors="replace"))
        report.stage(stage.name, **fields)
        print(f"=== {stage.name}: {status} in {seconds:.0f} s", flush=True)
        if stage.name == "environment" and status != "passed" and not dry_run:
            report.data["aborted"] = "environment check failed: no CUDA or no Triton"
            break
    report.data.update(finished=True, seconds=round(time.monotonic() - started, 1))
    report.write()
    return report.data


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0] if argv else os.environ.get("OUT") or "runs/gpu_check")
    dry_run = os.environ.get(DRY_RUN_ENV, "") not in ("", "0")
    total = float(os.environ.get("TOTAL_BUDGET_S", DEFAULT_TOTAL_S))
    result = run(out, dry_run, total, os.environ.get(BUDGETS_ENV, ""))
    print(f"=== gpu_check {'dry run ' if dry_run else ''}done in {result['seconds']:.0f} s; results in {out}")
    bad = {k: v["status"] for k, v in result["stages"].items() if v["status"] not in ("passed", "skipped")}
    for name, status in bad.items():
        print(f"=== {name}: {status.upper()} (see {out / (name + '.log')})")
    if "aborted" in result:
        return 2
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
