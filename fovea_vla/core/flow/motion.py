"""Motion analysis on top of any flow backend: dirty tiles, camera (ego) motion, independent motion, cuts.

:meth:`MotionAnalyzer.analyze` turns a frame pair and its flow (a
:class:`~fovea_vla.core.flow.base.FlowResult` from any backend, or a bare array) into plain NumPy
arrays for the stages after flow:

- texture: ``changed_tiles``, the tiles to re-upload. Anything that changes pixels counts: camera
  motion, independent motion, a brightness change. A cut marks every tile.
- fixation: ``residual`` flow after removing the camera motion, and ``independent_mask`` /
  ``independent_tiles`` for what moves relative to the scene.
- slip and texture: ``ego_motion``, a 3x3 homogeneous map prev -> cur.
- every cache: ``is_cut``, set when the pair shows unrelated scenes; ``change`` sums the frame
  up as static, partial (dirty tiles), full or cut.

Pixel convention: x right, y down, the centre of the top-left pixel is (0, 0). Flow follows
:mod:`fovea_vla.core.flow.base`: ``flow[i, j] = (u, v)`` in full-resolution px for the block of
rows ``[g*i, g*i+g)`` and columns ``[g*j, g*j+g)`` (clipped at the border) on a grid of ``g`` px.
Tile ``(ty, tx)`` covers rows ``[ty*T, (ty+1)*T)`` and columns ``[tx*T, (tx+1)*T)`` of the
full-resolution image, ``T = tile_size``, so ``(Ty, Tx) = (ceil(H / T), ceil(W / T))``. Tiles at
the right and bottom border are clipped to the image. Every per-tile statistic averages over
exactly the pixels (or flow blocks) the tile contains.

Independent motion: a block moves independently when all of these hold:

- its residual flow exceeds ``motion_threshold_px``;
- the camera motion fails to explain it: the mean absolute error ``|prev(q) - cur(q + d)|`` over
  the block's pixels q with the camera displacement d exceeds ``independent_min_change``
  (single-pixel blocks, grid 1, use their 3x3 neighbourhood, each pixel with its own d);
- its own flow explains it better: the same error with its flow vector is at most
  ``independent_error_ratio`` times the camera-motion error.

Without the second and third tests, flow that spills past an object's edge onto static
background, or that drifts in textureless or aliased texture, would count as motion (every
backend smooths across motion boundaries). An opening then removes isolated blocks.

Scene-cut rule. A cut needs both cues, so neither motion nor lighting alone makes one:

- ``cut_photometric = 1 - ZNCC`` of the two frames area-averaged to cells of ``cut_cell_px`` px.
  It is 0 for the same picture under any global gain and offset (brightness, contrast) and about
  1 for unrelated pictures. The coarse cells keep it small under moderate motion.
- ``cut_mismatch`` is the share of cells whose intensity disagrees after warping ``cur`` back
  along the flow. Intensities are in globally normalised units (zero mean, unit contrast per
  frame), so this cue is brightness robust too. It is small whenever the flow explains the pair,
  and large when no flow can, as at a cut.
- ``cut_score = min(cut_photometric / cfg.cut_photometric, cut_mismatch / cfg.cut_mismatch)``,
  and ``is_cut = cut_score >= 1``.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass

import cv2
import numpy as np

from fovea_vla.core._validation import is_int, is_real
from fovea_vla.core.flow.base import FlowResult, grid_shape

__all__ = [
    "EGO_MODELS",
    "MotionAnalysis",
    "MotionAnalyzer",
    "MotionConfig",
    "changed_tiles",
    "make_example",
    "tile_sums",
]

EGO_MODELS = ("translation", "affine", "homography")

# With fewer usable flow vectors than this, no fit is tried and the median translation is used.
_MIN_FIT_VECTORS = 12
# RANSAC iteration cap and confidence. It stops far earlier when most vectors agree (a handful of
# iterations at 90 % inliers).
_RANSAC_MAX_ITERS = 2000
_RANSAC_CONFIDENCE = 0.995
# Contrast floor [grey levels] of the cut detector's normalisation. Without it a near-uniform
# frame (a wall, a lens cap) would blow sensor noise up to unit contrast and look like a cut.
_MIN_CONTRAST = 2.0
# If the flow keeps less than this share of cells inside the frame, the warp test cannot vouch
# for the pair and every cell counts as disagreeing.
_MIN_VALID_CELLS = 0.25
# Width of the 2-D maps handed to cv2.remap for scattered samples (it rejects sides >= 32767).
_SAMPLE_ROW = 1024
# Accepted values of MotionConfig.device.
_DEVICE = re.compile(r"cpu|cuda(:[0-9]+)?")


@dataclass(frozen=True, kw_only=True)
class MotionConfig:
    """Motion analysis settings.

    Attributes:
        tile_size: tile side T [px, full resolution]; must be a multiple of the flow grid.
        motion_threshold_px: flow magnitude [px/frame] above which a block moves. For
            independent motion it applies to the residual flow (the camera motion removed); for
            camera-moved tiles, to the camera-motion displacement itself.
        photometric_threshold: mean absolute grey-level change per tile, prev vs cur, above which
            the tile changed. It is not compensated for motion or global brightness, so a
            flicker without motion marks its tiles.
        tile_moving_fraction: share of a tile's flow blocks, in (0, 1], that must hold
            independently moving content (in prev or, displaced by its flow, in cur) for the
            tile to count as moving. The default takes one grid-4 block (1/64 of a 32-px tile)
            or 11 grid-1 pixels, enough for an object's corner that cuts into a tile: 0.05
            missed 5-9 % of the tiles a moving patch touched in the tests, 0.01 misses 1-2 %.
            The verified, opened mask keeps noise out even at this low share.
        independent_min_change: mean absolute grey-level error [0-255] of a block under the
            camera motion at or below which the camera motion explains the block (sensor noise
            of std 2 gives about 2.3).
        independent_error_ratio: a block moves independently only if its own flow vector
            leaves at most this fraction of the camera motion's error, in (0, 1].
        min_region_px: side [px, full resolution] of the square opening that cleans the
            independent-motion mask. It is rounded to whole flow blocks, at least 2 when > 0, so
            that isolated blocks vanish; 0 disables it.
        ego_model: camera-motion model fitted to the flow: ``translation`` (the median flow),
            or ``affine`` (6 dof) or ``homography`` (8 dof), both fitted with RANSAC.
        ransac_threshold_px: RANSAC inlier distance [px]; also the inlier test behind the
            reported ``ego_inlier_fraction``.
        ego_samples: number of flow vectors sampled for the fit, in a fixed seeded order, so the
            fit is deterministic.
        ego_min_inliers: inlier share of the samples, in [0, 1], below which an affine or
            homography fit is rejected and the median translation is used instead.
        ego_min_confidence: backend confidence, in [0, 1], below which a vector is not sampled
            for the fit (when the flow carries a confidence).
        cut_cell_px: cell side [px] of the downsampled frames the cut detector compares.
        cut_photometric: threshold on ``1 - ZNCC`` of the cell images, in (0, 2]. Measured:
            0.001-0.065 between consecutive frames of the real test videos, 0.69-1.57 between
            unrelated frames.
        cut_mismatch: threshold on the share of cells that disagree after the flow warp, in
            (0, 1]. Measured: at most 0.035 on the real videos, 0.48-0.84 at cuts.
        cut_tolerance: normalised intensity difference, in units of the frame's cell contrast,
            above which a warped cell disagrees; > 0.
        seed: seed of the sampling order.
        device: where the per-pixel, per-block and per-tile work runs: ``cpu`` (NumPy and
            OpenCV) or ``cuda`` / ``cuda:N`` (torch on that device, see
            :mod:`fovea_vla.core.flow.motion_torch`; the camera-motion fit stays on the CPU).
            Both compute the same analysis (the CUDA path samples exactly as the installed
            OpenCV's remap); the measured agreement is in test/unit/test_motion_torch.py.
    """

    tile_size: int = 32
    motion_threshold_px: float = 0.5
    photometric_threshold: float = 8.0
    tile_moving_fraction: float = 0.01
    independent_min_change: float = 4.0
    independent_error_ratio: float = 0.7
    min_region_px: int = 8
    ego_model: str = "affine"
    ransac_threshold_px: float = 1.0
    ego_samples: int = 2000
    ego_min_inliers: float = 0.3
    ego_min_confidence: float = 0.5
    cut_cell_px: int = 8
    cut_photometric: float = 0.5
    cut_mismatch: float = 0.4
    cut_tolerance: float = 0.5
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        ints = {"tile_size": 1, "min_region_px": 0, "ego_samples": _MIN_FIT_VECTORS, "cut_cell_px": 1, "seed": 0}
        for name, minimum in ints.items():
            value = getattr(self, name)
            if not (is_int(value) and value >= minimum):
                raise ValueError(f"motion.{name}={value!r}: must be an integer >= {minimum}")
        # name: (low, high, low inclusive, high inclusive)
        floats = {
            "motion_threshold_px": (0.0, math.inf, False, False),
            "photometric_threshold": (0.0, math.inf, False, False),
            "tile_moving_fraction": (0.0, 1.0, False, True),
            "independent_min_change": (0.0, math.inf, True, False),
            "independent_error_ratio": (0.0, 1.0, False, True),
            "ransac_threshold_px": (0.0, math.inf, False, False),
            "ego_min_inliers": (0.0, 1.0, True, True),
            "ego_min_confidence": (0.0, 1.0, True, True),
            "cut_photometric": (0.0, 2.0, False, True),
            "cut_mismatch": (0.0, 1.0, False, True),
            "cut_tolerance": (0.0, math.inf, False, False),
        }
        for name, (low, high, low_in, high_in) in floats.items():
            value = getattr(self, name)
            # Written as "in range" tests, so NaN fails them.
            ok = is_real(value) and (low <= value if low_in else low < value)
            ok = ok and (value <= high if high_in else value < high)
            if not ok:
                interval = f"{'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"
                raise ValueError(f"motion.{name}={value!r}: must be a number in {interval}")
        if self.ego_model not in EGO_MODELS:
            raise ValueError(f"motion.ego_model={self.ego_model!r}: must be one of {', '.join(EGO_MODELS)}")
        if not (isinstance(self.device, str) and _DEVICE.fullmatch(self.device)):
            raise ValueError(f"motion.device={self.device!r}: must be 'cpu', 'cuda' or 'cuda:N'")


@dataclass
class MotionAnalysis:
    """What one frame pair shows.

    For (H, W) frames, tile side T and flow grid g, tile arrays are (Ty, Tx) =
    (ceil(H / T), ceil(W / T)) and grid arrays are (Hg, Wg) = (ceil(H / g), ceil(W / g)).

    Attributes:
        tile_size: tile side T [px].
        grid: flow grid g [px].
        tile_motion: (Ty, Tx) float32 mean residual flow magnitude [px/frame] over the tile's
            blocks in ``independent_mask`` (prev positions); 0 where none is.
        tile_independent_fraction: (Ty, Tx) float32 share, in [0, 1], of the tile's blocks that
            hold independently moving content: blocks of ``independent_mask``, plus the blocks
            their pixels land on in cur when displaced by their flow.
        independent_tiles: (Ty, Tx) bool, ``tile_independent_fraction >= tile_moving_fraction``:
            something moves relative to the scene there, in prev or in cur.
        tile_ego_motion: (Ty, Tx) float32 largest camera-motion displacement [px/frame] over
            the tile's four corner pixels under ``ego_motion``. This is the exact maximum over
            the tile for a translation or an affine map.
        tile_photometric: (Ty, Tx) float32 mean absolute grey-level difference cur - prev over
            the tile's pixels, in [0, 255]. Computed on the raw frames, NOT compensated for
            motion or brightness.
        changed_tiles: (Ty, Tx) bool, tiles whose pixels changed: a photometric change above
            the threshold, an independent tile, or camera motion above the motion threshold.
            All True on a cut.
        changed_fraction: share of tiles in ``changed_tiles``, in [0, 1].
        ego_motion: (3, 3) float64 homogeneous map of prev pixel coords (x, y, 1) to cur. It is
            the identity for a still camera. Its last row is (0, 0, 1) except for a homography.
        ego_model: the model actually fitted; ``translation`` after a fallback.
        ego_inlier_fraction: share, in [0, 1], of the sampled flow vectors within
            ``ransac_threshold_px`` of the fitted model.
        residual: (Hg, Wg, 2) float32 flow minus the camera-motion flow at each block centre
            [px/frame], u right, v down.
        independent_mask: (Hg, Wg) bool, blocks of prev that move independently (the test in
            the module docstring), cleaned by the opening. All False on a cut, because flow
            between unrelated frames means nothing.
        is_cut: the pair spans a scene cut (the rule is in the module docstring).
        cut_score: ``min(cut_photometric / cfg.cut_photometric, cut_mismatch / cfg.cut_mismatch)``;
            1 or more means a cut.
        cut_photometric: ``1 - ZNCC`` of the cell-averaged frames, in [0, 2].
        cut_mismatch: share, in [0, 1], of cells that disagree after warping cur back along the
            flow.
        timing_ms: wall time of :meth:`MotionAnalyzer.analyze` [ms].
    """

    tile_size: int
    grid: int
    tile_motion: np.ndarray
    tile_independent_fraction: np.ndarray
    independent_tiles: np.ndarray
    tile_ego_motion: np.ndarray
    tile_photometric: np.ndarray
    changed_tiles: np.ndarray
    changed_fraction: float
    ego_motion: np.ndarray
    ego_model: str
    ego_inlier_fraction: float
    residual: np.ndarray
    independent_mask: np.ndarray
    is_cut: bool
    cut_score: float
    cut_photometric: float
    cut_mismatch: float
    timing_ms: float

    @property
    def change(self) -> str:
        """Frame-level summary for the texture stage: ``"cut"``, ``"full"`` (every tile
        changed), ``"partial"`` (some tiles) or ``"static"`` (none)."""
        if self.is_cut:
            return "cut"
        if self.changed_tiles.all():
            return "full"
        return "partial" if self.changed_tiles.any() else "static"


class MotionAnalyzer:
    """Motion analysis of frame pairs. Each call depends only on its own inputs: the analyzer
    keeps nothing between pairs except caches and work buffers keyed by the frame size and
    grid. Because of the work buffers, one analyzer must not run two calls at once; use one
    per thread.

    With ``cfg.device`` ``cuda[:N]`` the analysis runs on that GPU through
    :class:`~fovea_vla.core.flow.motion_torch.TorchMotion`, which also keeps the last frame on
    the device (see there); torch is imported only then.

    Args:
        cfg: validated settings (defaults when None).

    Raises:
        RuntimeError: ``cfg.device`` names a CUDA device that torch cannot use.
    """

    def __init__(self, cfg: MotionConfig | None = None):
        self.cfg = cfg if cfg is not None else MotionConfig()
        self._key: tuple[int, int, int] | None = None
        self._torch = None
        if self.cfg.device != "cpu":
            from fovea_vla.core.flow.motion_torch import TorchMotion

            self._torch = TorchMotion(self.cfg, self.cfg.device, host=self)

    def reset(self) -> None:
        """Drop the size-dependent caches (sampling order, block centres, tile sizes, cell grid)
        and work buffers, and the frame kept on the device."""
        self._key = None
        if self._torch is not None:
            self._torch.reset()

    def analyze(
        self, prev_gray: np.ndarray, cur_gray: np.ndarray, flow: FlowResult | np.ndarray, grid: int
    ) -> MotionAnalysis:
        """Analyse the motion from ``prev_gray`` to ``cur_gray``.

        Args:
            prev_gray: (H, W) uint8 grayscale frame at time t. An (H, W, 3) uint8 RGB frame is
                converted to gray.
            cur_gray: frame at time t+1, same shape and dtype.
            flow: flow prev -> cur on the grid ``grid``. Either a :class:`FlowResult`, whose
                optional (Hg, Wg) confidence in [0, 1] gates the vectors sampled for the
                camera-motion fit, or an (Hg, Wg, 2) float array in full-resolution px, u right,
                v down.
            grid: block side g [px] of the flow; ``cfg.tile_size`` must be a multiple of it.

        Returns:
            The :class:`MotionAnalysis` of the pair.

        Raises:
            ValueError: frames or flow of the wrong shape or dtype, or a tile size that is not
                a multiple of the grid.
        """
        if self._torch is not None:
            return self._torch.analyze(prev_gray, cur_gray, flow, grid)
        start = time.perf_counter()
        cfg = self.cfg
        prev_gray, cur_gray, flow, confidence = _checked_inputs(cfg, prev_gray, cur_gray, flow, grid)
        height, width = prev_gray.shape
        hg, wg = flow.shape[:2]
        self._prepare(height, width, grid)

        ego, model, inliers = self._fit_ego(flow, confidence)
        ego_flow = _model_flow(ego, self._xs, self._ys)
        residual = flow - ego_flow
        magnitude = cv2.magnitude(residual[..., 0], residual[..., 1])
        diff = cv2.absdiff(prev_gray, cur_gray)
        tile_photometric = (tile_sums(diff, cfg.tile_size) / self._tile_pixels).astype(np.float32)
        tile_ego = _tile_ego_motion(ego, self._corner_x, self._corner_y)
        cut_photometric, cut_mismatch = self._cut_cues(prev_gray, cur_gray, flow)
        cut_score = min(cut_photometric / cfg.cut_photometric, cut_mismatch / cfg.cut_mismatch)
        is_cut = cut_score >= 1.0

        step = cfg.tile_size // grid
        moving = np.zeros((hg, wg), np.uint8)
        if not is_cut:
            candidates = magnitude > cfg.motion_threshold_px
            verified = self._verify(prev_gray, cur_gray, candidates, flow, ego_flow)
            moving = _opening(verified.view(np.uint8), self._kernel_side)
        counts = tile_sums(moving, step)
        tile_motion = (tile_sums(magnitude * moving, step) / np.maximum(counts, 1)).astype(np.float32)
        # Tiles count what moving content covers in prev or in cur: an object's leading edge
        # lies on background blocks in prev, whose flow stays put.
        occupied = _with_landing_blocks(moving, flow, grid, width, height)
        tile_fraction = (tile_sums(occupied, step) / self._tile_blocks).astype(np.float32)
        independent_tiles = tile_fraction >= cfg.tile_moving_fraction

        changed = changed_tiles(cfg, is_cut, tile_photometric, independent_tiles, tile_ego)
        return MotionAnalysis(
            tile_size=cfg.tile_size,
            grid=grid,
            tile_motion=tile_motion,
            tile_independent_fraction=tile_fraction,
            independent_tiles=independent_tiles,
            tile_ego_motion=tile_ego,
            tile_photometric=tile_photometric,
            changed_tiles=changed,
            changed_fraction=float(changed.mean()),
            ego_motion=ego,
            ego_model=model,
            ego_inlier_fraction=inliers,
            residual=residual,
            independent_mask=moving.astype(bool),
            is_cut=bool(is_cut),
            cut_score=float(cut_score),
            cut_photometric=float(cut_photometric),
            cut_mismatch=float(cut_mismatch),
            timing_ms=(time.perf_counter() - start) * 1e3,
        )

    def _prepare(self, height: int, width: int, grid: int) -> None:
        """(Re)builds everything that depends only on the frame size and grid."""
        key = (height, width, grid)
        if key == self._key:
            return
        cfg = self.cfg
        hg, wg = grid_shape(height, width, grid)
        self._size = (height, width, grid)
        # Centres of the (border-clipped) blocks [px].
        self._xs = _block_centres(width, grid)
        self._ys = _block_centres(height, grid)
        self._order = np.random.default_rng(cfg.seed).permutation(hg * wg)
        self._tile_blocks = tile_sums(np.ones((hg, wg), np.uint8), cfg.tile_size // grid)
        self._tile_pixels = tile_sums(np.ones((height, width), np.uint8), cfg.tile_size)
        self._grid_shape = (hg, wg)
        if grid > 1:
            # (g, Hg * Wg) float32 pixel columns and rows of each block by flat index i * Wg + j,
            # clipped to the frame (a clipped block repeats the border pixel).
            columns = np.minimum(np.arange(wg * grid).reshape(wg, grid).T, width - 1).astype(np.float32)
            rows = np.minimum(np.arange(hg * grid).reshape(hg, grid).T, height - 1).astype(np.float32)
            self._block_x, self._block_y = np.tile(columns, (1, hg)), np.repeat(rows, wg, axis=1)
            self._blocks = np.empty((grid, grid, hg * wg), np.uint8)  # see _block_major
            self._maps = np.empty((2, 0), np.float32)  # see _block_errors
        self._kernel_side = 0 if cfg.min_region_px == 0 else max(2, round(cfg.min_region_px / grid))
        if grid == 1:
            self._pixel_x, self._pixel_y = np.meshgrid(
                np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32)
            )
        # First and last pixel centre of each tile, where an affine displacement peaks.
        starts = np.arange(0, width, cfg.tile_size)
        self._corner_x = (starts, np.minimum(starts + cfg.tile_size, width) - 1)
        starts = np.arange(0, height, cfg.tile_size)
        self._corner_y = (starts, np.minimum(starts + cfg.tile_size, height) - 1)
        cw, ch = max(1, round(width / cfg.cut_cell_px)), max(1, round(height / cfg.cut_cell_px))
        self._cells = (cw, ch)
        self._cell_scale = (width / cw, height / ch)
        self._cell_x, self._cell_y = np.meshgrid(np.arange(cw, dtype=np.float32), np.arange(ch, dtype=np.float32))
        self._key = key

    def _fit_ego(self, flow: np.ndarray, confidence: np.ndarray | None) -> tuple[np.ndarray, str, float]:
        """Camera motion as a 3x3 map prev -> cur, the model used and its inlier share."""
        cfg = self.cfg
        order = self._order
        if confidence is not None:
            confident = np.asarray(confidence).reshape(-1) >= cfg.ego_min_confidence
            # The first ego_samples confident entries of the order: look at a prefix first,
            # the whole order only when the prefix holds too few.
            head = order[: 2 * cfg.ego_samples]
            head = head[confident[head]]
            order = head if len(head) >= cfg.ego_samples else order[confident[order]]
        order = order[: cfg.ego_samples]
        vectors = flow.reshape(-1, 2)[order]
        rows, cols = np.divmod(order, flow.shape[1])
        finite = np.isfinite(vectors).all(axis=1)
        vectors, rows, cols = vectors[finite], rows[finite], cols[finite]
        if len(vectors) < _MIN_FIT_VECTORS:
            return np.eye(3), "translation", 0.0
        threshold = cfg.ransac_threshold_px
        if cfg.ego_model != "translation":
            src = np.stack([self._xs[cols], self._ys[rows]], axis=1)
            dst = src + vectors
            if cfg.ego_model == "affine":
                matrix, mask = cv2.estimateAffine2D(
                    src,
                    dst,
                    method=cv2.RANSAC,
                    ransacReprojThreshold=threshold,
                    maxIters=_RANSAC_MAX_ITERS,
                    confidence=_RANSAC_CONFIDENCE,
                )
                if matrix is not None:
                    matrix = np.vstack([matrix, [0.0, 0.0, 1.0]])
            else:
                matrix, mask = cv2.findHomography(
                    src, dst, cv2.RANSAC, threshold, maxIters=_RANSAC_MAX_ITERS, confidence=_RANSAC_CONFIDENCE
                )
            if matrix is not None and np.isfinite(matrix).all():
                inliers = float(mask.mean())
                if inliers >= cfg.ego_min_inliers:
                    return matrix.astype(np.float64), cfg.ego_model, inliers
        # The median is the translation that most vectors agree with, whatever the outliers.
        shift = np.median(vectors, axis=0).astype(np.float64)
        inliers = float((np.linalg.norm(vectors - shift, axis=1) <= threshold).mean())
        matrix = np.eye(3)
        matrix[:2, 2] = shift
        return matrix, "translation", inliers

    def _verify(
        self, prev: np.ndarray, cur: np.ndarray, candidates: np.ndarray, flow: np.ndarray, ego_flow: np.ndarray
    ) -> np.ndarray:
        """(Hg, Wg) bool: the ``candidates`` blocks that pass the independent-motion test.

        The test is in the module docstring. A block whose camera-motion or flow displacement
        moves its centre out of the frame cannot be checked and is rejected.

        The three conditions are tested in turn, each on the blocks left by the one before, so
        the costly errors are only computed where they can matter: noisy flow (the ``nvof``
        engine's) makes about half the blocks candidates, and the camera motion explains all
        but a few percent of them.
        """
        verified = np.zeros(candidates.shape, bool)
        height, width, grid = self._size
        checkable = candidates.copy()
        for displacement in (ego_flow, flow):
            landed_x = self._xs[None, :] + displacement[..., 0]
            landed_y = self._ys[:, None] + displacement[..., 1]
            checkable &= (landed_x >= 0) & (landed_x <= width - 1) & (landed_y >= 0) & (landed_y <= height - 1)
        index = np.flatnonzero(checkable)  # flat block indices i * Wg + j
        if len(index) == 0:
            return verified
        cfg = self.cfg
        if grid == 1:
            camera_error = self._dense_error(prev, cur, ego_flow).reshape(-1)[index]
        else:
            prev_blocks = self._block_major(prev)
            camera_error = self._block_errors(prev_blocks, cur, index, ego_flow)
        unexplained = camera_error > cfg.independent_min_change
        index, camera_error = index[unexplained], camera_error[unexplained]
        if len(index) == 0:
            return verified
        if grid == 1:
            flow_error = self._dense_error(prev, cur, flow).reshape(-1)[index]
        else:
            flow_error = self._block_errors(prev_blocks, cur, index, flow)
        verified.reshape(-1)[index] = flow_error <= cfg.independent_error_ratio * camera_error
        return verified

    def _block_errors(
        self, prev_blocks: np.ndarray, cur: np.ndarray, index: np.ndarray, displacement: np.ndarray
    ) -> np.ndarray:
        """Mean ``|prev(q) - cur(q + d)|`` over the pixels q of K blocks, d the block's vector.

        Only the K given blocks are sampled, with one remap of K * g * g samples. Every array is
        laid out (g, g, K), blocks along the last axis, so each NumPy pass runs over K contiguous
        elements rather than over g.

        Args:
            prev_blocks: (g, g, Hg * Wg) uint8 prev by block, from :meth:`_block_major`.
            cur: (H, W) uint8 frame sampled at q + d.
            index: (K,) flat block indices ``i * Wg + j``.
            displacement: (Hg, Wg, 2) float32 field holding each block's d [px], (u, v).

        Returns:
            (K,) float64 errors in grey levels.
        """
        grid = self._size[2]
        count = len(index)
        flat = displacement.reshape(-1)
        # Pixel coordinates q + d in float32, as a per-pixel map of cv2.remap would hold them.
        x = np.take(self._block_x, index, axis=1)
        x += np.take(flat, 2 * index)
        y = np.take(self._block_y, index, axis=1)
        y += np.take(flat, 2 * index + 1)
        # cv2.remap takes 2-D maps of sides under 32767: (rows, _SAMPLE_ROW), the tail zeroed.
        size = grid * grid * count
        padded = -(-size // _SAMPLE_ROW) * _SAMPLE_ROW
        if self._maps.shape[1] < padded:
            # Kept between calls: fresh pages of a buffer this size cost more than filling them.
            self._maps = np.empty((2, padded), np.float32)
        maps = self._maps[:, :padded]
        maps[:, size:] = 0.0
        maps[0, :size].reshape(grid, grid, count)[...] = x[None, :, :]  # [a, b, k] = x[b, k]
        maps[1, :size].reshape(grid, grid, count)[...] = y[:, None, :]  # [a, b, k] = y[a, k]
        sampled = cv2.remap(
            cur,
            maps[0].reshape(-1, _SAMPLE_ROW),
            maps[1].reshape(-1, _SAMPLE_ROW),
            cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_REPLICATE,
        )
        sampled = sampled.reshape(-1)[:size].reshape(grid * grid, count)
        reference = np.take(prev_blocks, index, axis=2).reshape(grid * grid, count)
        # Exact integer sums over each block, then the mean.
        sums = cv2.reduce(cv2.absdiff(sampled, reference), 0, cv2.REDUCE_SUM, dtype=cv2.CV_32S)
        return sums.reshape(count) / grid**2

    def _block_major(self, image: np.ndarray) -> np.ndarray:
        """(g, g, Hg * Wg) uint8 copy of ``image`` by block: pixel (a, b) of block (i, j) at
        ``[a, b, i * Wg + j]``. Blocks clipped by the border repeat its last row or column, as
        the clipped coordinates in ``_block_x`` / ``_block_y`` do. The copy is a work buffer,
        overwritten by the next call.
        """
        height, width, grid = self._size
        hg, wg = self._grid_shape
        if (hg * grid, wg * grid) != (height, width):
            image = cv2.copyMakeBorder(image, 0, hg * grid - height, 0, wg * grid - width, cv2.BORDER_REPLICATE)
        blocks = self._blocks
        np.copyto(blocks.reshape(grid, grid, hg, wg), image.reshape(hg, grid, wg, grid).transpose(1, 3, 0, 2))
        return blocks

    def _dense_error(self, prev: np.ndarray, cur: np.ndarray, displacement: np.ndarray) -> np.ndarray:
        """(H, W) float32 ``|prev(q) - cur(q + d(q))|`` averaged over each pixel's 3x3 neighbourhood.

        For per-pixel flow (grid 1) one remap of the whole frame is cheaper than gathering
        scattered windows, and a single pixel is too noisy to test alone.
        """
        sampled = cv2.remap(
            cur,
            self._pixel_x + displacement[..., 0],
            self._pixel_y + displacement[..., 1],
            cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_REPLICATE,
        )
        return cv2.boxFilter(cv2.absdiff(sampled, prev), cv2.CV_32F, (3, 3))

    def _cut_cues(self, prev: np.ndarray, cur: np.ndarray, flow: np.ndarray) -> tuple[float, float]:
        """``(1 - ZNCC, warp mismatch share)`` of the cell-averaged pair (module docstring)."""
        cells = self._cells
        prev_c = cv2.resize(prev, cells, interpolation=cv2.INTER_AREA).astype(np.float32)
        cur_c = cv2.resize(cur, cells, interpolation=cv2.INTER_AREA).astype(np.float32)
        photometric = float(np.clip(1.0 - np.mean(_normalised(prev_c) * _normalised(cur_c)), 0.0, 2.0))

        flow_c = cv2.resize(flow, cells, interpolation=cv2.INTER_AREA)
        sx, sy = self._cell_scale
        map_x = self._cell_x + flow_c[..., 0] / sx
        map_y = self._cell_y + flow_c[..., 1] / sy
        inside = (map_x >= -0.5) & (map_x <= cells[0] - 0.5) & (map_y >= -0.5) & (map_y <= cells[1] - 0.5)
        if inside.mean() < _MIN_VALID_CELLS:
            return photometric, 1.0
        warped = cv2.remap(cur_c, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        disagree = np.abs(_normalised(prev_c, inside) - _normalised(warped, inside)) > self.cfg.cut_tolerance
        return photometric, float(disagree[inside].mean())


def changed_tiles(
    cfg: MotionConfig, is_cut: bool, tile_photometric: np.ndarray, independent_tiles: np.ndarray, tile_ego: np.ndarray
) -> np.ndarray:
    """Tiles whose pixels changed: every tile on a cut, else a photometric change, independent
    motion, or camera motion above the motion threshold."""
    if is_cut:
        return np.ones_like(independent_tiles)
    photometric = tile_photometric > cfg.photometric_threshold
    return photometric | independent_tiles | (tile_ego > cfg.motion_threshold_px)


def _normalised(image: np.ndarray, where: np.ndarray | None = None) -> np.ndarray:
    """Zero mean, unit contrast (std floored at ``_MIN_CONTRAST``), both taken over ``where``
    (over the whole image when None)."""
    values = image if where is None else image[where]
    return (image - values.mean()) / max(float(values.std()), _MIN_CONTRAST)


def _checked_inputs(
    cfg: MotionConfig, prev_gray: np.ndarray, cur_gray: np.ndarray, flow: FlowResult | np.ndarray, grid: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """``(prev, cur, flow, confidence)`` checked as :meth:`MotionAnalyzer.analyze` documents:
    (H, W) uint8 frames (RGB converted to gray), (Hg, Wg, 2) float32 flow and the (Hg, Wg)
    confidence or None. Raises ValueError otherwise."""
    prev_gray, cur_gray = _as_gray(prev_gray, "prev_gray"), _as_gray(cur_gray, "cur_gray")
    if prev_gray.shape != cur_gray.shape:
        raise ValueError(f"prev_gray {prev_gray.shape} and cur_gray {cur_gray.shape} must have the same shape")
    confidence = None
    if isinstance(flow, FlowResult):
        flow, confidence = flow.flow, flow.confidence
    if not is_int(grid) or grid < 1:
        raise ValueError(f"grid={grid!r}: must be an integer >= 1")
    if cfg.tile_size % grid:
        raise ValueError(f"motion.tile_size={cfg.tile_size}: must be a multiple of the flow grid {grid}")
    height, width = prev_gray.shape
    hg, wg = grid_shape(height, width, grid)
    flow = np.asarray(flow, dtype=np.float32)
    if flow.shape != (hg, wg, 2):
        raise ValueError(f"flow {flow.shape} must be (Hg, Wg, 2) = {(hg, wg, 2)} for {width}x{height} at grid {grid}")
    if confidence is not None and np.shape(confidence) != (hg, wg):
        raise ValueError(f"confidence {np.shape(confidence)} must be (Hg, Wg) = {(hg, wg)}")
    return prev_gray, cur_gray, flow, confidence


def _as_gray(image: np.ndarray, label: str) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ValueError(f"{label} must be a uint8 numpy array, got {getattr(image, 'dtype', type(image).__name__)}")
    if image.ndim == 3 and image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    if image.ndim != 2 or min(image.shape) < 1:
        raise ValueError(f"{label} must be (H, W) or (H, W, 3) uint8, got shape {image.shape}")
    return image


def _block_centres(size: int, grid: int) -> np.ndarray:
    """Centres [px] of the ``ceil(size / grid)`` blocks along one axis, the last one clipped."""
    starts = np.arange(0, size, grid)
    return ((starts + np.minimum(starts + grid, size) - 1) / 2.0).astype(np.float32)


def tile_sums(image: np.ndarray, step: int) -> np.ndarray:
    """Sums of ``image`` over ``step x step`` tiles, the last row and column of tiles clipped.

    Args:
        image: (H, W) uint8 or float array.
        step: tile side in elements of ``image``.

    Returns:
        (ceil(H / step), ceil(W / step)) float64 sums.

    >>> tile_sums(np.ones((5, 7), np.uint8), 4)
    array([[16., 12.],
           [ 4.,  3.]])
    """
    height, width = image.shape
    # With an integral image every tile sum is four lookups, exact for clipped tiles too.
    if image.dtype == np.uint8 and image.size * 255 < 2**31:
        table = cv2.integral(image, sdepth=cv2.CV_32S)
    else:
        table = cv2.integral(image, sdepth=cv2.CV_64F)
    # The stride misses the image border unless it divides the size; the last tile ends there.
    rows = np.append(np.arange(0, height, step), height)
    cols = np.append(np.arange(0, width, step), width)
    corners = table[rows][:, cols]
    return np.diff(np.diff(corners, axis=0), axis=1).astype(np.float64)


def _opening(mask: np.ndarray, side: int) -> np.ndarray:
    """Morphological opening of a uint8 mask by a ``side x side`` square (no-op for side 0)."""
    if side == 0:
        return mask
    kernel = np.ones((side, side), np.uint8)
    # Explicit anchors: OpenCV's default centre anchor shifts the result for even sides.
    eroded = cv2.erode(mask, kernel, anchor=(0, 0))
    return cv2.dilate(eroded, kernel, anchor=(side - 1, side - 1))


def _with_landing_blocks(moving: np.ndarray, flow: np.ndarray, grid: int, width: int, height: int) -> np.ndarray:
    """(Hg, Wg) uint8: ``moving`` plus every block that a moving block's pixels overlap in cur.

    Block ``(i, j)`` holds pixel centres ``g*j`` to ``g*j + g - 1``. Displaced by ``(u, v)``, with
    bilinear footprints, they overlap pixels ``floor(g*j + u)`` to ``ceil(g*j + g - 1 + u)``, at
    most two blocks per axis. Footprints entirely outside the frame mark nothing.
    """
    rows, cols = np.nonzero(moving)
    occupied = moving.copy()
    if len(rows) == 0:
        return occupied
    vectors = flow[rows, cols].astype(np.float64)
    spans, keep = [], np.ones(len(rows), bool)
    for index, shift, size in ((cols, vectors[:, 0], width), (rows, vectors[:, 1], height)):
        first = np.floor(grid * index + shift)
        last = np.ceil(grid * index + grid - 1 + shift)
        keep &= (last >= 0) & (first <= size - 1)
        spans.append([(np.clip(edge, 0, size - 1) // grid).astype(np.intp) for edge in (first, last)])
    (x_first, x_last), (y_first, y_last) = spans
    for ys in (y_first[keep], y_last[keep]):
        for xs in (x_first[keep], x_last[keep]):
            occupied[ys, xs] = 1
    return occupied


def _model_flow(matrix: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """(len(ys), len(xs), 2) float32 displacement ``matrix @ p - p`` at the points (xs x ys)."""
    x, y = xs[None, :].astype(np.float32), ys[:, None].astype(np.float32)
    m = matrix
    out = np.empty((len(ys), len(xs), 2), np.float32)
    if m[2, 0] == 0.0 and m[2, 1] == 0.0 and m[2, 2] == 1.0:
        # Affine: the per-row and per-column terms broadcast, one add per component.
        out[..., 0] = ((m[0, 0] - 1.0) * x + m[0, 2]) + m[0, 1] * y
        out[..., 1] = (m[1, 0] * x) + ((m[1, 1] - 1.0) * y + m[1, 2])
    else:
        w = m[2, 0] * x + m[2, 1] * y + m[2, 2]
        out[..., 0] = (m[0, 0] * x + m[0, 1] * y + m[0, 2]) / w - x
        out[..., 1] = (m[1, 0] * x + m[1, 1] * y + m[1, 2]) / w - y
    return out


def _tile_ego_motion(
    matrix: np.ndarray, corner_x: tuple[np.ndarray, np.ndarray], corner_y: tuple[np.ndarray, np.ndarray]
) -> np.ndarray:
    """(Ty, Tx) float32 largest displacement under ``matrix`` over each tile's 4 corner pixels."""
    magnitudes = [np.linalg.norm(_model_flow(matrix, xs, ys), axis=2) for xs in corner_x for ys in corner_y]
    return np.max(magnitudes, axis=0).astype(np.float32)


def make_example() -> tuple[MotionAnalyzer, np.ndarray, np.ndarray, np.ndarray, int]:
    """An analyzer and a 160x120 textured pair with a 24x16 px patch moving 3 px right.

    Returns:
        ``(analyzer, prev, cur, flow, grid)``: the default analyzer, (120, 160) uint8 frames,
        their exact (30, 40, 2) float32 flow on the 4-px grid, and that grid (4). Ready for
        ``analyzer.analyze(prev, cur, flow, grid)``.

    >>> analyzer, prev, cur, flow, grid = make_example()
    >>> result = analyzer.analyze(prev, cur, flow, grid)
    >>> result.changed_tiles.astype(int)  # the patch spans columns 40-66 of rows 40-55
    array([[0, 0, 0, 0, 0],
           [0, 1, 1, 0, 0],
           [0, 0, 0, 0, 0],
           [0, 0, 0, 0, 0]])
    >>> result.ego_model, result.change
    ('affine', 'partial')
    """
    rng = np.random.default_rng(0)
    background = cv2.GaussianBlur(rng.integers(0, 256, (120, 160), dtype=np.uint8), (0, 0), 1.0)
    patch = cv2.GaussianBlur(rng.integers(0, 256, (16, 24), dtype=np.uint8), (0, 0), 1.0)
    prev, cur = background.copy(), background.copy()
    prev[40:56, 40:64] = patch
    cur[40:56, 43:67] = patch
    flow = np.zeros((30, 40, 2), np.float32)
    flow[10:14, 10:16, 0] = 3.0
    return MotionAnalyzer(), prev, cur, flow, 4
