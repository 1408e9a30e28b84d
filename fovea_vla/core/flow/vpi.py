"""``vpi`` flow backend: the Optical Flow Accelerator (OFA) of Jetson Orin through VPI 3's Python module.

The OFA is a fixed-function engine beside the GPU, so flow costs no CUDA time. The pair is turned
into gray, resized by ``FlowConfig.scale`` on the CPU, wrapped with ``vpi.asimage`` (``Y8_ER``),
optionally expanded into a Gaussian pyramid on CUDA, converted to the block-linear ``Y8_ER_BL``
layout the OFA reads (on VIC), and passed to ``vpi.optflow_dense(prev, cur,
backend=vpi.Backend.OFA, quality=...)`` on the backend's own ``vpi.Stream``. The motion-vector
image is read back with ``rlock_cpu()`` and converted from S10.5 fixed point by
:func:`s10_5_to_float`.

Preset mapping (VPI documents LOW as fastest, MEDIUM as balanced, HIGH as slowest):

===========  =========================
``preset``   ``vpi.OptFlowQuality``
===========  =========================
ultrafast    LOW
fast         LOW
medium       MEDIUM
slow         HIGH
===========  =========================

Output grid: the OFA runs with its default grid of one vector per 4x4 block of the *working* image.
The result is resampled onto the stage's output grid of the input resolution: each output cell
gets the bilinear interpolation of the block field at the cell's centre (block centres taken at
the middle of each, possibly clipped, block; border blocks are extended), and vectors are scaled
from working to input pixels. At ``scale=1, grid=4`` this is the OFA field itself, unchanged. With
``grid=1`` the per-pixel field is **interpolated** from the 4x4-block field: it has no more detail
than ``grid=4`` and costs a CPU upsampling pass, so prefer ``grid=4`` with this backend. A block
vector is the OFA's estimate for that block, which approximates (not equals) the block mean of the
stage's pixel convention. The OFA gives no per-vector cost in VPI's dense flow API, so
``confidence`` is None; the field is copied to host memory, so ``device_flow`` and ``device_ms``
are None (there is no CUDA kernel to time with CUDA events) and ``timing_ms`` is the wall time.

VPI facts this module relies on, and where they are documented:

- ``vpi.optflow_dense(ref, frame, *, out=None, gridSize=4, quality=OptFlowQuality.HIGH,
  backend=Backend.DEFAULT, stream=None)`` with ``ref`` the previous and ``frame`` the current
  image, or both ``vpi.Pyramid``; returns a ``vpi.Image``
  (docs.nvidia.com /vpi/python/build/vpi.optflow_dense.html). The grid is left at its default, 4:
  the reference spells the keyword ``gridSize`` while public OFA code passes ``gridsize``, and
  not passing it sidesteps the question.
- Motion vectors estimate the translation of each 4x4 block's content from the previous to the
  current frame, as (x, y) pairs in S10.5 signed fixed point, ``F = S / 32``
  (/vpi/algo_optflow_dense.html); so ``prev -> cur`` with x right and y down, the stage's
  convention, and no sign flip.
- OFA: allowed grid sizes 1, 2, 4, 8; 1 to 7 pyramid levels (1 for plain images); the smallest
  level must be at least 32x32 and at least 4x4 after division by the grid; inputs must be
  block-linear (``Y8_ER_BL``, ``Y8_BL``, ``U8_BL``, ``NV12_ER_BL``, ``Y16_ER_BL``, ... ); the output
  is ``2S16_BL`` of ``((W + g - 1) // g, (H + g - 1) // g)``
  (/vpi/2.3/group__VPI__OpticalFlowDense.html, header ``vpi/algo/OpticalFlowDense.h``).
- The OFA backend exists only on Jetson Orin; quality low = fastest, medium = balanced, high =
  slowest; VPI's Python sample reads the output under ``rlock_cpu()`` and divides by ``1 << 5``
  (/vpi/3.1/sample_optflow_dense.html).

Verified on: not yet (written against the documentation on a machine without VPI). The pure
parts (S10.5 conversion, preset mapping, geometry, resampling, input preparation) and the
unavailable path are unit-tested. To verify on an Orin (JetPack 6, VPI 3):

1. ``python3 -c "import vpi; print(vpi.__version__)"`` and ``fovea-vla doctor`` list ``vpi`` as
   available (the availability probe runs a 64x64 flow on the OFA).
2. ``fovea-vla flow-eval ../shared/data --backends vpi dis --scale 1``: EPE close to dis medium;
   a sign or unit error shows as an EPE near or above twice the mean GT magnitude.
3. ``pytest test/unit/test_flow_vpi.py``: the tests marked for real VPI run instead of skipping.
4. Accepted by VPI: ``with stream:`` around the conversions and the flow, the pyramid path
   (``Image.gaussian_pyramid`` + ``Pyramid.convert`` into ``optflow_dense``), odd working sizes
   such as 292x194 (RubberWhale at scale 0.5), and reading the block-linear output with
   ``rlock_cpu()`` as an (Hg, Wg, 2) int16 array.
5. ``fovea-vla bench flow --backends vpi dis`` for timings; try VIC for the resize and colour
   conversion and more or fewer pyramid levels (:data:`MAX_PYRAMID_LEVELS`).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import cv2
import numpy as np

from fovea_vla.core.flow.base import (
    FLOW_BACKENDS,
    FLOW_PRESETS,
    FlowConfig,
    FlowResult,
    check_frame_pair,
    grid_shape,
    make_example,
)
from fovea_vla.core.registry import Availability

try:
    import vpi
except ImportError as _exc:  # reported by the availability check instead of failing the import
    vpi = None
    _VPI_IMPORT_ERROR = (
        "VPI Python module is not installed (needs JetPack 6 with VPI 3 on a Jetson Orin)"
        if isinstance(_exc, ModuleNotFoundError) and _exc.name == "vpi"
        else f"VPI Python module failed to import: {_exc}"
    )

__all__ = [
    "MAX_PYRAMID_LEVELS",
    "OFA_GRID",
    "OfaGeometry",
    "VpiFlow",
    "native_to_output",
    "ofa_geometry",
    "ofa_quality",
    "s10_5_to_float",
]

# Grid of the OFA output used here: VPI's default and documented 4x4-block motion vectors.
OFA_GRID = 4
# S10.5: 5 fractional bits.
_S10_5_ONE = 1 << 5
# OFA limit: the smallest (pyramid level) image must be at least 32x32.
_OFA_MIN_SIDE = 32
# Pyramid levels used when the working size allows (OFA accepts up to 7). Coarser levels extend
# the search range for fast motion; 3 is the level count of VPI 4.0's C++ sample. To tune on Orin.
MAX_PYRAMID_LEVELS = 3

_QUALITY = {"ultrafast": "LOW", "fast": "LOW", "medium": "MEDIUM", "slow": "HIGH"}


def s10_5_to_float(raw: np.ndarray) -> np.ndarray:
    """Convert VPI S10.5 fixed-point motion vectors to float pixels.

    S10.5 is a 16-bit two's-complement number with 5 fractional bits, so ``F = S / 32`` exactly:
    the representable range is [-1024, 1023.96875] px in steps of 1/32 px.

    Args:
        raw: (..., 2) int16 ``(x, y)`` motion vectors as read from a ``2S16``/``2S16_BL`` image.

    Returns:
        (..., 2) float32 ``(u, v)`` in pixels of the image the flow was computed on (exact: every
        int16 divided by 32 is representable in float32).

    Raises:
        ValueError: ``raw`` is not int16 or its last axis is not 2.

    >>> s10_5_to_float(np.array([[32, -48], [32767, -32768]], np.int16)).tolist()
    [[1.0, -1.5], [1023.96875, -1024.0]]
    """
    if raw.dtype != np.int16 or raw.ndim < 1 or raw.shape[-1] != 2:
        raise ValueError(f"raw must be (..., 2) int16 S10.5 vectors, got {raw.shape} {raw.dtype}")
    return raw.astype(np.float32) / np.float32(_S10_5_ONE)


def ofa_quality(preset: str) -> str:
    """Name of the ``vpi.OptFlowQuality`` member for a stage ``preset``.

    >>> [ofa_quality(p) for p in ("ultrafast", "fast", "medium", "slow")]
    ['LOW', 'LOW', 'MEDIUM', 'HIGH']
    """
    if preset not in _QUALITY:
        raise ValueError(f"flow.preset={preset!r}: must be one of {', '.join(FLOW_PRESETS)}")
    return _QUALITY[preset]


@dataclass(frozen=True)
class OfaGeometry:
    """Sizes involved in one OFA call, all as (height, width).

    Attributes:
        input_hw: input frame size.
        working_hw: size the OFA sees after ``scale``.
        native_hw: OFA output size, one vector per 4x4 working block.
        output_hw: the stage's output grid of the input, ``grid_shape(H, W, grid)``.
        levels: pyramid levels passed to the OFA (1 = plain images).
    """

    input_hw: tuple[int, int]
    working_hw: tuple[int, int]
    native_hw: tuple[int, int]
    output_hw: tuple[int, int]
    levels: int


def ofa_geometry(height: int, width: int, scale: float, grid: int) -> OfaGeometry:
    """Working, native and output sizes for an (H, W) input.

    Args:
        height: input height H in pixels.
        width: input width W in pixels.
        scale: ``FlowConfig.scale``; the working size is ``round(H * scale), round(W * scale)``.
        grid: ``FlowConfig.grid`` (1 or 4).

    Returns:
        The :class:`OfaGeometry`; ``levels`` is the most (up to :data:`MAX_PYRAMID_LEVELS`) for
        which the coarsest level stays at least 32x32.

    Raises:
        ValueError: the working size is under the OFA minimum of 32x32.

    >>> g = ofa_geometry(388, 584, 0.5, 4)
    >>> g.working_hw, g.native_hw, g.output_hw, g.levels
    ((194, 292), (49, 73), (97, 146), 3)
    """
    hs, ws = round(height * scale), round(width * scale)
    if min(hs, ws) < _OFA_MIN_SIDE:
        raise ValueError(
            f"the OFA needs a working size of at least {_OFA_MIN_SIDE}x{_OFA_MIN_SIDE} px, got {ws}x{hs} "
            f"({width}x{height} at scale {scale}); raise flow.scale or use larger frames"
        )
    levels = 1
    # Pyramid levels halve the size (rounding down here, the conservative side).
    while levels < MAX_PYRAMID_LEVELS and min(hs, ws) >> levels >= _OFA_MIN_SIDE:
        levels += 1
    return OfaGeometry(
        input_hw=(height, width),
        working_hw=(hs, ws),
        native_hw=grid_shape(hs, ws, OFA_GRID),
        output_hw=grid_shape(height, width, grid),
        levels=levels,
    )


def _block_positions(n_out: int, grid: int, n_in: int, n_work: int) -> np.ndarray:
    """Fractional native-block index of each output cell centre along one axis.

    Cell ``i`` covers input pixels ``[g*i, min(g*i + g, n_in))``; its centre is mapped to working
    pixels (pixel-centre aligned) and then to the block axis, on which block ``k`` sits at the
    centre of working pixels ``[4k, min(4k + 4, n_work))``. Positions beyond the first or last
    block centre are clamped, which extends the border blocks.
    """
    cells = grid * np.arange(n_out)
    centres = (cells + np.minimum(cells + grid, n_in) - 1) / 2.0
    working = (centres + 0.5) * (n_work / n_in) - 0.5
    blocks = OFA_GRID * np.arange(-(-n_work // OFA_GRID))
    block_centres = (blocks + np.minimum(blocks + OFA_GRID, n_work) - 1) / 2.0
    return np.interp(working, block_centres, np.arange(block_centres.size))


def _interp_axis(field: np.ndarray, positions: np.ndarray, axis: int) -> np.ndarray:
    # Linear interpolation along one axis at clamped fractional indices, in float32.
    lo = np.floor(positions).astype(np.intp)
    hi = np.minimum(lo + 1, field.shape[axis] - 1)
    frac = (positions - lo).astype(np.float32)
    shape = [1] * field.ndim
    shape[axis] = -1
    frac = frac.reshape(shape)
    return np.take(field, lo, axis=axis) * (1 - frac) + np.take(field, hi, axis=axis) * frac


def native_to_output(native: np.ndarray, geometry: OfaGeometry, grid: int) -> np.ndarray:
    """Resample an OFA block field onto the stage's output grid, in input pixels.

    Args:
        native: (Hn, Wn, 2) float32 flow, one vector per 4x4 working block, working pixels
            (``geometry.native_hw``).
        geometry: sizes from :func:`ofa_geometry`.
        grid: output grid step (the same ``grid`` that made ``geometry``).

    Returns:
        (Hg, Wg, 2) float32 flow on ``geometry.output_hw``, vectors in input pixels: bilinear in
        the block field at each cell centre (see the module docstring); ``native`` itself when the
        working size is the input size and ``grid`` is 4.

    >>> geometry = ofa_geometry(64, 96, 0.5, 1)
    >>> out = native_to_output(np.full((8, 12, 2), 0.5, np.float32), geometry, 1)
    >>> out.shape, float(out[10, 20, 0])
    ((64, 96, 2), 1.0)
    """
    (h, w), (hs, ws) = geometry.input_hw, geometry.working_hw
    if native.shape != (*geometry.native_hw, 2):
        raise ValueError(f"native field {native.shape} does not match the geometry {geometry.native_hw}")
    if (hs, ws) == (h, w) and grid == OFA_GRID:
        return native
    hg, wg = geometry.output_hw
    rows = _block_positions(hg, grid, h, hs)
    cols = _block_positions(wg, grid, w, ws)
    out = _interp_axis(_interp_axis(native, rows, 0), cols, 1)
    # Vectors were measured in working pixels; express them in input pixels.
    out[..., 0] *= w / ws
    out[..., 1] *= h / hs
    return out.astype(np.float32, copy=False)


def _vpi_inputs(prev: np.ndarray, cur: np.ndarray, working_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The pair as the OFA path wraps it: gray, at the working size, C-contiguous.

    Args:
        prev: (H, W) uint8 gray or (H, W, 3) uint8 RGB frame, already checked.
        cur: frame of the same shape and dtype.
        working_hw: (h, w) working size from :func:`ofa_geometry`.

    Returns:
        Two (h, w) uint8 C-contiguous arrays (area-resampled when the size changes); an input
        that is already gray, contiguous and of the working size is returned as is.
    """
    out = []
    for image in (prev, cur):
        if image.ndim == 3:
            image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        if image.shape != working_hw:
            image = cv2.resize(image, working_hw[::-1], interpolation=cv2.INTER_AREA)
        # vpi.asimage wraps the buffer; a strided crop would not wrap as a plain Y8 image.
        out.append(np.ascontiguousarray(image))
    return out[0], out[1]


@functools.lru_cache(maxsize=1)
def is_available() -> Availability:
    """``(True, "VPI <version> OFA")`` when a 64x64 dense flow runs on the OFA.

    The probe result is cached for the process: loading VPI and the OFA costs a noticeable time.
    """
    if vpi is None:
        return False, _VPI_IMPORT_ERROR
    version = getattr(vpi, "__version__", "(unknown version)")
    if not hasattr(getattr(vpi, "Backend", None), "OFA"):
        return False, f"VPI {version} has no vpi.Backend.OFA (needs VPI >= 2.3 on a Jetson Orin)"
    prev, cur, _ = make_example(64, 64, shift=(1.0, 0.0))
    try:
        VpiFlow(FlowConfig(grid=OFA_GRID, preset="ultrafast", scale=1.0)).compute(prev, cur)
    except Exception as exc:  # any VPI error means the OFA cannot serve this process
        return False, f"VPI {version} OFA probe (64x64 dense flow) failed: {type(exc).__name__}: {exc}"
    return True, f"VPI {version} OFA"


@FLOW_BACKENDS.register("vpi", is_available=is_available)
class VpiFlow:
    """Dense optical flow on the Jetson Orin OFA through VPI, with the stage's scale/grid handling.

    See the module docstring for the data path, the preset mapping and the output grid. The
    stream and the size-dependent geometry are kept across calls; the geometry is recomputed when
    the input size changes. The OFA keeps no state between frames.

    Args:
        cfg: stage config; ``cfg.backend`` is ignored (``make_flow`` already resolved it).

    Raises:
        RuntimeError: the VPI module is not importable.
    """

    name = "vpi"

    def __init__(self, cfg: FlowConfig):
        if vpi is None:
            raise RuntimeError(_VPI_IMPORT_ERROR)
        self.cfg = cfg
        self._quality = getattr(vpi.OptFlowQuality, ofa_quality(cfg.preset))
        self._stream = vpi.Stream()
        self._geometry: OfaGeometry | None = None

    def reset(self) -> None:
        """Drop the cached geometry (the OFA itself carries nothing from frame to frame)."""
        self._geometry = None

    def _to_ofa(self, gray: np.ndarray):
        image = vpi.asimage(gray, vpi.Format.Y8_ER)
        if self._geometry.levels > 1:
            image = image.gaussian_pyramid(self._geometry.levels, backend=vpi.Backend.CUDA)
        # The OFA reads block-linear images only; VIC does the layout conversion.
        return image.convert(vpi.Format.Y8_ER_BL, backend=vpi.Backend.VIC)

    def compute(self, prev: np.ndarray, cur: np.ndarray) -> FlowResult:
        """Forward flow ``prev -> cur``.

        Args:
            prev: (H, W) uint8 grayscale or (H, W, 3) uint8 RGB frame at time t, host memory.
            cur: frame at time t+1, same shape and dtype as ``prev``.

        Returns:
            :class:`FlowResult` with (ceil(H/grid), ceil(W/grid), 2) float32 flow in input pixels,
            ``confidence=None`` and the wall time in ``timing_ms``.

        Raises:
            ValueError: shapes differ, a frame is not (H, W) / (H, W, 3) uint8, or the working
                size is under 32x32.
        """
        start = time.perf_counter()
        check_frame_pair(prev, cur)
        if self._geometry is None or self._geometry.input_hw != prev.shape[:2]:
            self._geometry = ofa_geometry(prev.shape[0], prev.shape[1], self.cfg.scale, self.cfg.grid)
        prev_gray, cur_gray = _vpi_inputs(prev, cur, self._geometry.working_hw)
        with self._stream:
            motion = vpi.optflow_dense(
                self._to_ofa(prev_gray), self._to_ofa(cur_gray), backend=vpi.Backend.OFA, quality=self._quality
            )
        self._stream.sync()
        with motion.rlock_cpu() as data:
            # The conversion copies out of the locked buffer before the lock is released.
            native = s10_5_to_float(np.asarray(data))
        flow = native_to_output(native, self._geometry, self.cfg.grid)
        return FlowResult(flow, None, self.name, (time.perf_counter() - start) * 1e3)
