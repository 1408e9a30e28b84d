"""Middlebury colour coding of optical flow (Baker et al., "A Database and Evaluation Methodology
for Optical Flow", IJCV 2011).

Hue encodes the direction and saturation the magnitude: zero flow is white, and a vector of the
normalising magnitude takes the full colour of its direction on a 55-entry wheel (red -> yellow ->
green -> cyan -> blue -> magenta, with the segment lengths 15, 6, 4, 11, 13, 6 of the Middlebury
``colorcode.cpp``). Longer vectors are darkened to 75 %. With u right and v down, flow to the
right is red, down is yellow, left is cyan and up is blue-violet.
"""

from __future__ import annotations

import numpy as np

from fovea_vla.core.flow.base import FLOW_UNKNOWN_THRESHOLD

__all__ = ["colorwheel", "flow_to_color"]

# Middlebury wheel segments: red-yellow, yellow-green, green-cyan, cyan-blue, blue-magenta, magenta-red.
_SEGMENTS = (15, 6, 4, 11, 13, 6)


def colorwheel() -> np.ndarray:
    """The 55 Middlebury wheel colours.

    Returns:
        (55, 3) float64 RGB in [0, 255]; entry 0 is the colour of flow pointing right, and the
        entries follow the direction clockwise on screen (right, down, left, up).

    >>> wheel = colorwheel()
    >>> wheel.shape, wheel[0].tolist(), wheel[15].tolist(), wheel[25].tolist()
    ((55, 3), [255.0, 0.0, 0.0], [255.0, 255.0, 0.0], [0.0, 255.0, 255.0])
    """
    wheel = np.zeros((sum(_SEGMENTS), 3))
    start = 0
    # Each segment ramps one channel up or down while another stays at 255.
    for (channel, rising, steady), length in zip(
        ((1, True, 0), (0, False, 1), (2, True, 1), (1, False, 2), (0, True, 2), (2, False, 0)), _SEGMENTS, strict=True
    ):
        ramp = np.floor(255 * np.arange(length) / length)
        wheel[start : start + length, steady] = 255
        wheel[start : start + length, channel] = ramp if rising else 255 - ramp
        start += length
    return wheel


def flow_to_color(flow: np.ndarray, max_magnitude: float | None = None) -> np.ndarray:
    """Middlebury colour image of a flow field.

    Args:
        flow: (H, W, 2) float ``(u, v)`` in pixels, u right and v down. Unknown vectors
            (non-finite or |value| > 1e9, as in .flo ground truth) are drawn black.
        max_magnitude: magnitude drawn at full saturation; None = the largest known magnitude
            of this field (an all-zero field is drawn white).

    Returns:
        (H, W, 3) uint8 RGB image.

    >>> f = np.array([[[0.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [np.nan, 0.0]]], np.float32)
    >>> flow_to_color(f).tolist()
    [[[255, 255, 255], [255, 0, 0], [0, 209, 255], [0, 0, 0]]]
    """
    if flow.ndim != 3 or flow.shape[2] != 2:
        raise ValueError(f"flow must be (H, W, 2), got shape {flow.shape}")
    known = np.all(np.isfinite(flow) & (np.abs(flow) <= FLOW_UNKNOWN_THRESHOLD), axis=2)
    u = np.where(known, flow[..., 0], 0.0).astype(np.float64)
    v = np.where(known, flow[..., 1], 0.0).astype(np.float64)
    radius = np.hypot(u, v)
    if max_magnitude is None:
        max_magnitude = float(radius.max()) if radius.size else 0.0
    # Guards the all-zero field (0 / 0) while leaving any real magnitude untouched.
    scale = max(max_magnitude, np.finfo(np.float64).eps)
    u, v, radius = u / scale, v / scale, radius / scale

    wheel = colorwheel() / 255.0
    n = wheel.shape[0]
    position = (np.arctan2(-v, -u) / np.pi + 1) / 2 * (n - 1)  # angle -> [0, n - 1]
    k0 = np.floor(position).astype(np.intp)
    k1 = (k0 + 1) % n
    frac = (position - k0)[..., None]
    color = (1 - frac) * wheel[k0] + frac * wheel[k1]
    inside = (radius <= 1)[..., None]
    # Saturation grows with magnitude inside the unit circle; beyond it the colour is darkened.
    color = np.where(inside, 1 - radius[..., None] * (1 - color), color * 0.75)
    image = np.floor(255 * color).astype(np.uint8)
    image[~known] = 0
    return image
