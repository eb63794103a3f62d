"""The Accelerator of a run (DDP over NCCL or gloo, AMP), the single-process-world guard, dying with the launcher."""

from __future__ import annotations

import datetime
import importlib
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from mixmo_dist.runtime.faults import nccl_environment
from mixmo_dist.runtime.signals import die_with

log = logging.getLogger("mixmo_dist")


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent (the torchrun agent) dies.

    torchrun starts each rank in its own session, so killing `accelerate launch` alone would leave ranks training
    as orphans. SIGKILL (not SIGTERM) because a rank cannot save alone: its peers are gone with the launcher, and the
    previous complete checkpoint is what resume uses.
    """
    if "LOCAL_RANK" not in os.environ or not os.path.exists("/proc/self"):
        return
    if not die_with(os.getppid()):
        log.warning("could not set PR_SET_PDEATHSIG: ranks may outlive a killed launcher")


def build_accelerator(
    mixed_precision: str,
    *,
    output_dir: str,
    trackers: Sequence[str] = (),
    startup_timeout_s: float = 1800.0,
    tf32: str = "auto",
):
    """Accelerator for DDP (NCCL on GPU, gloo on CPU) and AMP.

    The process group starts with `startup_timeout_s` as its collective timeout (the trainer shortens it after the
    first step, `fault.collective_timeout_s`); on CUDA, NCCL is told to turn a timed-out collective into an error and
    to dump its flight recorder into `<output_dir>/stacks/` (`runtime.faults.nccl_environment`).

    Raises:
        RuntimeError: the launcher asked for several processes but this process sees a world of one (on CPU, use
            `accelerate launch --multi_gpu --num_processes N`; `--cpu --num_processes N` starts one process).
        ValueError: fp16 without CUDA (Accelerate would silently train in fp32 on CPU); a tracker asked for whose
            package is not installed (Accelerate would drop it with a debug message and the run would log nothing).
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    cuda = torch.cuda.is_available()
    precision = None if mixed_precision == "auto" else mixed_precision
    requested = precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if requested == "fp16" and not cuda:
        who = (
            "run.mixed_precision=fp16"
            if precision
            else "accelerate launch --mixed_precision fp16 (run.mixed_precision=auto)"
        )
        raise ValueError(f"{who} needs CUDA (Accelerate ignores fp16 on CPU); use bf16 or no")
    check_trackers(trackers)  # before the process group: the one line comes before any training starts
    # Each rank keeps its own BatchNorm statistics between checkpoints (they are synced from rank 0 before a save),
    # as with `broadcast_buffers=False` since it exists. torch 2.14 deprecates the flag for `forward_sync_buffers`,
    # which torch 2.11 (the GPU machines) lacks and Accelerate does not pass; the warning would print once per rank.
    warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
    if cuda:
        for key, value in nccl_environment(Path(output_dir) / "stacks").items():
            os.environ.setdefault(key, value)  # read when the NCCL process group is created, just below
    # torch._dynamo imported after the process group exists takes references to it that `destroy_process_group`
    # does not drop (torch 2.14; the first optimizer imports it): the gloo worker threads then live into interpreter
    # shutdown, and one that frees a finished collective's tensor there aborts the rank ("terminate called without
    # an active exception", exit -6) after its work is done. Imported first, it never sees the group.
    importlib.import_module("torch._dynamo")

    accelerator = Accelerator(
        cpu=not cuda,
        mixed_precision=precision,
        log_with=list(trackers) or None,
        project_dir=output_dir,
        kwargs_handlers=[
            DistributedDataParallelKwargs(broadcast_buffers=False),
            InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=startup_timeout_s)),
        ],
    )
    check_world(accelerator.num_processes, os.environ)
    use_tf32(tf32, accelerator.mixed_precision)
    return accelerator


def use_tf32(mode: str, precision: str) -> bool:
    """Set torch's TF32 switches for matmuls and cuDNN convolutions (`run.tf32`); returns whether TF32 is on.

    torch enables TF32 for convolutions by default on Ampere and later GPUs, so an fp32 run there is not fp32 unless
    the switch is turned off; "auto" keeps it for mixed-precision runs (whose matmuls are bf16/fp16 anyway) and turns
    it off for fp32 ones. The switches are process-wide and harmless without CUDA.
    """
    on = mode == "on" or (mode == "auto" and precision in ("bf16", "fp16"))
    with warnings.catch_warnings():  # newer torch prefers fp32_precision; these names work on 2.11 and 2.14
        warnings.simplefilter("ignore")
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on
    return on


# The package each tracker of `log.trackers` imports, and the extra of this project that installs it.
TRACKER_PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "trackers"),
    "wandb": ("wandb", "trackers"),
}


def check_trackers(trackers: Sequence[str]) -> None:
    """Refuse a tracker of `log.trackers` (or `log.tensorboard=true`) whose package does not import.

    Raises:
        ValueError: one line naming the key, the package and the extra that installs it.
    """
    for name in trackers:
        package, extra = TRACKER_PACKAGES[name]
        try:
            importlib.import_module(package)
        except ImportError:
            key = f"log.trackers lists {name}" + (" (or log.tensorboard=true)" if name == "tensorboard" else "")
            raise ValueError(
                f"{key} but the {package} package is not installed; install the extra '{extra}' "
                f"(pip install 'mixmo_dist[{extra}]') or take {name} out of the config"
            ) from None


def check_world(num_processes: int, environ) -> None:
    """Refuse a launcher world of N > 1 that this process sees as a world of one (it would train alone)."""
    env_world = int(environ.get("WORLD_SIZE", "1"))
    if env_world > 1 and num_processes == 1:
        raise RuntimeError(
            f"WORLD_SIZE={env_world} but the Accelerator sees a single process: every rank would train alone and "
            "write the same checkpoints. On CPU launch with `accelerate launch --multi_gpu --num_processes N` "
            "(Accelerate's `--cpu --num_processes N` starts one process)."
        )
