"""Latent shards: build them once from an image folder, then stream or load them for training.

Building (``build_shards``): every image is made divisible by 8 (the f4 and f8 factors), degraded
by a VQ-f8 round trip (``f8.round_trip``: encode, quantize, decode; the artifact the refiner
learns to remove), and both clean and degraded images are encoded by the VQ-f4 first stage into
*pre-quantization* latents. Training reads only these latents, so the first stage never runs in
the training loop. Each webdataset sample holds::

    __key__          "<index>_<file stem>"   (dots replaced, webdataset splits keys at the first dot)
    clean.png        the clean image (uint8, after resize/crop/pad)
    degraded.png     f8.round_trip(clean), rounded to uint8
    z_clean.pth      f4.encode(clean)          float32 (C, H/4, W/4)
    z_degraded.pth   f4.encode(degraded.png)   float32 (C, H/4, W/4)
    txt              optional caption (sidecar <image>.txt)
    json             source file, original/final size, resized/padded/cropped flags

``z_degraded`` encodes the *uint8-rounded* degraded image, exactly what a refiner sees at
inference when it reads an artifact image from disk.

Reading them for training is :mod:`refiner.data.latents`.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import math
import os
import shutil
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch import Tensor

from refiner.batching import batches_by
from refiner.data.images import (
    ImageError,
    encode_png,
    load_image,
    pad_to_multiple,
    scan_images,
    to_tensor,
    to_uint8,
)
from refiner.errors import InputsFailed, SettingError
from refiner.formats.fingerprint import first_stage_fingerprint
from refiner.io import atomic_write_text, new_folder, same_file
from refiner.models.vq import VQModel
from refiner.progress import progress as progress_bar
from refiner.settings import require_choice, require_int

log = logging.getLogger(__name__)

SHARD_PATTERN = "shard-%06d.tar"
SHARD_GLOB = "shard-*.tar"
MANIFEST = "manifest.json"
LATENT_KEYS = ("z_clean", "z_degraded")
IMAGE_KEYS = ("clean", "degraded")


# ---------------------------------------------------------------------------------------------- building


def fit_size(img: np.ndarray, size: int | None, multiple: int, fit: str, source: Path | str = "image"
              ) -> tuple[np.ndarray, dict]:
    """Resize/centre-crop to ``size`` (if given), then make both sides divisible by ``multiple``; errors name
    ``source``."""
    info = {"original_size": list(img.shape[:2]), "resized": False, "padded": False, "cropped": False}
    if size is not None:
        h, w = img.shape[:2]
        s = size / min(h, w)
        nh, nw = max(size, round(h * s)), max(size, round(w * s))
        if (nh, nw) != (h, w):
            img = np.asarray(Image.fromarray(img).resize((nw, nh), Image.Resampling.LANCZOS))
            info["resized"] = True
        y, x = (nh - size) // 2, (nw - size) // 2
        if (nh, nw) != (size, size):
            img = img[y : y + size, x : x + size]
            info["cropped"] = True
    h, w = img.shape[:2]
    if h % multiple or w % multiple:
        if fit == "crop":
            ch, cw = h - h % multiple, w - w % multiple
            if ch == 0 or cw == 0:
                raise ImageError(f"{source}: image of size {h}x{w} is smaller than {multiple} px; cannot crop to a "
                                 f"multiple of it (fit=pad pads it instead)")
            y, x = (h - ch) // 2, (w - cw) // 2
            img = img[y : y + ch, x : x + cw]
            info["cropped"] = True
        else:
            padded, _ = pad_to_multiple(to_tensor(img), multiple, mode="reflect")
            img = to_uint8(padded)
            info["padded"] = True
    info["size"] = list(img.shape[:2])
    return np.ascontiguousarray(img), info


def _caption_for(path: Path, captions: bool | dict | None) -> str | None:
    if captions is False:
        return None
    if isinstance(captions, dict):
        return captions.get(path.name, captions.get(path.stem))
    sidecar = path.with_suffix(".txt")
    return sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else None


def _tensor_bytes(t: Tensor) -> bytes:
    buf = io.BytesIO()
    torch.save(t.detach().to("cpu", torch.float32).contiguous().clone(), buf)
    return buf.getvalue()


def _sample_key(index: int, path: Path) -> str:
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in path.stem)
    return f"{index:06d}_{stem}"


@torch.no_grad()
def _encode_batch(f4: VQModel, f8: VQModel, clean_u8: list[np.ndarray], device: str) -> dict[str, list]:
    clean = torch.stack([to_tensor(a) for a in clean_u8]).to(device)
    degraded = f8.round_trip(clean).clamp(-1, 1).cpu()
    degraded_u8 = [to_uint8(d) for d in degraded]
    degraded_q = torch.stack([to_tensor(a) for a in degraded_u8]).to(device)
    return {
        "degraded_u8": degraded_u8,
        "z_clean": list(f4.encode(clean).float().cpu()),
        "z_degraded": list(f4.encode(degraded_q).float().cpu()),
    }


def existing_shards(out_dir: str | os.PathLike) -> list[Path]:
    return sorted(Path(out_dir).glob(SHARD_GLOB))


class ShardBuildError(SettingError):
    """A build setting or output folder that cannot work (found before anything is written)."""


class NoReadableImages(InputsFailed, ValueError):
    """Not one image of a split could be read."""


def check_build_settings(size: int | None, fit: str, batch_size: int, maxcount_per_shard: int, multiple: int = 8
                         ) -> None:
    """Raise :class:`ShardBuildError` for a ``fit``, ``size``, ``batch_size`` or ``maxcount_per_shard`` that
    cannot work (``multiple`` is the lcm of the first-stage factors)."""

    require_choice("fit", fit, ("crop", "pad"))
    if size is not None and (require_int("size", size, minimum=1) % multiple):
        raise ShardBuildError(f"size must be a positive multiple of {multiple} (the first-stage factors), got {size}")
    require_int("batch_size", batch_size, minimum=1)
    require_int("maxcount_per_shard", maxcount_per_shard, minimum=1)


def _is_build_leftover(entry: Path) -> bool:
    return entry.name == MANIFEST or entry.match(SHARD_GLOB) or entry.name.startswith(".build-")


def check_shard_output(out_dir: str | os.PathLike, overwrite: bool, image_files: Sequence[Path] = ()) -> str | None:
    """May a shard set be built into ``out_dir``? It must not be an image folder or a file, and must be new,
    empty, or hold only a shard set (``shard-*.tar``, ``manifest.json``), which is replaced only with
    ``overwrite``; a folder holding only a manifest (an unfinished earlier build?) counts as a shard set.

    Returns a note naming what will be replaced (None if nothing), or raises :class:`ShardBuildError` /
    ``FileExistsError`` (existing shard set without ``overwrite``).
    """
    out = Path(out_dir)
    if any(same_file(out, parent) for parent in {f.parent for f in image_files}):
        raise ShardBuildError(f"out_dir {out} must differ from the image folder")
    blocking = next((p for p in (out, *out.parents) if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise ShardBuildError(f"out_dir {out}: {blocking} is a file, not a folder")
    if not out.is_dir():
        return None
    others = sorted(e.name for e in out.iterdir() if not _is_build_leftover(e))
    if others:
        raise ShardBuildError(f"out_dir {out} holds files that are not shards ({', '.join(others[:3])}"
                              f"{', ...' if len(others) > 3 else ''}); build_shards replaces the whole folder, so "
                              "choose a new or empty folder")
    shards, manifest = existing_shards(out), (out / MANIFEST).is_file()
    if not shards and not manifest:
        return None
    what = (f"{len(shards)} shards" + (" and manifest.json" if manifest else " without manifest.json") if shards
            else "only manifest.json, no shards (an earlier build that did not finish?)")
    if not overwrite:
        raise FileExistsError(f"{out} already holds {what}; pass overwrite=true to replace it")
    return f"overwrite=true: replacing {out}, which holds {what}"


# Inside every temporary build folder: who made it (a later build removes the folder once that process is gone)
BUILD_MARKER = ".refiner-build.json"


class ShardDiskFull(InputsFailed):
    """The disk filled up while a split was written (exit 1): the partial build was removed, nothing installed."""


def _building_prefix(out: Path) -> str:
    return f".{out.name}.building-"


def _start_build_folder(out: Path, parent: Path) -> Path:
    """A new temporary build folder for ``out`` in ``parent``, holding the marker that names this process. A disk
    already full here is :class:`ShardDiskFull` (exit 1, one line), with nothing left behind."""
    tmp_dir = None
    try:
        tmp_dir = new_folder(parent, _building_prefix(out))
        marker = {"pid": os.getpid(), "host": socket.gethostname(), "out": str(out.absolute()), "started": time.time()}
        (tmp_dir / BUILD_MARKER).write_text(json.dumps(marker))
    except OSError as err:
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise ShardDiskFull(f"{err.strerror or 'no space left on device'} in {parent} before any shard of {out} was "
                            f"written; {out} is unchanged") from None
    return tmp_dir


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_builds(out: Path, parent: Path) -> list[Path]:
    """Remove the temporary build folders for ``out`` in ``parent`` that an earlier build left behind when it was
    killed (SIGKILL, power loss: its ``finally`` never ran). Only folders of ours are touched: named
    ``.<out>.building-*``, holding :data:`BUILD_MARKER` written for ``out`` on this host by a process that no longer
    runs (a concurrent build's folder is left alone). One warning line per folder removed; returns them."""
    removed = []
    for folder in sorted(parent.glob(_building_prefix(out) + "*")):
        try:
            marker = json.loads((folder / BUILD_MARKER).read_text())
            pid, host, target = int(marker["pid"]), marker["host"], marker["out"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # no readable marker: not provably ours
        if host != socket.gethostname() or target != str(out.absolute()) or _process_alive(pid):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        log.warning("removed %s, left by an earlier build of %s (process %d, no longer running)", folder, out, pid)
        removed.append(folder)
    return removed


def _bytes_in(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _human(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"


def _install_folder(built: Path, out: Path) -> None:
    """Move the complete folder ``built`` to ``out`` (same file system), replacing what was there."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists():
        os.rename(built, out)
        return
    old = new_folder(out.parent, f".{out.name}.replaced-")
    os.replace(out, old)  # onto the empty temp folder
    os.rename(built, out)
    shutil.rmtree(old, ignore_errors=True)


def build_shards(
    image_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    f4: VQModel,
    f8: VQModel,
    size: int | None = None,
    maxcount_per_shard: int = 1000,
    batch_size: int = 8,
    captions: bool | dict | None = None,
    device: str = "cpu",
    fit: str = "crop",
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Turn an image folder into webdataset shards of (clean, f8-degraded, f4 latents) samples.

    Args:
        image_dir: folder / glob / list accepted by ``list_images``; it is only read, never written.
        out_dir: receives ``shard-000000.tar``, ... and ``manifest.json``.
        f4, f8: the first stages (moved to ``device`` and put in eval mode).
        size: if given, resize the short side to ``size`` (LANCZOS) and centre-crop ``size x size``;
            must be a multiple of 8. ``None`` keeps each image's size (latents then vary in shape,
            which the deterministic datamodule refuses; fine for streaming with batch size 1 / val).
        maxcount_per_shard: samples per shard. Use enough shards for ranks x workers in stream mode.
        batch_size: images per first-stage forward; consecutive images of equal size are batched.
        captions: ``None`` -> use a sidecar ``<image>.txt`` when present; ``False`` -> none;
            a dict -> ``{file name or stem: caption}``.
        fit: how a size that is not a multiple of 8 is fixed: ``"crop"`` (centre-crop, default; no
            invented pixels) or ``"pad"`` (reflect-pad bottom/right). The report counts both.
        overwrite: replace an existing shard set in ``out_dir`` (see :func:`check_shard_output`: a folder
            holding anything else is never replaced).

    Returns:
        The manifest dict (also written atomically to ``out_dir/manifest.json``): sample/shard
        counts, shapes, latent channels, first-stage factors, source, padded/cropped/resized
        counts, the skipped images and the ignored non-image files, each with its reason.

    The whole split (shards and manifest) is written into a temporary folder next to ``out_dir`` and
    renamed into place when complete, so a failed or interrupted build leaves neither a partial shard set
    nor an empty ``out_dir`` (nor the parent folders it would have created).

    Raises:
        ShardBuildError / FileExistsError: bad settings or output folder (before anything is written).
        NoReadableImages: not one image could be read (nothing is written).
    """
    multiple = math.lcm(f4.factor, f8.factor)
    check_build_settings(size, fit, batch_size, maxcount_per_shard, multiple)
    files, ignored = scan_images(image_dir)  # clear error for a missing / empty folder, before any compute
    out = Path(out_dir)
    replacing = check_shard_output(out, overwrite, files)

    f4.to(device).eval()
    f8.to(device).eval()
    skipped: list[dict[str, str]] = []
    counts = Counter()
    image_shapes, latent_shapes = Counter(), Counter()
    nearest = next(p for p in (out.parent, *out.parents) if p.exists())
    remove_stale_builds(out, nearest)
    tmp_dir = _start_build_folder(out, nearest)
    writer = None
    try:
        writer = wds.ShardWriter(str(tmp_dir / SHARD_PATTERN), maxcount=maxcount_per_shard, verbose=0)

        def fitted() -> Iterator[tuple[int, Path, np.ndarray, dict]]:
            for index, path in enumerate(progress_bar(files, desc="building shards", unit="img", enabled=progress)):
                try:
                    img, info = fit_size(load_image(path), size, multiple, fit, source=path)
                except ImageError as exn:
                    skipped.append({"file": str(path), "reason": str(exn)})
                    log.warning("skipping %s", exn)
                    continue
                for flag in ("resized", "padded", "cropped"):
                    counts[flag] += info[flag]
                yield index, path, img, info

        def write(pending: list[tuple[int, Path, np.ndarray, dict]]) -> None:
            enc = _encode_batch(f4, f8, [p[2] for p in pending], device)
            for j, (index, path, clean_u8, info) in enumerate(pending):
                sample = {
                    "__key__": _sample_key(index, path),
                    "clean.png": encode_png(clean_u8),
                    "degraded.png": encode_png(enc["degraded_u8"][j]),
                    "z_clean.pth": _tensor_bytes(enc["z_clean"][j]),
                    "z_degraded.pth": _tensor_bytes(enc["z_degraded"][j]),
                    "json": json.dumps({"source": str(path), **info}).encode(),
                }
                caption = _caption_for(path, captions)
                if caption is not None:
                    sample["txt"] = caption
                    counts["captions"] += 1
                writer.write(sample)
                counts["samples"] += 1
                image_shapes["x".join(map(str, info["size"]))] += 1
                latent_shapes["x".join(map(str, enc["z_clean"][j].shape))] += 1

        for pending in batches_by(fitted(), batch_size, key=lambda item: item[2].shape):
            write(pending)
        writer.close()
        if counts["samples"] == 0:
            reasons = "; ".join(s["reason"] for s in skipped[:5])
            raise NoReadableImages(f"no readable images in {image_dir} ({len(skipped)} files failed: {reasons})")
        names = [shard.name for shard in sorted(tmp_dir.glob(SHARD_GLOB))]
        manifest = {
            "format": "refiner-latent-shards/1",
            "num_samples": counts["samples"],
            "num_shards": len(names),
            "shards": names,
            "source_dir": str(image_dir if isinstance(image_dir, (list, tuple)) else Path(image_dir).resolve()),
            "num_images_found": len(files),
            "image_shapes": dict(image_shapes),
            "latent_shapes": dict(latent_shapes),
            "latent_channels": f4.embed_dim,
            "latent_format": "torch .pth float32 (C, h, w), pre-quantization f4.encode",
            "first_stage_factors": {"f4": f4.factor, "f8": f8.factor},
            # refiner.formats.fingerprint: training records the f4 one in every window checkpoint
            "first_stage_fingerprints": {"f4": first_stage_fingerprint(f4), "f8": first_stage_fingerprint(f8)},
            "size": size,
            "fit": fit,
            "resized": counts["resized"],
            "padded": counts["padded"],
            "cropped": counts["cropped"],
            "captions": counts["captions"],
            "skipped": skipped,  # images that could not be read or sized, with the reason
            "ignored": ignored,  # entries of the image folder/glob that are not images PIL can open
        }
        atomic_write_text(tmp_dir / MANIFEST, json.dumps(manifest, indent=2, default=str))
        (tmp_dir / BUILD_MARKER).unlink()
        if replacing:
            log.warning("%s", replacing)
        _install_folder(tmp_dir, out)
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        written = _bytes_in(tmp_dir)
        where = err.filename or getattr(writer, "fname", None) or tmp_dir
        raise ShardDiskFull(f"{err.strerror or 'no space left on device'} writing {where}: {_human(written)} of "
                            f"shards for {out} had been written; the partial build is removed and {out} is "
                            "unchanged") from None
    finally:
        if writer is not None and getattr(writer, "tarstream", None) is not None:
            with contextlib.suppress(OSError, ValueError):
                writer.close()
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return manifest


def load_manifest(shard_dir: str | os.PathLike) -> dict | None:
    path = Path(shard_dir) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


# ---------------------------------------------------------------------------------------------- reading
