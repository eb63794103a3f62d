"""Intra-op threads per rank (issue 27), and the start-up line that breaks the time to the first step into parts.

`accelerate launch` puts OMP_NUM_THREADS=1 into the ranks' environment when the user left it unset, so a one-process
CPU run would compute on one core. Each rank takes the CPUs of its affinity divided by the ranks on its node, unless
the user set OMP_NUM_THREADS (a value the launcher set by itself does not count) or `run.num_threads`. Checked here
through real `accelerate launch` runs (1 and 2 processes), with the counts every rank recorded in run.json.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO, free_port, run_train, tiny_args, train_env

from mixmo_dist.runtime.threads import choose_threads, user_omp_threads

AFFINITY = len(os.sched_getaffinity(0))
_ONE_STEP = ("--schedule.max_steps=1", "--eval.at_end=false")
_LAUNCHED = {"ACCELERATE_DYNAMO_BACKEND": "NO", "OMP_NUM_THREADS": "1"}  # what `accelerate launch` gives a rank


def _env_without_omp(**extra: str) -> dict:
    env = train_env(CUDA_VISIBLE_DEVICES="")
    env.pop("OMP_NUM_THREADS")  # train_env sets 1 for the other tests; here the user sets nothing (or `extra`)
    return {**env, **extra}


def _accelerate_one_process(args: list[str], env: dict) -> tuple[int, str]:
    """`accelerate launch --num_processes 1` (not plain python: the launcher is what sets OMP_NUM_THREADS=1)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "-m", "mixmo_dist.train", *args]  # fmt: skip
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    return res.returncode, res.stdout + res.stderr


def _run_json(out) -> dict:
    return json.loads((out / "run.json").read_text())


def test_one_process_under_accelerate_launch_uses_every_cpu_of_its_affinity(tiny_data, tmp_path):
    """OMP_NUM_THREADS unset: the launcher's 1 is replaced by the affinity's CPUs; the run line says so; the start-up
    line names every part of the time to the first step."""
    out = tmp_path / "one"
    rc, log = _accelerate_one_process(tiny_args(tiny_data, out, *_ONE_STEP), _env_without_omp())
    assert rc == 0, log[-3000:]
    info = _run_json(out)
    assert info["num_threads"] == [AFFINITY], info["num_threads"]
    assert info["num_threads_from"] == f"auto: {AFFINITY} CPUs in the affinity / 1 ranks on the node"
    run_line = next(line for line in log.splitlines() if " INFO run: " in line)
    assert f'"num_threads": [{AFFINITY}]' in run_line, run_line
    startup = [line for line in log.splitlines() if " INFO startup: " in line]
    assert len(startup) == 1, log[-3000:]
    parts = ("imports", "runtime", "dataset index", "model build", "resume", "loader start", "first batch",
             "first step")  # fmt: skip
    found = re.findall(r"([a-z ]+) (\d+\.\d\d) s", startup[0].split("startup: ", 1)[1])
    assert [name.strip() for name, _ in found] == [*parts, "total"], startup[0]
    seconds = [float(s) for _, s in found]
    assert all(s >= 0 for s in seconds) and abs(sum(seconds[:-1]) - seconds[-1]) < 0.05, startup[0]
    assert seconds[0] > 0.2, startup[0]  # imports: measured from the process's start, which torch's import dwarfs


def test_two_ranks_share_the_affinity_and_the_config_key_wins(tiny_data, tmp_path):
    """2 ranks on one node: each gets the affinity's CPUs / 2 (at least 1); `--run.num_threads=3` sets 3 on both."""
    out = tmp_path / "two"
    rc, log = run_train(tiny_args(tiny_data, out, *_ONE_STEP), env=_env_without_omp(), timeout=300)
    assert rc == 0, log[-3000:]
    info = _run_json(out)
    assert info["num_threads"] == [max(AFFINITY // 2, 1)] * 2, info["num_threads"]
    assert info["num_threads_from"] == f"auto: {AFFINITY} CPUs in the affinity / 2 ranks on the node"
    out = tmp_path / "two_key"
    rc, log = run_train(tiny_args(tiny_data, out, *_ONE_STEP, "--run.num_threads=3"), env=_env_without_omp(),
                        timeout=300)  # fmt: skip
    assert rc == 0, log[-3000:]
    assert _run_json(out)["num_threads"] == [3, 3]
    assert _run_json(out)["num_threads_from"] == "run.num_threads"


def test_two_ranks_keep_the_users_omp_num_threads(tiny_data, tmp_path):
    """OMP_NUM_THREADS=3 exported to `accelerate launch`: the user's value, on both ranks."""
    out = tmp_path / "user"
    rc, log = run_train(tiny_args(tiny_data, out, *_ONE_STEP), env=_env_without_omp(OMP_NUM_THREADS="3"),
                        timeout=300)  # fmt: skip
    assert rc == 0, log[-3000:]
    assert _run_json(out)["num_threads"] == [3, 3]
    assert _run_json(out)["num_threads_from"] == "OMP_NUM_THREADS set by the user"


@pytest.mark.parametrize(
    ("environ", "launcher", "expected"),
    [
        ({"OMP_NUM_THREADS": "1"}, None, 1),  # no launcher: only the user sets it
        ({"OMP_NUM_THREADS": "0"}, None, None),  # a value OpenMP ignores
        ({}, None, None),
        (_LAUNCHED, ({}, ["accelerate", "launch"]), None),  # the launcher's own 1
        (_LAUNCHED, ({"OMP_NUM_THREADS": "1"}, ["accelerate", "launch"]), 1),  # the user's 1, passed on
        (_LAUNCHED, ({}, ["accelerate", "launch", "--num_cpu_threads_per_process", "1"]), 1),
        ({"TORCHELASTIC_RUN_ID": "x", "OMP_NUM_THREADS": "1"}, ({}, ["torchrun"]), None),
        ({**_LAUNCHED, "OMP_NUM_THREADS": "4"}, None, 4),  # launcher unreadable: only 1 is taken as its own
        (_LAUNCHED, None, None),
    ],
)
def test_users_omp_num_threads_is_told_from_the_launchers(environ, launcher, expected):
    assert user_omp_threads(environ, launcher) == expected


def test_thread_choice_order():
    """run.num_threads, then the user's OMP_NUM_THREADS, then affinity / LOCAL_WORLD_SIZE (at least 1)."""
    env = {**_LAUNCHED, "LOCAL_WORLD_SIZE": "4"}
    assert choose_threads(5, {"OMP_NUM_THREADS": "2"}, 8, None).num_threads == 5
    assert choose_threads(0, {"OMP_NUM_THREADS": "2"}, 8, None).num_threads == 2
    assert choose_threads(0, env, 8, ({}, [])).num_threads == 2
    assert choose_threads(0, env, 2, ({}, [])).num_threads == 1


def test_the_workers_forkserver_starts_before_torch_is_imported(tiny_data):
    """train.py starts the DataLoader workers' forkserver before it imports torch (the forkserver's own torch import
    then overlaps the rank's); only for runs whose loader will use worker processes."""
    probe = (
        "import sys\n"
        "from multiprocessing import forkserver\n"
        "from mixmo_dist.data.forkserver import start_early\n"
        "started = start_early(sys.argv[1:])\n"
        "print(started, forkserver._forkserver._forkserver_pid is not None, 'torch' in sys.modules)\n"
    )
    env = train_env()

    def probe_with(*words: str) -> str:
        res = subprocess.run([sys.executable, "-c", probe, f"--data.root={tiny_data}", *words], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        assert res.returncode == 0, res.stderr[-3000:]
        return res.stdout.strip()

    assert probe_with("--data.backend=torch", "--data.num_workers=2") == "True True False"
    assert probe_with("--data.backend=torch", "--data.num_workers=0") == "False False False"
    assert probe_with("--data.backend=synthetic") == "False False False"
    assert probe_with("--data.backend=torch", "--optim.lr=-1") == "False False False"  # the run reports the error
