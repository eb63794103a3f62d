"""The demo dataset: a small, deterministic, ImageNet-layout folder of real JPEG files drawn procedurally.

`python -m mixmo_dist.data.demo --out DIR [--seed 0]` writes DIR/train/<class>/*.JPEG and DIR/val/<class>/*.JPEG:
ten texture classes (stripes, checkerboard, dots, ...) at 72x72 px. Each image shows a patch of its class's pattern
(an irregular region covering roughly half to all of the image) on a busy background. The pattern's structure is
the only thing that defines the class; its period, tilt (up to 30 degrees from upright), duty cycle, polarity and
tinted grey levels, the patch's shape and place, the colourful background, clutter and noise are nuisances.

Difficulty: textures rather than object outlines, because a ResNet from scratch learns outlines under free rotation
and colour far too slowly for a CPU demo (a ten-shape version stayed below 20% val top-1 after 8 epochs). Free
rotation of the textures was too slow as well: the demo recipe (Cut-MixMo resnet18, M=2, 32 px, 376 steps of 64
unique images) reached 0.28-0.38 val top-1 with it, 0.73 with tilts limited to 30 degrees. With the demo recipe a
vanilla resnet18 stays below 50% val top-1 after its first epoch (measured: see README.md, "Demo result").

Determinism: every image is drawn from its own numpy PCG64 stream seeded by (seed, split, class, index), and encoded
as a baseline JPEG at a fixed quality, so the same seed gives byte-identical files. The set is written into a
temporary sibling directory and renamed into place; a marker file recording the generator version and parameters
makes a second run a no-op.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Bump whenever the drawing changes: a dataset with another version is regenerated.
GENERATOR_VERSION = 3
MARKER = "DEMO_DATASET.json"
IMAGE_SIZE = 72
# Drawn at 2x and downsampled, which antialiases edges.
_SUPERSAMPLE = 2
_JPEG_QUALITY = 90
TRAIN_PER_CLASS = 300
VAL_PER_CLASS = 50
_SPLIT_CODES = {"train": 1, "val": 2}

# Difficulty knobs (see the module docstring for how they were calibrated). Lengths are in 1x pixels.
_PERIOD = (10.0, 18.0)  # pattern period
_PATCH_RADIUS = (0.55, 0.75)  # radius of the textured patch, fraction of the side
_PATCH_CONTRAST = 110.0  # minimum grey-level difference (0-255) between the pattern's two colours
_TINT = 30.0  # largest chroma (RGB distance from grey) of each of the pattern's colours
_TILT = math.radians(30.0)  # largest rotation of the pattern away from its upright pose
_CLUTTER = (0, 2)  # number of distractors (lines and small polygons) drawn over everything
_CLUTTER_SIZE = (0.03, 0.08)  # distractor radius, fraction of the side
_BLOTCH = (0.1, 0.4)  # strength of the background's low-frequency blotches
_BG_SATURATION = 0.6  # background colourfulness (1 = as drawn, 0 = grey)
_NOISE_SIGMA = (2.0, 6.0)  # per-pixel Gaussian noise, 0-255 units

Rng = np.random.Generator
# A pattern maps rotated coordinates (u, v, in periods) and the rng to a foreground fraction in [0, 1].
Pattern = Callable[[np.ndarray, np.ndarray, Rng], np.ndarray]


def _frac(x: np.ndarray) -> np.ndarray:
    return x - np.floor(x)


def _stripes(u: np.ndarray, v: np.ndarray, rng: Rng) -> np.ndarray:
    return _frac(u) < rng.uniform(0.35, 0.65)


def _checkerboard(u: np.ndarray, v: np.ndarray, rng: Rng) -> np.ndarray:
    return (np.floor(u) + np.floor(v)) % 2 == 0


def _dots(u: np.ndarray, v: np.ndarray, rng: Rng) -> np.ndarray:
    # Every other row shifted by half a period half of the time (square or staggered lattice).
    shift = 0.5 * (np.floor(v) % 2) * (rng.random() < 0.5)
    return np.hypot(_frac(u + shift) - 0.5, _frac(v) - 0.5) < rng.uniform(0.2, 0.34)


def _grid(u: np.ndarray, v: np.ndarray, rng: Rng) -> np.ndarray:
    width = rng.uniform(0.18, 0.3)
    return (_frac(u) < width) | (_frac(v) < width)


def _zigzag(u: np.ndarray, v: np.ndarray, rng: Rng) -> np.ndarray:
    amplitude, wavelength = rng.uniform(0.7, 1.2), rng.uniform(1.0, 1.6)
    triangle = 2.0 * np.abs(_frac(v / wavelength) - 0.5)
    return _frac(u + amplitude * triangle) < 0.5


def _waves(u: np.ndarray, v: np.ndarray, rng: Rng) -> np.ndarray:
    amplitude, wavelength = rng.uniform(0.3, 0.5), rng.uniform(2.0, 3.5)
    return _frac(u + amplitude * np.sin(2 * np.pi * v / wavelength)) < 0.5


def _rings(u: np.ndarray, v: np.ndarray, rng: Rng) -> np.ndarray:
    # Concentric circles around the coordinate origin (inside the patch).
    cu, cv = rng.uniform(-0.5, 0.5, size=2)
    return _frac(np.hypot(u - cu, v - cv)) < 0.5


def _bricks(u: np.ndarray, v: np.ndarray, rng: Rng) -> np.ndarray:
    mortar = rng.uniform(0.14, 0.24)
    row = np.floor(v)
    return (_frac(v) < mortar) | (_frac(u / 2.0 + 0.5 * (row % 2)) < mortar / 2.0)


def _honeycomb(u: np.ndarray, v: np.ndarray, rng: Rng) -> np.ndarray:
    # Cell walls of a hexagonal lattice (neighbours one period apart). The lattice is two offset rectangular
    # lattices of pitch (1, sqrt 3); q is the offset from the nearest lattice point, and the Voronoi cell is
    # |q . n| <= 1/2 for the three neighbour directions n at 0, 60 and 120 degrees.
    pitch = math.sqrt(3)
    qa_u, qa_v = u - np.round(u), v - np.round(v / pitch) * pitch
    ub, vb = u - 0.5, v - pitch / 2
    qb_u, qb_v = ub - np.round(ub), vb - np.round(vb / pitch) * pitch
    use_b = qb_u**2 + qb_v**2 < qa_u**2 + qa_v**2
    q_u, q_v = np.where(use_b, qb_u, qa_u), np.where(use_b, qb_v, qa_v)
    slant = 0.5 * pitch * q_v
    reach = np.maximum(np.abs(q_u), np.maximum(np.abs(0.5 * q_u + slant), np.abs(0.5 * q_u - slant)))
    return reach > 0.5 - rng.uniform(0.05, 0.09)


def _camouflage(u: np.ndarray, v: np.ndarray, rng: Rng) -> np.ndarray:
    # Irregular blobs, the non-periodic cousin of dots: a random smooth field (a sum of plane waves of random
    # direction, about half the pattern frequency) thresholded at zero.
    field = np.zeros_like(u)
    for _ in range(8):
        freq, direction, phase = rng.uniform(0.3, 0.6), rng.uniform(0, math.pi), rng.uniform(0, 2 * math.pi)
        field += np.cos(2 * np.pi * freq * (u * math.cos(direction) + v * math.sin(direction)) + phase)
    return field > 0


PATTERNS: dict[str, Pattern] = {
    "stripes": _stripes,
    "checkerboard": _checkerboard,
    "dots": _dots,
    "grid": _grid,
    "zigzag": _zigzag,
    "waves": _waves,
    "rings": _rings,
    "bricks": _bricks,
    "honeycomb": _honeycomb,
    "camouflage": _camouflage,
}
CLASSES: tuple[str, ...] = tuple(PATTERNS)


def _random_colour(rng: Rng) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, size=3))  # type: ignore[return-value]


def _colour_pair(rng: Rng) -> tuple[np.ndarray, np.ndarray]:
    """The pattern's two colours (float32 [3] each, 0-255): one light, one dark, tinted with random hues.

    Grey levels at least _PATCH_CONTRAST apart (random polarity), each plus a random tint of up to _TINT. The
    tint stays moderate on purpose: with freely random colour pairs a ResNet from scratch needs several times
    more steps to become colour-invariant than a CPU demo can afford.
    """
    low = rng.uniform(0.0, 255.0 - _PATCH_CONTRAST)
    high = rng.uniform(low + _PATCH_CONTRAST, 255.0)
    pair = []
    for grey in (low, high):
        hue_3 = rng.normal(size=3)
        hue_3 -= hue_3.mean()  # a pure chroma direction: tints change colour, not brightness
        pair.append(np.clip(grey + rng.uniform(0.0, _TINT) * hue_3 / np.linalg.norm(hue_3), 0.0, 255.0))
    first, second = pair if rng.random() < 0.5 else pair[::-1]
    return first.astype(np.float32), second.astype(np.float32)


def _background(rng: Rng, side: int) -> np.ndarray:
    """float32 [side,side,3]: a muted two-colour gradient at a random angle plus smooth low-frequency blotches."""
    c0 = rng.integers(0, 256, size=3).astype(np.float32)
    c1 = rng.integers(0, 256, size=3).astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    coords = np.arange(side, dtype=np.float32) / (side - 1) - 0.5
    ramp_HW = math.cos(angle) * coords[None, :] + math.sin(angle) * coords[:, None] + 0.5
    img_HW3 = c0 + (c1 - c0) * np.clip(ramp_HW, 0.0, 1.0)[..., None]
    coarse = Image.fromarray(rng.integers(0, 256, size=(5, 5, 3), dtype=np.uint8))
    blotch_HW3 = np.asarray(coarse.resize((side, side), Image.Resampling.BICUBIC), np.float32)
    img_HW3 += rng.uniform(*_BLOTCH) * (blotch_HW3 - 128.0)
    luma_HW1 = img_HW3.mean(axis=2, keepdims=True)
    return luma_HW1 + _BG_SATURATION * (img_HW3 - luma_HW1)


def _patch_mask(rng: Rng, side: int, cx: float, cy: float) -> np.ndarray:
    """float32 [side,side] in [0,1]: an irregular convex-ish blob (a 12-gon with jittered radii) around (cx, cy)."""
    radius = rng.uniform(*_PATCH_RADIUS) * side
    angles = np.sort(rng.uniform(0, 2 * math.pi, size=12))
    radii = radius * rng.uniform(0.7, 1.0, size=12)
    points = [(float(cx + r * math.cos(a)), float(cy + r * math.sin(a))) for a, r in zip(angles, radii)]
    mask = Image.new("L", (side, side), 0)
    ImageDraw.Draw(mask).polygon(points, fill=255)
    return np.asarray(mask, np.float32) / 255.0


def _clutter(canvas: Image.Image, rng: Rng) -> None:
    """Small distractors (lines and small polygons) that carry no class information, drawn in place."""
    draw, side = ImageDraw.Draw(canvas), canvas.width
    for _ in range(int(rng.integers(_CLUTTER[0], _CLUTTER[1] + 1))):
        colour = _random_colour(rng)
        if rng.random() < 0.5:
            x0, y0, x1, y1 = (int(v) for v in rng.integers(0, side, size=4))
            draw.line([(x0, y0), (x1, y1)], fill=colour, width=int(rng.integers(2, 5)))
        else:
            size = rng.uniform(*_CLUTTER_SIZE) * side
            cx, cy = rng.uniform(0, side, size=2)
            angles = np.sort(rng.uniform(0, 2 * math.pi, size=int(rng.integers(3, 7))))
            draw.polygon([(float(cx + size * math.cos(a)), float(cy + size * math.sin(a))) for a in angles], colour)


def render(class_name: str, rng: Rng, size: int = IMAGE_SIZE) -> Image.Image:
    """Draws one RGB image (size x size) of `class_name`'s pattern from `rng`."""
    side = size * _SUPERSAMPLE
    period = rng.uniform(*_PERIOD) * _SUPERSAMPLE
    angle = rng.uniform(-_TILT, _TILT)
    stretch = rng.uniform(0.85, 1.15)  # slight anisotropy, so periods differ along the two axes
    cx, cy = (float(c) for c in rng.uniform(0.35 * side, 0.65 * side, size=2))
    # The pattern's origin (the centre of the rings, a random phase for the others) lies inside the patch.
    ys, xs = np.mgrid[0:side, 0:side].astype(np.float32)
    xs -= cx + rng.uniform(-period, period)
    ys -= cy + rng.uniform(-period, period)
    u = (xs * math.cos(angle) + ys * math.sin(angle)) / (period * stretch)
    v = (-xs * math.sin(angle) + ys * math.cos(angle)) * stretch / period
    foreground_HW = PATTERNS[class_name](u, v, rng).astype(np.float32)
    ink, paper = _colour_pair(rng)
    pattern_HW3 = paper + (ink - paper) * foreground_HW[..., None]
    patch_HW1 = _patch_mask(rng, side, cx, cy)[..., None]
    image_HW3 = _background(rng, side) * (1.0 - patch_HW1) + pattern_HW3 * patch_HW1
    canvas = Image.fromarray(np.clip(np.rint(image_HW3), 0, 255).astype(np.uint8))
    _clutter(canvas, rng)
    small = canvas.resize((size, size), Image.Resampling.BOX)
    noisy_HW3 = np.asarray(small, np.float32) + rng.normal(0.0, rng.uniform(*_NOISE_SIGMA), size=(size, size, 3))
    return Image.fromarray(np.clip(np.rint(noisy_HW3), 0, 255).astype(np.uint8))


def _write_split(root: Path, split: str, per_class: int, seed: int) -> None:
    for label, name in enumerate(CLASSES):
        class_dir = root / split / name
        class_dir.mkdir(parents=True)
        for index in range(per_class):
            rng = np.random.default_rng([seed, _SPLIT_CODES[split], label, index])
            # Baseline, non-optimised encoding at a fixed quality: the bytes depend on the pixels only.
            render(name, rng).save(class_dir / f"{name}_{index:05d}.JPEG", format="JPEG", quality=_JPEG_QUALITY)


def _marker(seed: int, train_per_class: int, val_per_class: int) -> dict:
    return {
        "generator": "mixmo_dist.data.demo",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "image_size": IMAGE_SIZE,
        "train_per_class": train_per_class,
        "val_per_class": val_per_class,
        "classes": list(CLASSES),
    }


def _read_marker(out: Path) -> dict | None:
    try:
        return json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return None


def generate(
    out: Path | str, *, seed: int = 0, train_per_class: int = TRAIN_PER_CLASS, val_per_class: int = VAL_PER_CLASS
) -> bool:
    """Writes the demo dataset to `out` unless the same one (version and parameters) is already complete there.

    Returns:
        True when files were written, False when the dataset was already there.
    Raises:
        ValueError: `out` exists, is not empty and is not a demo dataset (nothing is deleted then), or a count < 1.
    """
    if train_per_class < 1 or val_per_class < 1:
        raise ValueError(f"--train-per-class and --val-per-class must be >= 1, got {train_per_class}, {val_per_class}")
    out = Path(out)
    wanted = _marker(seed, train_per_class, val_per_class)
    existing = _read_marker(out)
    if existing == wanted:
        return False
    if out.exists() and existing is None and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not a demo dataset (no {MARKER}); remove it or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for split, per_class in (("train", train_per_class), ("val", val_per_class)):
            _write_split(tmp, split, per_class, seed)
        # The marker goes in last: a directory with it is complete by construction.
        (tmp / MARKER).write_text(json.dumps(wanted, indent=2) + "\n")
        if out.exists():
            # An empty dir, or an older/different demo dataset of ours: swap it out.
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "data")
            shutil.rmtree(old)
        try:
            os.rename(tmp, out)
        except OSError:
            # Another process won the race; its dataset is as good as ours if it is the same.
            if _read_marker(out) != wanted:
                raise
            return False
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mixmo_dist.data.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="dataset root to create (train/ and val/ inside)")
    parser.add_argument("--seed", type=int, default=0, help="generation seed (same seed -> identical files)")
    parser.add_argument("--train-per-class", type=int, default=TRAIN_PER_CLASS, help="train images per class")
    parser.add_argument("--val-per-class", type=int, default=VAL_PER_CLASS, help="val images per class")
    args = parser.parse_args(argv)
    try:
        written = generate(
            args.out, seed=args.seed, train_per_class=args.train_per_class, val_per_class=args.val_per_class
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if written:
        n_train, n_val = args.train_per_class * len(CLASSES), args.val_per_class * len(CLASSES)
        print(f"wrote {args.out}: {len(CLASSES)} classes, {n_train} train / {n_val} val images")
    else:
        print(f"exists: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
