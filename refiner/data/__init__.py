"""Data: image I/O (``images``), offline demo photos (``demo``), latent shards (``shards``)."""

from refiner.data.images import (
    ImageError,
    crop_to,
    list_images,
    load_image,
    pad_to_multiple,
    save_png_atomic,
    to_tensor,
    to_uint8,
)

__all__ = [
    "ImageError", "crop_to", "list_images", "load_image", "pad_to_multiple", "save_png_atomic", "to_tensor",
    "to_uint8",
]
