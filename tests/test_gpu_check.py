"""The GPU runbook's plumbing on CPU: `make gpu-check`'s dry run (`MIXMO_GPU_CHECK_DRY_RUN=1`).

No GPU here, so this checks what a short GPU lease cannot afford to find out: every stage starts, the JSON report
is rewritten while the run goes on (a kill keeps what was measured), a stage over its budget is cut off with the
processes it started, and the later stages still run. The trainer's SIGKILL-and-resume stage runs end to end at toy
size (bf16 on CPU instead of fp16).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _cmdlines() -> list[str]:
    lines = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                lines.append(Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode())
            except OSError:
                continue
    return lines


def _gpu_marked_files() -> set[str]:
    return {f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py") if re.search(r"mark\.gpu\b", p.read_text())}


@pytest.mark.slow
def test_dry_run_writes_json_per_stage_and_cuts_off_a_stage_over_budget(tmp_path):
    out = tmp_path / "gpu_check"
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        OMP_NUM_THREADS="1",
        MIXMO_GPU_CHECK_DRY_RUN="1",
        MIXMO_GPU_CHECK_BUDGETS="trainer_bf16=2",  # far below what a trainer run needs: it must be cut off
    )
    proc = subprocess.Popen(
        ["bash", "scripts/gpu_check.sh", str(out)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    # Watch the report while the run goes on: once the stage after the cut-off one runs, the earlier ones are final.
    seen_while_running = None
    t0 = time.monotonic()
    while proc.poll() is None and time.monotonic() - t0 < 850:  # pytest's own timeout is 900 s
        try:
            report = json.loads((out / "gpu_check.json").read_text())  # replaced atomically: never half-written
        except FileNotFoundError:
            report = {"stages": {}}
        if report["stages"].get("trainer_fp16_resume", {}).get("status") == "running" and seen_while_running is None:
            seen_while_running = report
            leftovers = [c for c in _cmdlines() if str(out / "trainer_bf16") in c]
        time.sleep(0.2)
    if proc.poll() is None:
        os.killpg(proc.pid, 9)
    log, _ = proc.communicate()
    assert proc.returncode == 1, log[-4000:]  # one stage timed out; everything else passed or was skipped

    assert seen_while_running is not None, f"never saw trainer_fp16_resume running:\n{log[-4000:]}"
    early = seen_while_running["stages"]
    assert early["environment"]["status"] == "passed" and early["environment"]["result"]["torch"]
    assert early["pytest_gpu"]["status"] == "passed"
    assert early["trainer_bf16"]["status"] == "timeout"
    assert "bench_gpu" not in early and seen_while_running["finished"] is False
    assert leftovers == [], f"the cut-off stage left its trainer running: {leftovers}"

    report = json.loads((out / "gpu_check.json").read_text())
    stages = report["stages"]
    assert report["dry_run"] is True and report["finished"] is True
    assert list(stages) == ["environment", "pytest_gpu", "trainer_bf16", "trainer_fp16_resume", "bench_ops",
                            "bench_overhead", "bench_gpu"]  # fmt: skip
    # The cut-off: killed at its budget (plus the SIGTERM grace), not when it would have finished.
    cut = stages["trainer_bf16"]
    assert cut["status"] == "timeout" and cut["exit_code"] is None and cut["seconds"] < 2 + 3 + 5, cut
    # pytest: the gpu-marked tests of every file that has some, test_metrics.py's included.
    collected = stages["pytest_gpu"]["result"]["collected"]
    assert {c.split("::")[0] for c in collected} >= _gpu_marked_files() - {"tests/test_data_dali.py"}, collected
    assert any(c.startswith("tests/test_metrics.py::") for c in collected)
    # The stages after the cut-off one ran to the end.
    resume = stages["trainer_fp16_resume"]
    assert resume["status"] == "passed", (out / "trainer_fp16_resume.log").read_text()[-4000:]
    res = resume["result"]
    assert res["ok"] and res["bit_identical"] and res["dry_run"], res
    assert res["resumed_from_step"] < res["killed_at_step"] < res["final_step"], res
    assert stages["bench_ops"]["status"] == "skipped"
    overhead = stages["bench_overhead"]
    assert overhead["status"] == "passed", (out / "bench_overhead.log").read_text()[-4000:]
    assert overhead["result"]["overhead_device"] == "cpu" and overhead["result"]["overhead_wall_ratio_1r"] > 0
    bench = stages["bench_gpu"]
    assert bench["status"] == "passed", (out / "bench_gpu.log").read_text()[-4000:]
    train = bench["result"]["train"]["bf16_compile=False"]
    assert train["ratio"] > 0 and train["mixmo"]["img_per_s"] > 0
    assert (out / "bench_gpu.json").exists() and (out / "trainer_fp16_resume.json").exists()


def test_stage_budgets_fit_the_lease():
    """The GPU stages' own budgets fit the default deadline, which with the last kill's grace ends within 6 min."""
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import gpu_check
    finally:
        sys.path.remove(str(ROOT))
    stages = gpu_check.build_stages(Path("/nonexistent"), dry_run=False)
    assert all(s.cmd for s in stages), "a GPU stage without a command"
    assert sum(s.budget_s for s in stages) <= gpu_check.DEFAULT_TOTAL_S
    assert gpu_check.DEFAULT_TOTAL_S + gpu_check._KILL_GRACE_S + 10 <= 360
