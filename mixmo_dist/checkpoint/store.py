"""How checkpoints are stored: atomic `step_<N>` directories with a sha256 marker, kept to the newest k.

The trainer decides what goes into a checkpoint; this module decides how it reaches the disk so that a checkpoint
that `find_latest()` returns is always whole, whatever moment a process was killed at. Layout:

    <output_dir>/checkpoints/                   CheckpointStore root
        step_00001000/                          one committed checkpoint
            model.safetensors ...               files written by the ranks (safetensors or JSON, never pickle)
            COMPLETE                            JSON {"step": N, "<file>": "<sha256>", ...}, written last
        latest                                  text file naming the newest committed directory (a hint)
        .tmp_step_00002000_<pid>/               a save in progress (never a candidate for resume)
        step_00000500.corrupt-<UTC time>/       a checkpoint that failed verification, moved aside, never deleted

A save is a short protocol with no collectives inside, so the caller decides where the barriers go:

    tmp = store.begin(step)              # global rank 0 only; then barrier
    tmp = store.tmp_dir(step)            # the other ranks find the same directory (shared file system)
    store.write_tensors(tmp, "model.safetensors", ...)   # each rank writes its own files
    store.write_json(tmp, f"rank_{rank}.json", ...)
    # barrier: every rank has finished writing
    store.commit(tmp, step)              # global rank 0 only

Durability order in `commit`: files fsynced, marker written and fsynced, directory renamed into place, parent
fsynced, `latest` replaced last; a kill at any point leaves either the old state or the new one. Every file is
written as a hidden temporary file, fsynced, then `os.replace`d, so a name that exists is a complete file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from mixmo_dist.checkpoint import CheckpointError, CheckpointWarning
from mixmo_dist.runtime.files import atomic_path, fsync_dir, fsync_file, is_part_name, sha256_file, write_bytes_atomic

MARKER = "COMPLETE"
LATEST = "latest"

# Canonical committed directory names; more than 8 digits is allowed because "%08d" simply grows past 99,999,999.
_STEP_RE = re.compile(r"^step_(\d{8,})$")
_TMP_RE = re.compile(r"^\.tmp_(step_\d{8,})_(\d+)$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# A checkpoint that failed verification and was moved aside (`move_aside`'s default tag).
_CORRUPT_RE = re.compile(r"^step_\d{8,}\.corrupt-")
# Keys of the marker that are not file names; file names may not take them.
_RESERVED_NAMES = frozenset({MARKER, LATEST, "step"})


def parse_step_dir_name(name: str) -> int | None:
    """The step of a canonical committed directory name (`step_00000042` -> 42), else None.

    Non-canonical spellings (`step_42`, `step_00000042.corrupt-...`) are not checkpoints: only names that
    `CheckpointStore.step_dir_name` would produce count, so moved-aside directories can never be picked up again.
    """
    match = _STEP_RE.match(name)
    if match is None:
        return None
    step = int(match.group(1))
    return step if name == f"step_{step:08d}" else None


def _utc_stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")


def _unreadable(path: Path, name: str, err: OSError) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path}: no permission to read {name} ({err.strerror}); it was left where it is. "
        "Run as the user who wrote it, or have its files made readable (e.g. chmod -R g+rX)"
    )


def _check_file_name(name: Any, suffix: str | None) -> str:
    if not isinstance(name, str):
        raise TypeError(f"checkpoint file name must be a str, got {type(name).__name__} ({name!r})")
    if not name or name != Path(name).name or name in (".", "..") or name.startswith("."):
        raise ValueError(f"checkpoint file name {name!r} must be a plain, non-hidden file name (no directories)")
    if name in _RESERVED_NAMES:
        raise ValueError(f"checkpoint file name {name!r} is reserved by the checkpoint store")
    if suffix is not None and not name.endswith(suffix):
        raise ValueError(f"checkpoint file name {name!r} must end with {suffix!r}")
    return name


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"checkpoint step must be an int, got {type(step).__name__} ({step!r})")
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return step


def _to_storable(tensors: Any, file: Path) -> dict[str, Tensor]:
    """CPU, contiguous tensors that own their memory among the dict, as safetensors requires.

    safetensors refuses two entries backed by the same storage (tied weights, views of one buffer) and
    non-contiguous tensors; the second and later users of a storage get a clone so both values survive.
    """
    if not isinstance(tensors, Mapping):
        raise TypeError(f"{file}: tensors must be a dict[str, Tensor], got {type(tensors).__name__}")
    seen_storages: set[int] = set()
    out: dict[str, Tensor] = {}
    for key, value in tensors.items():
        if not isinstance(key, str):
            raise TypeError(f"{file}: tensor key {key!r} must be a str, got {type(key).__name__}")
        if not isinstance(value, Tensor):
            raise TypeError(f"{file}: value of {key!r} must be a torch.Tensor, got {type(value).__name__}")
        if value.layout != torch.strided:
            raise TypeError(f"{file}: tensor {key!r} has layout {value.layout}; only dense tensors can be stored")
        tensor = value.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.to("cpu")
        tensor = tensor.contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen_storages:
            tensor = tensor.clone()
            ptr = tensor.untyped_storage().data_ptr()
        if tensor.numel() > 0:
            seen_storages.add(ptr)
        out[key] = tensor
    return out


class CheckpointStore:
    """Atomic, verifiable `step_<N>` checkpoint directories under one root, with keep-last-k pruning.

    Only one process (global rank 0) may call `begin`, `commit`, `find_latest`, `resolve`, `move_aside` and
    `cleanup_tmp`, since they rename directories; it shares the resulting path with the other ranks. All ranks may
    call `tmp_dir`, `write_tensors`, `write_json`, `read_tensors`, `read_json`, `verify` and
    `find_latest(repair=False)`, which writes nothing. The root must be on a
    file system that every rank sees when several hosts write into one checkpoint.

    Args:
        root: the checkpoint directory, `<output_dir>/checkpoints`; created on the first `begin`.
        keep_last: how many committed checkpoints to keep (>= 1); older complete ones are deleted after a commit.
    """

    def __init__(self, root: str | Path, keep_last: int) -> None:
        if not isinstance(root, (str, Path)):
            raise TypeError(f"checkpoint root must be a str or Path, got {type(root).__name__}")
        if isinstance(keep_last, bool) or not isinstance(keep_last, int):
            raise TypeError(f"checkpoint keep_last must be an int, got {type(keep_last).__name__} ({keep_last!r})")
        if keep_last < 1:
            raise ValueError(f"checkpoint keep_last must be >= 1, got {keep_last}")
        self.root = Path(root).expanduser()
        self.keep_last = keep_last

    # ----------------------------------------------------------------------------------------------- naming

    @staticmethod
    def step_dir_name(step: int) -> str:
        """Directory name of the checkpoint of `step`: `step_%08d`."""
        return f"step_{_check_step(step):08d}"

    def step_dirs(self) -> list[tuple[int, Path]]:
        """(step, path) of every canonically named entry under the root, oldest first; nothing is verified."""
        if not self.root.is_dir():
            return []
        found = [(parse_step_dir_name(p.name), p) for p in self.root.iterdir()]
        return sorted((step, p) for step, p in found if step is not None)

    # ----------------------------------------------------------------------------------------------- saving

    def begin(self, step: int) -> Path:
        """Create the empty temporary directory `root/.tmp_step_<N>_<pid>` of a save (global rank 0 only).

        A leftover temporary directory of the same step (a save killed earlier) is removed first, so
        `tmp_dir(step)` finds exactly one.

        Returns:
            The temporary directory; every rank writes its files into it, then rank 0 calls `commit`.
        """
        name = self.step_dir_name(step)
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(f".tmp_{name}_*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = self.root / f".tmp_{name}_{os.getpid()}"
        tmp.mkdir()
        return tmp

    def tmp_dir(self, step: int) -> Path:
        """The temporary directory that rank 0's `begin(step)` created, for the other ranks (after a barrier).

        Raises:
            CheckpointError: if there is none, or more than one (a save of the same step from another process).
        """
        name = self.step_dir_name(step)
        found = sorted(self.root.glob(f".tmp_{name}_*")) if self.root.is_dir() else []
        if len(found) != 1:
            raise CheckpointError(
                f"expected exactly one temporary directory .tmp_{name}_<pid> under {self.root} for step {step}, "
                f"found {[p.name for p in found]}; rank 0 must call begin({step}) before the barrier"
            )
        return found[0]

    def _check_tmp(self, tmp_dir: str | Path) -> tuple[Path, str]:
        tmp = Path(tmp_dir)
        match = _TMP_RE.match(tmp.name)
        if match is None or not tmp.is_dir() or tmp.parent.resolve() != self.root.resolve():
            raise CheckpointError(
                f"{tmp} is not a temporary checkpoint directory made by begin() under {self.root}; "
                "files go into the directory that begin()/tmp_dir() returned, never into a committed checkpoint"
            )
        return tmp, match.group(1)

    def write_tensors(
        self,
        tmp_dir: str | Path,
        name: str,
        tensors: Mapping[str, Tensor],
        metadata: Mapping[str, str] | None = None,
    ) -> Path:
        """Write `tensors` as the safetensors file `tmp_dir/name`, atomically (temp file, fsync, os.replace).

        Tensors are detached, moved to the CPU and made contiguous; entries that share memory (tied weights,
        views of one buffer) are cloned so each is stored on its own. Shapes and dtypes are kept as they are.

        Args:
            tmp_dir: the directory returned by `begin` or `tmp_dir`.
            name: file name ending in `.safetensors`, e.g. `model.safetensors`.
            tensors: {key: tensor of any shape}; keys are kept as they are.
            metadata: optional {str: str} stored in the safetensors header (see `read_metadata`).

        Returns:
            The written file.
        """
        tmp, _ = self._check_tmp(tmp_dir)
        file = tmp / _check_file_name(name, ".safetensors")
        if metadata is not None:
            if not isinstance(metadata, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
            ):
                raise TypeError(f"{file}: metadata must be a dict[str, str], got {metadata!r}")
            metadata = dict(metadata)
        storable = _to_storable(tensors, file)
        try:
            with atomic_path(file) as part:
                save_file(storable, str(part), metadata=metadata)
        except (SafetensorError, RuntimeError, ValueError, TypeError) as err:
            raise CheckpointError(f"cannot write {file}: {err}") from err
        return file

    def write_json(self, tmp_dir: str | Path, name: str, obj: Any) -> Path:
        """Write `obj` as the JSON file `tmp_dir/name` (sorted keys), atomically; `name` ends in `.json`."""
        return self.write_json_digest(tmp_dir, name, obj)[0]

    def write_json_digest(self, tmp_dir: str | Path, name: str, obj: Any) -> tuple[Path, str]:
        """`write_json`, also returning the sha256 of the bytes written (for `commit(digests=...)`)."""
        tmp, _ = self._check_tmp(tmp_dir)
        file = tmp / _check_file_name(name, ".json")
        try:
            text = json.dumps(obj, indent=1, sort_keys=True)
        except (TypeError, ValueError) as err:
            raise TypeError(f"cannot write {file}: {err}; checkpoint JSON holds only plain Python data") from err
        data = text.encode() + b"\n"
        write_bytes_atomic(file, data)
        return file, hashlib.sha256(data).hexdigest()

    def commit(self, tmp_dir: str | Path, step: int, digests: Mapping[str, str] | None = None) -> Path:
        """Turn a finished temporary directory into the committed checkpoint `root/step_<N>` (global rank 0 only).

        Call it after a barrier that follows every rank's writes. Order: fsync every file, write `COMPLETE`
        ({"step": N, file: sha256, ...}) and fsync it and the directory; move aside an existing `step_<N>`
        (`.replaced-<time>`) and any checkpoint of a later step (`.superseded-<time>`: a resume from an older
        checkpoint forks the run, and the later ones belong to the abandoned branch); rename into place; fsync
        the root; replace `latest`; prune to the newest `keep_last` complete checkpoints (never this one).

        Args:
            digests: {file name: sha256} of files that other ranks wrote (fsynced, `write_json`'s digest): they
                are listed as given and neither reread nor fsynced here, so the committing rank's work does not
                grow with the number of writers. Each must be in the directory.

        Returns:
            The committed directory `root/step_<N>`.
        """
        tmp, tmp_name = self._check_tmp(tmp_dir)
        name = self.step_dir_name(step)
        if tmp_name != name:
            raise CheckpointError(f"{tmp} was made by begin() for {tmp_name}, not for step {step}")
        digests = dict(digests or {})
        # scandir's entry types come with the listing: no stat per file, which at thousands of rank files counts.
        with os.scandir(tmp) as it:
            entries = sorted((e for e in it), key=lambda e: e.name)
        unfinished = [e.name for e in entries if e.name.startswith(".")]
        if unfinished:
            raise CheckpointError(f"{tmp} holds unfinished writes {unfinished}: commit only after every rank wrote")
        bad = [e.name for e in entries if e.is_symlink() or not e.is_file() or e.name in _RESERVED_NAMES]
        if bad:
            raise CheckpointError(f"{tmp} holds entries that cannot be checkpoint files: {bad}")
        if not entries:
            raise CheckpointError(f"{tmp} is empty: nothing was written for step {step}")
        missing = sorted(set(digests) - {e.name for e in entries})
        if missing:
            raise CheckpointError(f"{tmp} lacks files its writers reported: {missing[:5]}")
        marker: dict[str, Any] = {"step": step}
        for entry in entries:
            if entry.name in digests:
                marker[entry.name] = digests[entry.name]
                continue
            path = Path(entry.path)
            fsync_file(path)
            marker[entry.name] = sha256_file(path)
        write_bytes_atomic(tmp / MARKER, json.dumps(marker, indent=1, sort_keys=True).encode() + b"\n")
        fsync_dir(tmp)

        final = self.root / name
        if final.exists() or final.is_symlink():
            self.move_aside(final, f"a new checkpoint of step {step} replaces it", tag="replaced")
        for later_step, later in self.step_dirs():
            if later_step > step:
                self.move_aside(later, f"step {later_step} is later than the new checkpoint {name}", tag="superseded")
        os.rename(tmp, final)
        fsync_dir(self.root)
        self._write_latest(name)
        self._prune(keep=final)
        return final

    def _write_latest(self, name: str) -> None:
        write_bytes_atomic(self.root / LATEST, name.encode() + b"\n")
        fsync_dir(self.root)

    def _prune(self, keep: Path) -> None:
        # Only directories with a marker count as complete; a marker-less one is evidence, left to find_latest.
        complete = [p for _, p in reversed(self.step_dirs()) if p != keep and (p / MARKER).is_file()]
        for old in complete[self.keep_last - 1 :]:
            # Rename first so a kill mid-delete never leaves a half-deleted directory under a checkpoint's name.
            trash = self.root / f".trash_{old.name}_{uuid.uuid4().hex}"
            try:
                os.rename(old, trash)
                shutil.rmtree(trash)
            except OSError as err:
                warnings.warn(f"could not prune old checkpoint {old}: {err}", CheckpointWarning, stacklevel=3)

    def cleanup_tmp(self) -> list[Path]:
        """Remove leftovers of killed saves and prunes (`.tmp_*`, `.trash_*`, partial `latest` writes).

        Call it once at start-up while holding the `RunLock`; temporary directories of this very process are kept.

        Returns:
            The removed paths.
        """
        if not self.root.is_dir():
            return []
        removed = []
        for path in sorted(self.root.iterdir()):
            tmp = _TMP_RE.match(path.name)
            if tmp is not None and int(tmp.group(2)) == os.getpid():
                continue
            if tmp is not None or path.name.startswith(".trash_"):
                shutil.rmtree(path, ignore_errors=True)
            elif is_part_name(path.name, LATEST):
                path.unlink(missing_ok=True)
            else:
                continue
            removed.append(path)
        return removed

    # ----------------------------------------------------------------------------------------------- finding

    def verify(self, path: str | Path) -> str | None:
        """Check a committed checkpoint directory against its marker.

        Checks: the name is canonical (`step_%08d`); `COMPLETE` exists and is a JSON object whose "step" equals
        the directory's step and which lists at least one file; every listed file exists, is a regular file and
        has the listed sha256 (a truncated or modified file fails here).

        Returns:
            None when the checkpoint is whole, else the reason it is not.

        Raises:
            CheckpointError: a file this process has no permission to read. That is not damage (it may belong to
                another user), so callers must not move the checkpoint aside for it.
        """
        path = Path(path)
        step = parse_step_dir_name(path.name)
        if step is None:
            return f"directory name {path.name!r} is not step_<8 digits>"
        if not path.is_dir():
            return "not a directory"
        marker_path = path / MARKER
        if not marker_path.is_file():
            return f"no {MARKER} marker (the save did not finish)"
        try:
            marker = json.loads(marker_path.read_bytes())
        except PermissionError as err:
            raise _unreadable(path, MARKER, err) from err
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            return f"{MARKER} marker is not valid JSON ({err})"
        if not isinstance(marker, dict):
            return f"{MARKER} marker is not a JSON object"
        marker_step = marker.get("step")
        if isinstance(marker_step, bool) or marker_step != step:
            return f"{MARKER} marker says step {marker_step!r}, the directory is step {step}"
        files = {k: v for k, v in marker.items() if k != "step"}
        if not files:
            return f"{MARKER} marker lists no files"
        for name, digest in sorted(files.items()):
            if name in _RESERVED_NAMES or name != Path(name).name or name.startswith("."):
                return f"{MARKER} marker lists an invalid file name {name!r}"
            if not isinstance(digest, str) or _SHA256_RE.match(digest) is None:
                return f"{MARKER} marker has no valid sha256 for {name}"
            file = path / name
            if file.is_symlink() or not file.is_file():
                return f"listed file {name} is missing"
            try:
                actual = sha256_file(file)
            except PermissionError as err:
                raise _unreadable(path, name, err) from err
            except OSError as err:
                return f"listed file {name} cannot be read ({err})"
            if actual != digest:
                return f"sha256 mismatch for {name} (truncated or modified after the save)"
        return None

    def move_aside(self, path: str | Path, reason: str, tag: str = "corrupt") -> Path | None:
        """Rename `path` to `<name>.<tag>-<UTC time>` next to it (never delete it) and warn naming it and `reason`.

        Returns:
            The new path, or None when `path` no longer exists (another process moved it first).

        Raises:
            CheckpointError: the rename is refused (read-only mount, no write permission); nothing is changed.
        """
        path = Path(path)
        stamp = _utc_stamp()
        target = path.with_name(f"{path.name}.{tag}-{stamp}")
        n = 0
        while target.exists():
            n += 1
            target = path.with_name(f"{path.name}.{tag}-{stamp}-{n}")
        try:
            os.rename(path, target)
        except FileNotFoundError:
            return None
        except OSError as err:  # a read-only mount, a directory of another user
            raise CheckpointError(
                f"checkpoint {path} is unusable: {reason}; it cannot be moved aside ({err.strerror}): "
                "move or remove it by hand"
            ) from err
        fsync_dir(target.parent)
        warnings.warn(f"checkpoint {path} moved aside to {target.name}: {reason}", CheckpointWarning, stacklevel=2)
        return target

    def _latest_hint(self) -> Path | None:
        hint_file = self.root / LATEST
        try:
            text = hint_file.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as err:
            warnings.warn(f"{hint_file} is unreadable ({err}); scanning {self.root}", CheckpointWarning, stacklevel=3)
            return None
        if parse_step_dir_name(text) is None:
            warnings.warn(
                f"{hint_file} holds {text[:80]!r}, not a checkpoint name; scanning {self.root}",
                CheckpointWarning,
                stacklevel=3,
            )
            return None
        return self.root / text

    def find_latest(self, *, repair: bool = True) -> Path | None:
        """The checkpoint to resume from: `latest` if it verifies, else the newest step directory that verifies.

        `latest` is trusted first because it is written last by `commit`. Every candidate that fails `verify` is
        passed over with a warning naming it and the next older one is tried; `.tmp_*` directories are never
        candidates.

        Args:
            repair: the run's owner (the trainer, holding the run lock) moves failing candidates aside and rewrites
                `latest` to the answer when the scan had to be used. Readers (evaluate, export, init_from) pass
                False: they write nothing into the run they read, which may be a read-only copy.

        Returns:
            The checkpoint directory, or None when no checkpoint verifies (a fresh run).

        Raises:
            CheckpointError: a candidate cannot be read (permissions) or cannot be moved aside; nothing is moved.
        """
        if not self.root.is_dir():
            return None
        hint = self._latest_hint()
        if hint is not None:
            if hint.exists():
                reason = self.verify(hint)
                if reason is None:
                    return hint
                self._pass_over(hint, reason, repair)
            else:
                warnings.warn(
                    f"{self.root / LATEST} names {hint.name}, which does not exist; scanning {self.root}",
                    CheckpointWarning,
                    stacklevel=2,
                )
        for _, candidate in reversed(self.step_dirs()):
            if candidate == hint:
                continue  # verified and passed over above
            reason = self.verify(candidate)
            if reason is None:
                if repair:
                    self._write_latest(candidate.name)
                return candidate
            self._pass_over(candidate, reason, repair)
        return None

    def _pass_over(self, path: Path, reason: str, repair: bool) -> None:
        if repair:
            self.move_aside(path, reason)
        else:
            warnings.warn(
                f"checkpoint {path} is not usable ({reason}): skipped, trying the previous one",
                CheckpointWarning,
                stacklevel=3,
            )

    def resolve(self, resume: str) -> Path | None:
        """Apply the config value `checkpoint.resume`.

        Args:
            resume: "auto" (resume from `find_latest()`, or start fresh when there is none and none was ever moved
                aside as corrupt), "never" (start fresh), or the path of a checkpoint directory `.../step_<N>` (it
                must verify).

        Returns:
            The checkpoint directory to load, or None to start fresh.

        Raises:
            CheckpointError: an explicit path that does not exist or does not verify (never ignored silently); with
                "auto", no checkpoint verifies but corrupt ones were moved aside (a silent restart would lose them).
        """
        if not isinstance(resume, (str, Path)):
            raise TypeError(f"checkpoint.resume must be 'auto', 'never' or a path, got {type(resume).__name__}")
        if resume == "never":
            return None
        if resume == "auto":
            found = self.find_latest()
            if found is None:
                self._refuse_a_silent_restart()
            return found
        path = Path(resume).expanduser()
        if not path.exists():
            raise CheckpointError(f"checkpoint.resume={str(resume)!r}: {path} does not exist")
        reason = self.verify(path)
        if reason is not None:
            raise CheckpointError(
                f"checkpoint.resume={str(resume)!r}: {path} is not a usable checkpoint: {reason}; "
                "pass another step directory, or 'auto' to take the newest one that verifies"
            )
        return path

    def _refuse_a_silent_restart(self) -> None:
        """No checkpoint verifies, but some were moved aside as corrupt (now or by an earlier start): starting at step
        0 would silently throw the run's training away, so the user must ask for it (`checkpoint.resume=never`)."""
        corrupt = sorted(p.name for p in self.root.iterdir() if _CORRUPT_RE.match(p.name)) if self.root.is_dir() else []
        if not corrupt:
            return
        shown = ", ".join(corrupt[-3:]) + (f" and {len(corrupt) - 3} more" if len(corrupt) > 3 else "")
        raise CheckpointError(
            f"checkpoint.resume=auto: no checkpoint under {self.root} passes its sha256 check; the corrupt ones are "
            f"kept there, moved aside ({shown}), and the run was not restarted from step 0. Put back an intact copy "
            "of a checkpoint, or start again from step 0 with --checkpoint.resume=never"
        )

    # ----------------------------------------------------------------------------------------------- reading

    @staticmethod
    def _existing_file(path: str | Path, name: str, suffix: str) -> Path:
        file = Path(path) / _check_file_name(name, suffix)
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} has no file {name}")
        return file

    def read_tensors(self, path: str | Path, name: str, device: str | torch.device = "cpu") -> dict[str, Tensor]:
        """Load the safetensors file `path/name` (no pickle) as {key: tensor} on `device`."""
        file = self._existing_file(path, name, ".safetensors")
        try:
            dev = torch.device(device)
            # safetensors rejects "cpu:0", which is what Accelerate reports as the device of a CPU rank.
            return load_file(str(file), device="cpu" if dev.type == "cpu" else str(dev))
        except (SafetensorError, OSError, RuntimeError) as err:
            raise CheckpointError(f"checkpoint {path}: cannot read {name}: {err}") from err

    def read_metadata(self, path: str | Path, name: str) -> dict[str, str]:
        """The {str: str} metadata stored by `write_tensors` in `path/name` ({} when none was given)."""
        file = self._existing_file(path, name, ".safetensors")
        try:
            with safe_open(str(file), framework="pt") as f:
                return dict(f.metadata() or {})
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"checkpoint {path}: cannot read {name}: {err}") from err

    def read_json(self, path: str | Path, name: str) -> Any:
        """Load the JSON file `path/name`."""
        file = self._existing_file(path, name, ".json")
        try:
            return json.loads(file.read_bytes())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"checkpoint {path}: cannot read {name}: {err}") from err


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """The verified checkpoint directory that `path` names.

    Args:
        path: a step directory (`.../checkpoints/step_<N>`) or a run output directory (then its newest complete
            checkpoint: `CheckpointStore.find_latest(repair=False)` skips corrupt ones with a warning and writes
            nothing, so a read-only run directory works).

    Raises:
        CheckpointError: `path` does not exist, is neither kind of directory, holds no complete checkpoint, or the
            step directory fails its sha256 verification (the message names it and the reason).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint {path}: no such file or directory")
    if p.is_dir() and parse_step_dir_name(p.name) is not None:
        reason = CheckpointStore(p.parent, keep_last=1).verify(p)
        if reason is not None:
            raise CheckpointError(f"checkpoint {p} is not usable: {reason}")
        return p
    root = p / "checkpoints"
    if p.is_dir() and root.is_dir():
        found = CheckpointStore(root, keep_last=1).find_latest(repair=False)
        if found is None:
            raise CheckpointError(f"run directory {p} holds no complete checkpoint under {root}")
        return found
    raise CheckpointError(
        f"checkpoint {path} is neither a step directory (checkpoints/step_<8 digits>) nor a run output directory "
        "(one holding checkpoints/)"
    )
