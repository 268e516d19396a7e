"""Networks: the CompVis-layout denoiser UNet and the taming-based VQ first stage."""

from refiner.models.vq import VQModel

try:  # the UNet module is added separately; keep VQModel importable on its own
    from refiner.models.unet import UNetModel
except ImportError:  # pragma: no cover
    UNetModel = None

__all__ = ["UNetModel", "VQModel"]
