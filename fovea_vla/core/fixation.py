"""Fixation control: where the fovea points on each frame.

The controller is a small state machine with three modes (:class:`FixationMode`):

- **pursue**: follow motion inside the foveal window. Each frame the window (a disc of radius
  ``window_radius`` around the predicted position) is searched for moving blocks; their flow is
  gated against the predicted target velocity (so a car passing behind a pedestrian is not
  followed). The weighted median flow and the weighted median landing position (block centre +
  flow) of the surviving blocks, weighted by flow confidence and by closeness to the prediction,
  update an alpha-beta filter (constant-velocity model); a landing position that jumps more than
  ``innovation_gate`` window radii from the prediction is rejected. When nothing passes the
  gates (occlusion, motion blur, a pause), the filter coasts on its prediction for up to
  ``coast_s``; after that the pursuit is given up and the controller holds. Motion that
  appears in the window of a holding controller starts a new pursuit.
- **saccade**: jump to the top of a priority map, on a schedule (``saccade_rate_hz``) or on an
  event (see below). A frame on which a saccade lands reports this mode.
- **hold**: stay put: after a saccade to something static, after a pursuit was given up, and
  while an external or query fixation holds.

Priority map (used by every saccade and for the secondary fixations), on a grid 64 cells wide
with the image's aspect ratio::

    priority = motion_weight * independent motion (share of each cell's flow blocks)
             + saliency_weight * spectral-residual saliency of the gray frame, in [0, 1]
             + relevance_weight * external relevance map (e.g. from the encoder), clipped to [0, 1]

Inhibition of return (IOR): every saccade target is remembered with its landing time. For
``ior_window_s`` after that, no saccade lands within ``ior_radius`` of it (the priority is zero
there) and beyond that radius the priority is scaled by ``1 - exp(-d^2 / (2 ior_radius^2))``.
The current fixation is suppressed the same way, so a saccade always goes elsewhere.

Saccade policy, checked once per frame in this order:

1. An external or query fixation that holds wins over everything; events that arrive during a
   hold are dropped.
2. Events: ``cut`` (scene cut: the pursued target and IOR are forgotten), ``instruction``
   (:meth:`FixationController.notify_instruction_change`; IOR is cleared too), ``new_motion``
   (an independent-motion blob appears away from the fovea: the saccade goes to the best such
   blob) and ``idle`` (nothing pursued for ``acquire_after_s`` while independent motion exists
   elsewhere: the saccade goes to the best moving region). Only the events named in
   ``saccade_events`` are enabled. An event fires on its frame unless the previous saccade was
   less than ``min_saccade_interval_s`` ago; ``cut`` and ``instruction`` then wait for the
   first frame after that interval, the others are re-evaluated on the next frame. Events
   fire even during a pursuit.
3. Schedule: with ``saccade_rate_hz > 0`` a saccade is due every ``1 / saccade_rate_hz``
   seconds, on a fixed phase (frame times jitter the individual intervals, not the mean rate);
   an event saccade restarts the phase. **Pursuit wins**: while the controller pursues (the
   target was measured within ``coast_s``, coasting included) with a last measured confidence
   of at least ``pursuit_confidence``, due saccades wait; the first frame after the pursuit
   ends takes the overdue saccade.
4. A saccade that finds nothing to go to (the priority map is zero after IOR) is skipped.

A saccade that lands on independent motion lands on the centre of that moving blob and starts
pursuing it at its median flow, so a moving target is followed from the next frame.

Simultaneous fixations (``num_fixations > 1``): the primary is the controller's own fixation;
the others are the next-best peaks of the priority map (without the time-based IOR), each at
least ``ior_radius`` from the primary and from each other. Weights: ``primary_weight`` for the
primary, the rest shared in proportion to the peaks' priority.

Latency compensation. The filter estimates the target position at the frame's **capture time**
(``FixationState.filtered_x/filtered_y``; the layout of that frame is built around it because
it samples that frame). The **published** position ``FixationState.x/y`` is the prediction for
``capture time + latency_s``: ``filtered + velocity * latency_s``, clamped to the image. With
``latency_s = 0`` (default) both are the same.

Inputs are optical flow fields from :mod:`fovea_vla.core.flow`: (Hg, Wg, 2) float32 vectors in
full-resolution pixels per frame, one per ``grid x grid`` block, and optionally the motion
analysis of :mod:`fovea_vla.core.flow.motion` (residual flow without the camera's motion and the
verified independent-motion mask).

Pixel convention: x right, y down, the centre of the top-left pixel is (0, 0).
"""

from __future__ import annotations

import enum
import math
import numbers
from dataclasses import dataclass, fields

import cv2
import numpy as np

__all__ = [
    "SACCADE_EVENTS",
    "FixationConfig",
    "FixationController",
    "FixationMode",
    "FixationSet",
    "FixationSource",
    "FixationState",
    "grid_centers",
    "make_example",
    "spectral_residual_saliency",
]

SACCADE_EVENTS = ("new_motion", "cut", "instruction", "idle")

# Width [cells] of the priority and saliency maps; Hou & Zhang (CVPR 2007) use 64 px.
_MAP_WIDTH = 64
# Gate the pursuit measurement on the predicted velocity only once the filter has seen this
# many measurements; before that the velocity estimate is not trustworthy.
_GATE_AFTER_FRAMES = 3
# Time constant [s] of the memory of where independent motion was, against which a blob counts
# as new; long enough to bridge a few frames of missed detections.
_MOTION_MEMORY_S = 0.5
# Priority below this counts as nothing worth a saccade.
_MIN_PRIORITY = 1e-3
_EPS_S = 1e-6


class FixationSource(enum.IntEnum):
    """Why the fixation is where it is (same values as fovea_vla_msgs/Fixation SOURCE_*)."""

    DEFAULT = 0
    PURSUIT = 1
    SACCADE = 2
    EXTERNAL = 3
    QUERY = 4


class FixationMode(enum.IntEnum):
    """What the controller is doing on this frame (module docstring)."""

    HOLD = 0
    PURSUE = 1
    SACCADE = 2


@dataclass(frozen=True, kw_only=True)
class FixationConfig:
    """Fixation controller parameters.

    Attributes:
        window_fraction: radius of the pursuit window as a fraction of the image half-diagonal.
        motion_threshold_px: flow magnitude [px/frame], after removing camera motion, above which
            a block inside the pursuit window counts as moving (and, without a motion
            analysis, anywhere for the priority map and the motion events).
        min_moving_fraction: share of the window's blocks that must move (and pass the velocity
            gate) for a pursuit measurement.
        alpha: position gain of the alpha-beta filter, in (0, 1].
        beta: velocity gain of the alpha-beta filter on the position innovation, in [0, 1).
        velocity_gain: weight, in [0, 1], of the measured median flow in the velocity update.
        velocity_gate_px: a moving block in the window belongs to the pursued target when its
            flow is within ``max(velocity_gate_px, velocity_gate_ratio * |predicted|)`` px/frame
            of the predicted target displacement.
        velocity_gate_ratio: relative part of the velocity gate, >= 0.
        innovation_gate: once a pursuit is established, a measured position farther than this
            many window radii from the prediction is rejected (another object, flow spill).
        coast_s: how long the pursuit coasts on its prediction without a measurement before it
            is given up [s].
        velocity_decay: per-second decay of the velocity once a pursuit is given up.
        latency_s: pipeline latency [s] the published fixation is predicted ahead by.
        acquire_after_s: nothing pursued for this long [s] with independent motion elsewhere
            fires the ``idle`` event.
        saccade_rate_hz: scheduled saccades per second; 0 = saccades only on events.
        saccade_events: enabled events, a subset of ``new_motion, cut, instruction, idle``.
        min_saccade_interval_s: shortest time [s] from a saccade to an event saccade.
        pursuit_confidence: a pursuit measured with at least this confidence, in [0, 1],
            suppresses scheduled saccades.
        min_target_fraction: smallest independently moving blob worth a ``new_motion`` event,
            as a fraction of the image.
        motion_weight: weight of independent motion in the priority map, >= 0.
        saliency_weight: weight of the spectral-residual saliency, >= 0.
        relevance_weight: weight of the external relevance map, >= 0.
        ior_window_s: how long [s] a saccade target is inhibited; 0 = only the current fixation.
        ior_radius_fraction: IOR radius (and spacing of simultaneous fixations) as a fraction
            of the image half-diagonal.
        num_fixations: simultaneous fixations: the primary plus the next-best peaks of the
            priority map.
        primary_weight: importance weight of the primary fixation when there are others, in
            (0, 1]; the rest is shared in proportion to the peaks' priority.
        external_hold_s: how long an external or query fixation holds when the request gives
            no time.
    """

    window_fraction: float = 0.15
    motion_threshold_px: float = 0.6
    min_moving_fraction: float = 0.04
    alpha: float = 0.5
    beta: float = 0.05
    velocity_gain: float = 0.5
    velocity_gate_px: float = 1.0
    velocity_gate_ratio: float = 0.5
    innovation_gate: float = 0.5
    coast_s: float = 0.5
    velocity_decay: float = 3.0
    latency_s: float = 0.0
    acquire_after_s: float = 0.4
    saccade_rate_hz: float = 4.0
    saccade_events: tuple[str, ...] = SACCADE_EVENTS
    min_saccade_interval_s: float = 0.25
    pursuit_confidence: float = 0.5
    min_target_fraction: float = 0.002
    motion_weight: float = 1.0
    saliency_weight: float = 0.5
    relevance_weight: float = 1.0
    ior_window_s: float = 1.0
    ior_radius_fraction: float = 0.15
    num_fixations: int = 1
    primary_weight: float = 0.5
    external_hold_s: float = 3.0

    def __post_init__(self):
        for field in fields(self):
            value = getattr(self, field.name)
            if field.type == "float" and not (isinstance(value, numbers.Real) and not isinstance(value, bool)):
                raise ValueError(f"fixation.{field.name}={value!r}: must be a number")
        if isinstance(self.num_fixations, bool) or not isinstance(self.num_fixations, int):
            raise ValueError(f"fixation.num_fixations={self.num_fixations!r}: must be an integer")
        # name: (valid, the valid range in words)
        checks = {
            "window_fraction": (0.0 < self.window_fraction <= 1.0, "in (0, 1]"),
            "motion_threshold_px": (self.motion_threshold_px > 0.0, "> 0"),
            "min_moving_fraction": (0.0 < self.min_moving_fraction <= 1.0, "in (0, 1]"),
            "alpha": (0.0 < self.alpha <= 1.0, "in (0, 1]"),
            "beta": (0.0 <= self.beta < 1.0, "in [0, 1)"),
            "velocity_gain": (0.0 <= self.velocity_gain <= 1.0, "in [0, 1]"),
            "velocity_gate_px": (self.velocity_gate_px > 0.0, "> 0"),
            "velocity_gate_ratio": (self.velocity_gate_ratio >= 0.0, ">= 0"),
            "innovation_gate": (self.innovation_gate > 0.0, "> 0"),
            "coast_s": (self.coast_s >= 0.0, ">= 0"),
            "velocity_decay": (self.velocity_decay >= 0.0, ">= 0"),
            "latency_s": (0.0 <= self.latency_s <= 10.0, "in [0, 10]"),
            "acquire_after_s": (self.acquire_after_s >= 0.0, ">= 0"),
            "saccade_rate_hz": (0.0 <= self.saccade_rate_hz <= 100.0, "in [0, 100]"),
            "min_saccade_interval_s": (self.min_saccade_interval_s >= 0.0, ">= 0"),
            "pursuit_confidence": (0.0 <= self.pursuit_confidence <= 1.0, "in [0, 1]"),
            "min_target_fraction": (0.0 < self.min_target_fraction < 1.0, "in (0, 1)"),
            "motion_weight": (self.motion_weight >= 0.0, ">= 0"),
            "saliency_weight": (self.saliency_weight >= 0.0, ">= 0"),
            "relevance_weight": (self.relevance_weight >= 0.0, ">= 0"),
            "ior_window_s": (self.ior_window_s >= 0.0, ">= 0"),
            "ior_radius_fraction": (0.0 < self.ior_radius_fraction <= 2.0, "in (0, 2]"),
            "num_fixations": (1 <= self.num_fixations <= 16, "in [1, 16]"),
            "primary_weight": (0.0 < self.primary_weight <= 1.0, "in (0, 1]"),
            "external_hold_s": (self.external_hold_s > 0.0, "> 0"),
        }
        for name, (ok, valid) in checks.items():
            # Written as "is valid" tests, so NaN fails them.
            if not ok:
                raise ValueError(f"fixation.{name}={getattr(self, name)!r}: must be {valid}")
        events = self.saccade_events
        if not isinstance(events, tuple) or any(e not in SACCADE_EVENTS for e in events):
            raise ValueError(
                f"fixation.saccade_events={self.saccade_events!r}: must be a tuple of {', '.join(SACCADE_EVENTS)}"
            )


@dataclass(frozen=True)
class FixationState:
    """One fixation after one frame.

    Attributes:
        x, y: published position [px]: the target predicted for capture time + ``latency_s``.
        vx, vy: estimated image velocity of the pursued target [px/s].
        source: what placed the fixation here.
        confidence: [0, 1] support from the evidence on this frame.
        window_radius: pursuit window radius [px].
        mode: what the controller did on this frame.
        filtered_x, filtered_y: the filter's estimate at the frame's capture time [px] (the
            sampling layout of the frame is built around it).
    """

    x: float
    y: float
    vx: float
    vy: float
    source: FixationSource
    confidence: float
    window_radius: float
    mode: FixationMode
    filtered_x: float
    filtered_y: float

    @property
    def position(self) -> np.ndarray:
        """(2,) float32 published position (x, y) [px]."""
        return np.array([self.x, self.y], dtype=np.float32)

    @property
    def filtered(self) -> np.ndarray:
        """(2,) float32 capture-time position (x, y) [px]."""
        return np.array([self.filtered_x, self.filtered_y], dtype=np.float32)


@dataclass(frozen=True)
class FixationSet:
    """The simultaneous fixations of one frame.

    Attributes:
        fixations: K >= 1 fixations, the primary (the controller's own) first, then the
            next-best peaks of the priority map in falling priority.
        weights: K importance weights, summing to 1.
        saccade: the trigger when the primary saccaded on this frame (``"schedule"`` or an event
            name of :data:`SACCADE_EVENTS`), else None.
    """

    fixations: tuple[FixationState, ...]
    weights: tuple[float, ...]
    saccade: str | None

    @property
    def primary(self) -> FixationState:
        return self.fixations[0]


def grid_centers(grid_shape: tuple[int, int], grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Full-resolution pixel centres of flow blocks.

    Args:
        grid_shape: (Hg, Wg) blocks.
        grid: block side [px].

    Returns:
        xs (Wg,) and ys (Hg,) float32 block centres [px].

    Example:
        >>> grid_centers((2, 3), 4)[0]
        array([1.5, 5.5, 9.5], dtype=float32)
    """
    offset = (grid - 1) / 2.0
    xs = (np.arange(grid_shape[1], dtype=np.float32) * grid + offset).astype(np.float32)
    ys = (np.arange(grid_shape[0], dtype=np.float32) * grid + offset).astype(np.float32)
    return xs, ys


def spectral_residual_saliency(gray: np.ndarray, map_width: int = _MAP_WIDTH) -> np.ndarray:
    """Spectral-residual saliency (Hou & Zhang, CVPR 2007) of a downsampled gray frame.

    The log amplitude spectrum minus its 3x3 local mean keeps what is unexpected in the image;
    transformed back with the original phase, squared and blurred, it marks salient regions.
    Two changes make it behave on any input: the frame is mirrored to twice its size first, so
    the FFT's wrap-around does not turn the image borders salient, and the amplitude is floored
    at 1 % of its maximum (after removing the mean), so exact spectral zeros of synthetic images
    do not dominate. Cost: one area resize and a (2h, 2 * map_width) FFT pair, under 1 ms at
    640x480 on a desktop CPU.

    Args:
        gray: (H, W) uint8 (or float) gray frame.
        map_width: width of the map [cells]; the height keeps the aspect ratio.

    Returns:
        (h, map_width) float32 saliency in [0, 1] (1 at the most salient cell; all 0 for a
        uniform frame), ``h = max(1, round(map_width * H / W))``. Cell (i, j) covers the image
        columns ``[j * W / map_width, (j + 1) * W / map_width)``, and rows likewise.

    Example:
        >>> image = np.zeros((120, 160), np.uint8)
        >>> image[50:70, 100:120] = 255  # cells 20-28 by 40-48 of the 48x64 map
        >>> saliency = spectral_residual_saliency(image)
        >>> saliency.shape, [int(i) for i in np.unravel_index(saliency.argmax(), saliency.shape)]
        ((48, 64), [24, 43])
    """
    height, width = gray.shape[:2]
    map_height = max(1, round(map_width * height / width))
    small = cv2.resize(gray, (map_width, map_height), interpolation=cv2.INTER_AREA).astype(np.float32)
    small -= small.mean()
    if float(np.abs(small).max()) < 1e-3:
        return np.zeros((map_height, map_width), np.float32)
    mirrored = cv2.copyMakeBorder(small, 0, map_height, 0, map_width, cv2.BORDER_REFLECT)
    spectrum = np.fft.fft2(mirrored)
    amplitude = np.abs(spectrum)
    log_amplitude = np.log(amplitude + 0.01 * amplitude.max()).astype(np.float32)
    residual = log_amplitude - cv2.blur(log_amplitude, (3, 3), borderType=cv2.BORDER_WRAP)
    saliency = np.abs(np.fft.ifft2(np.exp(residual + 1j * np.angle(spectrum)))) ** 2
    saliency = cv2.GaussianBlur(saliency.astype(np.float32), (0, 0), 0.04 * map_width)[:map_height, :map_width]
    return saliency / max(float(saliency.max()), 1e-12)


def _flat(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Flat indices of (rows, cols) in a C-ordered 2-D array of ``shape``: ``take`` with them is
    several times faster than indexing with the two arrays."""
    return rows * shape[1] + cols


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per-column weighted median of (N, D) values with (N,) positive weights -> (D,)."""
    out = np.empty(values.shape[1])
    half = 0.5 * weights.sum()
    for d in range(values.shape[1]):
        order = np.argsort(values[:, d], kind="stable")
        cumulative = np.cumsum(weights[order])
        out[d] = values[order[np.searchsorted(cumulative, half)], d]
    return out


class FixationController:
    """Pursue / saccade / hold state machine over flow fields (module docstring).

    Args:
        cfg: controller parameters.
        width, height: image size [px].
    """

    def __init__(self, cfg: FixationConfig, width: int, height: int):
        self.cfg = cfg
        self.width = width
        self.height = height
        half_diagonal = 0.5 * math.hypot(width, height)
        self.window_radius = cfg.window_fraction * half_diagonal
        self.ior_radius = cfg.ior_radius_fraction * half_diagonal
        map_height = max(1, round(_MAP_WIDTH * height / width))
        self._map_shape = (map_height, _MAP_WIDTH)
        # Image position [px] of every map cell centre.
        self._map_x = ((np.arange(_MAP_WIDTH) + 0.5) * width / _MAP_WIDTH - 0.5).astype(np.float32)
        self._map_y = ((np.arange(map_height) + 0.5) * height / map_height - 0.5).astype(np.float32)
        self.reset()

    def reset(self) -> None:
        """Back to the image centre with no motion, no override, no history."""
        self._pos = np.array([(self.width - 1) / 2.0, (self.height - 1) / 2.0])
        self._vel = np.zeros(2)
        self._source = FixationSource.DEFAULT
        self._mode = FixationMode.HOLD
        self._confidence = 0.0
        self._last_time_s: float | None = None
        # Pursuit: time of the last measurement (None: not pursuing), measurements since the
        # pursuit started, and the confidence of the last one.
        self._measured_s: float | None = None
        self._track_frames = 0
        self._track_confidence = 0.0
        self._idle_since_s: float | None = None
        self._last_saccade_s = -math.inf
        self._next_saccade_s: float | None = None
        self._pending_events: list[str] = []
        self._pending_novel: np.ndarray | None = None
        self._hold_until_s: float | None = None
        self._ior: list[tuple[float, float, float]] = []
        self._motion_memory: np.ndarray | None = None
        self._set = FixationSet((self.state,), (1.0,), None)

    # -- state ------------------------------------------------------------------------------
    @property
    def state(self) -> FixationState:
        """The primary fixation after the last update."""
        lead = self._vel * self.cfg.latency_s
        published = self._clamp(self._pos + lead)
        return FixationState(
            x=float(published[0]),
            y=float(published[1]),
            vx=float(self._vel[0]),
            vy=float(self._vel[1]),
            source=self._source,
            confidence=float(self._confidence),
            window_radius=float(self.window_radius),
            mode=self._mode,
            filtered_x=float(self._pos[0]),
            filtered_y=float(self._pos[1]),
        )

    @property
    def fixations(self) -> FixationSet:
        """All simultaneous fixations of the last update, primary first, with their weights."""
        return self._set

    @property
    def pursuing(self) -> bool:
        """A target was measured within ``coast_s`` (coasting included)."""
        return self._measured_s is not None

    # -- requests ---------------------------------------------------------------------------
    def set_external(self, x: float, y: float, now_s: float, hold_s: float | None = None) -> FixationState:
        """Fix the gaze at (x, y) [px] until ``now_s + hold_s`` (default ``external_hold_s``)."""
        return self._hold_at(x, y, now_s, hold_s, FixationSource.EXTERNAL)

    def set_query_target(self, x: float, y: float, now_s: float, hold_s: float | None = None) -> FixationState:
        """Fix the gaze at the answer of a language query, (x, y) [px], like :meth:`set_external`."""
        return self._hold_at(x, y, now_s, hold_s, FixationSource.QUERY)

    def _hold_at(self, x, y, now_s, hold_s, source) -> FixationState:
        _check_finite(x, y)
        hold = self.cfg.external_hold_s if hold_s is None or hold_s <= 0 else hold_s
        self._pos = self._clamp(np.array([x, y], dtype=np.float64))
        self._vel[:] = 0.0
        self._source = source
        self._mode = FixationMode.HOLD
        self._confidence = 1.0
        self._measured_s = None
        self._hold_until_s = now_s + hold
        self._idle_since_s = now_s
        self._set = FixationSet((self.state,), (1.0,), None)
        return self.state

    def clear_external(self) -> None:
        """End an external or query hold; automatic control resumes from the current position."""
        self._hold_until_s = None
        if self._source in (FixationSource.EXTERNAL, FixationSource.QUERY):
            self._source = FixationSource.DEFAULT

    @property
    def external_active(self) -> bool:
        """An external or query fixation holds."""
        return self._hold_until_s is not None

    def start_pursuit(self, x: float, y: float, now_s: float) -> FixationState:
        """Pursue whatever moves at (x, y) [px] from now on (e.g. a tracker's initial box).

        Ends any hold. The target's velocity is unknown (0) until the first measurement; the
        pursuit coasts for ``coast_s`` if nothing moves there.
        """
        _check_finite(x, y)
        self._hold_until_s = None
        self._pos = self._clamp(np.array([x, y], dtype=np.float64))
        self._vel[:] = 0.0
        self._source = FixationSource.PURSUIT
        self._mode = FixationMode.PURSUE
        self._confidence = 1.0
        self._measured_s = now_s
        self._track_frames = 0
        self._track_confidence = 1.0
        self._idle_since_s = now_s
        self._set = FixationSet((self.state,), (1.0,), None)
        return self.state

    def notify_instruction_change(self) -> None:
        """The task changed: saccade on the next update (``instruction`` event) with IOR cleared."""
        if "instruction" in self.cfg.saccade_events:
            self._pending_events.append("instruction")

    def on_scene_cut(self, now_s: float) -> None:
        """Forget the pursued target, IOR and motion history; saccade on the next update."""
        self._vel[:] = 0.0
        self._confidence = 0.0
        self._measured_s = None
        self._track_frames = 0
        self._idle_since_s = now_s
        self._ior.clear()
        self._motion_memory = None
        self._pending_novel = None
        if "cut" in self.cfg.saccade_events:
            self._pending_events.append("cut")

    # -- per frame --------------------------------------------------------------------------
    def update(
        self,
        flow: np.ndarray | None,
        grid: int,
        now_s: float,
        *,
        residual: np.ndarray | None = None,
        independent: np.ndarray | None = None,
        confidence: np.ndarray | None = None,
        gray: np.ndarray | None = None,
        relevance: np.ndarray | None = None,
        is_cut: bool = False,
    ) -> FixationState:
        """Advance the controller by one frame.

        Args:
            flow: (Hg, Wg, 2) float32 flow from the previous frame to this one [px/frame], or
                None on the first frame, with flow off, or across a cut: nothing is measured.
            grid: block side [px] of ``flow``.
            now_s: capture time of this frame [s].
            residual: (Hg, Wg, 2) flow minus the camera's own motion, from motion analysis; when
                None the camera motion is taken as the median flow.
            independent: (Hg, Wg) bool blocks that move independently of the camera (motion
                analysis, verified); when None, blocks whose residual exceeds
                ``motion_threshold_px``. Drives the priority map and the motion events.
            confidence: (Hg, Wg) float32 in [0, 1] per-vector flow confidence, or None (all 1).
            gray: (H, W) uint8 gray frame for the saliency map, or None (no saliency term).
            relevance: (H', W') float relevance map over the whole image (any resolution;
                values clipped to [0, 1]), or None.
            is_cut: this frame starts a new scene (as :meth:`on_scene_cut`).

        Returns:
            The new primary fixation; :attr:`fixations` holds all of them.
        """
        dt = 1.0 / 30.0 if self._last_time_s is None else min(max(now_s - self._last_time_s, 1e-3), 1.0)
        self._last_time_s = now_s
        if self._next_saccade_s is None and self.cfg.saccade_rate_hz > 0:
            self._next_saccade_s = now_s + 1.0 / self.cfg.saccade_rate_hz
        if self._idle_since_s is None:
            self._idle_since_s = now_s
        if is_cut:
            self.on_scene_cut(now_s)
            flow = None

        moving = blocks = None
        if flow is not None:
            blocks = _Blocks(flow, grid, residual, confidence)
            moving = blocks.magnitude() > self.cfg.motion_threshold_px if independent is None else independent
        novel = self._novel_motion(moving, blocks, grid, dt) if moving is not None else None

        if self._hold_until_s is not None and now_s >= self._hold_until_s:
            self.clear_external()
        if self._hold_until_s is not None:
            self._pending_events.clear()
            self._pending_novel = None
            self._mode = FixationMode.HOLD
        else:
            self._pursue(blocks, now_s, dt)
            self._mode = FixationMode.PURSUE if self.pursuing else FixationMode.HOLD

        maps = _LazyPriority(self, gray, moving, grid, relevance)
        trigger = (
            None if self._hold_until_s is not None else self._maybe_saccade(now_s, dt, maps, moving, novel, blocks)
        )
        self._set = self._fixation_set(maps, trigger)
        return self._set.primary

    # -- pursuit ----------------------------------------------------------------------------
    def _pursue(self, blocks, now_s, dt) -> None:
        predicted = self._pos + self._vel * dt
        measurement = None if blocks is None else self._measure(blocks, predicted, dt)
        established = self._measured_s is not None and self._track_frames >= _GATE_AFTER_FRAMES
        jump = None if measurement is None else float(np.linalg.norm(measurement[0] - predicted))
        if established and jump is not None and jump > self.cfg.innovation_gate * self.window_radius:
            # A jump the target cannot have made is another object or flow spill, not the target.
            measurement = None
        if measurement is not None:
            position, velocity, confidence = measurement
            if self._measured_s is None:
                # A new pursuit: take the measured velocity as it is rather than filter it from 0.
                self._vel = velocity
                self._track_frames = 0
            innovation = position - predicted
            self._pos = self._clamp(predicted + self.cfg.alpha * innovation)
            self._vel = self._vel + (self.cfg.beta / dt) * innovation
            gain = self.cfg.velocity_gain
            self._vel = (1.0 - gain) * self._vel + gain * velocity
            self._source = FixationSource.PURSUIT
            self._confidence = confidence
            self._track_confidence = confidence
            self._measured_s = now_s
            self._track_frames += 1
            self._idle_since_s = now_s
            return
        if self._measured_s is not None and now_s - self._measured_s <= self.cfg.coast_s + _EPS_S:
            # Occluded or unmeasurable: coast on the constant-velocity prediction.
            self._pos = self._clamp(predicted)
            remaining = 1.0 - (now_s - self._measured_s) / max(self.cfg.coast_s, _EPS_S)
            self._confidence = self._track_confidence * max(remaining, 0.0)
            return
        # Nothing pursued: let the velocity die out where we are.
        self._measured_s = None
        self._vel *= math.exp(-self.cfg.velocity_decay * dt)
        self._pos = self._clamp(self._pos + self._vel * dt)
        self._confidence *= math.exp(-5.0 * dt)

    def _measure(self, blocks, predicted, dt):
        """Position [px], velocity [px/s] and confidence of the target in the window, or None."""
        xs, ys, flow, weights = blocks.xs, blocks.ys, blocks.flow, blocks.weights
        cfg = self.cfg
        # Only the blocks around the window are looked at; dx, dy and the window are local to them.
        box = blocks.around(predicted, self.window_radius)
        dx = xs[box[1]][None, :] - predicted[0]
        dy = ys[box[0]][:, None] - predicted[1]
        window = dx * dx + dy * dy <= self.window_radius**2
        in_window = int(window.sum())
        local_rows, local_cols = np.nonzero(
            window & (blocks.magnitude(box) > cfg.motion_threshold_px) & (weights[box] > 0)
        )
        needed = max(1, math.ceil(cfg.min_moving_fraction * in_window))
        if in_window == 0 or len(local_rows) < needed:
            return None
        rows, cols = local_rows + box[0].start, local_cols + box[1].start
        vectors = flow[rows, cols].astype(np.float64)
        w = weights[rows, cols].astype(np.float64)
        # Gate on the target's predicted displacement once it is known, else on the dominant
        # motion in the window: other movers (a passing car) and flow spill are left out.
        if self._measured_s is not None and self._track_frames >= _GATE_AFTER_FRAMES:
            reference = self._vel * dt
        else:
            reference = _weighted_median(vectors, w)
        gate = max(cfg.velocity_gate_px, cfg.velocity_gate_ratio * float(np.linalg.norm(reference)))
        keep = np.linalg.norm(vectors - reference, axis=1) <= gate
        if keep.sum() < needed:
            return None
        vectors, w, rows, cols = vectors[keep], w[keep], rows[keep], cols[keep]
        local_rows, local_cols = local_rows[keep], local_cols[keep]
        # Where the target's blocks are now: their previous-frame centres displaced by their flow.
        landed = np.stack([xs[cols], ys[rows]], axis=1) + vectors
        # Blocks near the prediction count more: the window's rim is where other movers enter.
        w = w * np.exp(-2.0 * ((dx[0, local_cols] ** 2 + dy[local_rows, 0] ** 2) / self.window_radius**2))
        position = _weighted_median(landed, w)
        velocity = _weighted_median(vectors, w) / dt
        confidence = float(min(1.0, keep.sum() / (4.0 * needed)))
        return position, velocity, confidence

    # -- saccades ---------------------------------------------------------------------------
    def _novel_motion(self, moving, blocks, grid, dt) -> np.ndarray | None:
        """(Hg, Wg) bool blobs of independent motion that were not there just before, or None."""
        cfg = self.cfg
        moving = np.asarray(moving, bool)
        min_blocks = max(1, int(cfg.min_target_fraction * moving.size))
        memory = self._motion_memory
        if memory is not None and memory.shape != moving.shape:
            memory = None
        # The blobs are labelled and judged on the moving blocks only (a few thousand of the
        # 130k blocks of a 1080p frame), within their bounding box. findNonZero lists them in
        # np.nonzero's (row-major) order, several times faster.
        points = cv2.findNonZero(moving.view(np.uint8))
        decay = math.exp(-dt / _MOTION_MEMORY_S)
        novel = np.zeros_like(moving)
        if memory is None:
            self._motion_memory = np.maximum(0.0, moving.astype(np.float32))
        elif points is None:
            self._motion_memory = np.multiply(memory, decay, out=memory)
        if points is None:
            return novel
        points = points.reshape(-1, 2)  # OpenCV 4 lists them as (N, 1, 2), OpenCV 5 as (N, 2)
        rows, cols = points[:, 1].astype(np.intp), points[:, 0].astype(np.intp)
        top, left = int(rows[0]), int(cols.min())
        box = (slice(top, int(rows[-1]) + 1), slice(left, int(cols.max()) + 1))
        seen = None
        if memory is not None:
            # Dilate by the distance the fastest mover covers in a frame, so a moving blob's
            # leading edge does not count as new.
            step = float(blocks.magnitude(_flat(rows, cols, moving.shape)).max())
            radius = min(8, 1 + math.ceil(step / grid))
            kernel = np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)
            # Dilated over the box grown by the kernel radius: the box's blocks see all of their
            # neighbourhood, and beyond the map nothing, as when the whole map is dilated.
            r0, c0 = max(top - radius, 0), max(left - radius, 0)
            grown = (slice(r0, box[0].stop + radius), slice(c0, box[1].stop + radius))
            dilated = cv2.dilate((memory[grown] > 0.1).view(np.uint8), kernel)
            seen = dilated.ravel().take(_flat(rows - r0, cols - c0, dilated.shape))
            # In place: the controller holds the only reference to its memory.
            self._motion_memory = np.maximum(np.multiply(memory, decay, out=memory), moving, out=memory)
            # A blob is new when it has at least min_blocks blocks and fewer than half of them
            # were seen, so more than min_blocks / 2 unseen ones: with fewer in all, none is.
            if 2 * (len(rows) - np.count_nonzero(seen)) <= min_blocks:
                return novel
        count, labels = cv2.connectedComponents(moving[box].view(np.uint8), connectivity=8)
        label = labels.ravel().take(_flat(rows - top, cols - left, labels.shape))
        # Label 0 is the background, which no moving block has.
        area = np.bincount(label, minlength=count)[1:]
        is_novel = area >= min_blocks
        if seen is not None:
            # The share of each blob's blocks that were seen (the float64 mean of its bools).
            is_novel &= np.bincount(label, weights=seen, minlength=count)[1:] / area < 0.5
        chosen = is_novel[label - 1]
        novel.ravel()[_flat(rows[chosen], cols[chosen], novel.shape)] = True
        return novel

    def _maybe_saccade(self, now_s, dt, maps, moving, novel, blocks) -> str | None:
        cfg = self.cfg
        refractory = now_s - self._last_saccade_s < cfg.min_saccade_interval_s - _EPS_S
        away = self._away_from_fovea(moving, blocks) if moving is not None else None
        if "new_motion" in cfg.saccade_events and away is not None:
            # New blobs wait out the refractory period here, grown by a block a frame as they move.
            pending = self._pending_novel
            if pending is not None and pending.shape == away.shape:
                novel = novel | cv2.dilate(pending.view(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
            self._pending_novel = novel & away if (novel & away).any() else None
        candidates: list[tuple[str, np.ndarray | None]] = []
        if not refractory:
            for event in ("cut", "instruction"):
                if event in self._pending_events:
                    candidates.append((event, None))
            if self._pending_novel is not None:
                candidates.append(("new_motion", self._pending_novel))
            idle = now_s - self._idle_since_s >= cfg.acquire_after_s - _EPS_S and not self.pursuing
            if "idle" in cfg.saccade_events and idle and away is not None and away.any():
                candidates.append(("idle", away))
        for event, region in candidates:
            if event == "instruction":
                self._ior.clear()  # a new task makes every target worth a look again
            if self._saccade(now_s, dt, maps, blocks, region):
                self._pending_events = [e for e in self._pending_events if e != event]
                if event == "new_motion":
                    self._pending_novel = None
                if cfg.saccade_rate_hz > 0:
                    self._next_saccade_s = now_s + 1.0 / cfg.saccade_rate_hz
                return event
        # Events that found nothing to look at are dropped; refractory ones wait.
        if not refractory:
            self._pending_events.clear()
            self._pending_novel = None

        if cfg.saccade_rate_hz <= 0 or now_s < self._next_saccade_s - _EPS_S:
            return None
        if self.pursuing and self._track_confidence >= cfg.pursuit_confidence:
            return None  # pursuit wins; the overdue saccade follows when it ends
        period = 1.0 / cfg.saccade_rate_hz
        self._next_saccade_s += period
        if self._next_saccade_s <= now_s:
            self._next_saccade_s = now_s + period
        return "schedule" if self._saccade(now_s, dt, maps, blocks, None) else None

    def _away_from_fovea(self, moving, blocks) -> np.ndarray:
        """(Hg, Wg) bool independent blocks farther than the pursuit window from the fixation."""
        away = np.array(moving, bool)
        # Blocks outside the box around the window are farther than its radius.
        box = blocks.around(self._pos, self.window_radius)
        dx = blocks.xs[box[1]][None, :] - self._pos[0]
        dy = blocks.ys[box[0]][:, None] - self._pos[1]
        away[box] &= dx * dx + dy * dy > self.window_radius**2
        return away

    def _saccade(self, now_s, dt, maps, blocks, region) -> bool:
        """Jump to the best target (restricted to the (Hg, Wg) bool ``region`` when given)."""
        priority = maps.priority()
        if region is not None:
            mask = cv2.resize(region.astype(np.float32), self._map_shape[::-1], interpolation=cv2.INTER_AREA)
            priority = priority * (mask > 0)
        priority = priority * self._inhibition(now_s)
        if float(priority.max()) < _MIN_PRIORITY:
            return False
        target = self._peak_position(priority)
        velocity = np.zeros(2)
        if blocks is not None and maps.moving is not None:
            # Land on the centre of the moving object at the peak (its blocks within the window)
            # and start pursuing it at its own velocity.
            xs, ys, flow, weights = blocks.xs, blocks.ys, blocks.flow, blocks.weights
            moving = np.asarray(maps.moving, bool)
            # Only blocks within the window are taken: d2 and near are local to the box around it.
            box = blocks.around(target, self.window_radius)
            d2 = (xs[box[1]][None, :] - target[0]) ** 2 + (ys[box[0]][:, None] - target[1]) ** 2
            near = np.where(moving[box] & (d2 <= (0.5 * self.window_radius) ** 2), d2, np.inf)
            if np.isfinite(near).any():
                # The blobs are labelled within the moving blocks' bounding box, which holds them all.
                x, y, w, h = cv2.boundingRect(moving.view(np.uint8))
                _, labels = cv2.connectedComponents(moving[y : y + h, x : x + w].view(np.uint8), connectivity=8)
                row, col = np.unravel_index(int(near.argmin()), near.shape)
                label = labels[box[0].start + row - y, box[1].start + col - x]
                # The blob's blocks in the window lie where the window's box and the bounding box meet.
                r0, r1 = max(box[0].start, y), min(box[0].stop, y + h)
                c0, c1 = max(box[1].start, x), min(box[1].stop, x + w)
                blob = labels[r0 - y : r1 - y, c0 - x : c1 - x] == label
                within = d2[r0 - box[0].start : r1 - box[0].start, c0 - box[1].start : c1 - box[1].start]
                rows, cols = np.nonzero(blob & (within <= self.window_radius**2))
                rows, cols = rows + r0, cols + c0
                vectors = flow[rows, cols].astype(np.float64)
                w = np.maximum(weights[rows, cols].astype(np.float64), 1e-6)
                landed = np.stack([xs[cols], ys[rows]], axis=1) + vectors
                target = (landed * w[:, None]).sum(axis=0) / w.sum()
                velocity = _weighted_median(vectors, w) / dt
        self._pos = self._clamp(target)
        self._vel = velocity
        self._source = FixationSource.SACCADE
        self._mode = FixationMode.SACCADE
        self._confidence = float(min(1.0, priority.max()))
        # Landing on a mover starts a pursuit at its velocity; the next frame measures it.
        self._measured_s = now_s if velocity.any() else None
        self._track_frames = 0
        self._track_confidence = 0.0
        self._last_saccade_s = now_s
        self._idle_since_s = now_s
        self._ior.append((float(self._pos[0]), float(self._pos[1]), now_s))
        return True

    def _inhibition(self, now_s) -> np.ndarray:
        """Map-shaped factor in [0, 1]: IOR of recent targets and of the current fixation."""
        self._ior = [entry for entry in self._ior if now_s - entry[2] < self.cfg.ior_window_s]
        points = [(float(self._pos[0]), float(self._pos[1]))] + [(x, y) for x, y, _ in self._ior]
        return self._suppression(points)

    def _suppression(self, points) -> np.ndarray:
        """Zero within ``ior_radius`` of each point, ``1 - exp(-d^2 / 2 r^2)`` beyond, multiplied."""
        factor = np.ones(self._map_shape, np.float32)
        r2 = self.ior_radius**2
        for x, y in points:
            d2 = (self._map_x[None, :] - x) ** 2 + (self._map_y[:, None] - y) ** 2
            factor *= np.where(d2 < r2, 0.0, 1.0 - np.exp(-0.5 * d2 / r2)).astype(np.float32)
        return factor

    def _peak_position(self, priority) -> np.ndarray:
        """Image position [px] of the map's maximum, refined by the 3x3 priority centroid."""
        row, col = np.unravel_index(int(priority.argmax()), priority.shape)
        r0, r1 = max(row - 1, 0), min(row + 2, priority.shape[0])
        c0, c1 = max(col - 1, 0), min(col + 2, priority.shape[1])
        patch = priority[r0:r1, c0:c1].astype(np.float64)
        total = patch.sum()
        x = float((patch.sum(axis=0) * self._map_x[c0:c1]).sum() / total)
        y = float((patch.sum(axis=1) * self._map_y[r0:r1]).sum() / total)
        return np.array([x, y])

    # -- simultaneous fixations -------------------------------------------------------------
    def _fixation_set(self, maps, trigger) -> FixationSet:
        primary = self.state
        if self.cfg.num_fixations == 1:
            return FixationSet((primary,), (1.0,), trigger)
        # Spaced from where the primary is on this frame (the layout's centre), not its prediction.
        priority = maps.priority() * self._suppression([(primary.filtered_x, primary.filtered_y)])
        states, scores = [primary], []
        for _ in range(self.cfg.num_fixations - 1):
            peak = float(priority.max())
            if peak < _MIN_PRIORITY:
                break
            x, y = self._peak_position(priority)
            states.append(
                FixationState(
                    x=x,
                    y=y,
                    vx=0.0,
                    vy=0.0,
                    source=FixationSource.SACCADE,
                    confidence=min(1.0, peak),
                    window_radius=float(self.window_radius),
                    mode=FixationMode.HOLD,
                    filtered_x=x,
                    filtered_y=y,
                )
            )
            scores.append(peak)
            priority = priority * self._suppression([(x, y)])
        if not scores:
            return FixationSet((primary,), (1.0,), trigger)
        rest = 1.0 - self.cfg.primary_weight
        weights = [self.cfg.primary_weight] + [rest * s / sum(scores) for s in scores]
        return FixationSet(tuple(states), tuple(weights), trigger)

    def _clamp(self, position: np.ndarray) -> np.ndarray:
        return np.clip(position, [0.0, 0.0], [self.width - 1.0, self.height - 1.0]).astype(np.float64)


class _Blocks:
    """One flow field's blocks: centres, flow, residual magnitude (computed where asked for) and weights.

    Args:
        flow: (Hg, Wg, 2) float32 flow [px/frame].
        grid: block side [px].
        residual: (Hg, Wg, 2) flow without the camera's motion, or None (flow minus its median).
        confidence: (Hg, Wg) per-block weights in [0, 1], or None (all 1).
    """

    def __init__(self, flow, grid, residual, confidence):
        self.xs, self.ys = grid_centers(flow.shape[:2], grid)
        self.flow = flow
        self.grid = grid
        if residual is None:
            residual = flow - np.median(flow.reshape(-1, 2), axis=0)
        self._residual = np.asarray(residual, np.float32)
        self._magnitude: np.ndarray | None = None
        self.weights = np.ones(flow.shape[:2], np.float32) if confidence is None else np.asarray(confidence, np.float32)

    def magnitude(self, where: tuple[slice, slice] | np.ndarray | None = None) -> np.ndarray:
        """Residual magnitude [px/frame], float32: (Hg, Wg), or part of it: a (rows, cols) box of
        slices, or (n,) at flat indices into the (Hg, Wg) map.

        Parts are computed on their own (most frames need a few thousand of the 130k blocks of a
        1080p frame). cv2.magnitude rounds a few elements at the ends of its buffer differently
        (plain vs fused multiply-add, by buffer alignment), by at most 1 ulp, on whole fields too.
        """
        if self._magnitude is not None:
            if isinstance(where, np.ndarray):
                return self._magnitude.ravel().take(where)
            return self._magnitude if where is None else self._magnitude[where]
        if where is None:
            self._magnitude = cv2.magnitude(self._residual[..., 0], self._residual[..., 1])
            return self._magnitude
        if isinstance(where, np.ndarray):
            residual = self._residual.reshape(-1, 2).take(where, axis=0)
        else:
            residual = self._residual[where]
        if residual.size == 0:
            return np.zeros(residual.shape[:-1], np.float32)  # cv2.magnitude returns None for nothing
        return cv2.magnitude(residual[..., 0], residual[..., 1]).reshape(residual.shape[:-1])

    def around(self, centre, radius: float) -> tuple[slice, slice]:
        """(rows, cols) slices of the blocks whose centres can lie within ``radius`` [px] of the
        (x, y) ``centre`` [px] (empty when none can).

        One block of slack on each side keeps every block the exact distance test would take.
        """
        reach = radius + self.grid
        cols = np.searchsorted(self.xs, (centre[0] - reach, centre[0] + reach), side="right")
        rows = np.searchsorted(self.ys, (centre[1] - reach, centre[1] + reach), side="right")
        return slice(int(rows[0]), int(rows[1])), slice(int(cols[0]), int(cols[1]))


class _LazyPriority:
    """The frame's priority map, computed on first use (most frames never need it)."""

    def __init__(self, ctrl: FixationController, gray, moving, grid, relevance):
        self.ctrl = ctrl
        self.gray = gray
        self.moving = moving
        self.grid = grid
        self.relevance = relevance
        self._map: np.ndarray | None = None

    def priority(self) -> np.ndarray:
        """(h, w) float32 priority map (module docstring), unsuppressed."""
        if self._map is not None:
            return self._map
        cfg = self.ctrl.cfg
        size = self.ctrl._map_shape[::-1]
        total = np.zeros(self.ctrl._map_shape, np.float32)
        if self.moving is not None and cfg.motion_weight > 0:
            motion = cv2.resize(np.asarray(self.moving, np.float32), size, interpolation=cv2.INTER_AREA)
            total += cfg.motion_weight * motion
        if self.gray is not None and cfg.saliency_weight > 0:
            total += cfg.saliency_weight * spectral_residual_saliency(self.gray, _MAP_WIDTH)
        if self.relevance is not None and cfg.relevance_weight > 0:
            relevance = np.clip(np.nan_to_num(np.asarray(self.relevance, np.float32)), 0.0, 1.0)
            total += cfg.relevance_weight * cv2.resize(relevance, size, interpolation=cv2.INTER_AREA)
        self._map = total
        return total


def make_example() -> tuple[FixationController, np.ndarray, int]:
    """A 640x480 controller and a 4-px-grid flow with a 30-px disc moving 3 px/frame right.

    Returns:
        ``(controller, flow, grid)``; ``controller.update(flow, grid, 0.0)`` pursues the disc.

    >>> ctrl, flow, grid = make_example()
    >>> ctrl.update(flow, grid, 0.0).mode.name
    'PURSUE'
    """
    xs, ys = grid_centers((120, 160), 4)
    flow = np.zeros((120, 160, 2), np.float32)
    flow[(xs[None, :] - 330.0) ** 2 + (ys[:, None] - 250.0) ** 2 <= 30.0**2] = (3.0, 0.0)
    return FixationController(FixationConfig(), 640, 480), flow, 4


def _check_finite(x: float, y: float) -> None:
    """A fixation request at NaN or infinity would poison the filter for good: refuse it."""
    if not (math.isfinite(x) and math.isfinite(y)):
        raise ValueError(f"fixation request at ({x}, {y}): coordinates must be finite")
