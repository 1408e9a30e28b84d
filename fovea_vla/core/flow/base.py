"""Optical-flow stage: config, result type, backend protocol, registry and evaluation helpers.

Every backend turns a pair of frames into a forward flow field ``prev -> cur`` on a fixed output
grid of the *original* resolution, whatever working resolution it computed at internally, so the
rest of the pipeline never needs to know which backend ran or what ``scale`` was used.

Pixel convention (all backends): ``flow[y, x] = (u, v)`` is the displacement, in full-resolution
pixels, of the content at pixel centre ``(x, y)`` of ``prev`` to its position in ``cur``; ``u``
points right and ``v`` down. With ``grid = g`` the vector at ``[i, j]`` is the mean of the dense
field over rows ``[g*i, g*i+g)`` and columns ``[g*j, g*j+g)``, clipped at the image border (a
backend documents it where it only approximates this).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from fovea_vla.core.registry import BackendRegistry, BackendSelection

__all__ = [
    "FLOW_BACKENDS",
    "FLOW_PRESETS",
    "FLOW_UNKNOWN_THRESHOLD",
    "FlowBackend",
    "FlowConfig",
    "FlowResult",
    "check_frame_pair",
    "endpoint_error",
    "flow_at_grid",
    "grid_shape",
    "make_example",
    "make_flow",
]

FLOW_PRESETS = ("ultrafast", "fast", "medium", "slow")
FLOW_GRIDS = (1, 4)

# Middlebury/Sintel .flo files mark pixels without ground truth with |value| > 1e9.
FLOW_UNKNOWN_THRESHOLD = 1e9

FLOW_BACKENDS = BackendRegistry(
    "flow",
    auto_order=("vpi", "nvof", "torch", "dis"),
    modules=(
        "fovea_vla.core.flow.vpi",
        "fovea_vla.core.flow.nvof",
        "fovea_vla.core.flow.torch_cuda",
        "fovea_vla.core.flow.dis",
    ),
)


@dataclass(frozen=True, kw_only=True)
class FlowConfig:
    """Settings shared by every flow backend.

    Attributes:
        backend: registered backend name, or ``"auto"`` for the first available of
            ``vpi, nvof, torch, dis``.
        grid: output grid step in pixels: 1 = one vector per pixel (dense), 4 = one vector per
            4x4 block (the NVOF hardware grid). Only 1 and 4 are allowed.
        preset: speed/quality trade-off, one of ``ultrafast, fast, medium, slow``; each backend
            maps it to its own presets.
        scale: factor applied to the input pair before flow is computed, ``0 < scale <= 1``.
            The result is still returned on the output grid of the original resolution, with
            vectors in original-resolution pixels.
    """

    backend: str = "auto"
    grid: int = 1
    preset: str = "fast"
    scale: float = 0.5

    def __post_init__(self) -> None:
        if not isinstance(self.backend, str):
            raise ValueError(f"flow.backend={self.backend!r}: must be a string")
        FLOW_BACKENDS.check_name(self.backend, field="flow.backend")
        # bool is an int subclass; grid=True would otherwise pass as 1.
        if isinstance(self.grid, bool) or self.grid not in FLOW_GRIDS:
            raise ValueError(f"flow.grid={self.grid!r}: must be 1 or 4")
        if self.preset not in FLOW_PRESETS:
            raise ValueError(f"flow.preset={self.preset!r}: must be one of {', '.join(FLOW_PRESETS)}")
        is_number = isinstance(self.scale, numbers.Real) and not isinstance(self.scale, bool)
        # The negated chained comparison also rejects NaN.
        if not is_number or not 0 < self.scale <= 1:
            raise ValueError(f"flow.scale={self.scale!r}: must be a number with 0 < scale <= 1")


@dataclass
class FlowResult:
    """Flow from ``prev`` to ``cur`` on the output grid.

    Attributes:
        flow: (Hg, Wg, 2) float32, ``(u, v)`` in full-resolution pixels (u right, v down), with
            ``Hg = ceil(H / grid)``, ``Wg = ceil(W / grid)`` for (H, W) input frames.
        confidence: (Hg, Wg) float32 in [0, 1] (1 = trusted), or None when the backend has none.
        backend: name of the backend that produced it.
        timing_ms: wall time of ``compute`` in milliseconds, input conversion and the copy of
            ``flow`` to host memory included.
        device_flow: the same field as a torch.Tensor (Hg, Wg, 2) float32 on the backend's device
            (torch and nvof), for consumers that stay on the GPU; None for backends without torch.
        device_ms: GPU backends: time of the flow kernels alone [ms], measured with CUDA events;
            None for CPU backends.
    """

    flow: np.ndarray
    confidence: np.ndarray | None
    backend: str
    timing_ms: float
    device_flow: object | None = None
    device_ms: float | None = None


@runtime_checkable
class FlowBackend(Protocol):
    """What every registered flow backend provides.

    Backends are constructed by :func:`make_flow` with the :class:`FlowConfig`, keep their
    working buffers across calls and re-create them when the input size changes. GPU backends
    may additionally accept torch tensors (same layouts, on their device) in ``compute``.
    """

    name: str

    def compute(self, prev: np.ndarray, cur: np.ndarray) -> FlowResult:
        """Forward flow ``prev -> cur``.

        Args:
            prev: (H, W) uint8 grayscale or (H, W, 3) uint8 RGB frame at time t, host memory.
            cur: frame at time t+1, same shape and dtype as ``prev``.

        Returns:
            The flow on the configured output grid of the (H, W) input.
        """
        ...

    def reset(self) -> None:
        """Drop per-sequence state (e.g. after a scene cut or a camera switch)."""
        ...


def make_flow(cfg: FlowConfig) -> tuple[FlowBackend, BackendSelection]:
    """Resolve ``cfg.backend`` (``auto`` logs its pick once) and construct the backend.

    Args:
        cfg: validated stage config.

    Returns:
        ``(backend, selection)``: the constructed backend and the name/reason it was chosen.

    Raises:
        ValueError: unknown backend name.
        RuntimeError: the backend (or, for ``auto``, every candidate) is unavailable.
    """
    selection = FLOW_BACKENDS.select(cfg.backend, field="flow.backend")
    return FLOW_BACKENDS.create(selection.name, cfg), selection


def grid_shape(height: int, width: int, grid: int) -> tuple[int, int]:
    """Output grid size ``(ceil(H / grid), ceil(W / grid))`` for an (H, W) frame.

    >>> grid_shape(388, 584, 4), grid_shape(5, 7, 4)
    ((97, 146), (2, 2))
    """
    return -(-height // grid), -(-width // grid)


def flow_at_grid(flow_dense: np.ndarray, grid: int) -> np.ndarray:
    """Block-average a dense flow field onto a ``grid``-pixel grid.

    Partial blocks at the right and bottom border average only the pixels they contain.

    Args:
        flow_dense: (H, W, 2) float flow, pixels.
        grid: block size in pixels, >= 1.

    Returns:
        (ceil(H / grid), ceil(W / grid), 2) float32 flow in the same units (not rescaled).

    >>> f = np.arange(5 * 6 * 2, dtype=np.float32).reshape(5, 6, 2)
    >>> g = flow_at_grid(f, 4)
    >>> g.shape, float(g[0, 0, 0]), float(g[1, 1, 1])
    ((2, 2, 2), 21.0, 58.0)
    """
    if flow_dense.ndim != 3 or flow_dense.shape[2] != 2:
        raise ValueError(f"flow_dense must be (H, W, 2), got shape {flow_dense.shape}")
    if grid < 1:
        raise ValueError(f"grid={grid}: must be >= 1")
    if grid == 1:
        return flow_dense.astype(np.float32, copy=True)
    h, w = flow_dense.shape[:2]
    # reduceat sums [start_k, start_k+1) slices, so the clipped last blocks come out right.
    sums = np.add.reduceat(flow_dense, np.arange(0, h, grid), axis=0)
    sums = np.add.reduceat(sums, np.arange(0, w, grid), axis=1)
    rows = np.minimum(grid, h - grid * np.arange(sums.shape[0]))
    cols = np.minimum(grid, w - grid * np.arange(sums.shape[1]))
    return (sums / (rows[:, None, None] * cols[None, :, None])).astype(np.float32)


def endpoint_error(flow: np.ndarray, gt: np.ndarray, valid: np.ndarray | None = None) -> dict[str, float]:
    """Average endpoint error and 3-pixel outlier rate of ``flow`` against ground truth.

    Pixels where either GT component is unknown (``|value| > 1e9`` or non-finite, as in
    Middlebury/Sintel ``.flo`` files) are excluded, as are pixels where ``valid`` is False.

    Args:
        flow: (H, W, 2) float estimated flow, pixels.
        gt: (H, W, 2) float ground-truth flow, pixels.
        valid: optional (H, W) bool mask of pixels to evaluate (e.g. KITTI's valid channel).

    Returns:
        ``{"epe": mean |flow - gt| over evaluated pixels (px),
        "outlier_3px": fraction of evaluated pixels with error > 3 px}``.

    Raises:
        ValueError: mismatched shapes or no pixel to evaluate.

    >>> gt = np.zeros((2, 2, 2), np.float32); gt[0, 0] = 2e9
    >>> est = np.zeros((2, 2, 2), np.float32); est[1, 1] = (3.0, 4.0)
    >>> endpoint_error(est, gt)
    {'epe': 1.6666666666666667, 'outlier_3px': 0.3333333333333333}
    """
    if flow.shape != gt.shape or flow.ndim != 3 or flow.shape[2] != 2:
        raise ValueError(f"flow {flow.shape} and gt {gt.shape} must both be (H, W, 2)")
    known = np.all(np.isfinite(gt) & (np.abs(gt) <= FLOW_UNKNOWN_THRESHOLD), axis=2)
    if valid is not None:
        if valid.shape != flow.shape[:2]:
            raise ValueError(f"valid {valid.shape} must be (H, W) = {flow.shape[:2]}")
        known &= valid.astype(bool)
    if not known.any():
        raise ValueError("no pixel with known ground truth to evaluate")
    err = np.linalg.norm(flow[known].astype(np.float64) - gt[known], axis=1)
    return {"epe": float(err.mean()), "outlier_3px": float((err > 3.0).mean())}


def make_example(
    height: int = 480, width: int = 640, shift: tuple[float, float] = (1.7, -0.6), seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Synthetic textured pair with a known uniform sub-pixel translation.

    The texture is periodic white noise low-passed by a Gaussian (sigma 2 px) and translated by a
    Fourier phase ramp, which is an exact sub-pixel shift; ``cv2.warpAffine`` was not used because
    its interpolation moves the content by up to ~0.07 px more or less than asked. ``prev`` and
    ``cur`` are shifted by half the displacement each, in opposite directions.

    Args:
        height: frame height H in pixels.
        width: frame width W in pixels.
        shift: ``(u, v)`` displacement of the content from ``prev`` to ``cur``, pixels.
        seed: random seed of the texture.

    Returns:
        ``(prev, cur, flow_gt)``: two (H, W) uint8 grayscale frames (mean 128, std ~50) and the
        (H, W, 2) float32 ground truth, ``shift`` everywhere. The texture wraps around at the
        border, so a margin of ``|shift|`` pixels has content that enters from the other side.

    >>> prev, cur, gt = make_example(48, 64, shift=(1.0, 0.0))
    >>> bool(np.array_equal(np.roll(prev, 1, axis=1), cur)), gt.shape
    (True, (48, 64, 2))
    """
    rng = np.random.default_rng(seed)
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    sigma = 2.0
    spectrum = np.fft.rfft2(rng.standard_normal((height, width)))
    spectrum *= np.exp(-2.0 * np.pi**2 * sigma**2 * (fx**2 + fy**2))
    u, v = shift

    def translate(du: float, dv: float) -> np.ndarray:
        # Content moves by +d: image(x) = texture(x - d), a phase ramp exp(-2 pi i f.d).
        return np.fft.irfft2(spectrum * np.exp(-2j * np.pi * (fx * du + fy * dv)), s=(height, width))

    frames = (translate(-u / 2, -v / 2), translate(u / 2, v / 2))
    # A periodic shift keeps mean and std, so one gain maps both frames alike.
    offset, gain = frames[0].mean(), 50.0 / frames[0].std()
    prev, cur = (np.clip(np.rint((f - offset) * gain + 128.0), 0, 255).astype(np.uint8) for f in frames)
    flow_gt = np.empty((height, width, 2), np.float32)
    flow_gt[..., 0], flow_gt[..., 1] = u, v
    return prev, cur, flow_gt


def check_frame_pair(prev: np.ndarray, cur: np.ndarray) -> None:
    """Raise ``ValueError`` unless both frames are (H, W) or (H, W, 3) uint8 numpy arrays of one shape."""
    for label, image in (("prev", prev), ("cur", cur)):
        if not isinstance(image, np.ndarray):
            raise ValueError(f"{label} must be a numpy array, got {type(image).__name__}")
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
            raise ValueError(f"{label} must be (H, W) or (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if prev.shape != cur.shape:
        raise ValueError(f"prev {prev.shape} and cur {cur.shape} must have the same shape")
