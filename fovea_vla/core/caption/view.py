"""The foveated view a captioner looks at, and when it has changed enough to describe again.

A vision-language model spends its tokens where the image is: a whole 1080p frame at full resolution
costs thousands of image tokens. The view mirrors the pipeline's own sampling instead: a
high-resolution square crop centred on the fixation (the fovea) and the whole frame at low
resolution (the periphery), two small images that a model like SmolVLM reads as one prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from fovea_vla.core._validation import is_int, is_real

__all__ = ["FoveatedView", "ViewConfig", "compose_view", "view_difference", "view_signature"]

_SIGNATURE_SIZE = (64, 48)  # (width, height) of the scene thumbnail
_SIGNATURE_CELL = 8  # [thumbnail px] side of the cells whose changes are compared


@dataclass(frozen=True, kw_only=True)
class ViewConfig:
    """How the foveated view is cut from a frame.

    Attributes:
        fovea_fraction: side of the square fovea crop as a fraction of the image's shorter side (0, 1].
        fovea_size: [px] side of the fovea crop after resizing (the model's input size is a good choice).
        periphery_size: [px] longest side of the downscaled whole frame.
    """

    fovea_fraction: float = 0.4
    fovea_size: int = 384
    periphery_size: int = 384

    def __post_init__(self):
        if not (is_real(self.fovea_fraction) and 0.0 < self.fovea_fraction <= 1.0):
            raise ValueError(f"fovea_fraction={self.fovea_fraction!r}: must be in (0, 1]")
        for name in ("fovea_size", "periphery_size"):
            value = getattr(self, name)
            if not (is_int(value) and 16 <= value <= 4096):
                raise ValueError(f"{name}={value!r}: must be an integer in [16, 4096] px")


@dataclass(frozen=True)
class FoveatedView:
    """Two RGB images of one frame.

    Attributes:
        fovea: ``(S, S, 3)`` uint8, the crop around the fixation resized to ``fovea_size``.
        periphery: ``(h, w, 3)`` uint8, the whole frame with its longest side ``periphery_size``.
        region: ``(x, y, width, height)`` [px] of the crop in the source image.
        source_size: ``(width, height)`` [px] of the source image.
    """

    fovea: np.ndarray
    periphery: np.ndarray
    region: tuple[int, int, int, int]
    source_size: tuple[int, int]


def _to_host(image) -> np.ndarray:
    """A NumPy array from a NumPy array or a (possibly CUDA) torch tensor."""
    if isinstance(image, np.ndarray):
        return image
    return image.detach().to("cpu").numpy()


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    shrinking = width <= image.shape[1] and height <= image.shape[0]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(image), (width, height), interpolation=interpolation)


def compose_view(rgb, fixation_xy: tuple[float, float], cfg: ViewConfig) -> FoveatedView:
    """The fovea crop at ``fixation_xy`` [px] (kept inside the image) and the downscaled periphery.

    Args:
        rgb: ``(H, W, 3)`` uint8 RGB, a NumPy array or a torch tensor (only the crop and a strided
            copy of the frame leave the device).
        fixation_xy: where the pipeline looks [px]; non-finite values mean the image centre.
        cfg: sizes.
    """
    height, width = int(rgb.shape[0]), int(rgb.shape[1])
    if height < 1 or width < 1 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb has shape {tuple(rgb.shape)}: expected (H, W, 3) with H, W >= 1")
    side = max(1, min(round(cfg.fovea_fraction * min(width, height)), width, height))
    x, y = fixation_xy
    x = x if np.isfinite(x) else (width - 1) / 2.0
    y = y if np.isfinite(y) else (height - 1) / 2.0
    left = int(np.clip(round(x - side / 2.0), 0, width - side))
    top = int(np.clip(round(y - side / 2.0), 0, height - side))
    fovea = _resize(_to_host(rgb[top : top + side, left : left + side]), cfg.fovea_size, cfg.fovea_size)

    scale = cfg.periphery_size / max(width, height)
    out_w, out_h = max(1, round(width * scale)), max(1, round(height * scale))
    # Subsample before leaving the device: at most 2x the output size, then area-average on the host.
    stride = max(1, int(1.0 / scale) // 2) if scale < 1.0 else 1
    periphery = _resize(_to_host(rgb[::stride, ::stride]), out_w, out_h)
    return FoveatedView(fovea=fovea, periphery=periphery, region=(left, top, side, side), source_size=(width, height))


def view_signature(view: FoveatedView) -> np.ndarray:
    """A small grey thumbnail of the whole frame (the periphery), float32 grey levels 0-255.

    The scene, not the gaze: a saccade across a still scene changes the fovea crop but not this.
    """
    grey = cv2.cvtColor(np.ascontiguousarray(view.periphery), cv2.COLOR_RGB2GRAY)
    return cv2.resize(grey, _SIGNATURE_SIZE, interpolation=cv2.INTER_AREA).astype(np.float32)


def view_difference(a: np.ndarray, b: np.ndarray) -> float:
    """How much the scene changed between two signatures [grey levels]: the largest mean absolute
    difference over a grid of cells.

    Thumbnails average away sensor noise and compression artefacts, and the per-cell maximum keeps a
    small moving object from being averaged away by a still background.
    """
    rows, columns = _SIGNATURE_SIZE[1] // _SIGNATURE_CELL, _SIGNATURE_SIZE[0] // _SIGNATURE_CELL
    cells = np.abs(a - b).reshape(rows, _SIGNATURE_CELL, columns, _SIGNATURE_CELL)
    return float(cells.mean(axis=(1, 3)).max())
