"""Tests of the SLURM launch path.

Without SLURM: the per-node argv of `mixmo_dist.slurm_launch`, submit's executor parameters, signal forwarding
through a real `accelerate launch` agent, and a submitit LocalExecutor run of the real trainer.
With SLURM (marker `slurm`): a single-node cluster started by `scripts/slurm_cluster.sh` runs `sbatch
slurm/imagenet_r50.sh` (2-process gloo world), a 2-task submitit job, and a submitit job that is preempted with
SIGUSR2, requeued under the same id and resumed from its checkpoint. If the cluster cannot start, these skip
(or fail when MIXMO_REQUIRE_SLURM=1).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mixmo_dist import slurm_launch, submit
from mixmo_dist.config import load_config
from mixmo_dist.slurm_launch import build_argv, expand_hostlist, launch_env, plan_from_env, procs_per_node_from_env

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SCRIPT = REPO / "scripts" / "slurm_cluster.sh"


# ----------------------------------------------------------------------------------------------------------------
# slurm_launch: host lists, process counts, the launcher argv.
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("vm", ["vm"]),
        ("a,b", ["a", "b"]),
        ("gpu[07-09]", ["gpu07", "gpu08", "gpu09"]),
        ("gpu[01-02,10],cpu3", ["gpu01", "gpu02", "gpu10", "cpu3"]),
        ("r[1-2]-n[8-9]", ["r1-n8", "r1-n9", "r2-n8", "r2-n9"]),
        ("node[098-101]", ["node098", "node099", "node100", "node101"]),
    ],
)
def test_expand_hostlist(nodelist, hosts):
    assert expand_hostlist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["", "gpu[1-", "gpu]1[", "gpu[3-1]", "gpu[a-b]", "gpu[[1]]"])
def test_expand_hostlist_rejects_malformed(nodelist):
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST"):
        expand_hostlist(nodelist)


@pytest.mark.parametrize(
    ("env", "procs"),
    [
        ({}, 1),
        ({"SLURM_GPUS_ON_NODE": "8"}, 8),
        ({"SLURM_GPUS_PER_NODE": "a100:4"}, 4),
        ({"SLURM_GPUS_PER_NODE": "0"}, 1),  # `sbatch --gpus-per-node=0`: a CPU job
        ({"SLURM_GPUS_ON_NODE": "2", "SLURM_GPUS_PER_NODE": "8"}, 2),  # what this node really got wins
        ({"SLURM_GPUS_ON_NODE": "8", "MIXMO_PROCS_PER_NODE": "3"}, 3),
    ],
)
def test_procs_per_node(env, procs):
    assert procs_per_node_from_env(env) == procs


def test_procs_per_node_rejects_bad_value():
    with pytest.raises(ValueError, match="MIXMO_PROCS_PER_NODE='0'"):
        procs_per_node_from_env({"MIXMO_PROCS_PER_NODE": "0"})


@pytest.fixture
def config_file(tmp_path, monkeypatch) -> str:
    """A valid config in the working directory (slurm_launch resolves MIXMO_CONFIG against it)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg.yaml").write_text("run:\n  name: slurmtest\n")
    return "cfg.yaml"


def _slurm_env(**extra: str) -> dict[str, str]:
    env = {"SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "4242"}
    env.update(extra)
    return env


def test_build_argv_two_nodes(config_file):
    env = _slurm_env(
        SLURM_GPUS_ON_NODE="8",
        MIXMO_CONFIG=config_file,
        # Quoting keeps a value with spaces in one word; shell syntax inside a value is never evaluated.
        MIXMO_OVERRIDES="--optim.lr=0.4 '--run.name=a b' '--run.output_dir=/r/$(touch x);x'",
        MIXMO_ACCELERATE_ARGS="--mixed_precision bf16",
    )
    plan = plan_from_env(env, ["--data.root=/data/in"])
    assert plan.num_processes == 16
    assert build_argv(plan, python="/py") == [
        "/py", "-m", "accelerate.commands.launch",
        "--num_machines", "2", "--machine_rank", "1",
        "--main_process_ip", "gpu07", "--main_process_port", str(20000 + 4242),
        "--num_processes", "16", "--multi_gpu", "--mixed_precision", "bf16",
        "-m", "mixmo_dist.train", "--config", "cfg.yaml",
        "--optim.lr=0.4", "--run.name=a b", "--run.output_dir=/r/$(touch x);x", "--data.root=/data/in",
    ]  # fmt: skip


def test_build_argv_single_process_and_explicit_mode(config_file, tmp_path):
    (tmp_path / slurm_launch.DEFAULT_CONFIG).parent.mkdir(parents=True)
    (tmp_path / slurm_launch.DEFAULT_CONFIG).write_text("run:\n  name: r50\n")
    one = plan_from_env(_slurm_env(SLURM_NNODES="1", SLURM_NODEID="0", SLURM_JOB_NODELIST="vm"), [])
    argv = build_argv(one, python="/py")
    assert argv[argv.index("--num_processes") + 1] == "1"
    assert "--multi_gpu" not in argv  # accelerate refuses --multi_gpu with one process
    assert argv[argv.index("-m", 3) :] == ["-m", "mixmo_dist.train", "--config", slurm_launch.DEFAULT_CONFIG]

    fsdp = plan_from_env(
        _slurm_env(MIXMO_CONFIG=config_file, MIXMO_PROCS_PER_NODE="2", MIXMO_ACCELERATE_ARGS="--use_fsdp"), []
    )
    argv = build_argv(fsdp, python="/py")
    assert "--multi_gpu" not in argv and "--use_fsdp" in argv  # the user's mode flag is kept, not doubled


def test_command_line_config_replaces_env_config(config_file, tmp_path):
    (tmp_path / "other.yaml").write_text("run:\n  name: other\n")
    plan = plan_from_env(_slurm_env(MIXMO_CONFIG=config_file), ["--config", "other.yaml", "--optim.lr=0.2"])
    assert plan.config == "other.yaml"
    assert plan.overrides == ("--optim.lr=0.2",)


@pytest.mark.parametrize(
    ("extra", "argv", "message"),
    [
        ({"SLURM_NODEID": "2"}, [], "SLURM_NODEID=2 is outside"),
        ({"SLURM_JOB_NODELIST": "gpu07"}, [], "names 1 hosts but SLURM_NNODES=2"),
        ({"MIXMO_ACCELERATE_ARGS": "--num-processes=4"}, [], "sets --num-processes, which slurm_launch computes"),
        ({"MIXMO_ACCELERATE_ARGS": "--main_process_port 1"}, [], "MIXMO_MAIN_PROCESS_PORT"),
        ({"MIXMO_ACCELERATE_ARGS": "--cpu"}, [], "--cpu with several processes"),
        ({"MIXMO_OVERRIDES": "--run.name='unclosed"}, [], "cannot be split"),
        ({"MIXMO_CONFIG": "missing.yaml"}, [], "config file 'missing.yaml'"),
        ({}, ["--optim.lrr=0.1"], "optim.lrr"),  # the config module's error, before any process starts
        ({}, ["--optim.lr=fast"], "optim.lr"),
    ],
)
def test_plan_errors_name_the_culprit(config_file, extra, argv, message):
    env = _slurm_env(**{"MIXMO_CONFIG": config_file, "MIXMO_PROCS_PER_NODE": "1", **extra})
    with pytest.raises(ValueError, match=re.escape(message)):
        plan_from_env(env, argv)


def test_main_outside_srun_is_a_clear_error(monkeypatch, capsys):
    for name in list(os.environ):
        if name.startswith("SLURM_"):
            monkeypatch.delenv(name)
    assert slurm_launch.main([]) == 2
    assert "SLURM_NNODES is not set: run mixmo_dist.slurm_launch inside `srun`" in capsys.readouterr().err


def test_launch_env_adds_requeue_and_sigusr2():
    env = launch_env({"PET_SIGNALS_TO_HANDLE": "SIGTERM", "KEEP": "1"})
    assert env["KEEP"] == "1"
    assert env["MIXMO_REQUEUE_CMD"] == "scontrol"
    assert env["PET_SIGNALS_TO_HANDLE"] == "SIGTERM,SIGUSR2"
    assert env["TORCHELASTIC_SIGNALS_TO_HANDLE"] == "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2"
    assert env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "100"
    assert launch_env({"MIXMO_REQUEUE_CMD": "none"})["MIXMO_REQUEUE_CMD"] == "none"


# ----------------------------------------------------------------------------------------------------------------
# Signal forwarding through a real `accelerate launch --multi_gpu` (torchrun agent), no SLURM needed.
# ----------------------------------------------------------------------------------------------------------------

_RANK_SCRIPT = """
import os, signal, sys, time
from pathlib import Path
out = Path(sys.argv[1])
rank = os.environ["RANK"]
def on_signal(signum, frame):
    (out / f"got_{rank}").write_text(signal.Signals(signum).name)
    sys.exit(0)
signal.signal(signal.SIGUSR2, on_signal)
(out / f"ready_{rank}").write_text(str(os.getpid()))
for _ in range(1200):
    time.sleep(0.05)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def _signal_two_ranks(tmp_path: Path, env: dict[str, str]) -> tuple[int, dict[str, str]]:
    """Start 2 ranks under the agent, SIGUSR2 the launcher only; returns (launcher exit code, {rank: signal})."""
    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(script), str(tmp_path)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    pids: list[int] = []
    try:
        _wait_for(lambda: all((tmp_path / f"ready_{r}").exists() for r in "01"), 120, "both ranks to start")
        pids = [int((tmp_path / f"ready_{r}").read_text()) for r in "01"]
        proc.send_signal(signal.SIGUSR2)
        code = proc.wait(timeout=60)
        time.sleep(1.0)  # a forwarded signal reaches the ranks before the agent exits; this is slack only
        return code, {r: (tmp_path / f"got_{r}").read_text() for r in "01" if (tmp_path / f"got_{r}").exists()}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in pids:  # ranks orphaned by a killed agent (the control case) are ours to end
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.slow
def test_launcher_forwards_sigusr2_to_every_rank(tmp_path):
    base = {k: v for k, v in os.environ.items() if k not in ("PET_SIGNALS_TO_HANDLE", "TORCHELASTIC_SIGNALS_TO_HANDLE")}
    base["OMP_NUM_THREADS"] = "1"
    (tmp_path / "with").mkdir()
    _, got = _signal_two_ranks(tmp_path / "with", launch_env(base))
    assert got == {"0": "SIGUSR2", "1": "SIGUSR2"}

    # Control: TORCHELASTIC_SIGNALS_TO_HANDLE alone is overwritten by the launcher (torch reads
    # PET_SIGNALS_TO_HANDLE), so SIGUSR2 kills the agent and no rank hears of it: why launch_env sets both.
    (tmp_path / "without").mkdir()
    control = dict(base, TORCHELASTIC_SIGNALS_TO_HANDLE="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2")
    code, got = _signal_two_ranks(tmp_path / "without", control)
    assert code == -signal.SIGUSR2
    assert got == {}


# ----------------------------------------------------------------------------------------------------------------
# submit: executor parameters and argument errors.
# ----------------------------------------------------------------------------------------------------------------


def test_executor_parameters_cpu_job_requests_no_gpu():
    cfg = load_config(["--run.name=cpujob", "--slurm.gpus_per_node=0", "--slurm.cpus_per_task=2"])
    params = submit.executor_parameters(cfg)
    assert "gpus_per_node" not in params
    assert params["tasks_per_node"] == 1
    assert params["name"] == "cpujob"
    assert params["cpus_per_task"] == 2
    assert params["slurm_signal_delay_s"] == 120
    assert params["slurm_additional_parameters"] == {"requeue": True}
    assert not {"slurm_partition", "slurm_account", "slurm_qos", "slurm_constraint", "mem_gb"} & set(params)


def test_executor_parameters_one_task_per_gpu():
    cfg = load_config(
        ["--slurm.nodes=2", "--slurm.gpus_per_node=8", "--slurm.partition=gpu", "--slurm.account=lab",
         "--slurm.qos=high", "--slurm.constraint=h100", "--slurm.mem_gb=500", "--slurm.job_name=r50",
         "--slurm.timeout_min=1440", "--slurm.signal_delay_s=300"]
    )  # fmt: skip
    params = submit.executor_parameters(cfg)
    assert params["gpus_per_node"] == 8 and params["tasks_per_node"] == 8 and params["nodes"] == 2
    assert params["slurm_partition"] == "gpu" and params["slurm_account"] == "lab"
    assert params["slurm_qos"] == "high" and params["slurm_constraint"] == "h100"
    assert params["mem_gb"] == 500 and params["name"] == "r50"
    assert params["timeout_min"] == 1440 and params["slurm_signal_delay_s"] == 300
    explicit = load_config(["--slurm.gpus_per_node=8", "--slurm.tasks_per_node=1"])
    assert submit.executor_parameters(explicit)["tasks_per_node"] == 1


def test_local_executor_folder_and_parameters(tmp_path):
    cfg = load_config([f"--run.output_dir={tmp_path / 'run'}", "--slurm.tasks_per_node=2", "--slurm.timeout_min=7"])
    executor = submit.build_executor(cfg, "local")
    assert Path(executor.folder) == (tmp_path / "run" / "submitit").resolve()
    assert executor.parameters["tasks_per_node"] == 2
    assert executor.parameters["timeout_min"] == 7
    assert "gpus_per_node" not in executor.parameters


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--cluster=local", "--slurm.gpus=1"], "slurm.gpus"),
        (["--cluster=local", "--slurm.nodes=0"], "slurm.nodes"),
        (["--cluster=local", "--slurm.nodes=2"], "slurm.nodes=2: the local executor runs on one node"),
    ],
)
def test_submit_rejects_bad_input_before_submitting(tmp_path, capsys, argv, message):
    assert submit.main([*argv, f"--run.output_dir={tmp_path}"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "submitit").exists()  # nothing was submitted


# ----------------------------------------------------------------------------------------------------------------
# Real trainer runs (submitit local executor, then SLURM).
# ----------------------------------------------------------------------------------------------------------------


def _tiny(data: Path, out: Path, *extra: str) -> list[str]:
    """resnet18 at 32 px, 8 rows per rank (4 unique x 2 repetitions) on the tiny demo set."""
    return [
        "--config", str(REPO / "configs" / "demo.yaml"), f"--data.root={data}", "--data.image_size=32",
        "--data.batch_size=8", "--data.num_workers=0", "--data.backend=torch", "--schedule.warmup_epochs=0",
        f"--run.output_dir={out}", "--log.every_n_steps=1", "--log.progress=lines", *extra,
    ]  # fmt: skip


def _job_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    # PYTHONPATH: jobs import this checkout even when started outside it. One thread per rank: 2 cores shared.
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MIXMO_PYTHON=sys.executable, **extra)
    return env


def _train_records(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("split") == "train"]


@pytest.mark.slow
def test_submit_local_executor_runs_the_trainer(tiny_data, tmp_path):
    out = tmp_path / "run"
    args = _tiny(tiny_data, out, "--schedule.epochs=1", "--schedule.max_steps=3", "--slurm.timeout_min=10")
    res = subprocess.run(
        [sys.executable, "-m", "mixmo_dist.submit", "--cluster=local", "--wait", *args],
        cwd=REPO, env=_job_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    job_id = re.search(r"submitted job (\d+) \(local, 1 tasks\)", res.stdout).group(1)
    assert f"job {job_id}: completed" in res.stdout
    assert [r["step"] for r in _train_records(out)] == [1, 2, 3]
    assert (out / "checkpoints" / "step_00000003" / "COMPLETE").is_file()


@pytest.fixture(scope="session")
def slurm_cluster() -> dict[str, str]:
    """A running single-node SLURM; yields the extra environment (SLURM_CONF) its clients need."""
    was_running = subprocess.run(["bash", str(CLUSTER_SCRIPT), "status"], capture_output=True).returncode == 0
    try:
        res = subprocess.run(["bash", str(CLUSTER_SCRIPT), "start"], capture_output=True, text=True, timeout=900)
        failure = None if res.returncode == 0 else res.stderr.strip()[-800:]
    except (OSError, subprocess.TimeoutExpired) as err:
        failure = str(err)
    if failure is not None:
        reason = f"single-node SLURM could not be started by {CLUSTER_SCRIPT.name}: {failure}"
        if os.environ.get("MIXMO_REQUIRE_SLURM") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    conf = re.search(r"^export SLURM_CONF=(\S+)$", res.stdout, re.MULTILINE).group(1)
    yield {"SLURM_CONF": conf}
    if not was_running:  # leave a cluster someone else started alone
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop"], capture_output=True, timeout=120)


def _scontrol_job(job_id: str, env: dict[str, str]) -> str:
    return subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True).stdout


def _cancel(job_id: str | None, env: dict[str, str]) -> None:
    if job_id:
        subprocess.run(["scancel", job_id], env=env, capture_output=True)


def _preempt_and_release(job_id: str, out: Path, env: dict[str, str]) -> None:
    """SIGUSR2 the running job once it has a checkpoint, wait for its requeue, release it from the ~120 s wait."""
    _wait_for(lambda: (out / "checkpoints" / "latest").exists(), 300, "the first checkpoint", poll_s=0.5)
    subprocess.run(["scancel", "--signal=USR2", job_id], env=env, check=True)
    # The trainer saves at the next step boundary, then rank 0 has the job requeued (`scontrol requeue`).
    _wait_for(lambda: "JobState=PENDING" in _scontrol_job(job_id, env), 120, "the requeue", poll_s=0.5)
    assert "Restarts=1" in _scontrol_job(job_id, env)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=env, check=True)


def _final_state(job_id: str, env: dict[str, str], timeout_s: float) -> str:
    """Poll until the job leaves the queue; its last state (MinJobAge keeps it listed for a while)."""

    def finished() -> str | None:
        res = subprocess.run(
            ["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"], env=env, capture_output=True, text=True
        )
        state = res.stdout.strip()
        if "Invalid job id" in res.stderr or (res.returncode == 0 and not state):
            return "GONE"
        return state if state in submit._TERMINAL_STATES else None  # None also when squeue failed: ask again

    return _wait_for(finished, timeout_s, f"job {job_id} to finish", poll_s=1.0)


@pytest.fixture(scope="module")
def sbatch_run(slurm_cluster, tiny_data, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path, Path]:
    """`sbatch --wait slurm/imagenet_r50.sh` as a 1-node CPU job with a 2-process gloo world."""
    tmp = tmp_path_factory.mktemp("sbatch")
    out = tmp / "run"
    words = _tiny(tiny_data, out, "--schedule.epochs=1", "--schedule.max_steps=6")[2:]  # config via MIXMO_CONFIG
    env = _job_env(
        **slurm_cluster,
        MIXMO_CONFIG="configs/demo.yaml",
        MIXMO_OVERRIDES=shlex.join(words),
        MIXMO_PROCS_PER_NODE="2",
        MIXMO_ACCELERATE_ARGS="--mixed_precision no --dynamo_backend no",
    )
    # Command-line flags override the script's #SBATCH lines (2 nodes x 8 GPUs): this node has no GPU gres.
    cmd = ["sbatch", "--wait", "--parsable", "--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2", "--mem=2G",
           "--time=10", f"--output={tmp}/%x-%j.out", "slurm/imagenet_r50.sh"]  # fmt: skip
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return res, out, tmp


@pytest.mark.slurm
@pytest.mark.slow
def test_sbatch_script_trains_with_two_processes(sbatch_run):
    res, out, tmp = sbatch_run
    job_id = res.stdout.strip().split(";")[0]
    log = (tmp / f"mixmo-r50-{job_id}.out").read_text()
    assert res.returncode == 0, log[-3000:]
    assert "--num_processes 2 --multi_gpu --mixed_precision no" in log
    assert json.loads((out / "run.json").read_text())["world_size"] == 2
    assert [r["step"] for r in _train_records(out)] == [1, 2, 3, 4, 5, 6]
    assert (out / "checkpoints" / "step_00000006" / "COMPLETE").is_file()


@pytest.mark.slurm
@pytest.mark.slow
def test_submitit_two_tasks_match_the_sbatch_run(slurm_cluster, sbatch_run, tiny_data, tmp_path):
    out = tmp_path / "run"
    args = _tiny(tiny_data, out, "--schedule.epochs=1", "--schedule.max_steps=6")
    args += ["--slurm.tasks_per_node=2", "--slurm.gpus_per_node=0", "--slurm.cpus_per_task=1", "--slurm.timeout_min=10"]
    res = subprocess.run(
        [sys.executable, "-m", "mixmo_dist.submit", "--wait", *args],
        cwd=tmp_path, env=_job_env(**slurm_cluster), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    job_id = re.search(r"submitted job (\d+) \(slurm, 2 tasks\)", res.stdout).group(1)
    assert f"job {job_id}: completed" in res.stdout
    script = (out / "submitit" / f"{job_id}_submission.sh").read_text()
    assert "#SBATCH --ntasks-per-node=2" in script and "#SBATCH --requeue" in script
    assert "gpu" not in script.lower()  # gpus_per_node=0: no GPU request of any form
    assert json.loads((out / "run.json").read_text())["world_size"] == 2
    # Both launch paths build the same 2-rank world from the same config: the same training, step for step.
    sbatch_losses = [r["loss"] for r in _train_records(sbatch_run[1])]
    assert [r["loss"] for r in _train_records(out)] == pytest.approx(sbatch_losses, rel=1e-5)


@pytest.mark.slurm
@pytest.mark.slow
def test_submitit_preempted_job_requeues_and_resumes(slurm_cluster, tiny_data, tmp_path):
    out = tmp_path / "run"
    env = _job_env(**slurm_cluster)
    args = _tiny(tiny_data, out, "--schedule.epochs=2", "--schedule.max_steps=10", "--checkpoint.every_n_steps=2")
    args += ["--slurm.tasks_per_node=2", "--slurm.gpus_per_node=0", "--slurm.cpus_per_task=1", "--slurm.timeout_min=10"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "mixmo_dist.submit", "--wait", *args],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    job_id = None
    try:
        first = ""
        while job_id is None and (line := proc.stdout.readline()):  # warnings may come first
            first += line
            job_id = next(iter(re.findall(r"^submitted job (\d+)", line)), None)
        assert job_id is not None, first
        # Here rank 0 hands over to submitit's handler, which runs `scontrol requeue`.
        _preempt_and_release(job_id, out, env)
        rest, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _cancel(job_id, env)
    assert proc.returncode == 0, first + rest
    assert f"job {job_id}: completed" in rest
    log = (out / "submitit" / f"{job_id}_0_log.err").read_text()
    stopped = int(re.search(r"stopped at step (\d+) after SIGUSR2", log).group(1))
    assert f"Requeued job {job_id}" in log
    assert f"resumed from step {stopped} " in log
    assert 2 <= stopped < 10
    # The resumed run truncated nothing it needed and repeated no step: one record per step, in order.
    assert [r["step"] for r in _train_records(out)] == list(range(1, 11))
    assert not (out / "PREEMPTED").exists()  # removed by the resumed run


@pytest.mark.slurm
@pytest.mark.slow
def test_sbatch_job_preempted_requeues_itself_and_resumes(slurm_cluster, tiny_data, tmp_path):
    out = tmp_path / "run"
    words = _tiny(tiny_data, out, "--schedule.epochs=1", "--schedule.max_steps=8", "--checkpoint.every_n_steps=2")
    env = _job_env(
        **slurm_cluster,
        MIXMO_OVERRIDES=shlex.join(words),  # its --config replaces MIXMO_CONFIG's default
        MIXMO_PROCS_PER_NODE="2",
        MIXMO_ACCELERATE_ARGS="--mixed_precision no --dynamo_backend no",
    )
    cmd = ["sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2", "--mem=2G", "--time=10",
           f"--output={tmp_path}/%x-%j.out", "slurm/imagenet_r50.sh"]  # fmt: skip
    job_id = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout.strip()
    try:
        # SIGUSR2 reaches every rank (torchrun's agent forwards it); the trainer's rank 0 runs `scontrol requeue`.
        _preempt_and_release(job_id, out, env)
        state = _final_state(job_id, env, timeout_s=400)
    finally:
        _cancel(job_id, env)
    log = (tmp_path / f"mixmo-r50-{job_id}.out").read_text()
    assert state == "COMPLETED", f"job {job_id} ended {state}:\n{log[-3000:]}"
    stops = re.findall(r"stopped at step (\d+) after SIGUSR2", log)
    assert len(stops) == 2 and stops[0] == stops[1], stops  # both ranks got the signal and agreed on the step
    assert f"requeueing SLURM job {job_id}" in log
    assert f"job {job_id} restart 1 on" in log  # the same job id ran again
    assert f"resumed from step {stops[0]} " in log
    assert [r["step"] for r in _train_records(out)] == list(range(1, 9))
