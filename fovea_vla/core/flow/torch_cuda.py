"""``torch`` flow backend: pyramidal dense Lucas–Kanade with iterated median filtering, in PyTorch.

Algorithm (whole-image tensor ops only, so the same code runs on CUDA and on the CPU):

1. Both frames become gray float32 in [0, 1] (BT.601 weights, as ``cv2.COLOR_RGB2GRAY``, not
   rounded), are area-resized by ``FlowConfig.scale`` and built into a Gaussian pyramid: each
   level is the one below blurred with the binomial ``[1, 5, 10, 10, 5, 1] / 32`` and decimated
   by 2, so pixel ``j`` of level ``l + 1`` is centred on ``2j + 0.5`` of level ``l`` (the
   ``align_corners=False`` geometry of ``F.interpolate``); odd sizes are padded by replication.
2. Coarse to fine (Bouguet, "Pyramidal implementation of the Lucas Kanade feature tracker",
   Intel 2000), the flow of the level above is upsampled (bilinear, factor 2, vectors doubled)
   and refined by ``iterations`` Gauss–Newton steps of dense Lucas–Kanade (Lucas & Kanade,
   IJCAI 1981), each:

   - backward-warp ``cur`` and its derivatives with the current flow (``grid_sample``, bilinear,
     border);
   - temporal difference ``It = cur(x + u) - prev(x)`` and the symmetric gradient
     ``g = (grad prev(x) + grad cur(x + u)) / 2`` (central differences);
   - average ``g gᵀ`` and ``g It`` over a ``window`` x ``window`` box and solve
     ``(mean g gᵀ + λ I) du = -mean g It`` per pixel (λ: Tikhonov term for flat regions);
   - filter the flow with ``median_passes`` 5 x 5 medians. Median filtering after every warp
     removes the outliers of the linearisation without blurring motion boundaries (Sun, Roth &
     Black, "Secrets of optical flow estimation and their principles", CVPR 2010); repeating it
     widens the support, and on the developer data each extra pass lowered the endpoint error
     more than a larger ``window`` or more iterations did.
3. Refinement stops at ``finest_level``; coarser than 0, the field is upsampled to the working
   resolution. Confidence is ``exp(-r / 0.02)``, ``r`` the window mean of ``|cur(x + u) - prev(x)|``
   (intensity in [0, 1]) after the final step: 1 where the warp explains the pair, toward 0 at
   occlusions and where it does not.
4. The field is resampled to the output grid of the input resolution as in the ``dis`` backend:
   block average for ``grid=4`` at ``scale=1`` (border blocks clipped, as ``flow_at_grid``),
   area-resampling when shrinking, bilinear when growing; vectors in input pixels.

Preset mapping and endpoint error at ``scale=1`` (DIS ``medium`` for comparison: 0.224, 0.324,
0.342; see ``test/unit/test_flow_torch.py``):

===========  ======  ==========  ======  =============  ======  ===========  ======  ======
``preset``   levels  iterations  window  median passes  finest  RubberWhale  Grove2  alley_1
===========  ======  ==========  ======  =============  ======  ===========  ======  ======
ultrafast    5       2           3       4              1       0.335        0.288   0.434
fast         5       2           3       4              0       0.203        0.197   0.354
medium       5       4           3       8              0       0.158        0.171   0.285
slow         6       8           3       12             0       0.137        0.166   0.257
===========  ======  ==========  ======  =============  ======  ===========  ======  ======

(``finest`` 1: refinement stops at half the working resolution.) 1920x1080 gray pair on an H100
(torch 2.11, CUDA graph, grid 4): ultrafast 1.8 ms, fast 3.5 ms, medium 7.1 ms wall; of that
1.0 / 2.7 / 6.3 ms on the GPU.

Device: CUDA when ``torch.cuda.is_available()``, else the CPU. ``auto`` picks this backend only
with a CUDA device; on the CPU it runs when named (``flow.backend: torch``). Inputs may be numpy
arrays or torch uint8 tensors on the CPU or the backend's device (not copied through the host).
On CUDA the pipeline after the upload is captured once per input shape in a CUDA graph and
replayed (it is ~200 kernels for ``fast``, too many to launch one by one in a few ms), and the
5 x 5 median is one Triton kernel; on the CPU the median is OpenCV's ``medianBlur``. The
median is exact in every path, so CPU and CUDA compute the same function: the endpoint errors
agree to 1e-3 px, single pixels near motion boundaries can differ more (float rounding decides
a median tie or a step, and later iterations carry it on).
"""

from __future__ import annotations

import time

import numpy as np

from fovea_vla.core import accel
from fovea_vla.core.flow import _lk
from fovea_vla.core.flow._lk import GRAY_WEIGHTS, DenseLK, LKParams, median5, to_output_grid
from fovea_vla.core.flow.base import FLOW_BACKENDS, FlowConfig, FlowResult, grid_shape
from fovea_vla.core.registry import Availability

try:
    import torch
    import torch.nn.functional as F
except ImportError as _exc:  # reported by the availability checks instead of failing the import
    torch = None
    _TORCH_IMPORT_ERROR = f"torch not importable: {_exc}"

__all__ = ["PRESETS", "LKParams", "TorchFlow", "is_available", "is_available_when_named", "median5"]

NO_CUDA_REASON = (
    "no CUDA device: the torch flow backend runs on the CPU only when named explicitly (flow.backend: torch)"
)


def is_available() -> Availability:
    """``auto``'s check: ``(True, device)`` only with torch and a CUDA device."""
    if torch is None:
        return False, _TORCH_IMPORT_ERROR
    if not torch.cuda.is_available():
        return False, NO_CUDA_REASON
    if not _lk.HAVE_TRITON:
        return False, "Triton not importable: the 5x5 median would fall back to a slow path (name it to use it anyway)"
    return True, f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"


def is_available_when_named() -> Availability:
    """Check for ``flow.backend: torch``: torch importable, on CUDA or else on the CPU."""
    if torch is None:
        return False, _TORCH_IMPORT_ERROR
    if torch.cuda.is_available():
        median = "Triton median" if _lk.HAVE_TRITON else "slow median: Triton not importable"
        return True, f"{torch.cuda.get_device_name(0)} (torch {torch.__version__}, {median})"
    return True, f"torch {torch.__version__} on the CPU (no CUDA device)"


PRESETS: dict[str, LKParams] = {
    "ultrafast": LKParams(levels=5, iterations=2, window=3, median_passes=4, finest_level=1),
    "fast": LKParams(levels=5, iterations=2, window=3, median_passes=4),
    "medium": LKParams(levels=5, iterations=4, window=3, median_passes=8),
    "slow": LKParams(levels=6, iterations=8, window=3, median_passes=12),
}


@FLOW_BACKENDS.register("torch", is_available=is_available, when_named=is_available_when_named)
class TorchFlow:
    """Pyramidal dense Lucas–Kanade flow on a torch device, with the stage's scale/grid handling.

    On CUDA the whole pipeline after the upload (gray conversion to output grid, ~200 kernels for
    ``fast``) is captured once per input shape in a CUDA graph and replayed, so the host does not
    have to launch each kernel; the first call of a shape runs it three times (warm-up, capture).
    The field is copied to the host through pinned memory.

    Args:
        cfg: stage config; ``cfg.backend`` is ignored (``make_flow`` already resolved it),
            ``cfg.preset`` selects :data:`PRESETS`.
        device: torch device; None = ``"cuda"`` when available, else ``"cpu"``.
        params: algorithm settings overriding the preset's (for tuning and tests).
        cuda_graph: capture and replay a CUDA graph on CUDA (False = launch every kernel each call;
            same results).

    Raises:
        RuntimeError: torch is missing, or a CUDA device was asked for and none is present.
    """

    name = "torch"

    def __init__(
        self,
        cfg: FlowConfig,
        *,
        device: str | None = None,
        params: LKParams | None = None,
        cuda_graph: bool = True,
    ):
        if torch is None:
            raise RuntimeError(_TORCH_IMPORT_ERROR)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device={device!r} but torch {torch.__version__} sees no CUDA device")
        self.cfg = cfg
        self.params = params or PRESETS[cfg.preset]
        self._gray = torch.tensor(GRAY_WEIGHTS, device=self.device, dtype=torch.float32)
        self._lk = DenseLK(self.params, self.device)
        self._cuda = self.device.type == "cuda"
        self._use_graph = cuda_graph and self._cuda
        self._events = (
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if self._cuda else None
        )
        self.reset()

    def reset(self) -> None:
        """Drop the per-shape geometry and CUDA graph; the next call rebuilds them.

        The flow itself keeps no temporal state between calls.
        """
        self._key: tuple[int, ...] | None = None
        self._graph = None
        self._static_in = None
        self._static_out = None

    # --- geometry -----------------------------------------------------------------------------

    def _prepare(self, shape: tuple[int, ...]) -> None:
        """Pyramid geometry for (H, W[, 3]) input frames."""
        h, w = shape[:2]
        hs, ws = max(1, round(h * self.cfg.scale)), max(1, round(w * self.cfg.scale))
        self.reset()
        self._lk.prepare(hs, ws)
        self._key = shape

    # --- algorithm ----------------------------------------------------------------------------

    def _pipeline(self, pair):
        """(2, H, W[, 3]) uint8 frames on the device -> packed (3 Hg Wg,) float32 result.

        The packing is flow (Hg, Wg, 2) followed by confidence (Hg, Wg), so one copy moves both.
        """
        h, w = pair.shape[1:3]
        pair = pair.to(torch.float32)
        gray = (pair @ self._gray if pair.ndim == 4 else pair * (1.0 / 255.0)).unsqueeze(1)
        top = self._lk.levels[0]
        if (top.height, top.width) != (h, w):
            gray = F.interpolate(gray, size=(top.height, top.width), mode="area")
        field = to_output_grid(self._lk.coarse_to_fine(gray), h, w, self.cfg.grid)[0]
        return torch.cat((field[:2].permute(1, 2, 0).reshape(-1), field[2].reshape(-1)))

    def _capture(self) -> None:
        """Record the pipeline on ``self._static_in`` (holding real frames) into a CUDA graph."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            # Warm-up outside the graph: compiles the Triton kernel and picks cuDNN algorithms.
            for _ in range(2):
                self._pipeline(self._static_in)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with accel.collector_paused(), torch.cuda.graph(graph):
            self._static_out = self._pipeline(self._static_in)
        self._graph = graph

    # --- API ----------------------------------------------------------------------------------

    def compute(self, prev, cur) -> FlowResult:
        """Forward flow ``prev -> cur``.

        Args:
            prev: (H, W) uint8 grayscale or (H, W, 3) uint8 RGB frame at time t: a numpy array,
                or a torch tensor on the CPU or on the backend's device.
            cur: frame at time t+1, same shape and dtype as ``prev``.

        Returns:
            :class:`FlowResult` with (ceil(H/grid), ceil(W/grid), 2) float32 ``flow`` in input
            pixels and (Hg, Wg) float32 ``confidence`` in [0, 1], host numpy arrays new each call;
            ``device_flow``, the same field as a (Hg, Wg, 2) float32 tensor on the device (on the
            CPU it shares memory with ``flow``); on CUDA ``device_ms``, the CUDA-event time from
            the uploaded frames to the packed result.

        Raises:
            ValueError: shapes differ, or a frame is not (H, W) / (H, W, 3) uint8.
        """
        start = time.perf_counter()
        frames = [_as_tensor(label, image) for label, image in (("prev", prev), ("cur", cur))]
        shape = tuple(frames[0].shape)
        if shape != tuple(frames[1].shape):
            raise ValueError(f"prev {shape} and cur {tuple(frames[1].shape)} must have the same shape")
        if min(shape[:2]) < 1:
            raise ValueError(f"frames must not be empty, got {shape}")
        with torch.no_grad():
            if shape != self._key:
                self._prepare(shape)
            if self._use_graph:
                if self._static_in is None:
                    self._static_in = torch.stack([f.to(self.device) for f in frames])
                else:
                    for slot, frame in zip(self._static_in, frames, strict=True):
                        slot.copy_(frame, non_blocking=True)
                pair = self._static_in
            else:
                pair = torch.stack([f.to(self.device, non_blocking=True) for f in frames])
            if self._events:
                self._events[0].record()
            if self._use_graph:
                if self._graph is None:
                    self._capture()
                self._graph.replay()
                packed = self._static_out.clone()  # the graph overwrites its output next call
            else:
                packed = self._pipeline(pair)
            if self._cuda:
                self._events[1].record()
                host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
                host.copy_(packed, non_blocking=True)
                torch.cuda.current_stream(self.device).synchronize()
            else:
                host = packed
        h, w = shape[:2]
        hg, wg = grid_shape(h, w, self.cfg.grid)
        host = host.numpy()
        flow = host[: 2 * hg * wg].reshape(hg, wg, 2)
        confidence = host[2 * hg * wg :].reshape(hg, wg)
        device_flow = packed[: 2 * hg * wg].view(hg, wg, 2)
        device_ms = self._events[0].elapsed_time(self._events[1]) if self._events else None
        elapsed = (time.perf_counter() - start) * 1e3
        return FlowResult(flow, confidence, self.name, elapsed, device_flow=device_flow, device_ms=device_ms)


def _as_tensor(label: str, image):
    """Validated (H, W) / (H, W, 3) uint8 frame as a torch tensor (numpy wrapped without a copy)."""
    if isinstance(image, np.ndarray):
        shape, ok, dtype = image.shape, image.dtype == np.uint8, str(image.dtype)
    elif torch.is_tensor(image):
        shape, ok, dtype = tuple(image.shape), image.dtype == torch.uint8, str(image.dtype)
    else:
        raise ValueError(f"{label} must be a numpy array or a torch tensor, got {type(image).__name__}")
    if not ok or not (len(shape) == 2 or (len(shape) == 3 and shape[2] == 3)):
        raise ValueError(f"{label} must be (H, W) or (H, W, 3) uint8, got {shape} {dtype}")
    return torch.from_numpy(np.ascontiguousarray(image)) if isinstance(image, np.ndarray) else image
