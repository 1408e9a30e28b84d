"""Float64 NumPy reference of the texture stage: pyramid construction and trilinear sampling.

Slow and simple on purpose; every texture backend is tested against it. Conventions are those of
:mod:`fovea_vla.core.texture.base`.
"""

from __future__ import annotations

import numpy as np

from fovea_vla.core.texture.base import patch_sample_offsets

__all__ = ["bilinear_corners", "reference_pyramid", "reference_sample"]


def reference_pyramid(rgb: np.ndarray, max_levels: int = 64) -> list[np.ndarray]:
    """Mip levels of an image by 2x2 box averaging, odd sizes padded by edge replication.

    Args:
        rgb: (H, W, C) image, any numeric dtype; uint8 is scaled to [0, 1].
        max_levels: most levels returned, level 0 included.

    Returns:
        Levels as (H_k, W_k, C) float64, from full resolution down to 1x1 or ``max_levels``.

    Example:
        >>> [lvl.shape for lvl in reference_pyramid(np.zeros((5, 3, 3), np.uint8))]
        [(5, 3, 3), (3, 2, 3), (2, 1, 3), (1, 1, 3)]
    """
    level = rgb.astype(np.float64)
    if rgb.dtype == np.uint8:
        level /= 255.0
    levels = [level]
    while len(levels) < max_levels and max(level.shape[:2]) > 1:
        h, w = level.shape[:2]
        level = np.pad(level, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        level = 0.25 * (level[0::2, 0::2] + level[1::2, 0::2] + level[0::2, 1::2] + level[1::2, 1::2])
        levels.append(level)
    return levels


def bilinear_corners(height: int, width: int, xs: np.ndarray, ys: np.ndarray):
    """The 2x2 texels a bilinear sample mixes and its weights, at texel coordinates (texel centres at
    integers) clamped to the border.

    Returns:
        (x0, y0, x1, y1) int64 texel indices and (fx, fy) float64 fractions, each shaped like ``xs``.
    """
    xs = np.clip(xs, 0.0, width - 1.0)
    ys = np.clip(ys, 0.0, height - 1.0)
    x0 = np.floor(xs).astype(np.int64)
    y0 = np.floor(ys).astype(np.int64)
    return x0, y0, np.minimum(x0 + 1, width - 1), np.minimum(y0 + 1, height - 1), xs - x0, ys - y0


def _bilinear(level: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Bilinear samples at texel coordinates, clamped to the border."""
    x0, y0, x1, y1, fx, fy = bilinear_corners(*level.shape[:2], xs, ys)
    fx, fy = fx[..., None], fy[..., None]
    top = level[y0, x0] * (1 - fx) + level[y0, x1] * fx
    bottom = level[y1, x0] * (1 - fx) + level[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def reference_sample(levels: list[np.ndarray], centers: np.ndarray, sizes: np.ndarray, patch_size: int) -> np.ndarray:
    """Trilinear patch samples, as the backends compute them.

    Args:
        levels: output of :func:`reference_pyramid`.
        centers: (N, 2) patch centres [px] (x, y), full resolution.
        sizes: (N,) footprints [px].
        patch_size: P samples per side.

    Returns:
        (N, C, P, P) float64.
    """
    centers = np.asarray(centers, dtype=np.float64).reshape(-1, 2)
    sizes = np.asarray(sizes, dtype=np.float64).reshape(-1)
    top = len(levels) - 1
    offsets = patch_sample_offsets(patch_size)
    out = np.empty((centers.shape[0], levels[0].shape[2], patch_size, patch_size))
    for i, ((cx, cy), size) in enumerate(zip(centers, sizes, strict=True)):
        lod = float(np.clip(np.log2(max(size, 1e-6) / patch_size), 0.0, top))
        low = int(np.floor(lod))
        high = min(low + 1, top)
        xs = np.broadcast_to(cx + offsets[None, :] * size, (patch_size, patch_size))
        ys = np.broadcast_to(cy + offsets[:, None] * size, (patch_size, patch_size))
        samples = []
        for k in (low, high):
            scale = 2.0**k
            samples.append(_bilinear(levels[k], (xs + 0.5) / scale - 0.5, (ys + 0.5) / scale - 0.5))
        blended = samples[0] * (1.0 - (lod - low)) + samples[1] * (lod - low)
        out[i] = blended.transpose(2, 0, 1)
    return out
