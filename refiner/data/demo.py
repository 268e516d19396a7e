"""Demo image folders built from photos that scikit-image and scikit-learn ship (nothing is downloaded).

Training images are random square crops of the training photos at a few scales, resized to
``crop_size`` (PIL LANCZOS), each also stored horizontally flipped. Validation images come from the
held-out photos only: with ``val_crops > 0`` that many crops drawn the same way as the training crops
(so validation measures the same kind of image), else one whole view per photo, resized so the short
side is ``2 * crop_size`` and centre-cropped to a multiple of 8. Deterministic given ``seed``.

    python -m refiner.data.demo OUT_DIR [--crop-size 64] [--crops-per-photo 16] [--val-crops 8] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from refiner.data.images import save_png_atomic
from refiner.progress import progress as progress_bar

SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
SKLEARN_PHOTOS = ("china", "flower")
PHOTO_NAMES = SKIMAGE_PHOTOS + SKLEARN_PHOTOS
DEFAULT_VAL_PHOTOS = ("chelsea", "flower")


def demo_photos(names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """The shipped colour photos as ``{name: (H, W, 3) uint8}`` (all of ``PHOTO_NAMES`` by default)."""
    names = list(PHOTO_NAMES if names is None else names)
    unknown = sorted(set(names) - set(PHOTO_NAMES))
    if unknown:
        raise ValueError(f"unknown demo photo(s) {unknown}; available: {', '.join(PHOTO_NAMES)}")
    photos: dict[str, np.ndarray] = {}
    if any(n in SKIMAGE_PHOTOS for n in names):
        import skimage.data

        for n in names:
            if n in SKIMAGE_PHOTOS:
                photos[n] = np.ascontiguousarray(getattr(skimage.data, n)(), dtype=np.uint8)
    if any(n in SKLEARN_PHOTOS for n in names):
        from sklearn.datasets import load_sample_images

        bunch = load_sample_images()
        for fname, img in zip(bunch.filenames, bunch.images):
            n = Path(fname).stem
            if n in names:
                photos[n] = np.ascontiguousarray(img, dtype=np.uint8)
    return {n: photos[n] for n in names}


def _resize(img: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(img).resize(size_wh, Image.Resampling.LANCZOS))


def random_crops(
    photo: np.ndarray, crop_size: int, count: int, rng: np.random.Generator, scales: Sequence[float]
) -> list[np.ndarray]:
    """``count`` random square crops whose side is ``scale * short_side`` (at least ``crop_size``),
    cycling through ``scales``, each resized to ``crop_size``."""
    h, w = photo.shape[:2]
    short = min(h, w)
    crops = []
    for i in range(count):
        side = int(min(short, max(crop_size, round(short * scales[i % len(scales)]))))
        y = int(rng.integers(0, h - side + 1))
        x = int(rng.integers(0, w - side + 1))
        crops.append(_resize(photo[y : y + side, x : x + side], (crop_size, crop_size)))
    return crops


def validation_view(photo: np.ndarray, short_side: int, multiple: int = 8) -> np.ndarray:
    """Resize so the short side is ``short_side``, then centre-crop both sides to a multiple of ``multiple``."""
    h, w = photo.shape[:2]
    s = short_side / min(h, w)
    nh, nw = max(multiple, round(h * s)), max(multiple, round(w * s))
    img = _resize(photo, (nw, nh))
    ch, cw = nh - nh % multiple, nw - nw % multiple
    y, x = (nh - ch) // 2, (nw - cw) // 2
    return np.ascontiguousarray(img[y : y + ch, x : x + cw])


def build_demo_images(
    out_dir: str | os.PathLike,
    crop_size: int = 64,
    crops_per_photo: int = 16,
    val_photos: Sequence[str] = DEFAULT_VAL_PHOTOS,
    seed: int = 0,
    scales: Sequence[float] = (0.2, 0.35, 0.6, 1.0),
    photos: Sequence[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    val_crops: int = 0,
) -> dict[str, int]:
    """Write ``out_dir/train/*.png`` (crops + flips) and ``out_dir/val/*.png`` (whole held-out photos).

    Args:
        crop_size: side of the training crops; a multiple of 8.
        crops_per_photo: random crops per training photo (each is also written flipped).
        val_photos: photos held out for validation (never cropped into the training set).
        seed: crops are a function of (seed, photo name) only, so subsets give the same crops.
        scales: crop side as a fraction of the photo's short side, cycled per crop.
        photos: restrict to these photo names (default: all of ``PHOTO_NAMES``).
        overwrite: replace PNGs of an earlier build; otherwise an existing build is an error.
        val_crops: crops per held-out photo (``val/{name}_{i:03d}.png``); 0 = one whole view (``val/{name}.png``).

    Returns:
        ``{"train": number of training files, "val": number of validation files}``.
    """
    if crop_size < 8 or crop_size % 8:
        raise ValueError(f"crop_size must be a positive multiple of 8, got {crop_size}")
    if crops_per_photo < 1:
        raise ValueError(f"crops_per_photo must be >= 1, got {crops_per_photo}")
    names = list(PHOTO_NAMES if photos is None else photos)
    out = Path(out_dir)
    train_dir, val_dir = out / "train", out / "val"
    existing = [p for d in (train_dir, val_dir) if d.is_dir() for p in d.glob("*.png")]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds demo images ({len(existing)} PNGs); pass overwrite=True to rebuild")
    for p in existing:
        p.unlink()

    images = demo_photos(names)
    counts = {"train": 0, "val": 0}
    for name in progress_bar(names, desc="demo photos", enabled=progress):
        photo = images[name]
        rng = np.random.default_rng([seed, PHOTO_NAMES.index(name)])
        if name in val_photos:
            views = random_crops(photo, crop_size, val_crops, rng, scales) if val_crops else [
                validation_view(photo, 2 * crop_size)]
            for i, view in enumerate(views):
                save_png_atomic(val_dir / (f"{name}_{i:03d}.png" if val_crops else f"{name}.png"), view)
            counts["val"] += len(views)
            continue
        for i, crop in enumerate(random_crops(photo, crop_size, crops_per_photo, rng, scales)):
            save_png_atomic(train_dir / f"{name}_{i:03d}.png", crop)
            save_png_atomic(train_dir / f"{name}_{i:03d}_flip.png", np.ascontiguousarray(crop[:, ::-1]))
            counts["train"] += 2
    return counts


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--crop-size", type=int, default=64)
    parser.add_argument("--crops-per-photo", type=int, default=16)
    parser.add_argument("--val-crops", type=int, default=8, help="crops per held-out photo; 0: one whole view")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-photos", nargs="*", default=list(DEFAULT_VAL_PHOTOS))
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    counts = build_demo_images(
        args.out_dir, crop_size=args.crop_size, crops_per_photo=args.crops_per_photo,
        val_photos=args.val_photos, seed=args.seed, overwrite=args.overwrite, val_crops=args.val_crops,
    )
    print(f"wrote {counts['train']} training and {counts['val']} validation images to {args.out_dir}")


if __name__ == "__main__":
    main()
