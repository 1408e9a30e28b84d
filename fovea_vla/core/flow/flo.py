"""Ground-truth flow file formats: Middlebury ``.flo`` (read/write) and KITTI 16-bit PNG (read).

Both return flow as (H, W, 2) float32 ``(u, v)`` in pixels, u right and v down (see
:mod:`fovea_vla.core.flow.base` for the pixel convention).
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

__all__ = ["FLO_MAGIC", "read_flo", "read_kitti_flow_png", "write_flo"]

# "PIEH" read as a little-endian float32; doubles as an endianness check.
FLO_MAGIC = np.float32(202021.25)
_HEADER_BYTES = 12
# Far beyond any real frame; stops a corrupt header from asking for a huge allocation.
_MAX_SIDE = 1 << 16


def read_flo(path: str | os.PathLike) -> np.ndarray:
    """Read a Middlebury ``.flo`` file.

    Layout: float32 magic 202021.25, int32 W, int32 H (all little-endian), then H*W*2 float32
    ``(u, v)`` pairs row-major. Unknown vectors (|value| > 1e9) are returned unchanged;
    :func:`~fovea_vla.core.flow.base.endpoint_error` skips them.

    Args:
        path: file to read.

    Returns:
        (H, W, 2) float32 flow, pixels (a writable, native-endian array).

    Raises:
        ValueError: wrong magic, implausible size, or a file length that does not match it.
    """
    data = Path(path).read_bytes()
    if len(data) < _HEADER_BYTES:
        raise ValueError(f"{path}: {len(data)} bytes is too short for a .flo header")
    magic = np.frombuffer(data, "<f4", count=1)[0]
    if magic != FLO_MAGIC:
        raise ValueError(f"{path}: bad .flo magic {magic!r} (expected {float(FLO_MAGIC)})")
    width, height = (int(x) for x in np.frombuffer(data, "<i4", count=2, offset=4))
    if not (0 < width <= _MAX_SIDE and 0 < height <= _MAX_SIDE):
        raise ValueError(f"{path}: implausible .flo size {width}x{height}")
    expected = _HEADER_BYTES + width * height * 8
    if len(data) != expected:
        raise ValueError(f"{path}: {len(data)} bytes, but a {width}x{height} .flo file has {expected} bytes")
    flow = np.frombuffer(data, "<f4", offset=_HEADER_BYTES).reshape(height, width, 2)
    return flow.astype(np.float32)  # copy: native byte order and writable


def write_flo(path: str | os.PathLike, flow: np.ndarray) -> None:
    """Write a Middlebury ``.flo`` file (layout as in :func:`read_flo`).

    Args:
        path: file to write (overwritten).
        flow: (H, W, 2) float flow, pixels; stored as little-endian float32.

    Raises:
        ValueError: ``flow`` is not (H, W, 2) with H, W >= 1.
    """
    if flow.ndim != 3 or flow.shape[2] != 2 or flow.shape[0] < 1 or flow.shape[1] < 1:
        raise ValueError(f"flow must be (H, W, 2) with H, W >= 1, got shape {flow.shape}")
    height, width = flow.shape[:2]
    with open(path, "wb") as f:
        f.write(FLO_MAGIC.astype("<f4").tobytes())
        f.write(np.array([width, height], "<i4").tobytes())
        f.write(np.ascontiguousarray(flow, "<f4").tobytes())


def read_kitti_flow_png(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a KITTI flow ground-truth PNG.

    KITTI stores a 16-bit RGB PNG with R = u, G = v as ``value * 64 + 2**15`` and B = 1 where the
    vector is valid. OpenCV loads it as BGR, so B (valid) is channel 0 and R (u) channel 2.

    Args:
        path: 16-bit 3-channel PNG.

    Returns:
        ``(flow, valid)``: (H, W, 2) float32 flow in pixels (0 where invalid) and (H, W) bool.

    Raises:
        FileNotFoundError: the file is missing or not a readable image.
        ValueError: the image is not 16-bit 3-channel.
    """
    image = cv2.imread(os.fspath(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise FileNotFoundError(f"{path}: missing or not a readable image")
    if image.dtype != np.uint16 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{path}: KITTI flow must be 16-bit 3-channel, got {image.shape} {image.dtype}")
    valid = image[..., 0] > 0
    flow = (image[..., [2, 1]].astype(np.float32) - 2.0**15) / 64.0
    flow[~valid] = 0.0
    return flow, valid
