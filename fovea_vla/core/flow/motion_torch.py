"""Motion analysis in torch: :class:`~fovea_vla.core.flow.motion.MotionAnalyzer` on a GPU.

:class:`TorchMotion` computes the analysis of :mod:`fovea_vla.core.flow.motion` (the rules are
in its docstring) with whole-tensor torch ops, so the same code runs on CUDA and on the CPU.
``MotionAnalyzer`` delegates to it when ``MotionConfig.device`` is ``cuda[:N]``; tests build it
directly on the CPU. Only the camera-motion fit (RANSAC with OpenCV on ``ego_samples`` flow
vectors) stays on the host: it needs the flow there, which every backend returns as NumPy.

One call:

1. Upload ``cur`` (and ``prev``, unless it is the array object that was ``cur`` last call: that
   frame is still on the device) and the flow into fixed device buffers, through reused pinned
   staging buffers.
2. Device, part 1: tile sums of ``|prev - cur|`` (reshape/sum, border tiles clipped) and the
   cut cues (area resize by reshape/sum for integer factors, else OpenCV's area weights as two
   matrix products; ZNCC; the warp of ``cur`` back along the flow).
3. Host, meanwhile: the camera-motion fit. Its 3x3 matrix goes to the device.
4. Device, part 2: camera-motion flow at the block centres, residual, candidates, the
   independent-motion test on every block at once (no data-dependent shapes, hence no
   synchronisation), the opening by max-pooling, landing blocks by scatter, tile statistics.
   A cut zeroes the mask.
5. Two non-blocking copies of the packed outputs to the host, one synchronisation.

On CUDA each part is recorded once per frame size in a CUDA graph and replayed: eagerly they are
about 300 small kernels, whose launches cost more host time than the NumPy path saves.

Sampling convention: ``cur(q + d)`` is ``cv2.remap`` with ``INTER_LINEAR`` and
``BORDER_REPLICATE``, emulated with four gathers per sample rather than ``grid_sample`` so that
it is exact, in the flavour of the installed OpenCV (:func:`opencv_remap_rounds_coordinates`):
OpenCV 4 rounds coordinates to 1/32 px and interpolates uint8 in fixed point, rounding half up;
OpenCV 5 interpolates at the exact coordinates in float32 and rounds half to even. Plain
float32 ``grid_sample`` differs from either by a grey level on about 60 % of the samples. Left
as is (at most the last float32 bit, so only exact ties at a threshold can differ):
``cv2.magnitude`` (not correctly rounded), the float32 scale of ``cv2.boxFilter``'s SIMD body,
area resizes with fractional factors (one grey level on ~0.03 % of the cells), float64 cell
statistics. Agreement with the NumPy path is measured in test/unit/test_motion_torch.py.

Arrays are (H, W) frames, (Hg, Wg) = (ceil(H / g), ceil(W / g)) flow blocks, (Ty, Tx) tiles and
(Ch, Cw) cut cells; pixel centres at integer coordinates, x right, y down.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import replace

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from fovea_vla.core import accel
from fovea_vla.core.flow.base import FlowResult
from fovea_vla.core.flow.motion import (
    _MIN_CONTRAST,
    _MIN_VALID_CELLS,
    MotionAnalysis,
    MotionAnalyzer,
    MotionConfig,
    _checked_inputs,
    changed_tiles,
)

__all__ = ["TorchMotion", "area_weights", "opencv_remap_rounds_coordinates"]

_LOG = logging.getLogger(__name__)

# OpenCV 4's remap resolution: coordinates are rounded to 1/32 px (INTER_TAB_SIZE).
_REMAP_BITS = 5
# Coordinates are clamped to this many px before integer conversion (OpenCV saturates them; any
# sample that far out is a border pixel either way).
_FAR = 1e7


class TorchMotion:
    """Motion analysis of frame pairs with torch on ``device``.

    Keeps the last ``cur`` frame on the device: when the next call's ``prev_gray`` is that same
    array object, it is not uploaded again. Frames must therefore not be modified in place
    between the call that passed them as ``cur_gray`` and the one that passes them as
    ``prev_gray``. Like the NumPy analyzer, one instance must not run two calls at once.

    Args:
        cfg: validated settings; ``cfg.device`` is not read (``device`` is).
        device: torch device, ``cpu`` or ``cuda[:N]``.
        host: the analyzer whose size-dependent constants and camera-motion fit are used (a
            private CPU one when None).
        cuda_graphs: on CUDA, replay each part of the device work from a CUDA graph recorded
            on the first call of each frame size (False: launch the kernels one by one).

    Attributes:
        frame_uploads: frames uploaded so far (1 per call when ``prev`` is the last ``cur``).

    Raises:
        RuntimeError: ``device`` is a CUDA device that torch cannot use.

    >>> from fovea_vla.core.flow.motion import make_example
    >>> analyzer, prev, cur, flow, grid = make_example()
    >>> TorchMotion(analyzer.cfg, "cpu").analyze(prev, cur, flow, grid).changed_tiles.astype(int)
    array([[0, 0, 0, 0, 0],
           [0, 1, 1, 0, 0],
           [0, 0, 0, 0, 0],
           [0, 0, 0, 0, 0]])
    """

    def __init__(
        self,
        cfg: MotionConfig,
        device: str | torch.device = "cpu",
        host: MotionAnalyzer | None = None,
        cuda_graphs: bool = True,
    ):
        self.cfg = cfg
        self.device = torch.device(device)
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError(f"motion.device={str(device)!r} but torch {torch.__version__} sees no CUDA device")
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            if index >= torch.cuda.device_count():
                raise RuntimeError(
                    f"motion.device={str(device)!r} but torch sees {torch.cuda.device_count()} CUDA device(s)"
                )
            self.device = torch.device("cuda", index)
        elif self.device.type != "cpu":
            raise RuntimeError(f"motion.device={str(device)!r}: must be 'cpu', 'cuda' or 'cuda:N'")
        self._cuda = self.device.type == "cuda"
        self._graphs_wanted = cuda_graphs and self._cuda
        self._host = host if host is not None else MotionAnalyzer(replace(cfg, device="cpu"))
        self._quantised = opencv_remap_rounds_coordinates()
        self._staging: dict[str, torch.Tensor] = {}
        self._in_flight = False
        self.frame_uploads = 0
        self.reset()

    def reset(self) -> None:
        """Forget the frame kept on the device, the size-dependent buffers and the CUDA graphs."""
        self._key: tuple[int, int, int] | None = None
        self._last_input: np.ndarray | None = None  # held, so that its id cannot be reused
        self._graphs: list[torch.cuda.CUDAGraph] | None = None

    def analyze(
        self, prev_gray: np.ndarray, cur_gray: np.ndarray, flow: FlowResult | np.ndarray, grid: int
    ) -> MotionAnalysis:
        """Analyse the motion from ``prev_gray`` to ``cur_gray``: the arguments, result and errors
        of :meth:`MotionAnalyzer.analyze <fovea_vla.core.flow.motion.MotionAnalyzer.analyze>`.
        ``timing_ms`` includes the device work (it ends after the synchronising copy)."""
        start = time.perf_counter()
        if not self._cuda:
            return self._analyze(start, prev_gray, cur_gray, flow, grid)
        # Graph capture and replay use the current device's streams: make it this one.
        with torch.cuda.device(self.device):
            return self._analyze(start, prev_gray, cur_gray, flow, grid)

    def _analyze(
        self, start: float, prev_gray: np.ndarray, cur_gray: np.ndarray, flow: FlowResult | np.ndarray, grid: int
    ) -> MotionAnalysis:
        cfg = self.cfg
        prev_input, cur_input = prev_gray, cur_gray
        prev, cur, flow, confidence = _checked_inputs(cfg, prev_gray, cur_gray, flow, grid)
        height, width = prev.shape
        hg, wg = flow.shape[:2]
        host = self._host
        host._prepare(height, width, grid)
        if self._in_flight:  # an earlier call raised before its synchronisation: copies may be pending
            self._synchronize()
            self._last_input = None  # and the kept frame may not have been copied
        self._prepare(height, width, grid)
        self._in_flight = True

        if prev_input is not self._last_input:
            self._upload(prev, "prev", self._prev)
            self.frame_uploads += 1
        self._upload(cur, "cur", self._cur)
        self.frame_uploads += 1
        self._upload(flow, "flow", self._flow)
        if self._flow_cells is not None:  # OpenCV enlarges the flow (grid > cut_cell_px): its formula, here
            cells = cv2.resize(flow, host._cells, interpolation=cv2.INTER_AREA)
            self._upload(cells, "flow_cells", self._flow_cells)
        self._last_input = None
        self._run(0)  # queued before the fit, so the device works meanwhile

        ego, model, inliers = host._fit_ego(flow, confidence)
        self._upload(ego.reshape(-1), "ego", self._ego)
        self._run(1)
        packed, scalars = (t.to("cpu", non_blocking=True) for t in self._outputs)
        self._prev.copy_(self._cur)  # kept for the next call
        self._synchronize()
        self._in_flight = False
        self._last_input = cur_input

        packed, scalars = packed.numpy(), scalars.numpy()
        n, tiles = hg * wg, self._tiles
        t = tiles[0] * tiles[1]
        residual = packed[: 2 * n].reshape(hg, wg, 2)
        moving = packed[2 * n : 3 * n].reshape(hg, wg) > 0.5
        tile_motion, tile_fraction, tile_photometric, independent_tiles, tile_ego = (
            packed[3 * n + k * t : 3 * n + (k + 1) * t].reshape(tiles) for k in range(5)
        )
        independent_tiles = independent_tiles > 0.5
        cut_photometric, cut_mismatch, cut_score, is_cut = (float(v) for v in scalars)
        is_cut = is_cut > 0.5

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
            independent_mask=moving,
            is_cut=is_cut,
            cut_score=cut_score,
            cut_photometric=cut_photometric,
            cut_mismatch=cut_mismatch,
            timing_ms=(time.perf_counter() - start) * 1e3,
        )

    # --- per size ------------------------------------------------------------------------------

    def _prepare(self, height: int, width: int, grid: int) -> None:
        """Device constants and input buffers that depend only on the frame size and grid
        (after ``host._prepare``)."""
        key = (height, width, grid)
        if key == self._key:
            return
        self.reset()
        host, dev, cfg = self._host, self.device, self.cfg
        hg, wg = host._grid_shape
        cw, ch = host._cells
        self._size = key
        self._tiles = host._tile_pixels.shape
        self._xs = torch.from_numpy(host._xs).to(dev)  # (Wg,) float32 block centres
        self._ys = torch.from_numpy(host._ys).to(dev)  # (Hg,)
        self._tile_pixels = torch.from_numpy(host._tile_pixels).to(dev)  # (Ty, Tx) float64
        self._tile_blocks = torch.from_numpy(host._tile_blocks).to(dev)
        self._xs64, self._ys64 = self._xs.double(), self._ys.double()
        # First and last pixel of each tile, (first..., last...): float32 as _model_flow takes them.
        self._corner_x, self._corner_y = (
            torch.from_numpy(np.concatenate(edges).astype(np.float32)).to(dev).double()
            for edges in (host._corner_x, host._corner_y)
        )
        self._block_col = torch.arange(wg, dtype=torch.float64, device=dev)[None, :]
        self._block_row = torch.arange(hg, dtype=torch.float64, device=dev)[:, None]
        self._own = torch.arange(hg * wg, device=dev).reshape(hg, wg)
        self._pixel_x = torch.arange(width, dtype=torch.float32, device=dev)[None, :]
        self._pixel_y = torch.arange(height, dtype=torch.float32, device=dev)[:, None]
        # Pixel rows and columns of the blocks' pixels, clipped at the border like _block_x / _block_y.
        self._rows = torch.arange(hg * grid, device=dev).clamp_(max=height - 1)
        self._cols = torch.arange(wg * grid, device=dev).clamp_(max=width - 1)
        self._rows_f, self._cols_f = self._rows.float()[:, None], self._cols.float()[None, :]
        # Cut cells: frames by integer factors (reshape/sum) or weight matrices; the flow by weight
        # matrices, or on the host where OpenCV would enlarge it.
        self._frame_factors = (height // ch, width // cw) if height % ch == 0 and width % cw == 0 else None
        self._frame_weights = None
        if self._frame_factors is None:
            self._frame_weights = tuple(
                torch.from_numpy(area_weights(n, c)).to(dev) for n, c in ((height, ch), (width, cw))
            )
        self._flow_weights = None
        if hg >= ch and wg >= cw:
            self._flow_weights = tuple(torch.from_numpy(area_weights(n, c)).to(dev) for n, c in ((hg, ch), (wg, cw)))
        self._cell_x = torch.arange(cw, dtype=torch.float32, device=dev)[None, :]
        self._cell_y = torch.arange(ch, dtype=torch.float32, device=dev)[:, None]
        # Divisors as device tensors: CUDA divides by a Python number through its reciprocal,
        # one rounding off the NumPy path's quotient.
        sx, sy = host._cell_scale
        self._cell_scale = torch.tensor([np.float32(sx), np.float32(sy)], dtype=torch.float64, device=dev)
        self._block_area = torch.tensor(float(grid * grid), dtype=torch.float64, device=dev)
        self._cut_limits = torch.tensor([cfg.cut_photometric, cfg.cut_mismatch], dtype=torch.float64, device=dev)
        # Inputs, in fixed buffers so that CUDA graphs can read them.
        self._prev = torch.zeros((height, width), dtype=torch.uint8, device=dev)
        self._cur = torch.zeros((height, width), dtype=torch.uint8, device=dev)
        self._flow = torch.zeros((hg, wg, 2), dtype=torch.float32, device=dev)
        self._ego = torch.eye(3, dtype=torch.float64, device=dev).reshape(-1)
        self._flow_cells = None if self._flow_weights is not None else torch.zeros((ch, cw, 2), device=dev)
        self._key = key

    # --- transfers and running ------------------------------------------------------------------

    def _upload(self, array: np.ndarray, slot: str, target: torch.Tensor) -> None:
        """Copies ``array`` into the device buffer ``target``, on CUDA through the pinned staging
        buffer ``slot`` (reused: free again once the call's final synchronisation has run)."""
        if not self._cuda:
            target.copy_(torch.from_numpy(np.ascontiguousarray(array)))
            return
        staging = self._staging.get(slot)
        if staging is None or tuple(staging.shape) != array.shape or staging.numpy().dtype != array.dtype:
            staging = torch.from_numpy(np.empty(array.shape, array.dtype)).pin_memory()
            self._staging[slot] = staging
        np.copyto(staging.numpy(), array)
        target.copy_(staging, non_blocking=True)

    def _synchronize(self) -> None:
        if self._cuda:
            torch.cuda.current_stream(self.device).synchronize()

    def _run(self, part: int) -> None:
        """Runs part 0 (before the camera-motion fit) or 1 (after it) of the device work: from
        its CUDA graph, recorded on the first call of this frame size, or eagerly."""
        if self._graphs is not None:
            self._graphs[part].replay()
            if part == 1:
                self._outputs = self._graph_outputs
        elif part == 0:
            self._stage = self._before_fit()
        else:
            self._outputs = self._after_fit(*self._stage)
            if self._graphs_wanted:
                self._record()

    def _record(self) -> None:
        """Records both parts in CUDA graphs, after a warm-up on the recording stream. Their inputs
        hold this call's data, whose eager outputs stay valid. A failure leaves the eager path in
        place, logged once."""
        current = torch.cuda.current_stream(self.device)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(current)
        try:
            with torch.cuda.stream(stream):
                self._after_fit(*self._before_fit())  # warm-up: cuBLAS handles, allocator blocks
                first, second = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
                # thread_local: CUDA calls of the process's other threads (the action head, the encoder,
                # a decoder) must not invalidate this capture.
                with accel.collector_paused():
                    with torch.cuda.graph(first, stream=stream, capture_error_mode="thread_local"):
                        stage = self._before_fit()
                    with torch.cuda.graph(second, pool=first.pool(), stream=stream, capture_error_mode="thread_local"):
                        outputs = self._after_fit(*stage)
        except RuntimeError as exc:  # pragma: no cover - depends on the driver
            _LOG.warning("motion: CUDA graph capture failed (%s); launching kernels one by one", exc)
            self._graphs_wanted = False
            return
        finally:
            current.wait_stream(stream)
        self._graphs, self._graph_outputs = [first, second], outputs

    # --- the two parts ---------------------------------------------------------------------------

    def _before_fit(self) -> tuple[torch.Tensor, ...]:
        """Everything the camera motion does not change: ``(tile_photometric, cut scalars,
        reference, source, flow_error)``: (Ty, Tx) float32, (4,) float64 ``(cut_photometric,
        cut_mismatch, cut_score, is_cut)``, prev by block and cur to sample (see :meth:`_error`),
        and the (Hg, Wg) error of each block under its own flow vector."""
        cfg = self.cfg
        diff = (self._prev.to(torch.int16) - self._cur.to(torch.int16)).abs_()
        tile_photometric = (_tile_sums(diff, cfg.tile_size).double() / self._tile_pixels).float()
        photometric, mismatch = self._cut_cues()
        limits = self._cut_limits
        score = torch.minimum(photometric / limits[0], mismatch / limits[1])
        cut = torch.stack([photometric, mismatch, score, (score >= 1.0).double()])
        reference = self._prev[self._rows][:, self._cols].to(torch.int32) if self._size[2] > 1 else None
        source = self._cur.to(torch.int32 if self._quantised else torch.float32)
        return tile_photometric, cut, reference, source, self._error(self._flow, reference, source)

    def _after_fit(
        self,
        tile_photometric: torch.Tensor,
        cut: torch.Tensor,
        reference: torch.Tensor | None,
        source: torch.Tensor,
        flow_error: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed float32 ``(residual, independent_mask, tile_motion, tile_independent_fraction,
        tile_photometric, independent_tiles, tile_ego_motion)``, flattened in that order, and the
        cut scalars."""
        cfg = self.cfg
        height, width, grid = self._size
        flow = self._flow
        ego_flow = self._model_flow(self._xs64, self._ys64)
        residual = flow - ego_flow
        magnitude = _hypot(residual)
        # The independent-motion test (``_verify`` of the NumPy path) on every block at once.
        checkable = magnitude > cfg.motion_threshold_px
        for displacement in (ego_flow, flow):
            landed_x = self._xs[None, :] + displacement[..., 0]
            landed_y = self._ys[:, None] + displacement[..., 1]
            inside = (landed_x >= 0) & (landed_x <= width - 1) & (landed_y >= 0) & (landed_y <= height - 1)
            checkable = checkable & inside
        camera_error = self._error(ego_flow, reference, source)
        unexplained = camera_error > cfg.independent_min_change
        verified = checkable & unexplained & (flow_error <= cfg.independent_error_ratio * camera_error)
        # The NumPy path skips the test on a cut; here it runs and is discarded (no synchronisation).
        moving = _opening(verified, self._host._kernel_side) & (cut[3] < 0.5)

        step = cfg.tile_size // grid
        counts = _tile_sums(moving.to(torch.int32), step)
        moved = torch.where(moving, magnitude.double(), 0.0)
        tile_motion = (_tile_sums(moved, step) / counts.clamp(min=1)).float()
        occupied = self._with_landing_blocks(moving)
        tile_fraction = (_tile_sums(occupied.to(torch.int32), step).double() / self._tile_blocks).float()
        independent_tiles = tile_fraction >= cfg.tile_moving_fraction
        # _tile_ego_motion: the largest norm over the 4 corner pixels (float32, as np.linalg.norm).
        ty, tx = self._tiles
        corners = _hypot(self._model_flow(self._corner_x, self._corner_y))  # (2 Ty, 2 Tx)
        tile_ego = torch.stack([corners[:ty, :tx], corners[:ty, tx:], corners[ty:, :tx], corners[ty:, tx:]]).amax(0)
        parts = (residual, moving, tile_motion, tile_fraction, tile_photometric, independent_tiles, tile_ego)
        return torch.cat([part.reshape(-1).float() for part in parts]), cut

    # --- steps ---------------------------------------------------------------------------------

    def _model_flow(self, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        """(len(ys), len(xs), 2) float32 ``ego @ p - p`` at the points (xs x ys) (float64 values
        of float32 coordinates): ``_model_flow`` of the NumPy path (its affine or its projective
        formula, the same float64 operations in the same order), then rounded to float32."""
        x, y = xs[None, :], ys[:, None]
        m00, m01, m02, m10, m11, m12, m20, m21, m22 = self._ego.unbind()
        affine_u = ((m00 - 1.0) * x + m02) + m01 * y
        affine_v = (m10 * x) + ((m11 - 1.0) * y + m12)
        w = m20 * x + m21 * y + m22
        projective_u = (m00 * x + m01 * y + m02) / w - x
        projective_v = (m10 * x + m11 * y + m12) / w - y
        affine = (m20 == 0.0) & (m21 == 0.0) & (m22 == 1.0)
        u = torch.where(affine, affine_u, projective_u)
        v = torch.where(affine, affine_v, projective_v)
        return torch.stack([u, v], dim=-1).float()

    def _error(self, displacement: torch.Tensor, reference: torch.Tensor | None, source: torch.Tensor) -> torch.Tensor:
        """(Hg, Wg) error of every block under ``displacement``, sampling ``source`` (cur as int32
        for OpenCV 4's fixed point, float32 for OpenCV 5): :meth:`_block_errors` with
        ``reference``, the (Hg * g, Wg * g) int32 prev whose border blocks repeat the last row /
        column, or :meth:`_dense_error` for grid 1 (as the NumPy path's ``_verify`` picks them)."""
        if reference is None:
            return self._dense_error(displacement, source)
        return self._block_errors(reference, displacement, source)

    def _block_errors(self, reference: torch.Tensor, displacement: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """(Hg, Wg) float64 mean ``|prev(q) - cur(q + d)|`` over each block's g x g pixels q.

        Args:
            reference: (Hg * g, Wg * g) int32 prev, border blocks repeating the last row / column.
            displacement: (Hg, Wg, 2) float32 vector d of each block [px].
        """
        grid = self._size[2]
        hg, wg = displacement.shape[:2]
        per_pixel = displacement[:, None, :, None].expand(hg, grid, wg, grid, 2).reshape(hg * grid, wg * grid, 2)
        # float32 coordinates, as the NumPy path hands them to cv2.remap.
        x = self._cols_f + per_pixel[..., 0]
        y = self._rows_f + per_pixel[..., 1]
        error = (_remap_uint8(source, x, y, self._quantised) - reference).abs_()
        return error.reshape(hg, grid, wg, grid).sum(dim=(1, 3)).double() / self._block_area

    def _dense_error(self, displacement: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """(H, W) float32 ``|prev(q) - cur(q + d(q))|`` averaged over each pixel's 3x3
        neighbourhood (grid 1), border reflected (OpenCV's BORDER_REFLECT_101)."""
        height, width = self._prev.shape
        x = self._pixel_x + displacement[..., 0]
        y = self._pixel_y + displacement[..., 1]
        sampled = _remap_uint8(source, x, y, self._quantised)
        error = (sampled - self._prev.to(torch.int32)).abs_().float()[None, None]
        # Reflect-101 needs 2 pixels along an axis; OpenCV repeats the only one.
        error = F.pad(error, (1, 1, 0, 0), mode="reflect" if width > 1 else "replicate")
        error = F.pad(error, (0, 0, 1, 1), mode="reflect" if height > 1 else "replicate")
        sums = F.avg_pool2d(error, 3, stride=1, divisor_override=1)[0, 0]  # exact integer sums
        # boxFilter's SIMD body scales by float32(1/9) (its scalar tail by the double).
        return sums * float(np.float32(1.0 / 9.0))

    def _with_landing_blocks(self, moving: torch.Tensor) -> torch.Tensor:
        """(Hg, Wg) bool: ``moving`` plus the blocks its blocks' pixels overlap in cur
        (``_with_landing_blocks`` of the NumPy path, for every block at once)."""
        height, width, grid = self._size
        hg, wg = moving.shape
        vectors = self._flow.double()
        keep = moving
        edges = []
        for index, shift, size in (
            (self._block_col, vectors[..., 0], width),
            (self._block_row, vectors[..., 1], height),
        ):
            first = torch.floor(grid * index + shift)
            last = torch.ceil(grid * index + grid - 1 + shift)
            keep = keep & (last >= 0) & (first <= size - 1)
            edges.append([edge.clamp(0, size - 1) for edge in (first, last)])
        (x_first, x_last), (y_first, y_last) = (
            [torch.where(keep, edge, 0.0).long() // grid for edge in pair] for pair in edges
        )
        # Blocks not kept (non-finite vectors included) add 0 to themselves: no two of them share
        # an index, so the atomic adds do not queue up.
        own = self._own
        counts = moving.reshape(-1).to(torch.int32)
        weight = keep.reshape(-1).to(torch.int32)
        for ys in (y_first, y_last):
            for xs in (x_first, x_last):
                counts.scatter_add_(0, torch.where(keep, ys * wg + xs, own).reshape(-1), weight)
        return (counts > 0).reshape(hg, wg)

    def _cut_cues(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(1 - ZNCC, warp mismatch share)`` as 0-d float64 tensors (``_cut_cues`` of the
        NumPy path)."""
        cw, ch = self._host._cells
        prev_c, cur_c = self._area_frame(self._prev), self._area_frame(self._cur)
        photometric = (1.0 - torch.mean(_normalised(prev_c) * _normalised(cur_c))).clamp(0.0, 2.0)

        if self._flow_weights is not None:
            rows, cols = self._flow_weights
            flow_c = (rows @ self._flow.double().permute(2, 0, 1) @ cols.T).permute(1, 2, 0).float()
        else:
            flow_c = self._flow_cells
        # float32 quotient (correctly rounded through float64) and sum, as NumPy computes them.
        scale = self._cell_scale
        map_x = self._cell_x + (flow_c[..., 0].double() / scale[0]).float()
        map_y = self._cell_y + (flow_c[..., 1].double() / scale[1]).float()
        inside = (map_x >= -0.5) & (map_x <= cw - 0.5) & (map_y >= -0.5) & (map_y <= ch - 0.5)
        warped = _remap(cur_c, map_x, map_y, self._quantised)
        disagree = (_normalised(prev_c, inside) - _normalised(warped, inside)).abs() > self.cfg.cut_tolerance
        mismatch = (disagree & inside).double().sum() / inside.sum().clamp(min=1)
        return photometric, torch.where(inside.double().mean() < _MIN_VALID_CELLS, 1.0, mismatch)

    def _area_frame(self, frame: torch.Tensor) -> torch.Tensor:
        """(Ch, Cw) float32 ``cv2.resize(frame, cells, INTER_AREA)`` of an (H, W) uint8 frame:
        cell means rounded to whole grey levels as OpenCV's uint8 output is."""
        cw, ch = self._host._cells
        if self._frame_factors is not None:
            fy, fx = self._frame_factors
            sums = frame.reshape(ch, fy, cw, fx).sum(dim=(1, 3), dtype=torch.int32)
            if (fy, fx) == (2, 2):  # OpenCV's SIMD 2x2 path: (sum + 2) >> 2, ties rounded up
                return torch.div(sums + 2, 4, rounding_mode="floor").float()
            # OpenCV's integer-factor path: sum * float32(1 / area), rounded half to even.
            return torch.round(sums.float() * float(np.float32(1.0 / (fy * fx))))
        rows, cols = self._frame_weights
        return torch.round(rows @ frame.double() @ cols.T).float()


# --- functions ----------------------------------------------------------------------------------


@functools.cache
def opencv_remap_rounds_coordinates() -> bool:
    """Whether the installed OpenCV's ``remap`` (``INTER_LINEAR``) rounds coordinates to 1/32 px
    (OpenCV 4) rather than interpolating at them (OpenCV 5): sampling ``[0, 255]`` at x = 0.01
    gives 0 in the first case, 3 in the second."""
    image = np.array([[0, 255]], np.uint8)
    coordinate = np.full((1, 1), 0.01, np.float32)
    sample = cv2.remap(image, coordinate, np.zeros_like(coordinate), cv2.INTER_LINEAR)
    return int(sample[0, 0]) == 0


def area_weights(source: int, target: int) -> np.ndarray:
    """(target, source) float64 matrix of OpenCV's INTER_AREA weights (``computeResizeAreaTab``,
    float32 values) shrinking an axis of ``source`` samples to ``target``: row i averages the
    source interval ``[i * s, (i + 1) * s)``, ``s = source / target`` >= 1, partial samples
    weighted by their overlap.

    >>> area_weights(5, 2).round(6)
    array([[0.4, 0.4, 0.2, 0. , 0. ],
           [0. , 0. , 0.2, 0.4, 0.4]])
    """
    scale = source / target
    weights = np.zeros((target, source))
    for i in range(target):
        start = i * scale
        end = start + scale
        width = min(scale, source - start)
        first, last = int(np.ceil(start)), int(np.floor(end))
        last = min(last, source - 1)
        first = min(first, last)
        if first - start > 1e-3:
            weights[i, first - 1] += np.float32((first - start) / width)
        weights[i, first:last] += np.float32(1.0 / width)
        if end - last > 1e-3:
            weights[i, last] += np.float32(min(min(end - last, 1.0), width) / width)
    return weights


def _taps(image: torch.Tensor, x: torch.Tensor, y: torch.Tensor, quantised: bool):
    """The four bilinear taps of ``image`` around ``(x, y)`` and the fractions ``(fx, fy)``.

    Coordinates are rounded to 1/32 px when ``quantised`` (fractions then int32 in [0, 32)),
    else the fractions are float32 ``x - floor(x)``. Each tap index is clamped to the image
    (BORDER_REPLICATE), NaN coordinates land on the first pixel.
    """
    height, width = image.shape
    x, y = torch.broadcast_tensors(x, y)
    x = torch.nan_to_num(x, nan=-_FAR).clamp_(-_FAR, _FAR)
    y = torch.nan_to_num(y, nan=-_FAR).clamp_(-_FAR, _FAR)
    if quantised:
        steps = 1 << _REMAP_BITS
        qx, qy = torch.round(x * steps).long(), torch.round(y * steps).long()
        ix, iy = qx >> _REMAP_BITS, qy >> _REMAP_BITS
        fx, fy = qx & (steps - 1), qy & (steps - 1)
    else:
        x0, y0 = torch.floor(x), torch.floor(y)
        ix, iy = x0.long(), y0.long()
        fx, fy = x - x0, y - y0
    x0, x1 = ix.clamp(0, width - 1), (ix + 1).clamp_(0, width - 1)
    rows0, rows1 = iy.clamp(0, height - 1).mul_(width), (iy + 1).clamp_(0, height - 1).mul_(width)
    flat = image.reshape(-1)
    taps = [torch.take(flat, row + col) for row in (rows0, rows1) for col in (x0, x1)]
    return taps, fx, fy


def _remap_uint8(image: torch.Tensor, x: torch.Tensor, y: torch.Tensor, quantised: bool) -> torch.Tensor:
    """``cv2.remap(image, x, y, INTER_LINEAR, borderMode=BORDER_REPLICATE)`` of an (H, W) image
    of uint8 values at (N, M) float32 coordinates [px]: (N, M) integer samples, exactly OpenCV's
    (4 when ``quantised``, else 5). ``image`` is int32 when ``quantised``, else float32."""
    (p00, p01, p10, p11), fx, fy = _taps(image, x, y, quantised)
    if quantised:
        # Fixed point on the 1/32 grid: weights (32 - fx)(32 - fy) etc., result rounded half up.
        gx, gy = 32 - fx, 32 - fy
        value = (p00 * gx + p01 * fx) * gy + (p10 * gx + p11 * fx) * fy
        return (value + 512) >> (2 * _REMAP_BITS)
    top = p00 + fx * (p01 - p00)
    bottom = p10 + fx * (p11 - p10)
    return torch.round(top + fy * (bottom - top)).to(torch.int32)


def _remap(image: torch.Tensor, x: torch.Tensor, y: torch.Tensor, quantised: bool) -> torch.Tensor:
    """``cv2.remap`` (INTER_LINEAR, BORDER_REPLICATE) of an (H, W) float32 image at (N, M)
    float32 coordinates: (N, M) float32 samples, to float32 rounding."""
    (p00, p01, p10, p11), fx, fy = _taps(image, x, y, quantised)
    if quantised:
        fx, fy = fx.float() * (1.0 / 32), fy.float() * (1.0 / 32)
    top = p00 + fx * (p01 - p00)
    bottom = p10 + fx * (p11 - p10)
    return top + fy * (bottom - top)


def _hypot(vectors: torch.Tensor) -> torch.Tensor:
    """float32 ``sqrt(u * u + v * v)`` of (..., 2) float32 vectors, as NumPy computes it: the
    square root correctly rounded (through float64, since torch's float32 CPU kernel is not)."""
    u, v = vectors[..., 0], vectors[..., 1]
    return torch.sqrt((u * u + v * v).double()).float()


def _normalised(image: torch.Tensor, where: torch.Tensor | None = None) -> torch.Tensor:
    """float64 zero mean, unit contrast (std floored at ``_MIN_CONTRAST``), both over ``where``
    (over the whole image when None); ``_normalised`` of the NumPy path without masked indexing."""
    image = image.double()
    if where is None:
        mean = image.mean()
        std = image.std(correction=0)
    else:
        count = where.sum().clamp(min=1)
        mean = torch.where(where, image, 0.0).sum() / count
        std = torch.sqrt(torch.where(where, (image - mean) ** 2, 0.0).sum() / count)
    return (image - mean) / std.clamp(min=_MIN_CONTRAST)


def _tile_sums(image: torch.Tensor, step: int) -> torch.Tensor:
    """Sums of an (H, W) tensor over ``step x step`` tiles, the last row and column clipped
    (:func:`~fovea_vla.core.flow.motion.tile_sums`): int64 for integer input, float64 for float.

    >>> _tile_sums(torch.ones((5, 7), dtype=torch.int32), 4)
    tensor([[16, 12],
            [ 4,  3]])
    """
    height, width = image.shape
    ty, tx = -(-height // step), -(-width // step)
    if image.is_floating_point():
        image = image.double()
    padded = F.pad(image, (0, tx * step - width, 0, ty * step - height))
    return padded.reshape(ty, step, tx, step).sum(dim=(1, 3))


def _opening(mask: torch.Tensor, side: int) -> torch.Tensor:
    """Opening of an (Hg, Wg) bool mask by a ``side x side`` square with the anchors of the NumPy
    path's ``_opening``: erosion over rows/columns ``[i, i + side)``, then dilation over
    ``[i - side + 1, i]``; pixels outside the mask count for neither (no-op for side 0).

    >>> mask = torch.zeros((4, 5), dtype=torch.bool)
    >>> mask[1:3, 1:4] = True
    >>> mask[0, 4] = True  # isolated: removed
    >>> _opening(mask, 2).int()
    tensor([[0, 0, 0, 0, 0],
            [0, 1, 1, 1, 0],
            [0, 1, 1, 1, 0],
            [0, 0, 0, 0, 0]], dtype=torch.int32)
    """
    if side == 0:
        return mask
    pad = side - 1
    outside = (~mask).float()[None, None]
    # Erosion: a pixel stays if no pixel of its window is outside the mask (the frame's outside is not).
    eroded = 1.0 - F.max_pool2d(F.pad(outside, (0, pad, 0, pad)), side, stride=1)
    return F.max_pool2d(F.pad(eroded, (pad, 0, pad, 0)), side, stride=1)[0, 0] > 0.5
