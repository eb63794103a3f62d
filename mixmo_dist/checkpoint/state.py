"""What a run saves and restores: `CheckpointManager`, the one object the training loop calls to save and resume.

A checkpoint directory (written through `CheckpointStore`, so atomic and sha256-verified) holds:

    model.safetensors     the network's state_dict (rank 0's, after the ranks' buffers were synchronised)
    trainer.safetensors   the optimizer's tensors (`optimizer/<param index>/<key>`) and the EMA's (`ema/<name>`)
    state.json            counters (step, ...), the optimizer's non-tensor state and param groups, the scaler, the
                          shape-defining settings, what the loop describes (config, plan, schedule, epoch), and
                          `reshard`: rank 0's per-rank state, which a resume on another world size restores from
    rank_<r>.json         per rank, written by that rank: its RNG streams, its data position, a fingerprint of its
                          replica

Nothing of a rank's state travels to another rank, and a resume reads one small file per rank, so a save's and a
resume's traffic per rank do not grow with the world size (rank 0 alone handles W digests of 64 bytes).

No pickle anywhere: tensors in safetensors, everything else in JSON, so loading never executes code. The manager
never imports the trainer: the loop hands it the state objects and the collectives it needs (like torchtitan's
`CheckpointManager(states=...)`).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from mixmo_dist.checkpoint import CheckpointError
from mixmo_dist.checkpoint.store import CheckpointStore

log = logging.getLogger("mixmo_dist")

# Settings a checkpoint cannot be resumed across: they change tensor shapes, the data position or the RNG streams.
SHAPE_KEYS = ("arch", "num_members", "num_classes", "rows_per_rank", "world_size", "classes")


class Stateful(Protocol):
    """Anything with a JSON-able (or tensor) `state_dict()` and `load_state_dict(state)`."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


def optimizer_tensors(sd: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into safetensors-able tensors and JSON metadata (no pickle)."""
    tensors, meta_state = {}, {}
    for idx, per_param in sd["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{idx}/{key}"] = value
            else:
                meta_state.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "state": meta_state}


def optimizer_state(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict:
    """The optimizer state_dict that `optimizer_tensors` split (the inverse)."""
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer/"):
            _, idx, key = name.split("/", 2)
            state.setdefault(int(idx), {})[key] = value
    for idx, extra in meta["state"].items():
        state.setdefault(int(idx), {}).update(extra)
    return {"state": state, "param_groups": meta["param_groups"]}


def fingerprint(model: nn.Module) -> str:
    """sha256 of every parameter and buffer's bytes: equal across ranks iff the replicas are bit-identical."""
    digest = hashlib.sha256()
    for name, value in model.state_dict().items():
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class CheckpointManager:
    """Saves and restores the whole state of a run, on every rank (both methods are collectives).

    Args:
        store: where checkpoints go.
        comm: the run's `Collectives` (broadcast, gather, buffer sync, barrier).
        rank: this process's global rank; rank 0 writes the shared files, every rank writes and reads its own
            `rank_<r>.json`.
        model: the unwrapped network.
        optimizer: its optimizer.
        ema: an EMA with tensor `state_dict()`, or None.
        scaler: a GradScaler, or None.
        counters: the loop's counters (`state_dict()` -> {"step": int, ...}), merged into state.json.
        rank_states: per-rank state objects saved into `rank_<r>.json` under their key (e.g. "rng", "data").
        shape: the shape-defining settings of this run (`SHAPE_KEYS`); a checkpoint that differs is refused.
        describe: returns informational entries for state.json (config, plan, epoch, ...); never restored.
        elastic: the run may resume a checkpoint of another world size with the same global batch (set when
            `data.global_batch_size` is): every per-rank object is then restored with `load_resharded([old rank
            0's state], step)` instead of `load_state_dict` (every old rank held the same data position).
    """

    def __init__(
        self,
        store: CheckpointStore,
        comm,
        *,
        rank: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        ema: Stateful | None,
        scaler: Stateful | None,
        counters: Stateful,
        rank_states: Mapping[str, Stateful],
        shape: Mapping[str, Any],
        describe: Callable[[], dict],
        elastic: bool = False,
    ) -> None:
        self.store, self.comm, self.rank = store, comm, rank
        self.model, self.optimizer, self.ema, self.scaler = model, optimizer, ema, scaler
        self.counters, self.rank_states = counters, dict(rank_states)
        self.shape, self.describe, self.elastic = dict(shape), describe, elastic
        # The newest complete checkpoint this run wrote or resumed from, and its size on disk (rank 0): the next
        # save must find at least that much free space before it writes a byte.
        self.latest: Path | None = None
        self.latest_bytes: int | None = None

    # ------------------------------------------------------------------------------------------------- saving

    def _rank_state(self) -> dict:
        state = {key: obj.state_dict() for key, obj in self.rank_states.items()}
        state["param_fingerprint"] = fingerprint(self.model)
        return state

    def save(self, on_file: Callable[[], None] | None = None) -> Path | None:
        """Write a checkpoint of the current state; returns its directory on rank 0, None elsewhere.

        What travels is independent of the world size: the ranks agree on their replica fingerprint with one
        all-reduce of 128 bytes; rank 0 opens the step's temporary directory and names it to the others; each rank
        writes its own `rank_<r>.json` there (its RNG streams are never sent anywhere) while rank 0 writes the
        tensors and state.json; each rank then sends rank 0 its file's sha256 (or its error), and rank 0 commits.
        Every rank then shares rank 0's outcome: a save that fails (a full disk, a quota, EIO, a permission, on any
        rank) stops every rank together with one one-line message, instead of leaving the others in a barrier. A
        failed save removes its temporary directory; the newest complete checkpoint stays the latest.

        Args:
            on_file: called after each file is written (the hang watchdog's heartbeat).

        Raises:
            RuntimeError: the replicas differ across ranks (a desync worth stopping for: DDP keeps them equal).
            StopAllRanks: on every rank, when the checkpoint could not be written.
        """
        on_file = on_file or (lambda: None)
        self.comm.sync_buffers(self.model)
        counters = self.counters.state_dict()
        step = counters["step"]
        own = self._rank_state()
        self._check_replicas(own["param_fingerprint"], step)
        tmp, needed, shared_bytes, path, error, failure = None, 0, 0, None, None, None
        if self.rank == 0:
            try:
                tmp, needed = self._begin(step)
            except SaveError as err:
                error = str(err)
        name = self.comm.broadcast_object(None if tmp is None else tmp.name)
        if name is not None:
            report = self._write_rank_file(self.store.root / name, own)
            if self.rank == 0:
                shared_bytes, failure = self._write_shared(tmp, counters, own, on_file)
            reports = self.comm.gather_to_main(report)
            if self.rank == 0:
                try:
                    path = self._commit(tmp, step, reports, needed, shared_bytes, failure)
                    log.info("saved checkpoint %s", path)
                except SaveError as err:
                    error = str(err)
        self.comm.agree(error)  # the barrier of the save: every rank learns rank 0's outcome
        return path

    def _check_replicas(self, mine: str, step: int) -> None:
        """Stop every rank when the ranks' fingerprints differ, from one all-reduce (max) of the hash and its
        negation: equal maximum and minimum word by word means one hash everywhere (a gather would grow with W)."""
        words = [int(mine[i : i + 8], 16) for i in range(0, len(mine), 8)]
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))  # NCCL reduces on the GPU
        hash_H = torch.tensor(words, dtype=torch.int64, device=device)
        both = self.comm.max(torch.cat([hash_H, -hash_H]))
        if not torch.equal(both[: len(words)], -both[len(words) :]):
            raise RuntimeError(
                f"model replicas differ across ranks at step {step}: this rank's parameter fingerprint is {mine}, "
                "and at least one other rank's is not"
            )

    def _begin(self, step: int) -> tuple[Path, int]:
        """Rank 0: check the free space, then open the step's temporary directory."""
        model_sd, opt_tensors, _ = self._tensors()
        needed = self.latest_bytes or _nbytes(model_sd) + _nbytes(opt_tensors)
        self._check_space(step, needed)
        try:
            return self.store.begin(step), needed
        except OSError as err:
            raise SaveError(self._failure(step, err, needed)) from err

    def _tensors(self) -> tuple[dict, dict, dict]:
        """(model state_dict, optimizer and EMA tensors, optimizer metadata), as saved."""
        model_sd = self.model.state_dict()
        opt_tensors, opt_meta = optimizer_tensors(self.optimizer.state_dict())
        if self.ema is not None:
            opt_tensors.update({f"ema/{k}": v for k, v in self.ema.state_dict().items()})
        return model_sd, opt_tensors, opt_meta

    def _write_rank_file(self, tmp: Path, own: dict) -> tuple[str | None, int, tuple[int | None, str] | None]:
        """This rank's `rank_<r>.json` into the temporary directory: (sha256, bytes, None), or (None, 0, (errno,
        message)) for rank 0 to report."""
        try:
            file, digest = self.store.write_json_digest(tmp, f"rank_{self.rank}.json", own)
            return digest, file.stat().st_size, None
        except (OSError, CheckpointError, TypeError, ValueError) as err:  # a state JSON cannot hold is a failure too
            code = getattr(err, "errno", None) or getattr(err.__cause__, "errno", None)
            return None, 0, (code, f"rank {self.rank} could not write rank_{self.rank}.json: {err}")

    def _write_shared(
        self, tmp: Path, counters: dict, own: dict, on_file: Callable[[], None]
    ) -> tuple[int, BaseException | None]:
        """Rank 0: the tensors and state.json, while the other ranks write their own files: (their bytes, None), or
        (0, the error)."""
        try:
            model_sd, opt_tensors, opt_meta = self._tensors()
            self.store.write_tensors(tmp, "model.safetensors", model_sd)
            on_file()
            self.store.write_tensors(tmp, "trainer.safetensors", opt_tensors)
            on_file()
            state = {
                **self.describe(),
                **counters,
                "shape": self.shape,
                "optimizer": opt_meta,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                # What a resume on another world size restores from (every rank stands at the same data position):
                # the new ranks read it here instead of every old rank's file.
                "reshard": {key: value for key, value in own.items() if key != "param_fingerprint"},
            }
            self.store.write_json(tmp, "state.json", state)
            on_file()
            shared = ("model.safetensors", "trainer.safetensors", "state.json")
            return sum((tmp / name).stat().st_size for name in shared), None
        # A state JSON cannot hold (TypeError, ValueError) fails the save like a full disk: raised here, it would
        # leave rank 0 alone while the other ranks wait for its gather.
        except (OSError, CheckpointError, TypeError, ValueError) as err:
            return 0, err

    def _commit(
        self, tmp: Path, step: int, reports: list, needed: int, shared: int, failure: BaseException | None
    ) -> Path:
        """Rank 0: commit the temporary directory with the ranks' digests, or remove it when any write failed."""
        failed = [error for _, _, error in reports if error is not None]
        if failure is None and failed:
            code, message = failed[0]
            failure = OSError(code, message) if code else OSError(message)
        if failure is None:
            try:
                final = self.store.commit(tmp, step, {f"rank_{r}.json": d for r, (d, _, _) in enumerate(reports)})
            except (OSError, CheckpointError) as err:
                failure = err
        if failure is not None:
            shutil.rmtree(tmp, ignore_errors=True)  # no 44 MB of a dead save left until the next start
            raise SaveError(self._failure(step, failure, needed)) from failure
        # Sizes from what was written and reported: no stat of thousands of rank files.
        self.latest, self.latest_bytes = final, shared + sum(size for _, size, _ in reports)
        return final

    def _check_space(self, step: int, needed: int) -> None:
        """Refuse to start a save that cannot fit: free space below the previous save's size (or, before any save,
        the tensors' size)."""
        free = _free_bytes(self.store.root)
        if free is not None and free < needed:
            raise SaveError(
                f"checkpoint save at step {step} not started: {_where(self.store.root)} has {_mb(free)} free, and "
                f"a checkpoint of this run takes {_mb(needed)}. {self._kept()}"
            )

    def _failure(self, step: int, err: BaseException, needed: int) -> str:
        code = getattr(err, "errno", None) or getattr(err.__cause__, "errno", None)
        text = " ".join(str(err).split())
        full = code in (errno.ENOSPC, errno.EDQUOT) or "os error 28" in text or "No space left" in text
        if full:
            free = _free_bytes(self.store.root)
            detail = (
                f"no space left on {_where(self.store.root)} (a checkpoint takes about {_mb(needed)}, "
                f"{_mb(free) if free is not None else 'unknown'} free after removing the partial save)"
            )
        else:
            detail = _shortened(text, _SAVE_DETAIL_CHARS)
        return f"checkpoint save at step {step} failed: {detail}. {self._kept()}"

    def _kept(self) -> str:
        latest = self.latest or self.store.root / "<none yet>"
        return (
            f"Nothing was committed; the newest complete checkpoint, {latest}, stays the latest. Free space (or "
            "fix the file system) and run the same command again to resume from it"
        )

    # ------------------------------------------------------------------------------------------------ resuming

    def resume(self, policy: str) -> Path | None:
        """Restore the checkpoint that `policy` (`checkpoint.resume`: auto, never or a path) names, if any.

        Rank 0 resolves it (it may move corrupt checkpoints aside) and tells the others.

        Returns:
            The checkpoint directory restored from, or None for a fresh start.

        Raises:
            CheckpointError: an explicit path that does not verify, or a checkpoint of an incompatible run.
        """
        path = error = None
        if self.rank == 0:
            self.store.cleanup_tmp()  # leftovers of saves killed mid-write
            try:
                found = self.store.resolve(policy)
                path = str(found) if found else None
            except CheckpointError as err:  # sent to every rank: none may be left waiting in the broadcast
                error = str(err)
        path, error = self.comm.broadcast_object((path, error))
        if error is not None:
            raise CheckpointError(error)
        if path is None:
            return None
        state = self.store.read_json(path, "state.json")
        self.latest = Path(path)
        if self.rank == 0:
            self.latest_bytes = _dir_bytes(Path(path))
        old_world = self.check_compatible(state, path)
        self._load_tensors(path, state)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.counters.load_state_dict(state)
        # Data before RNG, as the state was captured: restoring a loader must not consume a restored stream.
        keys = ("data", *sorted(k for k in self.rank_states if k not in ("data", "rng")), "rng")
        keys = [k for k in keys if k in self.rank_states]
        if old_world is None:
            rank_state = self.store.read_json(path, f"rank_{self.rank}.json")
            for key in keys:
                self.rank_states[key].load_state_dict(rank_state[key])
        else:
            # One state for the whole old world: every old rank stood at the same data position, and the RNG
            # streams are derived afresh. Checkpoints written before state.json held it give rank 0's file (one
            # read per rank, not one per old rank).
            shared = state.get("reshard") or self.store.read_json(path, "rank_0.json")
            for key in keys:
                self.rank_states[key].load_resharded([shared[key]], state["step"])
        return Path(path)

    def _load_tensors(self, path: str, state: dict) -> None:
        """Model, optimizer and EMA tensors; files that do not fit the settings stored beside them are refused."""
        try:
            self.model.load_state_dict(self.store.read_tensors(path, "model.safetensors"), strict=True)
            tensors = self.store.read_tensors(path, "trainer.safetensors")
            self.optimizer.load_state_dict(optimizer_state(tensors, state["optimizer"]))
            if self.ema is not None:
                self.ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema/")})
        except (RuntimeError, ValueError, KeyError) as err:
            if isinstance(err, CheckpointError):
                raise
            # One line: the first mismatches are enough to recognise the cause.
            detail = _shortened(" ".join(str(err).split()), _LOAD_DETAIL_CHARS)
            raise CheckpointError(
                f"cannot resume from {path}: its tensors do not fit the network its state.json describes "
                f"({', '.join(f'{k}={self.shape[k]!r}' for k in SHAPE_KEYS if k != 'classes')}): {detail}. It was "
                "written by another version of mixmo_dist or timm, or changed by hand; resume from another "
                "checkpoint (--checkpoint.resume=<run>/checkpoints/step_<N>) or start a new run in another "
                "run.output_dir"
            ) from None

    def check_compatible(self, state: dict, path: str | Path) -> int | None:
        """Refuse a checkpoint whose shape-defining settings differ from this run's, naming each difference.

        Returns:
            None for a checkpoint of this world size; the checkpoint's world size when this run may reshard it
            (`elastic` and the same global batch).
        """
        saved = state.get("shape", {})
        world_keys = ("rows_per_rank", "world_size")
        diffs = []
        for key in SHAPE_KEYS:
            if key == "classes" and saved.get(key) != self.shape[key]:
                diffs.append(class_difference(saved.get(key), self.shape[key]))
            elif key not in world_keys and saved.get(key) != self.shape[key]:
                diffs.append(f"{key}: checkpoint {saved.get(key)!r} vs now {self.shape[key]!r}")
        same_world = all(saved.get(key) == self.shape[key] for key in world_keys)
        old_global = _global_rows(saved)
        new_global = _global_rows(self.shape)
        if not same_world and old_global != new_global:
            diffs.append(f"global batch: checkpoint {old_global} rows vs now {new_global}")
        elif not same_world and not self.elastic:
            diffs.append(
                f"world_size: checkpoint {saved.get('world_size')!r} vs now {self.shape['world_size']!r} (to resume on "
                f"another number of processes, set data.global_batch_size={old_global}, the checkpoint's global batch, "
                "so every rank's share is recomputed)"
            )
        if diffs:
            raise CheckpointError(
                f"cannot resume from {path}: " + "; ".join(diffs) + ". Resuming needs the same shape-defining "
                "settings; start a new run in another run.output_dir (model.init_from can start it from these "
                "weights) or set checkpoint.resume=never"
            )
        if same_world:
            return None
        missing = [key for key, obj in self.rank_states.items() if not hasattr(obj, "load_resharded")]
        if missing:
            raise CheckpointError(f"cannot resume from {path} on another world size: {missing} cannot be resharded")
        log.warning(
            "resuming %s, saved by %d ranks, on %d ranks with the same global batch of %d rows: the remaining samples "
            "of the epoch are the same, but per-rank batches, member pairings and RNG streams differ from an "
            "uninterrupted run (the streams are re-derived from run.seed, each rank and the step)",
            *(path, saved["world_size"], self.shape["world_size"], new_global),
        )
        return int(saved["world_size"])


class SaveError(Exception):
    """Rank 0 could not write a checkpoint (its message is the one line every rank stops with)."""


# How much of an error's own text a save or a load failure quotes (the rest of the line says what to do).
_SAVE_DETAIL_CHARS = 300
_LOAD_DETAIL_CHARS = 400


def _shortened(text: str, limit: int) -> str:
    """`text` (single-spaced) whole when it has at most `limit` characters, else cut after the last whole word within
    `limit` characters, with " ..." after it."""
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def _nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _dir_bytes(path: Path) -> int | None:
    try:
        return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    except OSError:
        return None


def _free_bytes(root: Path) -> int | None:
    """Free bytes on the file system of `root` (or of its nearest existing parent: the first save creates it)."""
    for candidate in (root, *root.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def _where(root: Path) -> str:
    return f"the file system of {root}"


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:.1f} MB ({nbytes} bytes)"


def class_difference(saved: Any, now: list[str], shown: int = 3) -> str:
    """What changed between the checkpoint's class list and the data's, in one short clause.

    Two whole lists (1000 ImageNet names each) bury the one renamed folder; the counts and a few names of the
    classes added and removed say it, and a reordering names the first label that moved.
    """
    if not isinstance(saved, list):
        return f"classes: the checkpoint stores no class list ({type(saved).__name__}), the data has {len(now)}"

    def few(names: list[str]) -> str:
        more = f", ... ({len(names) - shown} more)" if len(names) > shown else ""
        return ", ".join(repr(n) for n in names[:shown]) + more

    old, new = set(saved), set(now)
    added, removed = [c for c in now if c not in old], [c for c in saved if c not in new]
    text = f"classes: the checkpoint has {len(saved)}, the data {len(now)}"
    if added:
        text += f"; {len(added)} not in the checkpoint ({few(added)})"
    if removed:
        text += f"; {len(removed)} missing from the data ({few(removed)})"
    moved = next((i for i, (a, b) in enumerate(zip(saved, now, strict=False)) if a != b), None)
    if not added and not removed and moved is not None:
        text += f", the same names in another order (label {moved}: checkpoint {saved[moved]!r}, now {now[moved]!r})"
    return text


def _global_rows(shape: Mapping[str, Any]) -> int | None:
    try:
        return int(shape["rows_per_rank"]) * int(shape["world_size"])
    except (KeyError, TypeError, ValueError):
        return None
