"""One rank of a real gloo group that saves or resumes a `CheckpointManager` (run by tests/test_checkpoint_ranks.py).

    python -m ckpt_ranks save <root> [desync|unwritable]
                                                 every rank saves step 7 at data position (epoch 1, batch 3); desync:
                                                 rank 1's replica differs; unwritable: rank 1's state is not JSON
    python -m ckpt_ranks resume <root>           every rank resumes the latest checkpoint (elastic)
    python -m ckpt_ranks rows <root>             rank r sends r + 1 rows to rank 0 (`gather_rows_to_main`)

Every rank writes `<root>/../<mode>-rank<r>.json` (long lines printed by several ranks interleave): its rank, the
bytes the collectives handed back to it, and what it saved or restored. The global batch is 12 unique images at
every world size (2, 3, 4, 6 ranks), so resuming on another world size is allowed.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import sys
from pathlib import Path

import torch
import torch._dynamo  # noqa: F401  before the process group: see mixmo_dist/runtime/accelerator.py
from accelerate import Accelerator

from mixmo_dist.checkpoint.state import CheckpointManager
from mixmo_dist.checkpoint.store import CheckpointStore
from mixmo_dist.data.plan import EpochPlan
from mixmo_dist.runtime.collectives import Collectives, StopAllRanks
from mixmo_dist.runtime.seeds import RankRNG, seed_rank

GLOBAL_UNIQUE = 12


class CountingCollectives(Collectives):
    """The run's collectives, counting the bytes each kind of call hands back to this rank (what it received)."""

    def __init__(self, accelerator) -> None:
        super().__init__(accelerator)
        self.received: dict[str, int] = {}

    def _count(self, name: str, out):
        size = out.nbytes if isinstance(out, torch.Tensor) else len(pickle.dumps(out))
        self.received[name] = self.received.get(name, 0) + size
        return out

    def broadcast_object(self, obj):
        return self._count("broadcast_object", super().broadcast_object(obj))

    def gather_objects(self, obj):
        return self._count("gather_objects", super().gather_objects(obj))

    def gather_to_main(self, obj):
        return self._count("gather_to_main", super().gather_to_main(obj))

    def max(self, t):
        return self._count("max", super().max(t))


class Unwritable:
    """A per-rank state JSON cannot hold (a set)."""

    def state_dict(self):
        return {1, 2}


class Counters:
    step = 0

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = state["step"]


def main(mode: str, root: str, *flags: str) -> None:
    accelerator = Accelerator(cpu=True)
    comm = CountingCollectives(accelerator)
    rank, world = comm.rank, comm.world_size
    torch.manual_seed(0)  # the same replica on every rank
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    generator = torch.Generator()
    seed_rank(0, rank, generator)
    rng = RankRNG(generator, seed=0, rank=rank)
    plan = EpochPlan(100, unique_per_rank=GLOBAL_UNIQUE // world, rank=rank, world_size=world, seed=0)
    counters = Counters()
    manager = CheckpointManager(
        CheckpointStore(root, keep_last=2), comm, rank=rank, model=model, optimizer=optimizer, ema=None,
        scaler=None, counters=counters, rank_states={"rng": rng, "data": plan},
        shape={"arch": "linear", "num_members": 1, "num_classes": 3, "rows_per_rank": GLOBAL_UNIQUE // world,
               "world_size": world, "classes": ["a", "b", "c"]},
        describe=dict, elastic=True,
    )  # fmt: skip
    report: dict = {"rank": rank}
    if mode == "rows":
        rows = torch.arange(3 * (rank + 1), dtype=torch.float32).reshape(rank + 1, 3) + 100 * rank
        parts = comm.gather_rows_to_main(rows)
        report["parts"] = None if parts is None else [part.tolist() for part in parts]
    elif mode == "save":
        counters.step = 7
        plan.load_state_dict({"epoch": 1, "batch": 3})
        if "desync" in flags and rank == 1:
            with torch.no_grad():
                model.weight[0, 0] += 1.0
        report["state"] = {"rng": rng.state_dict(), "data": plan.state_dict()}
        if "unwritable" in flags and rank == 1:
            manager.rank_states["bad"] = Unwritable()
        try:
            report["path"] = str(manager.save())
        except (RuntimeError, StopAllRanks) as err:
            report["error"] = str(err)
            report["reports"] = getattr(err, "report", None)
    else:
        report["path"] = str(manager.resume("auto"))
        report["data"] = plan.state_dict()
        report["rng_sha"] = hashlib.sha256(json.dumps(rng.state_dict(), sort_keys=True).encode()).hexdigest()
        report["step"] = counters.step
    report["received"] = comm.received
    (Path(root).parent / f"{mode}-rank{rank}.json").write_text(json.dumps(report))
    accelerator.end_training()


if __name__ == "__main__":
    main(*sys.argv[1:])
