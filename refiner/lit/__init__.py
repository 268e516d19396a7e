"""Lightning wrappers: data module here; the LightningModules live in their own modules of this package."""

from refiner.lit.datamodule import LatentDataModule

__all__ = ["LatentDataModule"]
