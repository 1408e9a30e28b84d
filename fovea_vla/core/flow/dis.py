"""``dis`` flow backend: OpenCV's Dense Inverse Search (Kroeger et al., ECCV 2016) on the CPU.

The fallback that works everywhere OpenCV does. Preset mapping:

===========  ==========================================================================
``preset``   OpenCV DIS settings
===========  ==========================================================================
ultrafast    ``DISOPTICAL_FLOW_PRESET_ULTRAFAST``
fast         ``DISOPTICAL_FLOW_PRESET_FAST``
medium       ``DISOPTICAL_FLOW_PRESET_MEDIUM``
slow         ``MEDIUM`` with finest scale 0 instead of 1: patches are matched and refined on
             the full working resolution instead of stopping at half of it; 0.5-0.7x the
             endpoint error of ``medium`` on Middlebury/Sintel for about 3.7x the time
===========  ==========================================================================

DIS itself stops refining at a pyramid level (finest scale): 1/4 of the working resolution for
ultrafast/fast, 1/2 for medium, full for slow, and ``FlowConfig.scale`` compounds with it (fast at
scale 0.5 matches patches on 1/8 of the input). On the developer data ultrafast at scale 1.0 was
both faster and more accurate than fast at scale 0.5 (the stage default).

DIS gives no confidence, so :attr:`FlowResult.confidence` is None.
"""

from __future__ import annotations

import math
import time

import numpy as np

from fovea_vla.core.flow.base import FLOW_BACKENDS, FlowConfig, FlowResult, check_frame_pair, flow_at_grid, grid_shape
from fovea_vla.core.registry import Availability

try:
    import cv2
except ImportError as _exc:  # reported by the availability check instead of failing the import
    cv2 = None
    _CV2_IMPORT_ERROR = f"cv2 not importable: {_exc}"

__all__ = ["DisFlow"]

# "slow" = MEDIUM down to the finest pyramid level (see the module docstring). Denser patches
# (stride 2) or more variational iterations were measured to gain < 4% EPE for 1.3-1.7x the time.
_SLOW_FINEST_SCALE = 0
# Smallest working image side: OpenCV DIS rejects images under 12 px (8-px patches plus margin).
_MIN_SIDE = 12


def is_available() -> Availability:
    """``(True, version)`` when OpenCV with DIS optical flow is importable."""
    if cv2 is None:
        return False, _CV2_IMPORT_ERROR
    if not hasattr(cv2, "DISOpticalFlow_create"):
        return False, f"OpenCV {cv2.__version__} has no DISOpticalFlow_create"
    return True, f"OpenCV {cv2.__version__} DIS"


def _create_dis(preset: str, height: int, width: int):
    """DIS object for ``preset`` on (height, width) working images.

    OpenCV derives the coarsest pyramid level from the image size and, when that level is finer
    than the preset's finest one (thumbnails and strips), indexes past its pyramid instead of
    raising: a 100x16 image segfaults with the ultrafast preset, 44x25 reads out of bounds. For
    such sizes the finest level is lowered to the coarsest one, so small frames get a
    single-level, full-resolution DIS.
    """
    if min(height, width) < _MIN_SIDE:
        raise ValueError(
            f"DIS needs a working size of at least {_MIN_SIDE}x{_MIN_SIDE} px, got {width}x{height} "
            "(raise flow.scale or use larger frames)"
        )
    base = {
        "ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
        "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
        "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
        "slow": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
    }[preset]
    dis = cv2.DISOpticalFlow_create(base)
    if preset == "slow":
        dis.setFinestScale(_SLOW_FINEST_SCALE)
    patch = dis.getPatchSize()
    # Same expression as OpenCV's dis_flow.cpp (C++ int() truncates toward zero like Python's).
    coarsest = min(
        int(math.log(max(height, width) / (4.0 * patch)) / math.log(2.0) + 0.5),
        int(math.log(min(height, width) / patch) / math.log(2.0)),
    )
    if coarsest < dis.getFinestScale():
        dis.setFinestScale(max(coarsest, 0))
    return dis


@FLOW_BACKENDS.register("dis", is_available=is_available)
class DisFlow:
    """OpenCV DIS optical flow with the stage's scale/grid handling.

    The pair is converted to gray, resized by ``cfg.scale`` (area interpolation), DIS runs at that
    working size, and the field is resampled to the output grid of the input resolution with its
    vectors multiplied by the input/working size ratio. The DIS object and the gray/resized image
    buffers are kept across calls and re-created when the input size changes; the returned
    ``flow`` is a new array each call, so results stay valid after the next call.

    At ``scale=1`` grid cells are exact block averages of the DIS field. Below it they are
    area-resampled from the working field: exact block averages of it when H and W are multiples
    of ``grid / scale``; otherwise the cells tile the image evenly instead of clipping the last
    one, which moves cell footprints by less than ``grid`` input pixels (most at the far border).

    Args:
        cfg: stage config; ``cfg.backend`` is ignored (``make_flow`` already resolved it).
    """

    name = "dis"

    def __init__(self, cfg: FlowConfig):
        self.cfg = cfg
        self._dis = None  # created for the input size on the first call
        self._in_shape: tuple[int, ...] | None = None
        self._gray: list[np.ndarray] = []
        self._small: list[np.ndarray] = []

    def reset(self) -> None:
        """Drop the DIS object and the buffers; the next call re-creates them."""
        self._dis = None
        self._in_shape = None

    def _allocate(self, shape: tuple[int, ...]) -> None:
        h, w = shape[:2]
        hs, ws = self._working_size(h, w)
        # The pyramid depth depends on the size, so a new size gets a fresh DIS object.
        self._dis = _create_dis(self.cfg.preset, hs, ws)
        self._gray = [np.empty((h, w), np.uint8) for _ in range(2)] if len(shape) == 3 else []
        self._small = [np.empty((hs, ws), np.uint8) for _ in range(2)] if (hs, ws) != (h, w) else []
        self._in_shape = shape

    def _working_size(self, h: int, w: int) -> tuple[int, int]:
        return round(h * self.cfg.scale), round(w * self.cfg.scale)

    def _prepare(self, image: np.ndarray, slot: int) -> np.ndarray:
        if self._gray:
            image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY, dst=self._gray[slot])
        if self._small:
            small = self._small[slot]
            image = cv2.resize(image, small.shape[::-1], dst=small, interpolation=cv2.INTER_AREA)
        # DIS asserts continuous rows; only a gray crop at scale 1 gets here uncopied.
        return np.ascontiguousarray(image)

    def compute(self, prev: np.ndarray, cur: np.ndarray) -> FlowResult:
        """Forward flow ``prev -> cur``.

        Args:
            prev: (H, W) uint8 grayscale or (H, W, 3) uint8 RGB frame at time t.
            cur: frame at time t+1, same shape and dtype as ``prev``.

        Returns:
            :class:`FlowResult` with (ceil(H/grid), ceil(W/grid), 2) float32 flow in input pixels
            and ``confidence=None``.

        Raises:
            ValueError: shapes differ, or a frame is not (H, W) / (H, W, 3) uint8.
        """
        start = time.perf_counter()
        check_frame_pair(prev, cur)
        if prev.shape != self._in_shape:
            self._allocate(prev.shape)
        # No preallocated output: DIS treats any (h, w, 2) float32 array passed here as an
        # initial flow (whatever setUseInitialFlow says), and garbage in it crashes OpenCV.
        flow = self._dis.calc(self._prepare(prev, 0), self._prepare(cur, 1), None)
        out = self._to_output_grid(flow, prev.shape[0], prev.shape[1])
        return FlowResult(out, None, self.name, (time.perf_counter() - start) * 1e3)

    def _to_output_grid(self, flow: np.ndarray, h: int, w: int) -> np.ndarray:
        grid = self.cfg.grid
        hs, ws = flow.shape[:2]
        if (hs, ws) == (h, w) and (grid == 1 or h % grid or w % grid):
            # DIS returns a new array per call, so grid 1 needs no copy; flow_at_grid gets the
            # clipped border blocks exactly where cv2.resize would stretch every block.
            return flow if grid == 1 else flow_at_grid(flow, grid)
        hg, wg = grid_shape(h, w, grid)
        # INTER_AREA is the exact block average for integer shrink factors (e.g. 640x480 at
        # scale 0.5 -> grid 4) and 10x faster than flow_at_grid; bilinear when growing.
        interpolation = cv2.INTER_AREA if ws >= wg and hs >= hg else cv2.INTER_LINEAR
        out = cv2.resize(flow, (wg, hg), interpolation=interpolation)
        # Vectors were measured in working pixels; express them in input pixels.
        out[..., 0] *= w / ws
        out[..., 1] *= h / hs
        return out
