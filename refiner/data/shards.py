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

Reading: ``latent_dataset`` (streaming, webdataset with node/worker splitting) and
``read_all_samples`` (small sets, in memory). Undecodable samples are skipped and counted by a
``SkipCounter`` rather than stopping training.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import math
import os
import shutil
import tempfile
from collections import Counter
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import braceexpand
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch import Tensor
from tqdm import tqdm

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
from refiner.io import atomic_write_text, same_file
from refiner.models.vq import VQModel
from refiner.settings import require_choice, require_int

log = logging.getLogger(__name__)

SHARD_PATTERN = "shard-%06d.tar"
SHARD_GLOB = "shard-*.tar"
MANIFEST = "manifest.json"
LATENT_KEYS = ("z_clean", "z_degraded")
IMAGE_KEYS = ("clean", "degraded")


# ---------------------------------------------------------------------------------------------- building


def _fit_size(img: np.ndarray, size: int | None, multiple: int, fit: str, source: Path | str = "image"
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


def _install_folder(built: Path, out: Path) -> None:
    """Move the complete folder ``built`` to ``out`` (same file system), replacing what was there."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists():
        os.rename(built, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.replaced-", dir=out.parent))
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
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=nearest))
    try:
        writer = wds.ShardWriter(str(tmp_dir / SHARD_PATTERN), maxcount=maxcount_per_shard, verbose=0)

        def fitted() -> Iterator[tuple[int, Path, np.ndarray, dict]]:
            for index, path in enumerate(tqdm(files, desc="building shards", unit="img", disable=not progress)):
                try:
                    img, info = _fit_size(load_image(path), size, multiple, fit, source=path)
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
        if replacing:
            log.warning("%s", replacing)
        _install_folder(tmp_dir, out)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return manifest


def load_manifest(shard_dir: str | os.PathLike) -> dict | None:
    path = Path(shard_dir) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


# ---------------------------------------------------------------------------------------------- reading


def expand_shards(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard paths from a folder (its ``shard-*.tar``, else ``*.tar``), a brace pattern
    (``dir/shard-{000000..000003}.tar``), a glob, or a list of these. Every file must exist.

    Raises:
        FileNotFoundError: naming the missing folder/file and how to create the shards.
    """
    hint = "build the shards first (the data build step, refiner.data.shards.build_shards)"
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    urls: list[str] = []
    for item in specs:
        text = str(item)
        if Path(text).is_dir():
            found = sorted(glob.glob(os.path.join(text, SHARD_GLOB))) or sorted(glob.glob(os.path.join(text, "*.tar")))
            if not found:
                raise FileNotFoundError(f"shard folder {text} contains no .tar shards; {hint}")
            urls += found
        elif "{" in text:
            expanded = list(braceexpand.braceexpand(text))
            missing = [u for u in expanded if not Path(u).is_file()]
            if missing:
                raise FileNotFoundError(f"{len(missing)} shard(s) of {text} do not exist (first: {missing[0]}); {hint}")
            urls += expanded
        elif any(c in text for c in "*?["):
            found = sorted(glob.glob(text))
            if not found:
                raise FileNotFoundError(f"shard pattern {text} matched no files; {hint}")
            urls += found
        elif Path(text).is_file():
            urls.append(text)
        else:
            raise FileNotFoundError(f"shards {text} do not exist; {hint}")
    if not urls:
        raise FileNotFoundError(f"no shards found in {spec}; {hint}")
    return urls


def check_enough_shards(num_shards: int, world_size: int, num_workers: int) -> None:
    """Every (rank, worker) reader needs at least one shard, or it silently yields nothing."""
    readers = world_size * max(1, num_workers)
    if num_shards < readers:
        raise ValueError(
            f"only {num_shards} shard(s) for {world_size} rank(s) x {max(1, num_workers)} dataloader worker(s) = "
            f"{readers} readers; some would get no data. Rebuild with more shards (smaller maxcount_per_shard) "
            f"or use fewer workers (data.num_workers), or mode='deterministic'."
        )


class SkipCounter:
    """webdataset exception handler that skips the bad sample/shard, counts it and logs a warning.

    ``skipped`` is the count, ``reasons`` the first ``keep`` messages. With DataLoader workers each
    worker process has its own copy, so the main process's counter stays at 0; the warnings are
    still logged from the workers.
    """

    def __init__(self, keep: int = 100):
        self.skipped = 0
        self.reasons: list[str] = []
        self.keep = keep

    def __call__(self, exn: BaseException) -> bool:
        self.skipped += 1
        reason = f"{type(exn).__name__}: {exn}"
        if len(self.reasons) < self.keep:
            self.reasons.append(reason)
        log.warning("skipping unreadable shard sample (%d so far): %s", self.skipped, reason)
        return True  # continue with the next sample

    def __repr__(self) -> str:
        return f"SkipCounter(skipped={self.skipped})"


class CorruptShardSample(ValueError):
    """A shard sample is missing an entry or holds something undecodable."""


def _decode_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return np.asarray(img.convert("RGB"))


def decode_sample(sample: dict, keys: Sequence[str] = LATENT_KEYS, images: bool = False) -> dict:
    """Raw webdataset sample -> ``{"__key__", <keys>: float32 (C,h,w), [clean, degraded: (3,H,W) in [-1,1]],
    [txt], [meta]}``. Hand-written instead of ``wds.decode`` so that only the needed entries are
    decoded and shapes/dtypes are validated (a bad entry raises ``CorruptShardSample`` naming shard and key)."""
    where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
    out: dict[str, Any] = {"__key__": sample.get("__key__")}
    entry = "?"
    try:
        for k in keys:
            entry = f"{k}.pth"
            if f"{k}.pth" not in sample:
                raise CorruptShardSample(f"{where} has no {k}.pth entry")
            t = torch.load(io.BytesIO(sample[f"{k}.pth"]), map_location="cpu", weights_only=True)
            if not isinstance(t, Tensor) or t.ndim != 3 or not t.is_floating_point():
                raise CorruptShardSample(f"{where}: {k}.pth is not a float (C, h, w) tensor")
            out[k] = t.float()
        if images:
            for k in IMAGE_KEYS:
                entry = f"{k}.png"
                if f"{k}.png" not in sample:
                    raise CorruptShardSample(f"{where} has no {k}.png entry")
                out[k] = to_tensor(_decode_png(sample[f"{k}.png"]))
        entry = "txt/json"
        if "txt" in sample:
            out["txt"] = sample["txt"].decode("utf-8")
        if "json" in sample:
            out["meta"] = json.loads(sample["json"])
    except CorruptShardSample:
        raise
    except Exception as exn:  # torch/PIL/json decoding errors of a corrupt entry
        first_line = (str(exn).strip().splitlines() or [""])[0]
        raise CorruptShardSample(f"{where}: cannot decode {entry} ({type(exn).__name__}: {first_line})") from exn
    return out


def split_by_rank(src: Iterable, rank: int, world_size: int) -> Iterator:
    """Node splitter with an explicit rank (for tests / launchers without torch.distributed)."""
    yield from islice(src, rank, None, world_size)


def latent_dataset(
    urls: str | Sequence[str],
    shuffle_buffer: int = 1000,
    seed: int = 0,
    resampled: bool = False,
    epoch_length: int | None = None,
    keys: Sequence[str] = LATENT_KEYS,
    images: bool = False,
    counter: SkipCounter | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    shardshuffle: int | bool | None = None,
) -> wds.WebDataset:
    """A webdataset pipeline yielding decoded samples (see ``decode_sample``).

    Shards are split across ranks (``wds.split_by_node``: torch.distributed or RANK/WORLD_SIZE;
    or pass ``rank``/``world_size`` explicitly) and then across DataLoader workers. When
    ``resampled``, rank ``r`` resamples from its own slice ``urls[r::world_size]`` (so ranks never
    draw the same shard), and its workers thin out that rank's random shard draws. Check
    ``check_enough_shards`` first: a reader with no shard yields nothing. Undecodable samples and
    unreadable shards are skipped and counted by ``counter`` (a new ``SkipCounter`` if None,
    available as ``dataset.skip_counter``).

    Args:
        shuffle_buffer: sample shuffle buffer (0: no sample shuffling).
        seed: seed of the shard-order shuffle. The sample shuffle buffer is not seeded: stream
            mode is not reproducible (use the datamodule's deterministic mode for that).
        resampled: draw shards with replacement forever (webdataset ``resampled=True``); then
            ``epoch_length`` (samples per reader per epoch, via ``with_epoch``) should be set.
        shardshuffle: shard shuffle buffer; default ``min(100, len(urls))`` when ``shuffle_buffer``
            > 0, else ``False``. Ignored when resampled.
    """
    counter = counter if counter is not None else SkipCounter()
    url_list = list(braceexpand.braceexpand(urls)) if isinstance(urls, str) else [str(u) for u in urls]
    if shardshuffle is None:
        shardshuffle = min(100, len(url_list)) if shuffle_buffer > 0 else False
    if resampled:
        shardshuffle = False
    if rank is not None or world_size is not None:
        if rank is None or world_size is None or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        nodesplitter = partial(split_by_rank, rank=rank, world_size=world_size)
    else:
        nodesplitter = wds.split_by_node
    if resampled:
        # Splitting a resampled (infinite, random) shard stream by node only thins out the random
        # draws; instead give each rank its own slice of the shard list to resample from.
        if rank is None:
            rank, world_size, _, _ = wds.utils.pytorch_worker_info()
        url_list = url_list[rank::world_size]
        if not url_list:
            raise ValueError(f"rank {rank} of {world_size} has no shard to resample from; see check_enough_shards")
        nodesplitter = None
    ds = wds.WebDataset(
        url_list,
        handler=counter,
        resampled=resampled,
        shardshuffle=shardshuffle,
        nodesplitter=nodesplitter,
        workersplitter=wds.split_by_worker,
        # shard counts are checked up front (check_enough_shards); an all-corrupt reader should be
        # skipped-and-reported, not crash with "No samples found"
        empty_check=False,
        seed=seed,
    )
    ds = ds.map(partial(decode_sample, keys=tuple(keys), images=images), handler=counter)
    if shuffle_buffer > 0:
        ds = ds.shuffle(shuffle_buffer)
    if epoch_length is not None:
        ds = ds.with_epoch(epoch_length)
    ds.skip_counter = counter
    return ds


def read_all_samples(
    urls: str | Sequence[str],
    keys: Sequence[str] = LATENT_KEYS,
    images: bool = False,
    max_samples: int | None = None,
    counter: SkipCounter | None = None,
) -> list[dict]:
    """Every sample of ``urls`` in shard order (no splitting, no shuffling): for validation and the
    deterministic in-memory training mode. Corrupt samples are skipped and counted in ``counter``;
    a summary warning names the samples this call skipped (a counter shared with earlier reads keeps
    counting, but their reasons are not repeated)."""
    counter = counter if counter is not None else SkipCounter()
    skipped_before, reasons_before = counter.skipped, len(counter.reasons)
    url_list = list(braceexpand.braceexpand(urls)) if isinstance(urls, str) else [str(u) for u in urls]
    ds = wds.WebDataset(
        url_list, handler=counter, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False
    ).map(partial(decode_sample, keys=tuple(keys), images=images), handler=counter)
    samples = list(islice(ds, max_samples) if max_samples is not None else ds)
    skipped = counter.skipped - skipped_before  # a shared counter also holds earlier reads' skips: not ours
    if skipped:
        log.warning("read %d samples from %d shard(s) (%s), skipped %d: %s", len(samples), len(url_list),
                    url_list[0] if len(url_list) == 1 else f"{url_list[0]} ...", skipped,
                    counter.reasons[reasons_before:reasons_before + 3])
    return samples


def collate_samples(samples: Sequence[dict], keys: Sequence[str]) -> dict[str, Any]:
    """Stack ``keys`` of equally shaped samples into a batch dict (plus ``__key__`` as a list)."""
    batch: dict[str, Any] = {k: torch.stack([s[k] for s in samples]) for k in keys}
    batch["__key__"] = [s["__key__"] for s in samples]
    return batch
