"""Benchmark: ImageNet on hundreds of ranks, by simulation (issue 21). Every figure is measured here, on this machine.

- **Scan vs index.** Synthetic ImageNet-layout trees of empty files in 1,000 class folders (50k, 200k and 1.28M files;
  removed afterwards): the scan every rank of every start used to make (`scan_split` + the file table), against the
  dataset index (`data/index.py`): its first build (one process per start), the check rank 0 makes (folders'
  mtimes + CRC-32) and the check every other rank makes (mtimes only).
- **Private memory per DataLoader worker.** A process started from the project's forkserver receives the table as a
  worker does (pickled), reads every 16th path, and reports how much its private memory (Private_Clean +
  Private_Dirty of /proc/self/smaps_rollup) grew: the table as arrays (before) against the memory-mapped index.
- **Epoch plan and checkpoint state at W in {8, 64, 512, 4096} simulated ranks.** The plan: rank 0's indices of one
  epoch of 1.28M samples. The checkpoint: a ResNet-50-sized MixMo checkpoint (27.6M parameters + SGD momentum) with
  each rank's real state (RNG streams, data position) saved by the real `CheckpointManager` as rank 0 of a world of
  W, through an in-process stand-in for the collectives that does the other ranks' part (each writes its own file,
  fsynced) and times it apart; against the protocol before issue 21, rebuilt here: every rank receives every rank's
  state (an all-gather), and rank 0 writes the W rank files and hashes them at the commit. Bytes are what a rank
  other than 0 receives per save.

Growth exponents are slopes of log(time) against log(size or W). The real gloo path is covered by
tests/test_checkpoint_ranks.py; this only scales it.

    python -m benchmarks.bench_scale [--quick]
"""

from __future__ import annotations

import gc
import math
import os
import pickle
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import quick_main
from mixmo_dist.checkpoint.state import CheckpointManager
from mixmo_dist.checkpoint.store import CheckpointStore
from mixmo_dist.data.folder import scan_split
from mixmo_dist.data.forkserver import worker_context
from mixmo_dist.data.index import PathTable, split_table
from mixmo_dist.data.plan import EpochPlan
from mixmo_dist.runtime.collectives import Collectives
from mixmo_dist.runtime.seeds import RankRNG, seed_rank

__all__ = ["run"]

IMAGENET = 1_281_167


# ---------------------------------------------------------------------------------------------------------- files


def _make_tree(root: Path, files: int, classes: int) -> None:
    for c in range(classes):
        folder = root / "train" / f"n{c:08d}"
        folder.mkdir(parents=True)
        for i in range(c * files // classes, (c + 1) * files // classes):
            os.close(os.open(folder / f"n{c:08d}_{i}.JPEG", os.O_CREAT | os.O_WRONLY, 0o644))


def _best(fn, rounds: int) -> float:
    best = math.inf
    for _ in range(rounds):
        gc.collect()
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _private_kb() -> int:
    total = 0
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith(("Private_Clean:", "Private_Dirty:")):
            total += int(line.split()[1])
    return total


def _probe(pickled: bytes, queue) -> None:
    """In a worker: how much private memory (kB) the table costs once received and read."""
    before = _private_kb()
    table = pickle.loads(pickled)
    for i in range(0, len(table), 16):
        table.path(i)
    queue.put(_private_kb() - before)


def _worker_private_mb(table: PathTable) -> float:
    ctx = worker_context()
    queue = ctx.Queue()
    proc = ctx.Process(target=_probe, args=(pickle.dumps(table), queue))
    proc.start()
    kb = queue.get(timeout=600)
    proc.join()
    return kb / 1024


def _files(sizes: tuple[int, ...], classes: int, rounds: int) -> dict:
    out: dict = {}
    for n in sizes:
        tag = _size_tag(n)
        with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
            root = Path(tmp)
            start = time.perf_counter()
            _make_tree(root, n, classes)
            made = time.perf_counter() - start
            scan = _best(lambda root=root: PathTable(scan_split(root, "train")[1]), rounds)
            start = time.perf_counter()
            split_table(root, "train")
            build = time.perf_counter() - start
            hit_first = _best(lambda root=root: split_table(root, "train", full_check=True), rounds)
            hit_other = _best(lambda root=root: split_table(root, "train", full_check=False), rounds)
            arrays = PathTable(scan_split(root, "train")[1])
            mapped = split_table(root, "train")[1]
            old_mb, new_mb = _worker_private_mb(arrays), _worker_private_mb(mapped)
            index_mb = (root / ".mixmo_index" / "train.idx").stat().st_size / 1e6
            del arrays, mapped
        print(
            f"{tag:>5s} files: scan {scan:6.2f} s (every rank, every start) | index build {build:6.2f} s (once) | "
            f"hit {hit_first:5.3f} s (rank 0, CRC) {hit_other:5.3f} s (other ranks) | scan/hit {scan / hit_other:6.1f}x"
            f" | worker private {old_mb:6.1f} MB -> {new_mb:4.1f} MB | index {index_mb:5.1f} MB (tree made in "
            f"{made:.0f} s)",
            flush=True,
        )
        out.update({
            f"scale_scan_s_{tag}": scan, f"scale_index_build_s_{tag}": build, f"scale_hit_rank0_s_{tag}": hit_first,
            f"scale_hit_s_{tag}": hit_other, f"scale_scan_vs_hit_{tag}": scan / hit_other,
            f"scale_worker_private_mb_before_{tag}": old_mb, f"scale_worker_private_mb_{tag}": new_mb,
        })  # fmt: skip
    largest = _size_tag(sizes[-1])  # 1.28M (20k in the quick run)
    for what in ("scan_vs_hit", "hit_s", "hit_rank0_s", "worker_private_mb"):
        out[f"scale_{what}_largest"] = out[f"scale_{what}_{largest}"]
    if len(sizes) > 1:
        for what in ("scan_s", "hit_s", "hit_rank0_s", "worker_private_mb_before"):
            slope = _slope(sizes, [out[f"scale_{what}_{_size_tag(n)}"] for n in sizes])
            out[f"scale_growth_{what}"] = slope
        print(
            "growth exponents in the number of files: scan {scan_s:.2f}, hit (other ranks) {hit_s:.2f}, "
            "hit (rank 0) {hit_rank0_s:.2f}, worker memory before {worker_private_mb_before:.2f}".format(
                **{k: out[f"scale_growth_{k}"] for k in ("scan_s", "hit_s", "hit_rank0_s", "worker_private_mb_before")}
            )
        )
    return out


def _size_tag(n: int) -> str:
    return "1.28M" if n == IMAGENET else f"{n // 1000}k"


def _slope(xs, ys) -> float:
    lx, ly = np.log(np.asarray(xs, dtype=float)), np.log(np.maximum(np.asarray(ys, dtype=float), 1e-9))
    return float(np.polyfit(lx, ly, 1)[0])


# ----------------------------------------------------------------------------------------------------- checkpoints


class SimCollectives:
    """Rank 0 of a simulated world of `world` ranks, in one process: each collective returns what rank 0 would get,
    and the other ranks' part (writing their own rank file into the broadcast directory) is done here and timed
    apart in `others_s`. `received` counts the bytes one rank other than 0 receives."""

    agree = Collectives.agree

    def __init__(self, world: int, store: CheckpointStore) -> None:
        self.world_size, self.rank, self.store = world, 0, store
        self.others_s, self.received, self._tmp, self._state = 0.0, 0, None, None
        self.accelerator = self

    def sync_buffers(self, module) -> None:
        pass

    def max(self, t):
        self.received += t.nbytes
        return t.clone()

    def broadcast_object(self, obj):
        self.received += len(pickle.dumps(obj))
        self._tmp = obj
        return obj

    def gather_to_main(self, obj):
        self.received += len(pickle.dumps(None))
        start = time.perf_counter()
        tmp = self.store.root / self._tmp
        reports = [obj]
        state = self._state  # another rank's state: the same size as rank 0's
        for r in range(1, self.world_size):
            file, digest = self.store.write_json_digest(tmp, f"rank_{r}.json", state)
            reports.append((digest, file.stat().st_size, None))
        self.others_s += time.perf_counter() - start
        return reports


def _old_save(manager: CheckpointManager, world: int) -> tuple[float, int]:
    """The save before issue 21 (rebuilt): an all-gather of every rank's state, rank 0 writes every rank file and
    hashes all of them at the commit. Returns (rank 0's time, bytes a rank receives)."""
    start = time.perf_counter()
    own = manager._rank_state()
    wire = pickle.dumps(own)
    states = [pickle.loads(wire) for _ in range(world)]  # what every rank received
    step = manager.counters.state_dict()["step"]
    model_sd, opt_tensors, opt_meta = manager._tensors()
    tmp = manager.store.begin(step)
    manager.store.write_tensors(tmp, "model.safetensors", model_sd)
    manager.store.write_tensors(tmp, "trainer.safetensors", opt_tensors)
    manager.store.write_json(tmp, "state.json", {**manager.counters.state_dict(), "optimizer": opt_meta})
    for r, state in enumerate(states):
        manager.store.write_json(tmp, f"rank_{r}.json", state)
    manager.store.commit(tmp, step)
    return time.perf_counter() - start, world * len(wire)


class _Counters:
    def __init__(self) -> None:
        self.step = 0

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = state["step"]


def _checkpoints(worlds: tuple[int, ...], features: int, samples: int) -> dict:
    torch.manual_seed(0)
    model = torch.nn.Linear(features, features)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, features)).sum().backward()
    optimizer.step()
    generator = torch.Generator()
    seed_rank(0, 0, generator)
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench_scale_warm_") as tmp:  # the first save of a process pays more
        store = CheckpointStore(Path(tmp), keep_last=1)
        plan = EpochPlan(samples, unique_per_rank=32, rank=0, world_size=8, seed=0)
        CheckpointManager(
            store, SimCollectives(1, store), rank=0, model=model, optimizer=optimizer, ema=None, scaler=None,
            counters=_Counters(), rank_states={"rng": RankRNG(generator, seed=0, rank=0), "data": plan}, shape={},
            describe=dict,
        ).save()  # fmt: skip
    params = sum(p.numel() for p in model.parameters())
    print(f"checkpoint of {params / 1e6:.1f}M parameters + momentum; per-rank state {_rank_state_bytes(generator)} B")
    for world in worlds:
        plan = EpochPlan(samples, unique_per_rank=32, rank=0, world_size=world, seed=0)
        plan_s = _best(lambda plan=plan: plan.rank_indices(0), 2)
        with tempfile.TemporaryDirectory(prefix="bench_scale_ckpt_") as tmp:
            store = CheckpointStore(Path(tmp) / "checkpoints", keep_last=1)
            counters = _Counters()
            comm = SimCollectives(world, store)
            manager = CheckpointManager(
                store, comm, rank=0, model=model, optimizer=optimizer, ema=None, scaler=None, counters=counters,
                rank_states={"rng": RankRNG(generator, seed=0, rank=0), "data": plan}, shape={}, describe=dict,
            )  # fmt: skip
            comm._state = manager._rank_state()
            counters.step = 1
            start = time.perf_counter()
            manager.save()
            new_total = time.perf_counter() - start
            new_s = new_total - comm.others_s
            per_other = comm.others_s / max(world - 1, 1)
            counters.step = 2
            old_s, old_bytes = _old_save(manager, world)
            ckpt = store.root / store.step_dir_name(2)
            start = time.perf_counter()
            for r in range(world):  # the old resume on another world size: every rank read every old rank file
                store.read_json(ckpt, f"rank_{r}.json")
            old_resume = time.perf_counter() - start
            start = time.perf_counter()
            store.read_json(ckpt, "rank_0.json")  # now: one file (its own), or none (the shared position)
            new_resume = time.perf_counter() - start
        print(
            f"W={world:5d}: plan {plan_s:5.3f} s | save, rank 0: {new_s:6.2f} s (before: {old_s:6.2f} s), another rank "
            f"{per_other * 1e3:5.2f} ms | bytes a rank receives {comm.received:6d} (before: {old_bytes:10d}) | "
            f"resume reads per rank 1 (before: {world}, {old_resume:.2f} s vs {new_resume * 1e3:.2f} ms)",
            flush=True,
        )
        out.update({
            f"scale_plan_s_w{world}": plan_s, f"scale_save_rank0_s_w{world}": new_s,
            f"scale_save_rank0_before_s_w{world}": old_s, f"scale_save_other_rank_ms_w{world}": per_other * 1e3,
            f"scale_bytes_per_rank_w{world}": comm.received, f"scale_bytes_per_rank_before_w{world}": old_bytes,
        })  # fmt: skip
    lo, hi = worlds[0], worlds[-1]
    # "wmax": the largest world measured (4096; 64 in the quick run), so the goals' keys exist in both runs.
    out["scale_save_rank0_wmax_vs_w8"] = out[f"scale_save_rank0_s_w{hi}"] / out[f"scale_save_rank0_s_w{lo}"]
    out["scale_save_rank0_before_wmax_vs_w8"] = (
        out[f"scale_save_rank0_before_s_w{hi}"] / out[f"scale_save_rank0_before_s_w{lo}"]
    )
    out["scale_bytes_per_rank_wmax_vs_w8"] = out[f"scale_bytes_per_rank_w{hi}"] / out[f"scale_bytes_per_rank_w{lo}"]
    for what in ("plan_s", "save_rank0_s", "save_rank0_before_s", "bytes_per_rank", "bytes_per_rank_before"):
        out[f"scale_growth_{what}"] = _slope(worlds, [out[f"scale_{what}_w{w}"] for w in worlds])
    print(
        "growth exponents in W: plan {plan_s:.2f}, save rank 0 {save_rank0_s:.2f} (before {save_rank0_before_s:.2f}),"
        " bytes per rank {bytes_per_rank:.2f} (before {bytes_per_rank_before:.2f})".format(
            **{
                k: out[f"scale_growth_{k}"]
                for k in ("plan_s", "save_rank0_s", "save_rank0_before_s", "bytes_per_rank", "bytes_per_rank_before")
            }
        )  # fmt: skip
    )
    return out


def _rank_state_bytes(generator: torch.Generator) -> int:
    return len(pickle.dumps(RankRNG(generator, seed=0, rank=0).state_dict()))


def run(quick: bool = False) -> dict:
    """Measures everything; quick: small trees and worlds (a smoke run, not figures to quote).

    Returns:
        Flat {key: value}; the headline ratios are `scale_scan_vs_hit_<size>`, `scale_save_rank0_w<W>_vs_w8` and
        `scale_bytes_per_rank_w<W>_vs_w8`.
    """
    torch.set_num_threads(1)
    if quick:
        files = _files((5_000, 20_000), classes=100, rounds=1)
        ckpts = _checkpoints((8, 64), features=256, samples=20_000)
    else:
        files = _files((50_000, 200_000, IMAGENET), classes=1000, rounds=3)
        # 5250^2 + 5250 = 27.6M parameters: a ResNet-50 MixMo's weights and momentum, 221 MB.
        ckpts = _checkpoints((8, 64, 512, 4096), features=5250, samples=IMAGENET)
    return {**files, **ckpts}


def main(argv: list[str] | None = None) -> int:
    return quick_main(run, "python -m benchmarks.bench_scale", __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
