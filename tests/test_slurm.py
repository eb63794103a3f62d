"""Tests of the SLURM launch path on one node.

Without SLURM: the per-node argv of `mixmo_dist.slurm_launch`, submit's executor parameters, signal forwarding
through a real `accelerate launch` agent, and a submitit LocalExecutor run of the real trainer.
With SLURM (marker `slurm`, on the two-node cluster of `scripts/slurm_cluster.sh`, see `slurm_support.py`): node
lists expanded by the real `scontrol`. The SLURM jobs (sbatch and submitit, preempted, a node lost) are in
`test_slurm_multinode.py`. If the cluster cannot start, these skip (or fail when MIXMO_REQUIRE_SLURM=1).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_support import job_env, tiny, train_records, wait_for

from mixmo_dist import slurm_launch, submit
from mixmo_dist.cluster import slurm as slurm_plan
from mixmo_dist.cluster import submitit_job
from mixmo_dist.cluster.slurm import build_argv, job_hosts, launch_env, plan_from_env, procs_per_node_from_env
from mixmo_dist.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
TWO_HOSTS = ["gpu07", "gpu08"]


# ----------------------------------------------------------------------------------------------------------------
# slurm_launch: host lists, process counts, the launcher argv.
# ----------------------------------------------------------------------------------------------------------------


# The node list is expanded by SLURM itself (`scontrol show hostnames`); these run it for real.
@pytest.mark.slurm
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
def test_job_hosts_from_scontrol(slurm_cluster, nodelist, hosts):
    assert job_hosts({**os.environ, **slurm_cluster.env, "SLURM_JOB_NODELIST": nodelist}) == hosts


@pytest.mark.slurm
@pytest.mark.parametrize("nodelist", ["gpu[3-1]", "gpu[a-b]", ""])
def test_job_hosts_rejects_malformed(slurm_cluster, nodelist):
    with pytest.raises(ValueError, match=r"`scontrol show hostnames .*` failed"):
        job_hosts({**os.environ, **slurm_cluster.env, "SLURM_JOB_NODELIST": nodelist})


def test_job_hosts_without_scontrol_is_a_clear_error(tmp_path):
    with pytest.raises(
        ValueError, match=r"scontrol is not on PATH: it is needed to expand SLURM_JOB_NODELIST='n\[1-2\]'"
    ):
        job_hosts({"PATH": str(tmp_path), "SLURM_JOB_NODELIST": "n[1-2]"})


@pytest.mark.slurm
def test_first_host_of_compressed_list_is_the_main_process_ip(slurm_cluster, config_file):
    env = {**os.environ, **slurm_cluster.env, **_slurm_env(MIXMO_CONFIG=config_file, SLURM_JOB_NODELIST="gpu[08,07]")}
    argv = build_argv(plan_from_env(env, []), python="/py")  # no hosts given: scontrol expands the list
    # SLURM keeps the list's order (it sorts when it allocates): the first host named is machine rank 0's.
    assert argv[argv.index("--main_process_ip") + 1] == "gpu08"
    env["SLURM_JOB_NODELIST"] = "gpu[07-09]"
    with pytest.raises(ValueError, match=re.escape("names 3 hosts but SLURM_NNODES=2")):
        plan_from_env(env, [])


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
    plan = plan_from_env(env, ["--data.root=/data/in"], hosts=TWO_HOSTS)
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
    (tmp_path / slurm_plan.DEFAULT_CONFIG).parent.mkdir(parents=True)
    (tmp_path / slurm_plan.DEFAULT_CONFIG).write_text("run:\n  name: r50\n")
    one = plan_from_env(_slurm_env(SLURM_NNODES="1", SLURM_NODEID="0", SLURM_JOB_NODELIST="vm"), [], hosts=["vm"])
    argv = build_argv(one, python="/py")
    assert argv[argv.index("--num_processes") + 1] == "1"
    assert "--multi_gpu" not in argv  # accelerate refuses --multi_gpu with one process
    assert argv[argv.index("-m", 3) :] == ["-m", "mixmo_dist.train", "--config", slurm_plan.DEFAULT_CONFIG]

    fsdp = plan_from_env(
        _slurm_env(MIXMO_CONFIG=config_file, MIXMO_PROCS_PER_NODE="2", MIXMO_ACCELERATE_ARGS="--use_fsdp"),
        [],
        hosts=TWO_HOSTS,
    )
    argv = build_argv(fsdp, python="/py")
    assert "--multi_gpu" not in argv and "--use_fsdp" in argv  # the user's mode flag is kept, not doubled


def test_command_line_config_replaces_env_config(config_file, tmp_path):
    (tmp_path / "other.yaml").write_text("run:\n  name: other\n")
    plan = plan_from_env(
        _slurm_env(MIXMO_CONFIG=config_file), ["--config", "other.yaml", "--optim.lr=0.2"], hosts=TWO_HOSTS
    )
    assert plan.config == "other.yaml"
    assert plan.overrides == ("--optim.lr=0.2",)


@pytest.mark.parametrize(
    ("extra", "argv", "message"),
    [
        ({"SLURM_NODEID": "2"}, [], "SLURM_NODEID=2 is outside"),
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
        plan_from_env(env, argv, hosts=TWO_HOSTS)


def test_plan_refuses_a_host_count_other_than_the_node_count(config_file):
    with pytest.raises(ValueError, match=re.escape("SLURM_JOB_NODELIST='gpu[07-08]' names 1 hosts but SLURM_NNODES=2")):
        plan_from_env(_slurm_env(MIXMO_CONFIG=config_file), [], hosts=["gpu07"])


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
        wait_for(lambda: all((tmp_path / f"ready_{r}").exists() for r in "01"), 120, "both ranks to start")
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
    params = submitit_job.executor_parameters(cfg)
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
    params = submitit_job.executor_parameters(cfg)
    assert params["gpus_per_node"] == 8 and params["tasks_per_node"] == 8 and params["nodes"] == 2
    assert params["slurm_partition"] == "gpu" and params["slurm_account"] == "lab"
    assert params["slurm_qos"] == "high" and params["slurm_constraint"] == "h100"
    assert params["mem_gb"] == 500 and params["name"] == "r50"
    assert params["timeout_min"] == 1440 and params["slurm_signal_delay_s"] == 300
    explicit = load_config(["--slurm.gpus_per_node=8", "--slurm.tasks_per_node=1"])
    assert submitit_job.executor_parameters(explicit)["tasks_per_node"] == 1


def test_local_executor_folder_and_parameters(tmp_path):
    cfg = load_config([f"--run.output_dir={tmp_path / 'run'}", "--slurm.tasks_per_node=2", "--slurm.timeout_min=7"])
    executor = submitit_job.build_executor(cfg, "local")
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
# A real trainer run through submitit's local executor.
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_submit_local_executor_runs_the_trainer(tiny_data, tmp_path):
    out = tmp_path / "run"
    args = tiny(tiny_data, out, "--schedule.epochs=1", "--schedule.max_steps=3", "--slurm.timeout_min=10")
    res = subprocess.run(
        [sys.executable, "-m", "mixmo_dist.submit", "--cluster=local", "--wait", *args],
        cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    job_id = re.search(r"submitted job (\d+) \(local, 1 tasks\)", res.stdout).group(1)
    assert f"job {job_id}: completed" in res.stdout
    assert [r["step"] for r in train_records(out)] == [1, 2, 3]
    assert (out / "checkpoints" / "step_00000003" / "COMPLETE").is_file()


# ----------------------------------------------------------------------------------------------------------------
# Sweeps (issue 23).
# ----------------------------------------------------------------------------------------------------------------


def test_sweep_words_give_the_grid_in_order_with_named_directories():
    from mixmo_dist.cluster.sweep import parse_sweeps, point_argv, point_name, sweep_points

    points = sweep_points(parse_sweeps(["run.seed=1,2,3", "--mixmo.num_members=1,2"]))
    assert [(p["run.seed"], p["mixmo.num_members"]) for p in points] == [
        ("1", "1"), ("1", "2"), ("2", "1"), ("2", "2"), ("3", "1"), ("3", "2")
    ]  # fmt: skip
    assert point_name(points[3]) == "run.seed-2_mixmo.num_members-2"
    argv = point_argv(["--config", "c.yaml", "--run.seed=9"], points[3], "runs/grid")
    assert argv == ["--config", "c.yaml", "--run.seed=9", "--run.seed=2", "--mixmo.num_members=2",
                    f"--run.output_dir={Path('runs/grid/run.seed-2_mixmo.num_members-2')}"]  # fmt: skip
    assert point_name({"data.root": "/data/x y"}) == "data.root-_data_x_y"
    for bad, message in [
        (["run.seed"], "expected section.key=V1,V2"),
        (["seed=1,2"], "expected section.key=V1,V2"),
        (["run.seed=1,,2"], "empty value"),
        (["run.seed=1,1"], "repeated"),
        (["run.seed=1", "run.seed=2"], "given twice"),
        (["run.output_dir=a,b"], "derived from run.output_dir"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_sweeps(bad)


def test_a_config_file_axis_gives_each_point_its_file_under_the_command_lines_words(tmp_path):
    """`--sweep config=A,B`: Cut-MixMo against vanilla in one sweep. Each point reads its own file (the last
    `--config` wins over the command line's), the command line's `--section.key` words still beat that file, and the
    directory names the file by its stem."""
    from mixmo_dist.cluster.sweep import parse_sweeps, point_argv, point_name, sweep_points

    demo, vanilla = str(REPO / "configs" / "demo.yaml"), str(REPO / "configs" / "demo_vanilla.yaml")
    points = sweep_points(parse_sweeps([f"config={demo},{vanilla}", "run.seed=1,2"]))
    assert [point_name(p) for p in points] == [
        "config-demo_run.seed-1", "config-demo_run.seed-2", "config-demo_vanilla_run.seed-1",
        "config-demo_vanilla_run.seed-2",
    ]  # fmt: skip
    base = ["--config", demo, "--data.image_size=24", "--mixmo.alpha=1.5", f"--run.output_dir={tmp_path}"]
    cfgs = [load_config(point_argv(base, p, tmp_path)) for p in points]
    assert [(c.mixmo.num_members, c.mixmo.mixing, c.mixmo.batch_repetitions, c.data.batch_size) for c in cfgs] == [
        (2, "cut", 2, 64), (2, "cut", 2, 64), (1, "none", 1, 32), (1, "none", 1, 32)
    ]  # fmt: skip
    assert [c.run.seed for c in cfgs] == [1, 2, 1, 2]
    assert all(c.data.image_size == 24 and c.mixmo.alpha == 1.5 for c in cfgs)  # the command line beats each file
    assert cfgs[2].run.output_dir == str(tmp_path / "config-demo_vanilla_run.seed-1")
    with pytest.raises(ConfigError, match="same name"):
        parse_sweeps([f"config={demo},{tmp_path / 'demo.yaml'}"])
    with pytest.raises(ConfigError, match="expected section.key=V1,V2"):
        parse_sweeps([f"configs={demo}"])


def test_a_sweep_with_a_bad_key_or_value_submits_nothing(tmp_path, capsys):
    base = [f"--run.output_dir={tmp_path}", "--cluster=local"]
    assert submit.main([*base, "--sweep", "run.sed=1,2"]) == 2
    assert "run.sed" in capsys.readouterr().err
    assert submit.main([*base, "--sweep", "mixmo.num_members=2,zero"]) == 2
    err = capsys.readouterr().err
    assert "sweep point mixmo.num_members-zero" in err and "mixmo.num_members" in err
    assert not (tmp_path / "submitit").exists()  # nothing was submitted


@pytest.mark.slow
def test_sweep_runs_every_point_locally_and_reports_the_failed_ones(tiny_data, tmp_path):
    """2 seeds x 2 data roots, one of them missing: 4 local jobs; the 2 points without data fail, the other 2 train
    into their own directories with their own seeds, and --wait names the failed points."""
    base = tmp_path / "grid"
    missing = tmp_path / "nodata"
    args = tiny(tiny_data, base, "--schedule.epochs=1", "--schedule.max_steps=2", "--slurm.timeout_min=10")
    sweeps = ["--sweep", "run.seed=1,2", "--sweep", f"data.root={tiny_data},{missing}"]
    res = subprocess.run(
        [sys.executable, "-m", "mixmo_dist.submit", "--cluster=local", "--wait", *sweeps, *args],
        cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    assert len(re.findall(r"submitted job \S+ \(local, 1 tasks\) for run\.seed-\d_data\.root-", out)) == 4, out
    good = {seed: base / f"run.seed-{seed}_data.root-{str(tiny_data).replace('/', '_')}" for seed in (1, 2)}
    bad = [f"run.seed-{seed}_data.root-{str(missing).replace('/', '_')}" for seed in (1, 2)]
    assert f"2 of 4 sweep points failed: {bad[0]}, {bad[1]}" in out
    for seed, run in good.items():
        assert [r["step"] for r in train_records(run)] == [1, 2], out
        assert load_config(["--config", str(run / "config.yaml")]).run.seed == seed
    losses = [train_records(good[s])[0]["loss"] for s in (1, 2)]
    assert losses[0] != losses[1]  # two seeds, two runs


@pytest.mark.slurm
@pytest.mark.slow
def test_sweep_on_slurm_is_one_job_array(slurm_cluster, tiny_data, tmp_path):
    """`--sweep run.seed=1,2` on the two-node SLURM: one `sbatch --array=0-1` (at most slurm.array_parallelism at
    once), each array task a run of its own that completes in its own directory."""
    base = tmp_path / "grid"
    args = tiny(tiny_data, base, "--schedule.epochs=1", "--schedule.max_steps=2", "--slurm.timeout_min=10")
    args += ["--slurm.cpus_per_task=1", "--slurm.array_parallelism=2"]
    res = subprocess.run(
        [sys.executable, "-m", "mixmo_dist.submit", "--cluster=slurm", "--wait", "--sweep", "run.seed=1,2", *args],
        cwd=tmp_path, env=job_env(slurm_cluster), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    ids = re.findall(r"submitted job (\d+)_(\d) \(slurm, 1 tasks\) for run\.seed-(\d)", out)
    assert [(task, seed) for _, task, seed in ids] == [("0", "1"), ("1", "2")] and ids[0][0] == ids[1][0], out
    script = next((base / "submitit").glob("*_submission.sh")).read_text()
    assert "#SBATCH --array=0-1%2" in script
    for seed in (1, 2):
        run = base / f"run.seed-{seed}"
        assert [r["step"] for r in train_records(run)] == [1, 2]
        assert (run / "checkpoints" / "step_00000002" / "COMPLETE").is_file()
