"""Image files <-> arrays <-> tensors, with the conversions every entry point needs.

* ``load_image``: any PIL-readable file -> ``(H, W, 3) uint8`` RGB, EXIF orientation applied.
* ``scan_images`` / ``list_images``: folder / glob / file / list of these -> sorted image paths (every format
  PIL can open), plus every file that was passed over and why.
* ``to_tensor`` / ``to_uint8``: uint8 ``[0, 255]`` <-> float ``[-1, 1]`` (the first stage's range).
* ``pad_to_multiple`` / ``crop_to``: make sizes divisible by the first-stage factor and undo it.
* ``save_png_atomic``: write a PNG without ever leaving a half-written file or clobbering an input.
"""

from __future__ import annotations

import glob
import io
import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from PIL.PngImagePlugin import PngInfo

from refiner.io import atomic_write_bytes, file_id

Image.init()
# Extensions of every format this PIL can open (GIF, TGA, PPM, ICO, ... as well as PNG/JPEG/WebP/TIFF/BMP).
IMAGE_EXTENSIONS = tuple(sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN))


class ImageError(ValueError):
    """An image file could not be read or converted (the message names the file and the reason)."""


# ---------------------------------------------------------------------------------------------- loading


def _composite_on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _high_depth_gray_to_uint8(img: Image.Image) -> np.ndarray:
    """Scale a 16/32-bit integer or float greyscale image to uint8.

    Integer modes (``I;16*``, ``I``) are read as 16-bit data (what 16-bit PNG/TIFF give) and
    mapped 0..65535 -> 0..255. Float (``F``) data is read as [0, 1] when its maximum is <= 1
    (the usual float-TIFF convention), otherwise as [0, 255]; values outside are clipped.
    """
    a = np.asarray(img)
    if img.mode == "F":
        a = a.astype(np.float64)
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
        scale = 255.0 if a.size and a.max() <= 1.0 else 1.0
        return np.clip(np.rint(a * scale), 0, 255).astype(np.uint8)
    a = np.clip(a.astype(np.float64), 0, 65535)
    return np.rint(a / 257.0).astype(np.uint8)


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode == "P" or mode == "PA":
        has_alpha = mode == "PA" or "transparency" in img.info
        return np.asarray(_composite_on_white(img) if has_alpha else img.convert("RGB"))
    if mode in ("RGBA", "LA", "RGBa", "La") or (mode in ("L", "RGB") and "transparency" in img.info):
        return np.asarray(_composite_on_white(img))
    if mode.startswith("I;16") or mode in ("I", "F"):
        gray = _high_depth_gray_to_uint8(img)
        return np.repeat(gray[..., None], 3, axis=2)
    # L, 1, CMYK, YCbCr, LAB, HSV, RGB: PIL's own conversions
    return np.asarray(img.convert("RGB"))


def image_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """``(H, W)`` from the file header (no decoding), or None if PIL cannot open it."""
    try:
        with Image.open(path) as img:
            w, h = img.size
        return h, w
    except Exception:  # reported properly by load_image later
        return None


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as ``(H, W, 3) uint8`` RGB.

    Transparent images (RGBA, LA, palette with transparency) are composited over white;
    greyscale (L, I;16, I, F), palette and CMYK are converted to RGB; EXIF orientation is applied.

    Raises:
        ImageError: the file is missing, empty, truncated, not an image, or has zero size.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()  # force decoding here, so truncated files fail inside this try
            img = ImageOps.exif_transpose(img)
            arr = _to_rgb_array(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exn:
        reason = "empty file" if path.is_file() and path.stat().st_size == 0 else f"{type(exn).__name__}: {exn}"
        raise ImageError(f"cannot read image {path}: {reason}") from exn
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageError(f"cannot read image {path}: unexpected decoded shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.uint8)


def why_not_image(path: Path) -> str | None:
    """None if ``path`` is an image file PIL can open (by its extension, else by reading its header), else
    the reason it is passed over. Whether it also *decodes* is :func:`load_image`'s business."""
    if not path.is_file():
        return "a folder (not searched; use a glob with ** to include subfolders)" if path.is_dir() else "not a file"
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return None
    try:
        with Image.open(path):
            return None
    except Image.DecompressionBombError:
        return None  # an image; load_image reports it
    except (OSError, SyntaxError, ValueError) as exn:
        return f"not an image PIL can open ({type(exn).__name__})"


def scan_images(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[list[Path], list[dict[str, str]]]:
    """Expand ``spec`` to a sorted, de-duplicated list of image files, and list everything passed over.

    ``spec`` is a folder (its direct children), a glob pattern (``**`` allowed), a single file, or a list of
    any of these. An image is any file PIL can open: a known extension (:data:`IMAGE_EXTENSIONS`, any case)
    or, for other names, a header PIL recognises. Returns ``(images, ignored)`` where ``ignored`` holds
    ``{"file", "reason"}`` for every other entry of a folder or glob, so callers can report them.

    Raises:
        FileNotFoundError: a folder/file does not exist or a pattern matches nothing.
        ValueError: a single file given by name is not an image, or the spec as a whole yields no image.
    """
    specs: Iterable = [spec] if isinstance(spec, (str, os.PathLike)) else spec
    found: set[Path] = set()
    ignored: dict[Path, str] = {}

    def consider(candidates: Iterable[Path]) -> None:
        for p in candidates:
            reason = why_not_image(p)
            if reason is None:
                found.add(p)
            else:
                ignored[p] = reason

    for item in specs:
        text = str(item)
        path = Path(text).expanduser()
        if any(ch in text for ch in "*?["):
            matches = [Path(m) for m in glob.glob(os.path.expanduser(text), recursive=True)]
            if not matches:
                raise FileNotFoundError(f"image pattern {text!r} matched no files")
            consider(matches)
        elif path.is_dir():
            consider(path.iterdir())
        elif path.is_file():
            reason = why_not_image(path)
            if reason is not None:
                raise ValueError(f"{path} is not an image file: {reason}")
            found.add(path)
        else:
            raise FileNotFoundError(f"image folder or file {text!r} does not exist")
    if not found:
        passed = f" ({len(ignored)} other entries, e.g. {next(iter(ignored))}: {next(iter(ignored.values()))})" \
            if ignored else ""
        raise ValueError(f"no image files found in {spec!r}{passed}")
    skipped = [{"file": str(p), "reason": r} for p, r in sorted(ignored.items()) if p not in found]
    return sorted(found), skipped


def list_images(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The image files of :func:`scan_images` (without the report of what was passed over)."""
    return scan_images(spec)[0]


# ---------------------------------------------------------------------------------------------- tensors


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """``(H, W, 3) uint8`` -> ``(3, H, W) float32`` in [-1, 1] (x / 127.5 - 1)."""
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 array, got {img.shape} {img.dtype}")
    return unit_from_uint8(torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1))


def unit_from_uint8(t: torch.Tensor) -> torch.Tensor:
    """uint8 ``[0, 255]`` (any shape) -> float32 ``[-1, 1]``, ``x / 127.5 - 1``, with one float buffer (no temporaries)."""
    return t.float().div_(127.5).sub_(1.0)


def to_uint8(t: torch.Tensor) -> np.ndarray:
    """``(3, H, W)`` float in [-1, 1] -> ``(H, W, 3) uint8`` (clamped, rounded): inverse of ``to_tensor``."""
    if t.ndim != 3 or t.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) tensor, got shape {tuple(t.shape)}")
    # clamp makes the one float copy; the rest runs in place on it (same values as out-of-place, less memory)
    x = t.detach().float().cpu().clamp(-1, 1).add_(1.0).mul_(127.5).round_().to(torch.uint8)
    return x.permute(1, 2, 0).contiguous().numpy()


def pad_to_multiple(x: torch.Tensor, multiple: int, mode: str = "reflect",
                    min_size: tuple[int, int] = (0, 0)) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad the bottom/right of ``(..., C, H, W)`` so H and W are divisible by ``multiple`` and at least ``min_size``
    (a ``(H, W)`` that is itself a multiple; some models cannot take a single ``multiple`` block,
    :mod:`refiner.inference.min_size`).

    Returns ``(padded, (H, W))``; ``crop_to(padded, (H, W))`` restores the input exactly.
    Padding goes at the bottom/right only so that cropping back is a plain slice.

    ``mode="reflect"`` mirrors the border without repeating the edge pixel (fewer seams for the
    autoencoder than zeros). Reflection needs each pad to be smaller than that side (a 3-pixel
    image cannot be reflected by 5), so for such tiny images it falls back to ``"replicate"``
    (repeat the edge pixel). Other modes: "replicate", "constant" (zeros).
    """
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    if x.ndim < 3:
        raise ValueError(f"expected a (..., C, H, W) tensor, got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    ph, pw = max((-h) % multiple, min_size[0] - h), max((-w) % multiple, min_size[1] - w)
    if ph == 0 and pw == 0:
        return x, (h, w)
    if mode == "reflect" and (ph >= h or pw >= w):
        mode = "replicate"
    lead = x.shape[:-3]
    x4 = x.reshape(-1, *x.shape[-3:])
    padded = F.pad(x4, (0, pw, 0, ph), mode=mode)
    return padded.reshape(*lead, *padded.shape[-3:]), (h, w)


def crop_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Keep the top-left ``size = (H, W)`` of ``(..., H', W')``: undoes ``pad_to_multiple``."""
    h, w = size
    if h > x.shape[-2] or w > x.shape[-1]:
        raise ValueError(f"cannot crop {tuple(x.shape[-2:])} to the larger size {(h, w)}")
    return x[..., :h, :w]


class PaddedImages:
    """Same-size ``(H, W, 3)`` uint8 images seen as the batch ``pad_to_multiple(stack([to_tensor(img)]), multiple,
    mode)``, (B, 3, H', W') in [-1, 1] padded at the bottom/right, but held as uint8 (3 bytes a pixel instead of 12)
    and converted to float one crop at a time (:meth:`crop`), so a tiled encoder never needs the image-sized float
    batch.

    The padding is :func:`pad_to_multiple` itself, applied to the uint8 pixels. Reflect and replicate padding copy
    pixel values, so padding before or after the conversion gives the same floats. ``"constant"`` pads zeros in
    [-1, 1], which no uint8 value maps to (127.5), so :meth:`crop` writes those zeros after the conversion.
    ``size`` is the unpadded ``(H, W)``.
    """

    def __init__(self, images: Sequence[np.ndarray], multiple: int, mode: str = "reflect",
                 device: str | torch.device = "cpu", min_size: tuple[int, int] = (0, 0)):
        if not len(images):
            raise ValueError("no images given")
        for img in images:
            if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
                raise ValueError(f"expected (H, W, 3) uint8 arrays, got {img.shape} {img.dtype}")
        if any(img.shape != images[0].shape for img in images):
            raise ValueError(f"images of one batch must share one size, got {sorted({img.shape for img in images})}")
        # a view of one image (no copy; read only); a batch is stacked. A read-only or strided array is copied
        # first, since torch refuses to wrap read-only memory
        views = [torch.from_numpy(img if img.flags.writeable and img.flags.c_contiguous else np.array(img))
                 .permute(2, 0, 1) for img in images]
        u8 = (views[0][None] if len(views) == 1 else torch.stack(views)).to(device)
        self.pixels, self.size = pad_to_multiple(u8, multiple, mode=mode, min_size=min_size)
        self.constant = mode == "constant"

    @property
    def shape(self) -> torch.Size:
        """``(B, 3, H', W')`` of the padded batch."""
        return self.pixels.shape

    def crop(self, rows: slice = slice(None), cols: slice = slice(None)) -> torch.Tensor:
        """The padded float batch's ``[..., rows, cols]`` (float32, contiguous NCHW), converted from uint8 now."""
        x = unit_from_uint8(self.pixels[..., rows, cols].contiguous())
        if self.constant:
            (h, w), (full_h, full_w) = self.size, self.shape[-2:]
            top, left = rows.indices(full_h)[0], cols.indices(full_w)[0]
            x[..., max(h - top, 0):, :] = 0.0
            x[..., max(w - left, 0):] = 0.0
        return x

    def full(self) -> torch.Tensor:
        """The whole padded float batch."""
        return self.crop()


# ---------------------------------------------------------------------------------------------- saving


def encode_png(img: np.ndarray, text: Mapping[str, str] | None = None) -> bytes:
    """``(H, W, 3) uint8`` (RGB) or ``(H, W) uint8`` (greyscale, mode L) -> PNG bytes, with optional ``text``
    chunks (tEXt, written before the image data)."""
    if img.dtype != np.uint8 or not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)):
        raise ValueError(f"expected an (H, W, 3) or (H, W) uint8 array, got {img.shape} {img.dtype}")
    info = None
    if text:
        info = PngInfo()
        for key, value in text.items():
            info.add_text(key, value)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def save_png_atomic(path: str | os.PathLike, img: np.ndarray, protect: Iterable[str | os.PathLike] = (),
                    text: Mapping[str, str] | None = None) -> Path:
    """Write ``img`` as a PNG (with optional ``text`` chunks) at ``path`` atomically (temp file + rename,
    via ``refiner.io``).

    Raises:
        ValueError: ``path`` is one of the ``protect`` paths (e.g. the input images; compared by inode, so
            links count), so an output setting can never overwrite a source file.
    """
    path = Path(path)
    target = file_id(path)  # a path that does not exist yet cannot be an input
    if target is not None and any(file_id(p) == target for p in protect):
        raise ValueError(f"refusing to overwrite input image {path} (choose an output folder different from the inputs)")
    atomic_write_bytes(path, encode_png(img, text))
    return path
