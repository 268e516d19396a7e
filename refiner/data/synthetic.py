"""Procedural cartoon heads: an image family whose *composition* has exact rules.

Each image is a head (a filled ellipse of skin colour, tilted by a few degrees) on a background with a
colour gradient and a faint wave texture. The head carries two dark round eyes placed symmetrically
about its long axis, above its centre, and one red mouth on the axis, below the eyes. Every quantity is
drawn from a seeded generator, so image ``i`` of seed ``s`` is always the same picture, and the family is
unlimited. Colour ranges are disjoint by construction, which is what lets
:mod:`refiner.data.checker` read an image without a learned model:

==========  ===============  ===============  ===============
part        hue (degrees)    saturation       value
==========  ===============  ===============  ===============
background  165 .. 265       0.25 .. 0.55     0.50 .. 0.95
skin        22 .. 42         0.35 .. 0.65     0.72 .. 0.95
eyes        any              0 .. 0.3         0.05 .. 0.18
mouth       -24 .. 0         0.65 .. 0.90     0.55 .. 0.80
==========  ===============  ===============  ===============

:func:`inject_defect` renders the same head with one controlled composition error and returns the
pixel mask of where the error is: the ground truth that artifact detectors are measured against.

    python -m refiner.data.synthetic OUT --n 4000 --seed 0 [--size 64] [--defects 0.0]

Why hand-written: no library draws this family, and its rules must be exact to be checkable.
Shapes are rasterised at ``SUPERSAMPLE``x and box-filtered down, so edges are anti-aliased.
"""

from __future__ import annotations

import argparse
import colorsys
import json
import math
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from refiner.data.images import save_png_atomic
from refiner.io import atomic_write_bytes, atomic_write_text

MIN_SIZE = 32          # below this the eyes are under ~2 px across and the rules cannot be read
SUPERSAMPLE = 4
DEFECTS = ("missing_eye", "extra_eye", "dented_head", "merged_head", "displaced_mouth")

# Colour ranges (hue in degrees, saturation, value); the checker's thresholds sit between them.
BG_HUE, BG_SAT, BG_VAL = (165.0, 265.0), (0.25, 0.55), (0.50, 0.95)
SKIN_HUE, SKIN_SAT, SKIN_VAL = (22.0, 42.0), (0.35, 0.65), (0.72, 0.95)
EYE_SAT, EYE_VAL = (0.0, 0.3), (0.05, 0.18)
MOUTH_HUE, MOUTH_SAT, MOUTH_VAL = (-24.0, 0.0), (0.65, 0.90), (0.55, 0.80)


@dataclass(frozen=True)
class Ellipse:
    """An ellipse in image units (fractions of the side, y down): centre, semi-axes, tilt (radians)."""

    cx: float
    cy: float
    a: float   # semi-axis across the head (x before tilt)
    b: float   # semi-axis along the head (y before tilt)
    tilt: float = 0.0

    def inside(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        u, v = to_head_frame(x - self.cx, y - self.cy, self.tilt)
        return (u / self.a) ** 2 + (v / self.b) ** 2 <= 1.0


@dataclass(frozen=True)
class Head:
    """All parameters of one picture. Positions are fractions of the image side."""

    bg_colors: tuple[tuple[float, float, float], tuple[float, float, float]]
    bg_angle: float
    bg_wave: tuple[float, float, float]       # amplitude, spatial frequency (cycles per side), phase
    skin: tuple[float, float, float]
    face: Ellipse
    eye_color: tuple[float, float, float]
    eyes: tuple[tuple[float, float], ...]     # centres in head-frame units (u across, v along, y down)
    eye_radius: float
    mouth_color: tuple[float, float, float]
    mouth: tuple[float, float]                # centre in head-frame units
    mouth_size: tuple[float, float]           # semi-axes (across, along)
    extra_skin: tuple[Ellipse, ...] = ()      # merged_head defect: more skin ellipses (under the features)
    bites: tuple[tuple[float, float, float], ...] = ()  # dented_head defect: (x, y, r) discs of background

    def to_dict(self) -> dict:
        return asdict(self)


def to_head_frame(dx, dy, tilt: float):
    """Image offsets from the head centre -> (u across, v along) the tilted head axis."""
    c, s = math.cos(tilt), math.sin(tilt)
    return c * dx + s * dy, -s * dx + c * dy


def from_head_frame(u, v, head: Ellipse):
    """Head-frame (u, v) -> image (x, y)."""
    c, s = math.cos(head.tilt), math.sin(head.tilt)
    return head.cx + c * u - s * v, head.cy + s * u + c * v


def _hsv(rng: np.random.Generator, hue, sat, val) -> tuple[float, float, float]:
    h = (rng.uniform(*hue) % 360.0) / 360.0
    return tuple(float(c) for c in colorsys.hsv_to_rgb(h, rng.uniform(*sat), rng.uniform(*val)))


def sample_head(rng: np.random.Generator) -> Head:
    """One well-formed head. Geometry (fractions of the side): semi-axes a in [0.21, 0.27] across and
    b = a x [1.18, 1.40] along the head, tilt within +-14 degrees, centre within +-0.06 of the middle; eyes at
    u = +-[0.38, 0.50] a, v = -[0.12, 0.32] b, radius [0.050, 0.062]; mouth at v = [0.42, 0.58] b with
    semi-axes [0.30, 0.45] a across and [0.13, 0.17] b along."""
    a = rng.uniform(0.21, 0.27)
    b = a * rng.uniform(1.18, 1.40)
    face = Ellipse(0.5 + rng.uniform(-0.06, 0.06), 0.5 + rng.uniform(-0.06, 0.06), a, b,
                   math.radians(rng.uniform(-14.0, 14.0)))
    eu, ev = rng.uniform(0.38, 0.50) * a, -rng.uniform(0.12, 0.32) * b
    return Head(
        bg_colors=(_hsv(rng, BG_HUE, BG_SAT, BG_VAL), _hsv(rng, BG_HUE, BG_SAT, BG_VAL)),
        bg_angle=rng.uniform(0, 2 * math.pi),
        bg_wave=(rng.uniform(0.0, 0.05), rng.uniform(1.5, 4.0), rng.uniform(0, 2 * math.pi)),
        skin=_hsv(rng, SKIN_HUE, SKIN_SAT, SKIN_VAL),
        face=face,
        eye_color=_hsv(rng, (0, 360), EYE_SAT, EYE_VAL),
        eyes=((-eu, ev), (eu, ev)),
        eye_radius=rng.uniform(0.050, 0.062),
        mouth_color=_hsv(rng, MOUTH_HUE, MOUTH_SAT, MOUTH_VAL),
        mouth=(0.0, rng.uniform(0.42, 0.58) * b),
        mouth_size=(rng.uniform(0.30, 0.45) * a, rng.uniform(0.13, 0.17) * b),
    )


def _check_size(size: int) -> None:
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < MIN_SIZE:
        raise ValueError(f"size must be an int >= {MIN_SIZE} px (smaller heads have eyes under 2 px), got {size!r}")


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Supersampled pixel-centre coordinates in [0, 1]."""
    n = size * SUPERSAMPLE
    c = (np.arange(n) + 0.5) / n
    return np.meshgrid(c, c, indexing="xy")


def _downsample(x: np.ndarray, size: int) -> np.ndarray:
    return x.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, *x.shape[2:]).mean(axis=(1, 3))


def part_masks(head: Head, size: int) -> dict[str, np.ndarray]:
    """Supersampled boolean masks of each painted part, after painting order (later parts cover earlier)."""
    x, y = _grid(size)
    skin = head.face.inside(x, y)
    for extra in head.extra_skin:
        skin |= extra.inside(x, y)
    for bx, by, r in head.bites:
        skin &= (x - bx) ** 2 + (y - by) ** 2 > r * r
    eyes = np.zeros_like(skin)
    for u, v in head.eyes:
        ex, ey = from_head_frame(u, v, head.face)
        eyes |= (x - ex) ** 2 + (y - ey) ** 2 <= head.eye_radius ** 2
    mx, my = from_head_frame(*head.mouth, head.face)
    mouth = Ellipse(mx, my, head.mouth_size[0], head.mouth_size[1], head.face.tilt).inside(x, y)
    return {"skin": skin, "eyes": eyes, "mouth": mouth & ~eyes}


def render(head: Head, size: int = 64) -> np.ndarray:
    """The picture as (size, size, 3) uint8."""
    _check_size(size)
    x, y = _grid(size)
    c0, c1 = (np.asarray(c) for c in head.bg_colors)
    ramp = 0.5 + (math.cos(head.bg_angle) * (x - 0.5) + math.sin(head.bg_angle) * (y - 0.5))
    amp, freq, phase = head.bg_wave
    wave = amp * np.sin(2 * math.pi * freq * (x * math.sin(head.bg_angle) - y * math.cos(head.bg_angle)) + phase)
    img = (1 - ramp[..., None]) * c0 + ramp[..., None] * c1 + wave[..., None]
    masks = part_masks(head, size)
    img[masks["skin"]] = head.skin
    img[masks["eyes"]] = head.eye_color
    img[masks["mouth"]] = head.mouth_color
    return np.clip(np.round(_downsample(img, size) * 255), 0, 255).astype(np.uint8)


def head_for(seed: int, index: int) -> Head:
    """Head ``index`` of the family with seed ``seed`` (independent of how many others are drawn)."""
    return sample_head(np.random.default_rng([int(seed), int(index)]))


def render_head(seed: int, index: int, size: int = 64) -> np.ndarray:
    return render(head_for(seed, index), size)


# ------------------------------------------------------------------------------------------- defects
def _dilate(mask: np.ndarray, px: int) -> np.ndarray:
    from scipy.ndimage import binary_dilation

    return binary_dilation(mask, iterations=px) if px > 0 else mask


def _pixel_mask(supersampled: np.ndarray, size: int) -> np.ndarray:
    """A pixel belongs to the defect if a quarter or more of it changed."""
    return _downsample(supersampled.astype(np.float32), size) >= 0.25


def with_defect(head: Head, kind: str, rng: np.random.Generator) -> Head:
    """The same head with one composition error of ``kind`` (see :data:`DEFECTS`)."""
    f = head.face
    if kind == "missing_eye":
        keep = int(rng.integers(0, 2))
        return replace(head, eyes=(head.eyes[keep],))
    if kind == "extra_eye":  # a third eye on the axis between the eyes and the mouth, or on the forehead
        v_eye, r = head.eyes[0][1], head.eye_radius
        gap = (v_eye + r, head.mouth[1] - head.mouth_size[1])   # free skin between eyes and mouth
        if rng.random() < 0.5 and gap[1] - gap[0] > 2 * r + 0.01:
            where = (rng.uniform(-0.15, 0.15) * f.a, 0.5 * (gap[0] + gap[1]))
        else:
            where = (rng.uniform(-0.15, 0.15) * f.a, max(v_eye - rng.uniform(0.40, 0.48) * f.b, -0.72 * f.b))
        return replace(head, eyes=head.eyes + (where,))
    if kind == "dented_head":  # a bite out of the rim, away from the features
        angle = rng.choice([rng.uniform(-0.35, 0.35), math.pi + rng.uniform(-0.35, 0.35),
                            -math.pi / 2 + rng.uniform(-0.5, 0.5)])
        u, v = f.a * math.cos(angle), f.b * math.sin(angle)
        bx, by = from_head_frame(u, v, f)
        return replace(head, bites=((bx, by, rng.uniform(0.42, 0.55) * f.a),))
    if kind == "merged_head":  # a second head shape fused to the first
        angle = rng.uniform(0, 2 * math.pi)
        scale = rng.uniform(0.55, 0.8)
        dist = rng.uniform(0.85, 1.05)
        cx = f.cx + dist * f.a * 1.2 * math.cos(angle)
        cy = f.cy + dist * f.b * math.sin(angle)
        extra = Ellipse(cx, cy, f.a * scale, f.b * scale, f.tilt + rng.uniform(-0.3, 0.3))
        return replace(head, extra_skin=(extra,))
    if kind == "displaced_mouth":
        u_eye = abs(head.eyes[0][0])
        if rng.random() < 0.5:   # up between the eyes
            where = (0.0, head.eyes[0][1] + rng.uniform(-0.05, 0.08) * f.b)
            return replace(head, mouth=where, mouth_size=(min(head.mouth_size[0], 0.5 * u_eye), head.mouth_size[1]))
        side = rng.choice([-1.0, 1.0])  # off to one side, under an eye
        return replace(head, mouth=(side * rng.uniform(0.55, 0.65) * f.a, head.mouth[1] - 0.15 * f.b),
                       mouth_size=(0.6 * head.mouth_size[0], head.mouth_size[1]))
    raise ValueError(f"unknown defect {kind!r}; expected one of {DEFECTS}")


def inject_defect(head: Head, kind: str, rng: np.random.Generator, size: int = 64
                  ) -> tuple[np.ndarray, np.ndarray, Head]:
    """Render ``head`` with one defect. Returns ``(image uint8, true_mask bool (size, size), defect head)``.

    The true mask is every pixel whose part label differs between the clean and the defective head,
    grown by one pixel (an eye that vanished, an extra eye, the bitten-off or added skin, the old and
    new mouth).
    """
    _check_size(size)
    bad = with_defect(head, kind, rng)
    clean_parts, bad_parts = part_masks(head, size), part_masks(bad, size)
    changed = np.zeros_like(clean_parts["skin"])
    for name in clean_parts:
        changed |= clean_parts[name] ^ bad_parts[name]
    return render(bad, size), _dilate(_pixel_mask(changed, size), 1), bad


# ----------------------------------------------------------------------------------------------- CLI
def _save_mask(path: Path, mask: np.ndarray) -> None:
    """A boolean mask as an 8-bit greyscale PNG (255 = defect), written atomically."""
    import io

    from PIL import Image


    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def write_folder(out: Path, n: int, seed: int, size: int = 64, defects: float = 0.0) -> dict:
    """Write ``n`` PNGs (``00000.png`` ...) and ``heads.json``; with ``defects > 0`` that fraction of the
    images carries one defect each (round-robin over :data:`DEFECTS`) and ``masks/<name>.png`` holds its
    true mask. Refuses a folder that already holds PNGs."""

    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not 0.0 <= defects <= 1.0:
        raise ValueError(f"defects must be a fraction in [0, 1], got {defects}")
    _check_size(size)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.glob("*.png")):
        raise ValueError(f"output folder {out} already holds PNG files; choose an empty or new folder")
    records = []
    defect_every = int(round(1 / defects)) if defects > 0 else 0
    for i in range(n):
        head = head_for(seed, i)
        name = f"{i:05d}.png"
        record = {"file": name, "defect": None}
        if defect_every and i % defect_every == 0:
            kind = DEFECTS[(i // defect_every) % len(DEFECTS)]
            image, mask, _ = inject_defect(head, kind, np.random.default_rng([seed, i, 1]), size)
            _save_mask(out / "masks" / name, mask)
            record["defect"] = kind
        else:
            image = render(head, size)
        save_png_atomic(out / name, image)
        records.append(record)
    meta = {"family": "cartoon heads", "seed": seed, "n": n, "size": size, "images": records}
    atomic_write_text(out / "heads.json", json.dumps(meta, indent=1))
    return meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m refiner.data.synthetic", description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path, help="output folder (created; must not already hold PNGs)")
    p.add_argument("--n", type=int, required=True, help="number of images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=64, help=f"side in pixels (>= {MIN_SIZE})")
    p.add_argument("--defects", type=float, default=0.0, help="fraction of images with one injected defect")
    args = p.parse_args(argv)
    try:
        meta = write_folder(args.out, args.n, args.seed, args.size, args.defects)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {meta['n']} heads ({args.size} px, seed {args.seed}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
