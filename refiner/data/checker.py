"""A rule-based composition checker for the cartoon-head family (:mod:`refiner.data.synthetic`); no learned model.

The image is read by colour alone (the family's colour ranges are disjoint): *skin*, *dark* (eyes) and
*red* (mouth) pixels, then connected components (``scipy.ndimage.label``, 4-connected). The head frame is
the moment ellipse of the hole-filled largest skin component: centre = mean, axes from the covariance
(a uniform ellipse with semi-axes a, b has variances a^2/4 and b^2/4 along its axes), ``v`` runs along the
long axis towards the bottom of the image and ``u`` across it.

Rules (all must hold for ``passed``):

* ``one_head``: exactly one skin region of head size (at least ``MIN_HEAD_FRAC`` of the image).
* ``head_elliptical``: the filled head matches its moment ellipse (IoU >= ``ELLIPSE_IOU``), is convex
  (area / convex-hull area >= ``SOLIDITY``) and does not touch the image border.
* ``two_eyes``: exactly two round dark regions of eye size inside the head, and no other dark blob there.
* ``eyes_symmetric``: the two eyes mirror each other about the head's axis (|u1 + u2| <= ``SYM_U`` a,
  |v1 - v2| <= ``SYM_V`` b, opposite sides) and sit above the head's centre.
* ``mouth_below_eyes``: exactly one red region inside the head, on the axis (|u| <= ``MOUTH_U`` a) and
  at least ``MOUTH_GAP`` b below the eyes.

Each failed rule also gets a pixel mask of where the violation is (an extra eye, the place a missing eye
should be, the bitten-off or added skin, the wrong and the expected mouth). The thresholds were set on
renders of seed 0 and their f4 round trips (``tests/test_checker.py`` checks them on other seeds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from refiner.data.synthetic import MIN_SIZE

RULES = ("one_head", "head_elliptical", "two_eyes", "eyes_symmetric", "mouth_below_eyes")

# colour classes (hue in degrees); the family's ranges are in refiner.data.synthetic
SKIN_HUE, SKIN_MIN_SAT, SKIN_MIN_VAL = (12.0, 62.0), 0.18, 0.45
DARK_MAX_VAL = 0.34
RED_HUE_FROM, RED_HUE_TO, RED_MIN_SAT, RED_MIN_VAL = 328.0, 12.0, 0.42, 0.30
# geometry, as fractions of the image side or of the fitted head's semi-axes (a across, b along)
MIN_HEAD_FRAC = 0.04
ELLIPSE_IOU = 0.95
SOLIDITY = 0.945
EYE_AREA = (0.25, 2.6)
EYE_ELONGATION = 1.6         # long / short moment axis; two touching eyes read as one elongated blob       # times the smallest / largest rendered eye area (radius 0.050 .. 0.062 of the side)
SYM_U, SYM_V = 0.22, 0.18
MOUTH_MIN_AREA = 0.004       # of the image area
MOUTH_U, MOUTH_GAP = 0.22, 0.25
EYE_RADIUS = (0.050, 0.062)


@dataclass
class CheckResult:
    """``rules[name]`` is True when the rule holds; ``masks[name]`` (bool, H x W) marks where it is broken."""

    rules: dict[str, bool]
    masks: dict[str, np.ndarray]
    info: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(self.rules.values())

    @property
    def violation_mask(self) -> np.ndarray:
        shape = next(iter(self.masks.values())).shape
        out = np.zeros(shape, bool)
        for name, ok in self.rules.items():
            if not ok:
                out |= self.masks[name]
        return out


def hsv(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 RGB -> hue in degrees [0, 360), saturation and value in [0, 1] (the hexcone model)."""
    rgb = image.astype(np.float32) / 255.0
    mx, mn = rgb.max(-1), rgb.min(-1)
    delta = mx - mn
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.where(delta > 0, delta, 1.0)
    hue = np.where(mx == r, ((g - b) / safe) % 6, np.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = np.where(delta > 0, hue * 60.0, 0.0)
    sat = np.where(mx > 0, delta / np.where(mx > 0, mx, 1.0), 0.0)
    return hue, sat, mx


def colour_classes(image: np.ndarray) -> dict[str, np.ndarray]:
    h, s, v = hsv(image)
    skin = (h >= SKIN_HUE[0]) & (h <= SKIN_HUE[1]) & (s >= SKIN_MIN_SAT) & (v >= SKIN_MIN_VAL)
    dark = v <= DARK_MAX_VAL
    red = ((h >= RED_HUE_FROM) | (h <= RED_HUE_TO)) & (s >= RED_MIN_SAT) & (v >= RED_MIN_VAL) & ~dark
    return {"skin": skin, "dark": dark, "red": red}


def _components(mask: np.ndarray) -> list[np.ndarray]:
    labels, n = ndimage.label(mask)
    return [labels == k for k in range(1, n + 1)]


def _disc(shape, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]] + 0.5
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


@dataclass
class HeadFrame:
    """Moment ellipse of the filled head (pixel units): centre, semi-axes a (across) <= b (along), unit axes."""

    cx: float
    cy: float
    a: float
    b: float
    along: np.ndarray   # unit vector (x, y) of the long axis, pointing down the image
    across: np.ndarray

    @classmethod
    def fit(cls, mask: np.ndarray) -> "HeadFrame":
        ys, xs = np.nonzero(mask)
        pts = np.stack([xs + 0.5, ys + 0.5], 1)
        mean = pts.mean(0)
        evals, evecs = np.linalg.eigh(np.cov((pts - mean).T))
        along = evecs[:, 1] if evecs[1, 1] >= 0 else -evecs[:, 1]
        across = np.array([along[1], -along[0]])
        return cls(float(mean[0]), float(mean[1]), 2 * math.sqrt(max(evals[0], 1e-6)),
                   2 * math.sqrt(max(evals[1], 1e-6)), along, across)

    @classmethod
    def fit_trimmed(cls, mask: np.ndarray, rounds: int = 3, grow: float = 1.08) -> "HeadFrame":
        """Moment fit, then refit to the pixels inside the (slightly grown) previous ellipse, ``rounds``
        times: a fused second shape pulls the plain moment fit towards itself; the trimmed fit keeps
        to the bigger shape, so what sticks out is marked as the violation."""
        frame = cls.fit(mask)
        for _ in range(rounds):
            inside = mask & frame.ellipse(mask.shape, a=grow * frame.a, b=grow * frame.b)
            if inside.sum() < 10:
                break
            frame = cls.fit(inside)
        return frame

    def uv(self, x: float, y: float) -> tuple[float, float]:
        d = np.array([x - self.cx, y - self.cy])
        return float(d @ self.across), float(d @ self.along)

    def xy(self, u: float, v: float) -> tuple[float, float]:
        p = np.array([self.cx, self.cy]) + u * self.across + v * self.along
        return float(p[0]), float(p[1])

    def ellipse(self, shape, u: float = 0.0, v: float = 0.0, a: float | None = None, b: float | None = None
                ) -> np.ndarray:
        """Pixels of the ellipse centred at head-frame (u, v) with semi-axes a (across) and b (along);
        by default the head's own moment ellipse."""
        a, b = (self.a if a is None else a), (self.b if b is None else b)
        cx, cy = self.xy(u, v)
        yy, xx = np.mgrid[: shape[0], : shape[1]] + 0.5
        dx, dy = xx - cx, yy - cy
        uu = dx * self.across[0] + dy * self.across[1]
        vv = dx * self.along[0] + dy * self.along[1]
        return (uu / max(a, 1e-6)) ** 2 + (vv / max(b, 1e-6)) ** 2 <= 1.0


def _centroid(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.mean() + 0.5), float(ys.mean() + 0.5)


def check(image: np.ndarray) -> CheckResult:
    """Check one (H, W, 3) uint8 image against the composition rules."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"check expects an (H, W, 3) uint8 RGB image, got {image.dtype} {image.shape}")
    H, W = image.shape[:2]
    if min(H, W) < MIN_SIZE:
        raise ValueError(f"image is {W}x{H}; the checker needs at least {MIN_SIZE}x{MIN_SIZE} px to see the eyes")
    side = math.sqrt(H * W)
    empty = np.zeros((H, W), bool)
    rules = {name: False for name in RULES}
    masks = {name: empty.copy() for name in RULES}
    classes = colour_classes(image)

    # -- head
    heads = sorted((c for c in _components(classes["skin"]) if c.sum() >= MIN_HEAD_FRAC * H * W),
                   key=lambda c: -int(c.sum()))
    if not heads:
        for name in RULES:
            masks[name] = np.ones((H, W), bool)
        return CheckResult(rules, masks, {"reason": "no head-sized skin region"})
    head = ndimage.binary_fill_holes(heads[0])
    rules["one_head"] = len(heads) == 1
    for extra in heads[1:]:
        masks["one_head"] |= extra
    frame = HeadFrame.fit_trimmed(head)
    ellipse = frame.ellipse((H, W))
    iou = float((head & ellipse).sum() / max((head | ellipse).sum(), 1))
    from skimage.morphology import convex_hull_image

    solidity = float(head.sum() / max(convex_hull_image(head).sum(), 1))
    border = bool(head[0].any() or head[-1].any() or head[:, 0].any() or head[:, -1].any())
    rules["head_elliptical"] = iou >= ELLIPSE_IOU and solidity >= SOLIDITY and not border
    off = head ^ ellipse
    opened = ndimage.binary_opening(off)
    masks["head_elliptical"] = opened if opened.any() else off
    if border:
        edge = np.zeros((H, W), bool)
        edge[[0, -1], :] = edge[:, [0, -1]] = True
        masks["head_elliptical"] |= head & ndimage.binary_dilation(edge, iterations=2)

    # -- eyes: dark regions mostly inside the filled head
    r_lo, r_hi = EYE_RADIUS[0] * side, EYE_RADIUS[1] * side
    area_lo, area_hi = EYE_AREA[0] * math.pi * r_lo**2, EYE_AREA[1] * math.pi * r_hi**2
    inner = [c for c in _components(classes["dark"]) if (c & head).sum() >= 0.6 * c.sum()]
    eyes, blobs = [], []
    for c in inner:  # eye-sized and round -> eye; bigger or elongated -> blob; smaller -> ignored
        area = int(c.sum())
        if area < area_lo:
            continue
        blob_frame = HeadFrame.fit(c)
        round_enough = blob_frame.b / blob_frame.a <= EYE_ELONGATION
        (eyes if area <= area_hi and round_enough else blobs).append(c)
    eye_uv = [frame.uv(*_centroid(e)) for e in eyes]
    rules["two_eyes"] = len(eyes) == 2 and not blobs
    for blob in blobs:
        masks["two_eyes"] |= blob
    eye_r = math.sqrt(np.mean([e.sum() for e in eyes]) / math.pi) if eyes else 0.5 * (r_lo + r_hi)
    pair = _best_pair(eye_uv, frame) if len(eyes) >= 2 else None
    if len(eyes) > 2:
        for k, e in enumerate(eyes):
            if k not in pair:
                masks["two_eyes"] |= e
    elif len(eyes) == 1:  # the missing eye belongs at the mirror image of the present one
        u, v = eye_uv[0]
        masks["two_eyes"] |= _disc((H, W), *frame.xy(-u, v), 1.6 * eye_r)
    elif not eyes:
        band = np.zeros((H, W), bool)
        for u in (-0.45 * frame.a, 0.45 * frame.a):
            band |= _disc((H, W), *frame.xy(u, -0.22 * frame.b), 2.0 * eye_r)
        masks["two_eyes"] |= band
    if pair is not None:
        (u1, v1), (u2, v2) = eye_uv[pair[0]], eye_uv[pair[1]]
        symmetric = (abs(u1 + u2) <= SYM_U * frame.a and abs(v1 - v2) <= SYM_V * frame.b and u1 * u2 < 0
                     and max(v1, v2) < 0)
        rules["eyes_symmetric"] = symmetric
        if not symmetric:
            for k in pair:
                u, v = eye_uv[k]
                masks["eyes_symmetric"] |= ndimage.binary_dilation(eyes[k], iterations=1)
                masks["eyes_symmetric"] |= _disc((H, W), *frame.xy(-u, v), 1.3 * eye_r)
    else:
        masks["eyes_symmetric"] = masks["two_eyes"].copy()

    # -- mouth
    reds = [c for c in _components(classes["red"]) if (c & head).sum() >= 0.6 * c.sum()
            and c.sum() >= MOUTH_MIN_AREA * H * W]
    eye_v = max((eye_uv[k][1] for k in pair), default=None) if pair is not None else None
    lowest_ok = (eye_v if eye_v is not None else 0.0) + MOUTH_GAP * frame.b
    placed = [frame.uv(*_centroid(c)) for c in reds]
    good = [abs(u) <= MOUTH_U * frame.a and v >= lowest_ok for u, v in placed]
    rules["mouth_below_eyes"] = len(reds) == 1 and good[0]
    if not rules["mouth_below_eyes"]:
        for c, ok in zip(reds, good):
            if not ok or len(reds) > 1:
                masks["mouth_below_eyes"] |= ndimage.binary_dilation(c, iterations=1)
        if not any(good):  # where a mouth should be
            expected = frame.ellipse((H, W), 0.0, max(lowest_ok, 0.5 * frame.b), 0.38 * frame.a, 0.14 * frame.b)
            masks["mouth_below_eyes"] |= expected
    info = {"ellipse_iou": iou, "solidity": solidity, "touches_border": border, "eyes": len(eyes),
            "dark_blobs": len(blobs), "mouths": len(reds), "head_axes_px": (frame.a, frame.b)}
    return CheckResult(rules, masks, info)


def _best_pair(eye_uv: list[tuple[float, float]], frame: HeadFrame) -> tuple[int, int]:
    """The two eyes that best mirror each other (smallest normalised asymmetry)."""
    best, best_cost = (0, 1), math.inf
    for i in range(len(eye_uv)):
        for j in range(i + 1, len(eye_uv)):
            (u1, v1), (u2, v2) = eye_uv[i], eye_uv[j]
            cost = abs(u1 + u2) / frame.a + abs(v1 - v2) / frame.b + (0 if u1 * u2 < 0 else 10)
            if cost < best_cost:
                best, best_cost = (i, j), cost
    return best


# ------------------------------------------------------------------------- beyond the training size
def count_heads(image: np.ndarray, training_size: int) -> int:
    """How many heads a picture holds, at any size: regions (4-connected) of the hole-filled skin mask of at least
    ``MIN_HEAD_FRAC / 4`` of a ``training_size``-px picture's area that hold at least one dark blob (an eye: at least
    ``EYE_AREA[0]`` of a disc of radius ``EYE_RADIUS[0] * training_size / 2``, 60% of it inside the region). That is,
    a head drawn at half the smallest scale :func:`check` counts in a training-size picture still counts; a skin
    smear without an eye does not.

    :func:`check`'s ``one_head`` rule counts skin regions of ``MIN_HEAD_FRAC`` of *this* picture: a picture of
    a model trained at ``training_size`` px, run at 4x that side, that repeats the head in every training-size
    window (DemoFusion's named failure of direct sampling beyond the training size, Du et al., CVPR 2024)
    holds 16 heads of ``1/16`` that area each, which that rule does not see as heads at all. This count does."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"count_heads expects an (H, W, 3) uint8 RGB image, got {image.dtype} {image.shape}")
    if not isinstance(training_size, (int, np.integer)) or training_size < MIN_SIZE:
        raise ValueError(f"training_size must be an int >= {MIN_SIZE} px, got {training_size!r}")
    min_area = MIN_HEAD_FRAC / 4 * training_size**2
    min_eye = EYE_AREA[0] * math.pi * (EYE_RADIUS[0] * training_size / 2) ** 2
    classes = colour_classes(image)
    regions, n = ndimage.label(ndimage.binary_fill_holes(classes["skin"]))  # the skin mask's holes (eyes) filled
    big = np.bincount(regions.ravel(), minlength=n + 1) >= min_area
    dark, n_dark = ndimage.label(classes["dark"])
    # overlap[k, r]: pixels of dark blob k in skin region r; an eye is a blob of eye size with 60% in one region
    overlap = np.bincount(dark.ravel() * (n + 1) + regions.ravel(), minlength=(n_dark + 1) * (n + 1))
    overlap = overlap.reshape(n_dark + 1, n + 1)[1:]
    area = overlap.sum(1)
    eyes = (area >= min_eye)[:, None] & (overlap >= 0.6 * area[:, None])
    return int((big & eyes.any(0))[1:].sum())


def composed(image: np.ndarray, training_size: int) -> tuple[bool, int]:
    """``(passed, heads)``: the composition verdict beyond the training size: :func:`check` passes (one head of
    this picture's scale, elliptical, two symmetric eyes, the mouth below) *and* :func:`count_heads` finds
    exactly one head. At ``training_size`` itself, :func:`check`'s own verdict is what the benchmark uses."""
    heads = count_heads(image, training_size)
    return check(image).passed and heads == 1, heads


def check_batch(images) -> list[CheckResult]:
    return [check(np.asarray(img)) for img in images]


def artifact_rate(images) -> float:
    """Fraction of images that fail at least one rule."""
    results = check_batch(images)
    return sum(not r.passed for r in results) / max(len(results), 1)
