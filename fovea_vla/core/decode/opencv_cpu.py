"""``opencv`` image decoder: raw and compressed images on the CPU (the converters of :mod:`fovea_vla.core.frames`).

Always available; ``auto`` falls back to it. Frames stay on the host (``device_rgb`` None): a CUDA
texture uploads them itself through its own pinned buffer.
"""

from __future__ import annotations

import cv2

from fovea_vla.core.decode.base import IMAGE_DECODERS, DecodeConfig, DecodedImage
from fovea_vla.core.frames import compressed_to_rgb, image_to_rgb
from fovea_vla.core.registry import Availability

__all__ = ["OpencvDecoder"]


def _available() -> Availability:
    return True, f"OpenCV {cv2.__version__} on the CPU"


@IMAGE_DECODERS.register("opencv", is_available=_available)
class OpencvDecoder:
    """CPU decoder: :func:`~fovea_vla.core.frames.image_to_rgb` and :func:`~fovea_vla.core.frames.compressed_to_rgb`."""

    name = "opencv"
    device = "cpu"

    def __init__(self, cfg: DecodeConfig | None = None):
        self.max_pixels = (cfg or DecodeConfig()).max_pixels

    def raw(self, data, width: int, height: int, encoding: str, step: int, is_bigendian: bool = False) -> DecodedImage:
        rgb = image_to_rgb(data, width, height, encoding, step, is_bigendian, max_pixels=self.max_pixels)
        return DecodedImage(rgb)

    def compressed(self, data, fmt: str) -> DecodedImage:
        return DecodedImage(compressed_to_rgb(data, fmt, max_pixels=self.max_pixels))
