"""Process runtime: the Accelerator, the single-process-world guard, dying with the launcher, per-rank seeding and
RNG capture, and the preemption signals."""

from __future__ import annotations

import base64
import ctypes
import logging
import os
import random
import signal
from dataclasses import dataclass, field

import numpy as np
import torch

log = logging.getLogger("mixmo_dist")

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent (the torchrun agent) dies.

    torchrun starts each rank in its own session, so killing `accelerate launch` alone would leave ranks training
    as orphans. SIGKILL (not SIGTERM) because a rank cannot save alone: its peers are gone with the launcher, and the
    previous complete checkpoint is what resume uses.
    """
    if "LOCAL_RANK" not in os.environ or not os.path.exists("/proc/self"):
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        log.warning("could not set PR_SET_PDEATHSIG: ranks may outlive a killed launcher")
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def build_accelerator(mixed_precision: str, *, output_dir: str, tensorboard: bool):
    """Accelerator for DDP (NCCL on GPU, gloo on CPU) and AMP.

    Raises:
        RuntimeError: the launcher asked for several processes but this process sees a world of one (on CPU, use
            `accelerate launch --multi_gpu --num_processes N`; `--cpu --num_processes N` starts one process).
        ValueError: fp16 without CUDA (Accelerate would silently train in fp32 on CPU); TensorBoard asked for but
            not installed (Accelerate would drop the tracker with a warning and the run would log nothing).
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    cuda = torch.cuda.is_available()
    precision = None if mixed_precision == "auto" else mixed_precision
    requested = precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if requested == "fp16" and not cuda:
        raise ValueError("run.mixed_precision=fp16 needs CUDA (Accelerate ignores it on CPU); use bf16 or no")
    if tensorboard:
        check_tensorboard()
    accelerator = Accelerator(
        cpu=not cuda,
        mixed_precision=precision,
        log_with="tensorboard" if tensorboard else None,
        project_dir=output_dir,
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
    )
    check_world(accelerator.num_processes, os.environ)
    return accelerator


def check_tensorboard() -> None:
    """Refuse `log.tensorboard=true` where the `tensorboard` package does not import (torch's writer needs it)."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise ValueError(
            "log.tensorboard=true but the tensorboard package is not installed; install the extra "
            "'tensorboard' (pip install 'mixmo_dist[tensorboard]') or set log.tensorboard=false"
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


def rank_seed(seed: int, rank: int, stream: int) -> int:
    """A distinct, reproducible 63-bit seed per (run seed, global rank, stream)."""
    mixed = (seed * 1_000_003 + rank) * 1_000_033 + stream
    return (mixed * 0x9E3779B97F4A7C15) % (2**63 - 1)


def seed_everything(seed: int, rank: int) -> None:
    """Seed python, numpy and torch per global rank (augmentation and dropout differ across ranks)."""
    s = rank_seed(seed, rank, 0)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def capture_rng(generator: torch.Generator) -> dict:
    """Every RNG of this rank as plain JSON (no pickle): python, numpy, torch CPU, CUDA, the mixing generator."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": _b64(torch.get_rng_state()),
        "mixing": _b64(generator.get_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = _b64(torch.cuda.get_rng_state())
    return state


def restore_rng(state: dict, generator: torch.Generator) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state((npst[0], np.asarray(npst[1], dtype=np.uint32), npst[2], npst[3], npst[4]))
    torch.set_rng_state(_unb64(state["torch"]))
    generator.set_state(_unb64(state["mixing"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_unb64(state["cuda"]))


@dataclass
class StopSignal:
    """Records SIGUSR2/SIGTERM; the trainer acts on it at the next step boundary, after all ranks agree.

    The handler only sets a flag: a collective inside a signal handler could deadlock mid-collective.
    """

    signals: tuple = (signal.SIGUSR2, signal.SIGTERM)
    received: str | None = None
    _previous: dict = field(default_factory=dict)

    def install(self) -> None:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            log.warning("received %s: saving at the next step boundary, then stopping", self.received)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
