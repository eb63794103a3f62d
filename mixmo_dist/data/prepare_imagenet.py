"""Entry point: sort ImageNet's flat validation images into one folder per synset, the layout every loader reads.

    python -m mixmo_dist.data.prepare_imagenet --val-dir DIR --devkit ILSVRC2012_devkit_t12.tar.gz [--train-dir T]
    python -m mixmo_dist.data.prepare_imagenet --val-dir DIR --labels-csv LOC_val_solution.csv [--train-dir T]

The 50,000 files `ILSVRC2012_val_XXXXXXXX.JPEG` move to `DIR/<wnid>/`. The labels come from the official devkit
(`data/ILSVRC2012_validation_ground_truth.txt`: one 1-based ILSVRC2012_ID per line, in file order, and
`data/meta.mat`: ILSVRC2012_ID -> WNID; reading the .mat file needs scipy, imported only on that path) or from
Kaggle's `LOC_val_solution.csv` (columns ImageId, PredictionString; the first token of PredictionString is the
synset; no extra dependency).

With --train-dir ROOT/train and --val-dir ROOT/val, it then writes the dataset index of ROOT (one scan of both
splits, kept where `data.index_dir` says: `--index-dir`, else ROOT/.mixmo_index/), so the first training run and
`evaluate` start without scanning.

Everything is checked before the first file moves: the images present must be exactly the labelled ones, the
synsets must equal the train class folders when --train-dir is given, and a directory already prepared (marker file,
or images already in synset folders) is refused. An interrupted run (some images moved, no marker yet) is finished
by running the same command again.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import sys
import tarfile
from collections.abc import Sequence
from pathlib import Path

from .index import folder_tables, index_dir

__all__ = ["MARKER", "labels_from_csv", "labels_from_devkit", "main", "prepare_val"]

MARKER = ".mixmo_val_prepared.json"
_VAL_NAME = re.compile(r"ILSVRC2012_val_\d{8}\.JPEG")
_WNID = re.compile(r"n\d{8}")
_GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
_META = "data/meta.mat"


def _val_name(number: int) -> str:
    return f"ILSVRC2012_val_{number:08d}.JPEG"


def _tar_member(tar: tarfile.TarFile, suffix: str, devkit: Path) -> bytes:
    """The bytes of the one regular member named `suffix` (at the top or under the devkit's own folder)."""
    found = [m for m in tar.getmembers() if m.isfile() and (m.name == suffix or m.name.endswith("/" + suffix))]
    if len(found) != 1:
        raise ValueError(f"devkit {devkit}: expected one member ending in {suffix}, found {len(found)}")
    handle = tar.extractfile(found[0])
    assert handle is not None  # a regular file always has a handle
    return handle.read()


def labels_from_devkit(devkit: Path | str) -> dict[str, str]:
    """Validation labels from the official devkit tarball.

    Args:
        devkit: ILSVRC2012_devkit_t12.tar.gz (any tar compression).
    Returns:
        {file name: wnid}, file names ILSVRC2012_val_%08d.JPEG numbered by ground-truth line (1-based).
    Raises:
        ValueError: unreadable tarball, missing member, a line that is not a known ILSVRC2012_ID, or scipy missing.
    """
    devkit = Path(devkit)
    try:
        with tarfile.open(devkit, "r:*") as tar:
            truth = _tar_member(tar, _GROUND_TRUTH, devkit).decode("ascii")
            meta = _tar_member(tar, _META, devkit)
    except (OSError, tarfile.TarError, UnicodeDecodeError) as err:
        raise ValueError(f"devkit {devkit}: cannot read it as a tarball ({type(err).__name__}: {err})") from err
    try:
        # Only this path needs scipy (the .mat reader); the CSV path and the trainer do not.
        from scipy.io import loadmat
    except ImportError as err:
        raise ValueError(
            f"reading {_META} from the devkit needs scipy (pip install 'mixmo_dist[imagenet]', or pip install scipy), or use --labels-csv instead"
        ) from err
    try:
        synsets = loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
        wnid_of_id = {int(i): str(w) for i, w in zip(synsets["ILSVRC2012_ID"], synsets["WNID"])}
    except (KeyError, ValueError, TypeError) as err:
        raise ValueError(f"devkit {devkit}: {_META} holds no synsets table with ILSVRC2012_ID and WNID") from err
    labels = {}
    for line_no, line in enumerate(truth.split(), start=1):
        if not line.isdigit() or int(line) not in wnid_of_id:
            raise ValueError(f"devkit {devkit}: {_GROUND_TRUTH} line {line_no}: {line!r} is not an ILSVRC2012_ID")
        labels[_val_name(line_no)] = wnid_of_id[int(line)]
    if not labels:
        raise ValueError(f"devkit {devkit}: {_GROUND_TRUTH} is empty")
    return labels


def labels_from_csv(path: Path | str) -> dict[str, str]:
    """Validation labels from Kaggle's LOC_val_solution.csv.

    Returns:
        {file name: wnid}, the file name being ImageId + ".JPEG".
    Raises:
        ValueError: unreadable file, missing columns, a duplicate ImageId or a row whose first token is no wnid.
    """
    path = Path(path)
    labels: dict[str, str] = {}
    try:
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            if not {"ImageId", "PredictionString"} <= set(reader.fieldnames or ()):
                raise ValueError(f"{path}: needs the columns ImageId,PredictionString, has {reader.fieldnames}")
            for row in reader:
                where = f"{path} line {reader.line_num}"
                name = f"{row['ImageId'].strip()}.JPEG"
                tokens = (row["PredictionString"] or "").split()
                if not _VAL_NAME.fullmatch(name):
                    raise ValueError(f"{where}: ImageId {row['ImageId']!r} is not ILSVRC2012_val_XXXXXXXX")
                if not tokens or not _WNID.fullmatch(tokens[0]):
                    raise ValueError(f"{where}: PredictionString does not start with a synset (nXXXXXXXX)")
                if name in labels:
                    raise ValueError(f"{where}: ImageId {row['ImageId']} appears twice")
                labels[name] = tokens[0]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"{path}: cannot read the labels CSV ({type(err).__name__}: {err})") from err
    if not labels:
        raise ValueError(f"{path}: no labelled image")
    return labels


def _examples(names: set[str], limit: int = 3) -> str:
    shown = sorted(names)[:limit]
    return ", ".join(shown) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _plan(val_dir: Path, labels: dict[str, str], train_dir: Path | None) -> list[tuple[Path, Path]]:
    """Checks everything and returns the (source, destination) moves still to do; moves nothing.

    Raises:
        ValueError: naming the directory, marker, missing/unexpected images or class mismatch.
    """
    if not val_dir.is_dir():
        raise ValueError(f"--val-dir {val_dir} is not a directory")
    if (val_dir / MARKER).exists():
        raise ValueError(f"{val_dir} is already prepared (marker {val_dir / MARKER}); nothing to do")
    flat = {entry.name for entry in val_dir.iterdir() if entry.is_file() and _VAL_NAME.fullmatch(entry.name)}
    # Images a previous, interrupted run already moved into their synset folder.
    moved = {name for name, wnid in labels.items() if name not in flat and (val_dir / wnid / name).is_file()}
    if not flat:
        where = "are already in synset folders" if moved else "are missing"
        raise ValueError(f"{val_dir} holds no flat ILSVRC2012_val_*.JPEG file: the validation images {where}")
    missing = set(labels) - flat - moved
    unexpected = flat - set(labels)
    if missing or unexpected:
        raise ValueError(
            f"{val_dir} holds {len(flat) + len(moved)} validation images but the labels list {len(labels)}"
            + (f"; missing: {_examples(missing)}" if missing else "")
            + (f"; not in the labels: {_examples(unexpected)}" if unexpected else "")
            + "; nothing was moved"
        )
    if train_dir is not None:
        if not train_dir.is_dir():
            raise ValueError(f"--train-dir {train_dir} is not a directory")
        train_classes = sorted(e.name for e in train_dir.iterdir() if e.is_dir() and not e.name.startswith("."))
        val_classes = sorted(set(labels.values()))
        if train_classes != val_classes:
            extra, lacking = set(val_classes) - set(train_classes), set(train_classes) - set(val_classes)
            raise ValueError(
                f"validation synsets differ from the class folders of {train_dir}: "
                f"{len(val_classes)} vs {len(train_classes)}"
                + (f"; only in val: {_examples(extra)}" if extra else "")
                + (f"; only in train: {_examples(lacking)}" if lacking else "")
                + "; nothing was moved"
            )
    return [(val_dir / name, val_dir / labels[name] / name) for name in sorted(flat)]


def prepare_val(
    val_dir: Path | str, labels: dict[str, str], *, train_dir: Path | str | None = None, source: str = ""
) -> dict:
    """Moves the flat validation images of `val_dir` into `val_dir/<wnid>/`, after checking everything.

    Args:
        val_dir: folder holding the flat ILSVRC2012_val_XXXXXXXX.JPEG files.
        labels: {file name: wnid} for every validation image (labels_from_devkit / labels_from_csv).
        train_dir: when given, the synsets must equal its class folders.
        source: where the labels came from, recorded in the marker.
    Returns:
        The marker's content: {"images", "classes", "moved", "source"}.
    Raises:
        ValueError: see `_plan`; nothing has moved when it is raised.
    """
    val_dir = Path(val_dir)
    moves = _plan(val_dir, labels, None if train_dir is None else Path(train_dir))
    for wnid in sorted({dst.parent.name for _, dst in moves}):
        (val_dir / wnid).mkdir(exist_ok=True)
    for src, dst in moves:
        os.replace(src, dst)  # a rename inside one directory tree: no copy, atomic per file
    summary = {"images": len(labels), "classes": len(set(labels.values())), "moved": len(moves), "source": source}
    # Written last: its presence means every image is in place.
    (val_dir / MARKER).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mixmo_dist.data.prepare_imagenet",
        description="Move ImageNet's flat validation images into one folder per synset.",
    )
    parser.add_argument("--val-dir", required=True, type=Path, help="folder of the flat ILSVRC2012_val_*.JPEG files")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--devkit", type=Path, help="ILSVRC2012_devkit_t12.tar.gz (needs scipy)")
    source.add_argument("--labels-csv", type=Path, help="Kaggle's LOC_val_solution.csv")
    parser.add_argument("--train-dir", type=Path, help="train split: its class folders must equal the val synsets")
    parser.add_argument(
        "--index-dir", help="where the dataset index goes (data.index_dir of the runs); default: ROOT/.mixmo_index/"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry; returns the exit status (0 done, 2 refused with a message on stderr)."""
    args = _parse(argv)
    try:
        if args.devkit is not None:
            labels, source = labels_from_devkit(args.devkit), str(args.devkit)
        else:
            labels, source = labels_from_csv(args.labels_csv), str(args.labels_csv)
        summary = prepare_val(args.val_dir, labels, train_dir=args.train_dir, source=source)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    moved, images, classes = summary["moved"], summary["images"], summary["classes"]
    print(f"moved {moved} of {images} images into {classes} synset folders of {args.val_dir}")
    root = Path(args.val_dir).resolve().parent
    if args.train_dir is not None and Path(args.train_dir).resolve() == root / "train" and args.val_dir.name == "val":
        try:
            names, train, val = folder_tables(root, args.index_dir, rescan=True)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        where = index_dir(root, "train", args.index_dir)
        print(f"indexed {len(train)} train and {len(val)} val images of {len(names)} classes in {where or 'memory'}")
    else:
        print("no dataset index written: it needs --train-dir ROOT/train next to --val-dir ROOT/val")
    return 0


if __name__ == "__main__":
    sys.exit(main())
