"""Lightning wrappers: the window denoiser and first-stage modules, their DataModules, checkpoint IO."""

from refiner.lit.checkpoint_io import AtomicCheckpointIO
from refiner.lit.datamodule import LatentDataModule
from refiner.lit.first_stage import FirstStageModule
from refiner.lit.image_data import ImageDataModule
from refiner.lit.window_module import WindowRefiner

__all__ = ["AtomicCheckpointIO", "FirstStageModule", "ImageDataModule", "LatentDataModule", "WindowRefiner"]
