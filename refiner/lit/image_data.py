"""Image-folder DataModule for training the first-stage autoencoders.

Map-style data, so Lightning's own DistributedSampler splits it across ranks. Unreadable files
are found in ``setup`` (before any compute), reported with their reason, and left out.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from refiner.data.images import ImageError, list_images, load_image, to_tensor
from refiner.data.shards import fit_size

log = logging.getLogger(__name__)


def _crop(x: torch.Tensor, size: int, random: bool) -> torch.Tensor:
    """Random (torch's global RNG, seeded by Lightning per worker) or centre crop to size x size;
    images smaller than that are edge-padded first."""
    _, h, w = x.shape
    if h < size or w < size:
        ph, pw = max(0, size - h), max(0, size - w)
        x = torch.nn.functional.pad(x[None], (0, pw, 0, ph), mode="replicate")[0]
        _, h, w = x.shape
    if not random:
        top, left = (h - size) // 2, (w - size) // 2
    else:
        top, left = (int(torch.randint(0, n - size + 1, ())) for n in (h, w))
    return x[:, top : top + size, left : left + size]


class ImageFolderDataset(Dataset):
    """``size``: each image is first resized (short side) and centre-cropped to ``size x size`` exactly as
    ``build_shards(size=...)`` does, so that an autoencoder learns the images as the shards will hold them."""

    def __init__(self, files: list[Path], crop_size: int, train: bool, size: int | None = None):
        self.files, self.crop_size, self.train, self.size = files, crop_size, train, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        img = load_image(self.files[index])
        if self.size is not None:
            img, _ = fit_size(img, self.size, 8, "crop", source=self.files[index])
        x = to_tensor(img)
        x = _crop(x, self.crop_size, random=self.train)
        if self.train and bool(torch.rand(()) < 0.5):
            x = x.flip(-1)
        return {"image": x}


def readable_images(spec) -> list[Path]:
    files, bad = [], []
    for f in list_images(spec):
        try:
            load_image(f)
            files.append(f)
        except ImageError as err:
            bad.append(f"{f}: {err}")
    if bad:
        log.warning("skipping %d unreadable image(s):\n  %s", len(bad), "\n  ".join(bad))
    if not files:
        raise ValueError(f"no readable images in {spec!r}")
    return files


class ImageDataModule(pl.LightningDataModule):
    """Args:
    train_dir, val_dir: image folders (or globs).
    crop_size: training crops and validation centre crops are crop_size x crop_size.
    size: None (images as they are) or an int, a multiple of 8: resize the short side to ``size`` and centre-crop
        ``size x size`` before cropping, as ``build_shards(size=...)`` does (``refiner chain`` passes its ``size``).
    batch_size, num_workers: the usual (crops use torch's RNG, seeded by ``seed_everything``).
    """

    def __init__(self, train_dir: str, val_dir: str, crop_size: int = 64, batch_size: int = 8,
                 num_workers: int = 0, size: int | None = None):
        super().__init__()
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 8 or size % 8):
            raise ValueError(f"data.size must be null or a positive multiple of 8, got {size!r}")
        if size is not None and size < crop_size:
            raise ValueError(f"data.size={size} is smaller than data.crop_size={crop_size}")
        self.train_dir, self.val_dir, self.size = train_dir, val_dir, size
        self.crop_size, self.batch_size, self.num_workers = crop_size, batch_size, num_workers

    def setup(self, stage: Optional[str] = None) -> None:
        self.train_set = ImageFolderDataset(readable_images(self.train_dir), self.crop_size, True, self.size)
        self.val_set = ImageFolderDataset(readable_images(self.val_dir), self.crop_size, False, self.size)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)
