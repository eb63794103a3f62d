"""Shared by the SLURM tests: the two-node cluster (a session fixture) and helpers to run, signal and watch jobs.

The cluster is the real one of `scripts/slurm_cluster.sh`: munged and slurmctld in this namespace, one slurmd per
node in a network + UTS + mount namespace of its own (see the script's header). `conftest.py` imports the fixture so
that every test module shares one cluster.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SCRIPT = REPO / "scripts" / "slurm_cluster.sh"
# squeue states after which a job never runs again (submit's list, plus what a vanished job reads as).
FINAL_STATES = frozenset(
    {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED"}
    | {"SPECIAL_EXIT", "TIMEOUT"}
)


@dataclass(frozen=True)
class Node:
    """One compute node of the test cluster: its SLURM/host name, network namespace and address."""

    name: str
    netns: str
    addr: str


@dataclass(frozen=True)
class Cluster:
    """A running test cluster: the environment its clients need (SLURM_CONF) and its nodes in SLURM's order."""

    env: dict[str, str]
    nodes: tuple[Node, ...]


@pytest.fixture(scope="session")
def slurm_cluster() -> Cluster:
    """The two-node SLURM of scripts/slurm_cluster.sh, started once for the session (skip or fail if it cannot)."""
    was_running = subprocess.run(["bash", str(CLUSTER_SCRIPT), "status"], capture_output=True).returncode == 0
    try:
        res = subprocess.run(["bash", str(CLUSTER_SCRIPT), "start"], capture_output=True, text=True, timeout=900)
        failure = None if res.returncode == 0 else res.stderr.strip()[-800:]
    except (OSError, subprocess.TimeoutExpired) as err:
        failure = str(err)
    if failure is not None:
        reason = f"the two-node SLURM could not be started by {CLUSTER_SCRIPT.name}: {failure}"
        if os.environ.get("MIXMO_REQUIRE_SLURM") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    conf = re.search(r"^export SLURM_CONF=(\S+)$", res.stdout, re.MULTILINE).group(1)
    listing = subprocess.run(["bash", str(CLUSTER_SCRIPT), "nodes"], capture_output=True, text=True, check=True)
    nodes = tuple(Node(*line.split()) for line in listing.stdout.splitlines())
    yield Cluster(env={"SLURM_CONF": conf}, nodes=nodes)
    if not was_running:  # leave a cluster someone else started alone
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop"], capture_output=True, timeout=300)


def tiny(data: Path, out: Path, *extra: str) -> list[str]:
    """Trainer words: resnet18 at 32 px, 8 rows per rank (4 unique x 2 repetitions) on the tiny demo set."""
    return [
        "--config", str(REPO / "configs" / "demo.yaml"), f"--data.root={data}", "--data.image_size=32",
        "--data.batch_size=8", "--data.num_workers=0", "--data.backend=torch", "--schedule.warmup_epochs=0",
        f"--run.output_dir={out}", "--log.every_n_steps=1", "--log.progress=lines", *extra,
    ]  # fmt: skip


def job_env(cluster: Cluster | None = None, **extra: str) -> dict[str, str]:
    """The environment a test submits with (sbatch and submitit pass it on to the job)."""
    env = dict(os.environ)
    # PYTHONPATH: jobs import this checkout even when started outside it. One thread per rank: 2 cores shared.
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MIXMO_PYTHON=sys.executable)
    if cluster is not None:
        env.update(cluster.env)
    env.update(extra)
    return env


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.2):
    """Poll `predicate` until it returns a true value (returned); AssertionError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def records(out: Path, split: str) -> list[dict]:
    """The run's metrics.jsonl records of one split ("train" or "val")."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("split") == split]


def train_records(out: Path) -> list[dict]:
    return records(out, "train")


def scontrol_job(job_id: str, env: dict[str, str]) -> str:
    return subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True).stdout


def cancel(job_id: str | None, env: dict[str, str]) -> None:
    if job_id:
        subprocess.run(["scancel", job_id], env=env, capture_output=True)


def preempt_and_release(job_id: str, out: Path, env: dict[str, str]) -> None:
    """SIGUSR2 the running job once it has a checkpoint, wait for its requeue, release it from the ~120 s wait."""
    wait_for(lambda: (out / "checkpoints" / "latest").exists(), 300, "the first checkpoint", poll_s=0.5)
    subprocess.run(["scancel", "--signal=USR2", job_id], env=env, check=True)
    # The trainer saves at the next step boundary, then rank 0 has the job requeued (`scontrol requeue`).
    wait_for(lambda: "JobState=PENDING" in scontrol_job(job_id, env), 120, "the requeue", poll_s=0.5)
    assert "Restarts=1" in scontrol_job(job_id, env)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=env, check=True)


def final_state(job_id: str, env: dict[str, str], timeout_s: float) -> str:
    """Poll until the job leaves the queue; its last state (MinJobAge keeps it listed for a while), or GONE."""

    def finished() -> str | None:
        res = subprocess.run(
            ["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"], env=env, capture_output=True, text=True
        )
        state = res.stdout.strip()
        if "Invalid job id" in res.stderr or (res.returncode == 0 and not state):
            return "GONE"
        return state if state in FINAL_STATES else None  # None also when squeue failed: ask again

    return wait_for(finished, timeout_s, f"job {job_id} to finish", poll_s=1.0)


def process_environ(pid: int) -> dict[str, str]:
    """The environment of process `pid` ({} once it has exited)."""
    try:
        words = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return {}
    return dict(w.decode(errors="replace").partition("=")[::2] for w in words if b"=" in w)


def node_processes(node: Node) -> dict[int, tuple[str, str]]:
    """Every process in the node's network namespace: {pid: (command name, command line)}."""
    pids = subprocess.run(["ip", "netns", "pids", node.netns], capture_output=True, text=True, check=True).stdout
    table = {}
    for pid in map(int, pids.split()):
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # exited meanwhile
            continue
        table[pid] = (comm, cmdline.strip())
    return table


def job_processes(node: Node) -> dict[int, tuple[str, str]]:
    """The node's processes other than its slurmd: what jobs (slurmstepd and the tasks under it) left there."""
    return {pid: proc for pid, proc in node_processes(node).items() if proc[0] != "slurmd"}


def step_tasks(node: Node, job_id: str, step: str = "0") -> dict[int, str]:
    """The processes that a job step's tasks started on the node: every descendant of its slurmstepd
    ("slurmstepd: [JOB.STEP]"), not slurmstepd itself. {pid: command line}."""
    table = node_processes(node)
    parents = {}
    for pid in table:
        try:
            # /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces, so split after its ")".
            parents[pid] = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    stepd = [pid for pid, (_, cmd) in table.items() if cmd.startswith(f"slurmstepd: [{job_id}.{step}]")]
    found, frontier = {}, list(stepd)
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in found:
                found[pid] = table[pid][1]
                frontier.append(pid)
    return found
