"""Networks: the CompVis-layout denoiser UNet and the taming-based VQ first stage."""

from refiner.models.unet import UNetModel
from refiner.models.vq import VQModel

__all__ = ["UNetModel", "VQModel"]
