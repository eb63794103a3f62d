"""Seeds and RNG state: the one seed-derivation function, per-rank seeding, and every RNG's state as plain JSON.

Every stream of the project starts from `derive_seed(run seed, ...)`: the per-rank process RNGs and mixing
generator (`seed_rank`), the torch backend's per-sample augmentation, the epoch permutations and DALI's pipeline
seeds. A hash (blake2b) rather than arithmetic, so nearby tuples ((seed, rank 0) and (seed, rank 1), consecutive
epochs) give unrelated streams.
"""

from __future__ import annotations

import base64
import hashlib
import random
import struct

import numpy as np
import torch

# Streams of `seed_rank`: one name per consumer, so adding a consumer never shifts another's stream.
STREAM_PROCESS = 0  # python, numpy and torch's global RNGs of a rank
STREAM_MIXING = 1  # the rank's mixing generator (member shuffles, kappas, boxes, coins)


def derive_seed(*words: int, bits: int = 63) -> int:
    """A reproducible seed of `bits` bits (<= 63) from a tuple of integers (each in the int64 range).

    DALI takes 31-bit seeds (`bits=31`); torch and numpy take 63 bits.
    """
    if not 1 <= bits <= 63:
        raise ValueError(f"bits must be in [1, 63], got {bits}")
    digest = hashlib.blake2b(struct.pack(f"<{len(words)}q", *words), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << bits) - 1)


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


def seed_rank(seed: int, rank: int, generator: torch.Generator, *after: int) -> None:
    """Seed this rank's process RNGs (python, numpy, torch, CUDA) and its mixing generator.

    `after`: extra words for a restart (the step of a resume on another world size), so the new streams are
    reproducible and differ from the first ones.
    """
    s = derive_seed(seed, rank, STREAM_PROCESS, *after)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)
    generator.manual_seed(derive_seed(seed, rank, STREAM_MIXING, *after))


class RankRNG:
    """Every RNG stream of this rank as one stateful object (`state_dict`/`load_state_dict`, plain JSON).

    Args:
        generator: the rank's mixing generator; the process-wide RNGs (python, numpy, torch, CUDA) come with it.
        seed, rank: the run seed and this rank, to derive fresh streams when a checkpoint is resharded.
    """

    def __init__(self, generator: torch.Generator, *, seed: int, rank: int) -> None:
        self.generator, self.seed, self.rank = generator, seed, rank

    def state_dict(self) -> dict:
        return capture_rng(self.generator)

    def load_state_dict(self, state: dict) -> None:
        restore_rng(state, self.generator)

    def load_resharded(self, states: list[dict], step: int) -> None:
        """After a world-size change the old ranks' streams belong to nobody: derive new ones from (seed, rank,
        step), deterministically."""
        seed_rank(self.seed, self.rank, self.generator, step)
