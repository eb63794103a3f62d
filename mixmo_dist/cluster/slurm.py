"""One SLURM node's share of a job: the `accelerate launch -m mixmo_dist.train` command it runs.

`slurm/imagenet_r50.sh` runs `srun --ntasks-per-node=1 python -m mixmo_dist.slurm_launch [words...]`. On every node
this module reads the SLURM environment (SLURM_NNODES, SLURM_NODEID, SLURM_JOB_NODELIST, SLURM_JOB_ID, the GPU
count) and the `MIXMO_*` variables, takes machine rank 0's host from SLURM itself (`scontrol show hostnames`, the
first host of the compressed node list), builds the launcher argv

    python -m accelerate.commands.launch --num_machines N --machine_rank R --main_process_ip HOST
        --main_process_port P --num_processes N*G [--multi_gpu] [MIXMO_ACCELERATE_ARGS...]
        -m mixmo_dist.train --config C [MIXMO_OVERRIDES...] [words...]

and replaces itself with it (`os.execvpe`), so the launcher is the srun task and receives SLURM's signals. No value
ever passes through a shell: the variables are split with `shlex.split` and the argv goes straight to exec.

Environment read:
    MIXMO_CONFIG            config file (default configs/imagenet_r50_cutmixmo.yaml, relative to the working dir).
    MIXMO_OVERRIDES         extra `--section.key=value` words (shell-quoted); command-line words come after them.
    MIXMO_ACCELERATE_ARGS   extra launcher flags (e.g. `--mixed_precision bf16`).
    MIXMO_PROCS_PER_NODE    processes per node (default: SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE, else 1).
    MIXMO_MAIN_PROCESS_PORT rendezvous port (default: derived from SLURM_JOB_ID, stable across requeues).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mixmo_dist.config import load_config

DEFAULT_CONFIG = "configs/imagenet_r50_cutmixmo.yaml"

# Launcher flags this module computes from SLURM; accepting them from MIXMO_ACCELERATE_ARGS too would leave two
# contradicting values on the command line (argparse silently keeps the last one).
OWNED_LAUNCHER_FLAGS = ("num_machines", "machine_rank", "main_process_ip", "main_process_port", "num_processes")
# Flags that choose the launcher mode; when none is given and the world has several processes we add --multi_gpu,
# otherwise `accelerate launch` on a host with fewer visible GPUs than processes falls back to one process.
MODE_FLAGS = ("multi_gpu", "use_deepspeed", "use_fsdp", "use_megatron_lm", "tpu", "cpu")

# torch.distributed.run (the agent inside `accelerate launch --multi_gpu`) forwards only these signals to the ranks;
# an unhandled SIGUSR2 (SLURM's warning signal, see `#SBATCH --signal`) would kill the agent and orphan the ranks.
# The agent reads its list from PET_SIGNALS_TO_HANDLE (its argparse default) and then overwrites
# TORCHELASTIC_SIGNALS_TO_HANDLE with it, so both are set.
DEFAULT_ELASTIC_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT"
# Seconds the agent waits for the ranks to save and exit after forwarding a signal before it SIGKILLs them; it must
# stay below the SIGUSR2 lead time of the sbatch script (120 s) so SLURM does not kill the job first.
DEFAULT_SHUTDOWN_TIMEOUT_S = "100"

_PORT_BASE, _PORT_SPAN = 20000, 20000


@dataclass(frozen=True)
class LaunchPlan:
    """Everything one node needs to start its share of the world.

    Attributes:
        num_machines: nodes in the job (SLURM_NNODES).
        machine_rank: this node's index in [0, num_machines) (SLURM_NODEID).
        main_process_ip: host of machine rank 0 (the first host of SLURM_JOB_NODELIST, as scontrol expands it).
        main_process_port: rendezvous port on that host.
        procs_per_node: training processes per node (one per GPU).
        config: config file passed as `--config`.
        overrides: `--section.key=value` words for the trainer, in order.
        accelerate_args: extra launcher flags, in order.
    """

    num_machines: int
    machine_rank: int
    main_process_ip: str
    main_process_port: int
    procs_per_node: int
    config: str
    overrides: tuple[str, ...]
    accelerate_args: tuple[str, ...]

    @property
    def num_processes(self) -> int:
        """World size across all nodes."""
        return self.num_machines * self.procs_per_node


def job_hosts(env: Mapping[str, str]) -> list[str]:
    """The job's hosts in SLURM's order, expanded by SLURM itself: `scontrol show hostnames $SLURM_JOB_NODELIST`.

    SLURM_JOB_NODELIST is compressed (`gpu[01-02,07]`); its first host runs machine rank 0 (SLURM_NODEID 0).

    Args:
        env: the environment; scontrol runs with it (it reads SLURM_CONF there, like any SLURM command).

    Returns:
        The host names, e.g. ['gpu01', 'gpu02', 'gpu07'].

    Raises:
        ValueError: scontrol is not on PATH, or it fails on the list (its message is included).
    """
    nodelist = env["SLURM_JOB_NODELIST"]
    cmd = ["scontrol", "show", "hostnames", nodelist]
    try:
        res = subprocess.run(cmd, env=dict(env), capture_output=True, text=True, timeout=60, check=False)
    except FileNotFoundError as err:
        raise ValueError(f"scontrol is not on PATH: it is needed to expand SLURM_JOB_NODELIST={nodelist!r}") from err
    except subprocess.TimeoutExpired as err:
        raise ValueError(f"`{shlex.join(cmd)}` did not answer within 60 s") from err
    hosts = res.stdout.split()
    # scontrol 22.05 exits 0 on a malformed list, printing "Invalid hostlist: ..." on stderr and nothing on stdout.
    if res.returncode != 0 or not hosts:
        why = (res.stderr.strip().splitlines() or [f"exit status {res.returncode}, no output"])[-1]
        raise ValueError(f"`{shlex.join(cmd)}` failed: {why}")
    return hosts


def _positive_int(env: Mapping[str, str], name: str) -> int:
    value = env.get(name, "")
    if not re.fullmatch(r"\d+", value.strip()) or int(value) < 1:
        raise ValueError(f"{name}={value!r}: expected a positive integer")
    return int(value)


def procs_per_node_from_env(env: Mapping[str, str]) -> int:
    """Processes to start on each node.

    MIXMO_PROCS_PER_NODE wins; otherwise the GPUs SLURM gave this node (SLURM_GPUS_ON_NODE, then
    SLURM_GPUS_PER_NODE, which may read `a100:8`); with no GPU, 1.

    Raises:
        ValueError: MIXMO_PROCS_PER_NODE is not a positive integer.
    """
    if env.get("MIXMO_PROCS_PER_NODE", "").strip():
        return _positive_int(env, "MIXMO_PROCS_PER_NODE")
    for name in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        match = re.search(r"(\d+)$", env.get(name, "").strip())
        # 0 means "no GPU requested" (e.g. `sbatch --gpus-per-node=0`): fall through to one process.
        if match and int(match.group(1)) > 0:
            return int(match.group(1))
    return 1


def port_for_job(job_id: str) -> int:
    """Rendezvous port derived from the job id: the same after a requeue, different for concurrent jobs."""
    digits = re.sub(r"\D", "", job_id)
    return _PORT_BASE + (int(digits) % _PORT_SPAN if digits else 0)


def _flag_name(word: str) -> str:
    """`--num-processes=4` -> `num_processes` (accelerate accepts dashes and underscores)."""
    return word.lstrip("-").split("=", 1)[0].replace("-", "_")


def _take_config(words: list[str], config: str) -> tuple[str, list[str]]:
    """Pull `--config FILE` / `--config=FILE` out of the trainer words (the last one wins)."""
    rest: list[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        if word == "--config":
            if i + 1 >= len(words):
                raise ValueError("--config needs a file name")
            config, i = words[i + 1], i + 2
            continue
        if word.startswith("--config="):
            config = word.split("=", 1)[1]
        else:
            rest.append(word)
        i += 1
    return config, rest


def plan_from_env(env: Mapping[str, str], argv: Sequence[str] = (), hosts: Sequence[str] | None = None) -> LaunchPlan:
    """Read the SLURM and MIXMO_* variables into a LaunchPlan.

    Args:
        env: the environment (os.environ inside an srun task).
        argv: extra trainer words from the command line; they follow MIXMO_OVERRIDES, and a `--config` among
            them replaces MIXMO_CONFIG.
        hosts: the job's hosts in order; default: `job_hosts(env)` (scontrol expands SLURM_JOB_NODELIST).

    Raises:
        ValueError: a SLURM variable is missing (not inside srun), the node list cannot be expanded or does not
            hold SLURM_NNODES hosts, a MIXMO_* variable is malformed, the config file does not exist or does not
            validate with the overrides (ConfigError), or MIXMO_ACCELERATE_ARGS sets a flag this module owns.
    """
    for name in ("SLURM_NNODES", "SLURM_NODEID", "SLURM_JOB_NODELIST", "SLURM_JOB_ID"):
        if name not in env:
            raise ValueError(f"{name} is not set: run mixmo_dist.slurm_launch inside `srun` (one task per node)")
    num_machines = _positive_int(env, "SLURM_NNODES")
    machine_rank = int(env["SLURM_NODEID"])
    if not 0 <= machine_rank < num_machines:
        raise ValueError(f"SLURM_NODEID={machine_rank} is outside [0, SLURM_NNODES={num_machines})")
    hosts = job_hosts(env) if hosts is None else list(hosts)
    if len(hosts) != num_machines:
        raise ValueError(
            f"SLURM_JOB_NODELIST={env['SLURM_JOB_NODELIST']!r} names {len(hosts)} hosts but SLURM_NNODES={num_machines}"
        )
    port = (
        _positive_int(env, "MIXMO_MAIN_PROCESS_PORT")
        if env.get("MIXMO_MAIN_PROCESS_PORT", "").strip()
        else port_for_job(env["SLURM_JOB_ID"])
    )

    try:
        words = shlex.split(env.get("MIXMO_OVERRIDES", "")) + list(argv)
        accelerate_args = shlex.split(env.get("MIXMO_ACCELERATE_ARGS", ""))
    except ValueError as err:  # unbalanced quotes
        raise ValueError(f"MIXMO_OVERRIDES / MIXMO_ACCELERATE_ARGS cannot be split: {err}") from err
    config, overrides = _take_config(words, env.get("MIXMO_CONFIG", "").strip() or DEFAULT_CONFIG)
    if not Path(config).is_file():
        raise ValueError(f"config file {config!r} (MIXMO_CONFIG or --config) not found in {os.getcwd()}")
    # Fail here, in a second, rather than in every rank after the launcher and torch have started.
    load_config(["--config", config, *overrides])

    for word in accelerate_args:
        if word.startswith("-") and _flag_name(word) in OWNED_LAUNCHER_FLAGS:
            raise ValueError(
                f"MIXMO_ACCELERATE_ARGS sets {word.split('=', 1)[0]}, which slurm_launch computes from SLURM; "
                "choose the processes per node with MIXMO_PROCS_PER_NODE and the port with MIXMO_MAIN_PROCESS_PORT"
            )
        if word in ("-m", "--module"):
            raise ValueError("MIXMO_ACCELERATE_ARGS must not contain -m/--module: the module is mixmo_dist.train")

    plan = LaunchPlan(
        num_machines=num_machines,
        machine_rank=machine_rank,
        main_process_ip=hosts[0],
        main_process_port=port,
        procs_per_node=procs_per_node_from_env(env),
        config=config,
        overrides=tuple(overrides),
        accelerate_args=tuple(accelerate_args),
    )
    if plan.num_processes > 1 and "--cpu" in plan.accelerate_args:
        # Verified: `accelerate launch --cpu --num_processes 2` starts a single process.
        raise ValueError(
            "MIXMO_ACCELERATE_ARGS has --cpu with several processes, which accelerate runs as ONE process; "
            "drop --cpu (the trainer builds a CPU gloo world by itself when CUDA is absent)"
        )
    return plan


def build_argv(plan: LaunchPlan, python: str = sys.executable) -> list[str]:
    """The launcher argv for one node.

    `python -m accelerate.commands.launch` is `accelerate launch` without relying on PATH (inside srun the venv's
    bin directory is often not on it), and torchrun then starts the ranks with the same interpreter.

    Args:
        plan: what to launch.
        python: interpreter to run the launcher with.

    Returns:
        argv for os.execvp; argv[0] is `python`.
    """
    argv = [python, "-m", "accelerate.commands.launch"]
    argv += ["--num_machines", str(plan.num_machines), "--machine_rank", str(plan.machine_rank)]
    argv += ["--main_process_ip", plan.main_process_ip, "--main_process_port", str(plan.main_process_port)]
    argv += ["--num_processes", str(plan.num_processes)]
    chosen_modes = {_flag_name(word) for word in plan.accelerate_args if word.startswith("--")} & set(MODE_FLAGS)
    if plan.num_processes > 1 and not chosen_modes:
        argv.append("--multi_gpu")
    argv += list(plan.accelerate_args)
    argv += ["-m", "mixmo_dist.train", "--config", plan.config, *plan.overrides]
    return argv


def launch_env(env: Mapping[str, str]) -> dict[str, str]:
    """The environment for the launcher: `env` plus the requeue command and the signal forwarding settings.

    Returns:
        A new dict; MIXMO_REQUEUE_CMD=scontrol (the trainer's rank 0 requeues the job after saving), SIGUSR2 added
        to the agent's forwarded signals, and the agent's shutdown timeout, each unless already set.
    """
    out = dict(env)
    out.setdefault("MIXMO_REQUEUE_CMD", "scontrol")
    for name in ("PET_SIGNALS_TO_HANDLE", "TORCHELASTIC_SIGNALS_TO_HANDLE"):
        signals = [s for s in out.get(name, DEFAULT_ELASTIC_SIGNALS).split(",") if s]
        if "SIGUSR2" not in signals:
            signals.append("SIGUSR2")
        out[name] = ",".join(signals)
    out.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", DEFAULT_SHUTDOWN_TIMEOUT_S)
    return out
