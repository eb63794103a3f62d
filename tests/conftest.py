"""Shared fixtures: a tiny generated ImageNet-layout dataset of real JPEGs, and launchers for real trainer runs."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from slurm_support import slurm_cluster  # noqa: F401  (the session's one SLURM cluster, shared by every module)

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
# `accelerate launch` as the module it runs: the same `launch_command` (cluster/slurm.py starts SLURM nodes this way).
# The `accelerate` console script imports every subcommand first, `estimate` among them, which imports timm: 5.1 s
# before the ranks start against 2.3 s here, paid by each of the suite's launches. test_cli runs the script itself
# (`launcher=ACCELERATE_SCRIPT`).
ACCELERATE_SCRIPT = [str(VENV_BIN / "accelerate"), "launch"]
ACCELERATE_LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """10 classes x 7 train JPEGs, 49 val JPEGs (one removed: a count not divisible by the world size)."""
    root = tmp_path_factory.mktemp("tiny_data") / "demo"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "mixmo_dist.data.demo",
            "--out",
            str(root),
            "--train-per-class",
            "7",
            "--val-per-class",
            "5",
        ],
        check=True,
        cwd=REPO,
        capture_output=True,
    )
    victim = sorted((root / "val").rglob("*.JPEG"))[0]
    victim.unlink()
    return root


@contextmanager
def tmpfs_mount(path: Path, size: str):
    """`path` as a new tmpfs of `size` (e.g. "64k") for the block, unmounted afterwards; skips without root or mount."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@contextmanager
def read_only_mount(path: Path, source: Path | None = None):
    """`path` as a read-only mount for the block: an empty tmpfs, or a read-only bind of `source` (a copy of a run).

    Root ignores file modes, so only a read-only mount refuses root's writes; mounting needs root (CI runs as root).
    Unmounted afterwards, whatever happens inside the block.
    """
    if os.geteuid() != 0:
        pytest.skip("needs root to make a read-only mount (root ignores file modes, so nothing else is read-only)")
    path.mkdir(parents=True, exist_ok=True)
    if source is None:
        steps = [["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)]]
    else:
        steps = [["mount", "--bind", str(source), str(path)], ["mount", "-o", "remount,bind,ro", str(path)]]
    for i, cmd in enumerate(steps):
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            if i:
                subprocess.run(["umount", str(path)], check=True)
            pytest.skip(f"cannot make a read-only mount here ({' '.join(cmd)}): {res.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def without_root_file_access() -> None:
    """A `preexec_fn`: the child, root here, loses the capabilities that let root ignore file modes
    (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), so a chmod 000 file or folder refuses it as it refuses any user.

    Dropped from the bounding set before `exec`, they are absent from the new program's capabilities; the child
    stays root and can still write its own (root-owned) temporary directories.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), f"prctl(PR_CAPBSET_DROP, {cap})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_args(data: Path, out: Path, *extra: str) -> list[str]:
    """A resnet18 at 32 px, 8 rows per rank (4 unique x 2 repetitions): 9 steps per epoch on 2 ranks."""
    return [
        f"--data.root={data}",
        "--data.image_size=32",
        "--data.batch_size=8",
        "--data.num_workers=1",
        "--data.backend=torch",
        "--schedule.epochs=2",
        "--schedule.warmup_epochs=0",
        "--optim.lr_reference_batch=32",
        f"--run.output_dir={out}",
        "--log.every_n_steps=1",
        "--log.progress=lines",
        "--checkpoint.every_n_steps=6",
        *extra,
    ]


def train_env(**extra: str) -> dict:
    env = dict(os.environ)
    # torch >= 2.14's torchrun overwrites TORCHELASTIC_SIGNALS_TO_HANDLE from its --signals-to-handle option, whose
    # default comes from PET_SIGNALS_TO_HANDLE: set both so SIGUSR2 is forwarded to the ranks.
    signals = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2"
    env.update(
        OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TORCHELASTIC_SIGNALS_TO_HANDLE=signals, PET_SIGNALS_TO_HANDLE=signals
    )
    env.update(extra)
    return env


def launch(
    args: list[str],
    nproc: int = 2,
    env: dict | None = None,
    mixed_precision: str = "no",
    module: str = "mixmo_dist.train",
    launcher: list[str] = ACCELERATE_LAUNCH,
    **popen,
) -> subprocess.Popen:
    """`accelerate launch --multi_gpu --num_processes N --mixed_precision P -m mixmo_dist.train ARGS` as a real
    process group (N = 1: plain `python -m mixmo_dist.train ARGS`, which has no launcher precision); `module` runs
    another module (the tests' own rank programs, e.g. `ckpt_ranks` from this folder) the same way."""
    if nproc == 1:
        cmd = [sys.executable, "-m", module, *args]
    else:
        cmd = [
            *launcher,
            "--multi_gpu",
            "--num_processes",
            str(nproc),
            "--num_machines",
            "1",
            "--mixed_precision",
            mixed_precision,
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(free_port()),
            "-m",
            module,
            *args,
        ]
    popen.setdefault("cwd", REPO)
    # A tag in the environment of every process of this run (launcher, ranks, their DataLoader forkservers and
    # workers), so that `kill_run` finds them all: torchrun puts each rank in its own session.
    tag = uuid.uuid4().hex
    proc = subprocess.Popen(
        cmd,
        env={**(env or train_env()), RUN_TAG: tag},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **popen,
    )
    proc.run_tag = tag
    return proc


RUN_TAG = "MIXMO_TEST_RUN_TAG"


def run_processes(tag: str) -> dict[int, dict[str, str]]:
    """{pid: environment} of the live (non-zombie) processes of the `launch`ed run tagged `tag` (`proc.run_tag`)."""
    needle = f"{RUN_TAG}={tag}".encode()
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        if needle in environ and state not in ("Z", "X"):
            found[int(entry)] = dict(w.decode(errors="replace").partition("=")[::2] for w in environ if b"=" in w)
    return found


def kill_run(proc: subprocess.Popen) -> str:
    """SIGKILL every process of a `launch`ed run and return its output.

    Killing the launcher's group is not enough: a rank killed (or crashed) without its DataLoader forkserver leaves
    that forkserver alive and holding the output pipe, and reading the output would then block for good.
    """
    for pid in run_processes(proc.run_tag):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    out, _ = proc.communicate(timeout=60)
    return out


def run_train(
    args: list[str],
    nproc: int = 2,
    env: dict | None = None,
    timeout: float = 600,
    mixed_precision: str = "no",
    module: str = "mixmo_dist.train",
    launcher: list[str] = ACCELERATE_LAUNCH,
) -> tuple[int, str]:
    popen = {"cwd": REPO / "tests"} if module != "mixmo_dist.train" else {}
    proc = launch(args, nproc, env, mixed_precision, module, launcher, **popen)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_run(proc)
        raise
    return proc.returncode, out


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def reference_run(tiny_data, tmp_path_factory) -> Path:
    """An uninterrupted 2-rank gloo run of 18 steps (2 epochs of 9), checkpoints at 6, 12, 18."""
    out = tmp_path_factory.mktemp("reference") / "run"
    rc, log = run_train(tiny_args(tiny_data, out))
    assert rc == 0, log[-4000:]
    return out


def launch_two_machines(args: list[str], cwds: tuple[Path, Path] = (REPO, REPO)) -> list[subprocess.Popen]:
    """Two `accelerate launch` of one process each (machine ranks 0 and 1) forming one world of 2.

    Unlike one launcher with 2 processes, neither launcher stops the other's rank when its own fails: a rank left
    waiting in a collective would wait until the timeout, as on two real nodes.
    """
    port = str(free_port())
    procs = []
    for machine in (0, 1):
        cmd = [
            *ACCELERATE_LAUNCH,
            "--multi_gpu",
            "--num_machines",
            "2",
            "--machine_rank",
            str(machine),
            "--num_processes",
            "2",
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            port,
            "--same_network",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "mixmo_dist.train",
            *args,
        ]
        procs.append(
            subprocess.Popen(
                cmd,
                cwd=cwds[machine],
                env=train_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        )
    return procs


def train_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m mixmo_dist.train ARGS` to completion (quick answers: --help, config errors), output captured."""
    return subprocess.run(
        [sys.executable, "-m", "mixmo_dist.train", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=env or train_env(),
    )
