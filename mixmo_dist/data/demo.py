"""The demo dataset: a small, deterministic, ImageNet-layout folder of real JPEG files drawn procedurally.

`python -m mixmo_dist.data.demo --out DIR [--seed 0]` writes DIR/train/<class>/*.JPEG and DIR/val/<class>/*.JPEG:
ten shape classes (circle, ring, crescent, ...) at 72x72 px. The shape is the only thing that defines the class;
colour, size, aspect, rotation, position, fill pattern, background gradient, clutter, occluding bars and noise are
nuisances, so a small ResNet needs a few epochs to learn it (see README/docs for the measured curve).

Determinism: every image is drawn from its own numpy PCG64 stream seeded by (seed, split, class, index), only
integer-valued Pillow drawing and fixed-quality baseline JPEG encoding are used, so the same seed gives byte-identical
files. The set is written into a temporary sibling directory and renamed into place; a marker file recording the
generator version and parameters makes a second run a no-op.
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
GENERATOR_VERSION = 1
MARKER = "DEMO_DATASET.json"
IMAGE_SIZE = 72
# Shapes are drawn at 2x and downsampled, which antialiases their edges.
_SUPERSAMPLE = 2
_JPEG_QUALITY = 90
TRAIN_PER_CLASS = 260
VAL_PER_CLASS = 50
_SPLIT_CODES = {"train": 1, "val": 2}

# Difficulty knobs, calibrated so that a vanilla ResNet-18 needs a few epochs (see the module docstring).
# Instances of the class shape per image (1, 2, 3) and their radius ranges (fraction of the side) by count.
_INSTANCES_P = (0.5, 0.3, 0.2)
_RADIUS = ((0.28, 0.45), (0.18, 0.3), (0.14, 0.24))
_ASPECT = (0.85, 1.18)  # anisotropic stretch of the object
_CLUTTER = (0, 4)  # number of distractors
_CLUTTER_SIZE = (0.03, 0.08)  # distractor radius, fraction of the side
_BLOTCH = (0.1, 0.35)  # strength of the background's low-frequency blotches
_BG_SATURATION = 0.5  # background colourfulness (1 = as drawn, 0 = grey)
_STRIPES_P = 0.15  # probability of a striped object instead of a plain one
_OCCLUDER_P = 0.1  # probability of a bar across the object
_NOISE_SIGMA = (2.0, 8.0)  # per-pixel Gaussian noise, 0-255 units
_MIN_CONTRAST = 130.0  # RGB distance between the object's paint and the background at its centre

Rng = np.random.Generator
Points = list[tuple[float, float]]


def _regular_polygon(sides: int, phase: float = 0.0) -> Points:
    """Unit-radius regular polygon around the origin."""
    return [
        (math.cos(phase + 2 * math.pi * k / sides), math.sin(phase + 2 * math.pi * k / sides)) for k in range(sides)
    ]


def _star(rng: Rng) -> Points:
    inner = rng.uniform(0.38, 0.5)
    return [
        (r * math.cos(math.pi * k / 5 - math.pi / 2), r * math.sin(math.pi * k / 5 - math.pi / 2))
        for k, r in zip(range(10), [1.0, inner] * 5)
    ]


def _cross(rng: Rng) -> Points:
    w = rng.uniform(0.28, 0.4)
    return [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]


def _arrow(rng: Rng) -> Points:
    shaft, head = rng.uniform(0.18, 0.3), rng.uniform(0.55, 0.8)
    neck = rng.uniform(-0.1, 0.25)
    return [(-1, -shaft), (neck, -shaft), (neck, -head), (1, 0), (neck, head), (neck, shaft), (-1, shaft)]


# Class name -> how to draw its mask: (polygon outlines to fill, polygon outlines to cut out), in unit coordinates.
# Discs are 48-gons: with integer drawing at 2x they are indistinguishable from ellipses and rotate like polygons.
def _shape_circle(rng: Rng) -> tuple[list[Points], list[Points]]:
    return [_regular_polygon(48)], []


def _shape_ring(rng: Rng) -> tuple[list[Points], list[Points]]:
    inner = rng.uniform(0.45, 0.7)
    return [_regular_polygon(48)], [[(inner * x, inner * y) for x, y in _regular_polygon(48)]]


def _shape_crescent(rng: Rng) -> tuple[list[Points], list[Points]]:
    shift, radius = rng.uniform(0.35, 0.6), rng.uniform(0.8, 1.0)
    return [_regular_polygon(48)], [[(shift + radius * x, radius * y) for x, y in _regular_polygon(48)]]


def _shape_square(rng: Rng) -> tuple[list[Points], list[Points]]:
    return [_regular_polygon(4, math.pi / 4)], []


def _shape_frame(rng: Rng) -> tuple[list[Points], list[Points]]:
    inner = rng.uniform(0.5, 0.72)
    outer = _regular_polygon(4, math.pi / 4)
    return [outer], [[(inner * x, inner * y) for x, y in outer]]


def _shape_triangle(rng: Rng) -> tuple[list[Points], list[Points]]:
    return [_regular_polygon(3, -math.pi / 2)], []


def _shape_star(rng: Rng) -> tuple[list[Points], list[Points]]:
    return [_star(rng)], []


def _shape_cross(rng: Rng) -> tuple[list[Points], list[Points]]:
    return [_cross(rng)], []


def _shape_heart(rng: Rng) -> tuple[list[Points], list[Points]]:
    # The classic parametric heart, scaled to about the unit disc and centred.
    ts = [2 * math.pi * k / 40 for k in range(40)]
    pts = [
        (
            16 * math.sin(t) ** 3 / 17,
            -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)) / 17 - 0.15,
        )
        for t in ts
    ]
    return [pts], []


def _shape_arrow(rng: Rng) -> tuple[list[Points], list[Points]]:
    return [_arrow(rng)], []


SHAPES: dict[str, Callable[[Rng], tuple[list[Points], list[Points]]]] = {
    "circle": _shape_circle,
    "ring": _shape_ring,
    "crescent": _shape_crescent,
    "square": _shape_square,
    "frame": _shape_frame,
    "triangle": _shape_triangle,
    "star": _shape_star,
    "cross": _shape_cross,
    "heart": _shape_heart,
    "arrow": _shape_arrow,
}
CLASSES: tuple[str, ...] = tuple(SHAPES)


def _place(
    points: Points, *, cx: float, cy: float, sx: float, sy: float, angle: float, jitter: float, rng: Rng
) -> list[tuple[int, int]]:
    """Scales (anisotropically), rotates, jitters and translates unit points to integer canvas pixels."""
    unit_P2 = np.asarray(points, dtype=np.float64) * (sx, sy)
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    rotated_P2 = unit_P2 @ np.array([[cos_a, sin_a], [-sin_a, cos_a]])
    placed_P2 = np.rint(rotated_P2 + (cx, cy) + rng.uniform(-jitter, jitter, size=unit_P2.shape)).astype(np.int64)
    return [(int(x), int(y)) for x, y in placed_P2]


def _random_colour(rng: Rng) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, size=3))  # type: ignore[return-value]


def _contrasting_colour(rng: Rng, reference: Sequence[int]) -> tuple[int, int, int]:
    """A random colour at least _MIN_CONTRAST away (RGB distance) from `reference`, so the shape is visible."""
    ref_3 = np.asarray(reference, dtype=np.float64)
    for _ in range(32):
        colour_3 = rng.integers(0, 256, size=3)
        if np.linalg.norm(colour_3 - ref_3) >= _MIN_CONTRAST:
            break
    return tuple(int(v) for v in colour_3)  # type: ignore[return-value]


def _background(rng: Rng, side: int) -> Image.Image:
    """RGB side x side: a two-colour gradient at a random angle plus smooth low-frequency blotches."""
    # Smooth content: computed at a quarter of the side and upsampled, which costs nothing visible.
    small = side // 4
    c0 = rng.integers(0, 256, size=3).astype(np.float32)
    c1 = rng.integers(0, 256, size=3).astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    coords = np.arange(small, dtype=np.float32) / (small - 1) - 0.5
    ramp_HW = math.cos(angle) * coords[None, :] + math.sin(angle) * coords[:, None] + 0.5
    img_HW3 = c0 + (c1 - c0) * np.clip(ramp_HW, 0.0, 1.0)[..., None]
    coarse = Image.fromarray(rng.integers(0, 256, size=(5, 5, 3), dtype=np.uint8))
    blotch_HW3 = np.asarray(coarse.resize((small, small), Image.Resampling.BICUBIC), np.float32)
    img_HW3 += rng.uniform(*_BLOTCH) * (blotch_HW3 - 128.0)
    # Muted backgrounds, vivid objects: saturation is a cue for "object", never for which object.
    luma_HW1 = img_HW3.mean(axis=2, keepdims=True)
    img_HW3 = luma_HW1 + _BG_SATURATION * (img_HW3 - luma_HW1)
    low = Image.fromarray(np.clip(img_HW3, 0, 255).astype(np.uint8))
    return low.resize((side, side), Image.Resampling.BILINEAR)


def _clutter(draw: ImageDraw.ImageDraw, rng: Rng, side: int) -> None:
    """Small distractors (lines, small polygons) that carry no class information."""
    for _ in range(int(rng.integers(_CLUTTER[0], _CLUTTER[1] + 1))):
        colour = _random_colour(rng)
        if rng.random() < 0.4:
            x0, y0, x1, y1 = (int(v) for v in rng.integers(0, side, size=4))
            draw.line([(x0, y0), (x1, y1)], fill=colour, width=int(rng.integers(2, 5)))
        else:
            size = rng.uniform(*_CLUTTER_SIZE) * side
            cx, cy = rng.uniform(0, side, size=2)
            outline = _regular_polygon(int(rng.integers(3, 9)))
            sy, angle = size * rng.uniform(0.5, 1.5), rng.uniform(0, 2 * math.pi)
            draw.polygon(_place(outline, cx=cx, cy=cy, sx=size, sy=sy, angle=angle, jitter=size * 0.3, rng=rng), colour)


def _fill(rng: Rng, side: int, reference: Sequence[int]) -> Image.Image:
    """The object's paint: a solid colour, or two-colour stripes at a random angle and period."""
    fill = Image.new("RGB", (side, side), _contrasting_colour(rng, reference))
    if rng.random() < _STRIPES_P:
        draw = ImageDraw.Draw(fill)
        other = _contrasting_colour(rng, reference)
        period = int(rng.integers(8, 20))
        angle = rng.uniform(0, math.pi)
        dx, dy = math.cos(angle), math.sin(angle)
        for offset in range(-2 * side, 2 * side, period):
            # A long thick line perpendicular to (dx, dy) at this offset from the centre.
            cx, cy = side / 2 + offset * dx, side / 2 + offset * dy
            p0 = (round(cx - 2 * side * dy), round(cy + 2 * side * dx))
            p1 = (round(cx + 2 * side * dy), round(cy - 2 * side * dx))
            draw.line([p0, p1], fill=other, width=period // 2)
    return fill


def _instance_centres(rng: Rng, radii: Sequence[float], side: int) -> list[tuple[float, float]]:
    """Centres for the object instances: mostly inside the canvas, overlapping little (up to 12 tries each)."""
    centres: list[tuple[float, float]] = []
    for radius in radii:
        margin = radius * 0.8
        for _ in range(12):
            cx, cy = (float(v) for v in rng.uniform(margin, side - margin, size=2))
            if all(math.hypot(cx - x, cy - y) >= 0.9 * (radius + r) for (x, y), r in zip(centres, radii)):
                break
        centres.append((cx, cy))
    return centres


def _draw_instance(canvas: Image.Image, class_name: str, rng: Rng, *, cx: float, cy: float, radius: float) -> None:
    """Paints one instance of the class shape (random rotation, stretch and paint) onto `canvas`, in place."""
    side = canvas.width
    aspect = rng.uniform(*_ASPECT)
    angle = rng.uniform(0, 2 * math.pi)
    reference = canvas.getpixel((int(cx), int(cy)))
    solids, holes = SHAPES[class_name](rng)
    mask = Image.new("L", (side, side), 0)
    mask_draw = ImageDraw.Draw(mask)
    sx, sy, jitter = radius * aspect, radius / aspect, radius * 0.03
    for outline, value in [(pts, 255) for pts in solids] + [(pts, 0) for pts in holes]:
        mask_draw.polygon(_place(outline, cx=cx, cy=cy, sx=sx, sy=sy, angle=angle, jitter=jitter, rng=rng), value)
    canvas.paste(_fill(rng, side, reference), (0, 0), mask)


def render(class_name: str, rng: Rng, size: int = IMAGE_SIZE) -> Image.Image:
    """Draws one RGB image of `class_name` (size x size) from `rng`: 1-3 instances of the shape on a busy scene."""
    side = size * _SUPERSAMPLE
    canvas = _background(rng, side)
    _clutter(ImageDraw.Draw(canvas), rng, side)
    count = int(rng.choice(len(_INSTANCES_P), p=_INSTANCES_P)) + 1
    radii = [rng.uniform(*_RADIUS[count - 1]) * side for _ in range(count)]
    for (cx, cy), radius in zip(_instance_centres(rng, radii, side), radii):
        _draw_instance(canvas, class_name, rng, cx=cx, cy=cy, radius=radius)
    if rng.random() < _OCCLUDER_P:
        # An occluding bar across the scene, so no single part of an outline can be relied on.
        x0, y0, x1, y1 = (int(v) for v in rng.integers(0, side, size=4))
        ImageDraw.Draw(canvas).line([(x0, y0), (x1, y1)], fill=_random_colour(rng), width=int(rng.integers(4, 10)))
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
