"""Grasp-slip detection: motion of a held object relative to the gripper that holds it.

Per frame pair, :meth:`SlipDetector.update` takes the optical flow ``prev -> cur`` (any flow
backend), the gripper and object regions in ``prev`` (e.g. boxes of the gripper's CAD model and
of the grasped object projected with :func:`project_box`) and the gripper state, and measures

``relative = robust(flow in the object region) - robust(flow in the gripper region)``

Arm motion moves gripper and object alike and a translating camera shake moves the whole view,
so both cancel in the difference. With ``ego_motion`` (the camera map prev -> cur, e.g.
:attr:`~fovea_vla.core.flow.motion.MotionAnalysis.ego_motion`) the camera-motion flow at every
block is subtracted first, which also cancels camera rotation and zoom, whose flow differs
between the two regions. ``robust`` is a confidence-weighted interquartile mean of each flow
component over the region's textured blocks, at least ``edge_margin_px`` inside its rectangle
(flow smears across motion boundaries); gripper blocks inside the object rectangle are left out.

A frame is *slipping* when all of these hold:

- ``|relative| >= onset_threshold_px``;
- the object's blocks agree: a weighted share of at least ``min_agreement`` of them move along
  ``relative`` (their own relative vector has a positive component on it). A real slip moves
  the whole object (measured: >= 0.99 of the blocks agree from 0.2 px/frame on), while flow
  errors confined to part of the region (a highlight, an edge of an occluding finger) drag the
  mean without moving the rest;
- when the frames are given and ``verify_warp`` is on, the images confirm it: the object patch of
  ``prev`` matches ``cur`` displaced by the object's motion better than displaced by the
  gripper's, ``error(object) <= max_warp_ratio * error(gripper)``. The error is ``1 - ZNCC`` of
  lightly blurred patches, so a brightness gain or offset (flicker) leaves it unchanged.

State machine (one event per call at most): ``k_frames`` consecutive slipping frames give
ONSET; every later frame gives ONGOING until ``clear_frames`` consecutive frames below
``clear_threshold_px`` (lower than the onset threshold: hysteresis, no flapping) give CLEARED.
An open gripper resets the detector (an active slip ends with CLEARED on that frame).
Frames without enough texture in either region give no evidence: they break an onset run and
count toward clearing.

What the detector expects from the flow stage: accuracy well below the onset threshold on
both regions, including the thin gripper parts next to differently moving background, so dense
flow refined at full resolution: ``grid`` 1, ``scale`` 1, on a crop around the gripper
(:func:`slip_crop`) with ``cur`` brightness-matched to ``prev`` (:func:`match_brightness`).
Measured on the generated sequences of :mod:`fovea_vla.core.slip_sequences` (320x240, arm
motion, shake, flicker; 99th percentile of ``|relative|`` on a still grasp): DIS ``slow``
(medium refined down to full resolution) 0.09 px/frame, ``torch`` ``medium`` 0.13 px/frame, but
DIS ``medium`` 0.29 px/frame: it stops refining at half resolution, so the 16-18 px gripper
parts take up part of the background's motion. The 0.2 px/frame default onset threshold rests
on the first two; ``fovea-vla slip-eval`` measures any backend.

Pixel convention: x right, y down, the centre of the top-left pixel is (0, 0). Rectangles are
``(x, y, w, h)`` in px and hold the pixel centres in ``[x, x + w) x [y, y + h)`` (integers: the
``sensor_msgs/RegionOfInterest`` pixels ``x_offset .. x_offset + width - 1``). Flow follows
:mod:`fovea_vla.core.flow.base`: ``flow[i, j] = (u, v)`` [px/frame] for the block of rows
``[oy + g*i, oy + g*i + g)`` and columns ``[ox + g*j, ...)`` of the image, ``(ox, oy)`` the
``flow_origin`` of a crop.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from fovea_vla.core._validation import is_int, is_real
from fovea_vla.core.flow.base import FlowResult

__all__ = [
    "SlipConfig",
    "SlipDetector",
    "SlipEvent",
    "SlipMeasurement",
    "SlipState",
    "make_example",
    "match_brightness",
    "project_box",
    "slip_crop",
    "trimmed_mean",
]

Rect = tuple[float, float, float, float]

# Gaussian blur [px] of both frames before the warp test, so that the bilinear resampling of cur
# (a blur that depends on the fractional displacement) hardly changes the matching error.
_WARP_BLUR_SIGMA = 1.0
# Side [px] of the box over which the gradient magnitude is averaged for the texture test.
_TEXTURE_WINDOW = 5
# Padding [px] around the regions of the frame crops used for texture and the warp test.
_CROP_PAD = 4


class SlipState(enum.IntEnum):
    """Event states, equal to ``fovea_vla_msgs/SlipEvent`` ``STATE_*``."""

    ONSET = 0
    ONGOING = 1
    CLEARED = 2


@dataclass(frozen=True, kw_only=True)
class SlipConfig:
    """Slip detector settings.

    Attributes:
        onset_threshold_px: relative motion [px/frame], > 0, at or above which a frame counts
            toward an onset.
        clear_threshold_px: relative motion [px/frame], > 0 and below ``onset_threshold_px``,
            under which an active slip counts toward clearing.
        k_frames: consecutive slipping frames that confirm an onset, >= 1. The onset delay is
            at least ``k_frames - 1`` frames after the first frame above the threshold.
        clear_frames: consecutive frames below ``clear_threshold_px`` that clear a slip, >= 1.
        ego_compensation: subtract the camera-motion flow when ``ego_motion`` is given.
        edge_margin_px: blocks whose centre lies closer than this to a region's border are left
            out [px], >= 0.
        min_agreement: share of the object's (weighted) blocks, in [0.5, 1], that must move
            along the relative motion for a frame to count as slipping.
        verify_warp: confirm candidate frames on the images (needs ``prev_gray``/``cur_gray``).
        max_warp_ratio: the object-motion warp must leave at most this share, in (0, 1], of the
            gripper-motion warp's matching error.
        texture_threshold: gradient magnitude [grey levels/px, Sobel scale 1/8 per px],
            averaged over 5x5 px, at or above which a pixel counts as textured; >= 0.
            Untextured blocks are left out (their flow is unreliable). Without frames every
            block counts as textured.
        min_textured_area_px: textured area [px²] each region needs for a measurement, >= 1.
        min_flow_confidence: blocks whose backend confidence is below this are left out, in
            [0, 1]; the confidence also weights the rest.
        trim: share cut from each tail of each flow component before averaging, in [0, 0.5);
            0.25 gives the interquartile mean.
    """

    onset_threshold_px: float = 0.2
    clear_threshold_px: float = 0.1
    k_frames: int = 2
    clear_frames: int = 3
    ego_compensation: bool = True
    edge_margin_px: float = 3.0
    min_agreement: float = 0.75
    verify_warp: bool = True
    max_warp_ratio: float = 0.9
    texture_threshold: float = 2.0
    min_textured_area_px: int = 150
    min_flow_confidence: float = 0.3
    trim: float = 0.25

    def __post_init__(self) -> None:
        floats = {
            "onset_threshold_px": (0.0, math.inf, False),
            "clear_threshold_px": (0.0, self.onset_threshold_px, False),
            "edge_margin_px": (0.0, math.inf, True),
            "min_agreement": (0.5, 1.0, True),
            "max_warp_ratio": (0.0, 1.0, False),
            "texture_threshold": (0.0, math.inf, True),
            "min_flow_confidence": (0.0, 1.0, True),
            "trim": (0.0, 0.5, True),
        }
        for name, (low, high, low_in) in floats.items():
            value = getattr(self, name)
            # Written as "in range" tests, so NaN fails them; high is inclusive except for
            # trim (< 0.5 keeps samples) and the clear threshold (< onset: hysteresis).
            high_in = name not in ("trim", "clear_threshold_px")
            ok = is_real(value) and (low <= value if low_in else low < value)
            ok = ok and (value <= high if high_in else value < high) and math.isfinite(value)
            if not ok:
                interval = f"{'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"
                raise ValueError(f"slip.{name}={value!r}: must be a number in {interval}")
        for name in ("k_frames", "clear_frames", "min_textured_area_px"):
            value = getattr(self, name)
            if not (is_int(value) and value >= 1):
                raise ValueError(f"slip.{name}={value!r}: must be an integer >= 1")
        for name in ("ego_compensation", "verify_warp"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"slip.{name}={getattr(self, name)!r}: must be a bool")


@dataclass(frozen=True)
class SlipMeasurement:
    """What one frame pair shows (also kept when no event is emitted).

    Attributes:
        valid: both regions had enough textured area to measure.
        relative: ``(u, v)`` object motion relative to the gripper [px/frame], x right, y down.
        magnitude: ``|relative|`` [px/frame].
        agreement: weighted share, in [0, 1], of the object's blocks moving along ``relative``.
        warp_ratio: matching error of the object-motion warp over that of the gripper-motion
            warp (lower = the images confirm the slip); NaN when not computed.
        textured_share: textured share of the object region's blocks, in [0, 1].
        slipping: the frame passed every onset test.
        timing_ms: wall time of the measurement [ms].
    """

    valid: bool
    relative: tuple[float, float]
    magnitude: float
    agreement: float
    warp_ratio: float
    textured_share: float
    slipping: bool
    timing_ms: float


@dataclass(frozen=True)
class SlipEvent:
    """A slip event, the core twin of ``fovea_vla_msgs/SlipEvent``.

    Attributes:
        state: ONSET, ONGOING or CLEARED.
        stamp_s: capture time of the frame (``cur``) it was detected on [s].
        magnitude: object motion relative to the gripper [px/frame] on that frame.
        direction: unit vector ``(x, y)`` of that motion in the image (x right, y down); the
            last non-zero direction on frames without measurable motion.
        region: ``(x, y, w, h)`` integer rectangle [px] of the object region, clipped to >= 0.
        confidence: in [0, 1]: the blocks' agreement beyond chance (``2 * agreement - 1``)
            times the textured share of the object region; 0 without a valid measurement.
        timing_ms: wall time of the update [ms].
    """

    state: SlipState
    stamp_s: float
    magnitude: float
    direction: tuple[float, float]
    region: tuple[int, int, int, int]
    confidence: float
    timing_ms: float


class SlipDetector:
    """Slip state machine over per-frame relative-motion measurements (module docstring).

    Args:
        cfg: validated settings (defaults when None).
    """

    def __init__(self, cfg: SlipConfig | None = None):
        self.cfg = cfg if cfg is not None else SlipConfig()
        self.last_measurement: SlipMeasurement | None = None
        self.reset()

    @property
    def active(self) -> bool:
        """A slip has been reported (ONSET) and not yet cleared."""
        return self._active

    def reset(self) -> None:
        """Forget the slip state (e.g. after the gripper opened or a scene cut)."""
        self._active = False
        self._run = 0  # consecutive slipping frames while idle, frames below clear while active
        self._direction = (1.0, 0.0)

    def update(
        self,
        flow: FlowResult | np.ndarray,
        grid: int,
        gripper_region: Rect | Sequence[Rect],
        object_region: Rect,
        gripper_closed: bool,
        *,
        stamp_s: float,
        ego_motion: np.ndarray | None = None,
        prev_gray: np.ndarray | None = None,
        cur_gray: np.ndarray | None = None,
        flow_origin: tuple[int, int] = (0, 0),
    ) -> SlipEvent | None:
        """Measure one frame pair and advance the state machine.

        Args:
            flow: flow ``prev -> cur``: a :class:`FlowResult` (its optional (Hg, Wg) confidence
                in [0, 1] weights the blocks) or an (Hg, Wg, 2) float array [px/frame], u right,
                v down, on blocks of ``grid`` px starting at ``flow_origin``.
            grid: block side g [px] of the flow, >= 1.
            gripper_region: one ``(x, y, w, h)`` rectangle [px] or several (palm, fingers) of
                the gripper in ``prev``.
            object_region: ``(x, y, w, h)`` [px] of the held object in ``prev``.
            gripper_closed: False resets the detector and measures nothing.
            stamp_s: capture time of ``cur`` [s], copied into the event.
            ego_motion: optional (3, 3) float homogeneous camera map of ``prev`` pixel
                coordinates to ``cur`` (affine or homography); used when
                ``cfg.ego_compensation``.
            prev_gray: optional (H, W) uint8 full frame at time t, for the texture and warp
                tests; the regions must lie in it.
            cur_gray: optional (H, W) uint8 full frame at time t+1 (needed for the warp test).
            flow_origin: ``(x, y)`` [px] of the image pixel at the top-left of block (0, 0),
                for flow computed on a crop (:func:`slip_crop`); (0, 0) for full frames.

        Returns:
            The event of this frame, or None.

        Raises:
            ValueError: malformed flow, grid, regions, frames or matrix.
        """
        start = time.perf_counter()
        cfg = self.cfg
        object_region = _check_rect(object_region, "object_region")
        if not gripper_closed:
            self.last_measurement = None
            event = self._emit(SlipState.CLEARED, stamp_s, 0.0, object_region, 0.0, start) if self._active else None
            self.reset()
            return event
        m = self._measure(flow, grid, gripper_region, object_region, ego_motion, prev_gray, cur_gray, flow_origin)
        self.last_measurement = m
        if m.magnitude > 0:
            self._direction = (m.relative[0] / m.magnitude, m.relative[1] / m.magnitude)
        confidence = max(0.0, 2.0 * m.agreement - 1.0) * m.textured_share if m.valid else 0.0
        if not self._active:
            self._run = self._run + 1 if m.slipping else 0
            if self._run < cfg.k_frames:
                return None
            self._active, self._run = True, 0
            return self._emit(SlipState.ONSET, stamp_s, m.magnitude, object_region, confidence, start)
        below = not m.valid or m.magnitude < cfg.clear_threshold_px
        self._run = self._run + 1 if below else 0
        if self._run >= cfg.clear_frames:
            event = self._emit(SlipState.CLEARED, stamp_s, m.magnitude, object_region, confidence, start)
            self.reset()
            return event
        return self._emit(SlipState.ONGOING, stamp_s, m.magnitude, object_region, confidence, start)

    def _emit(self, state, stamp_s, magnitude, region: Rect, confidence, start) -> SlipEvent:
        x, y, w, h = region
        x0, y0 = max(0, math.ceil(x)), max(0, math.ceil(y))
        rect = (x0, y0, max(0, math.ceil(x + w) - x0), max(0, math.ceil(y + h) - y0))
        return SlipEvent(
            state=state,
            stamp_s=float(stamp_s),
            magnitude=float(magnitude),
            direction=self._direction,
            region=rect,
            confidence=float(confidence),
            timing_ms=(time.perf_counter() - start) * 1e3,
        )

    # --- measurement --------------------------------------------------------------------------

    def _measure(
        self, flow, grid, gripper_region, object_region: Rect, ego_motion, prev_gray, cur_gray, flow_origin
    ) -> SlipMeasurement:
        start = time.perf_counter()
        cfg = self.cfg
        confidence = None
        if isinstance(flow, FlowResult):
            flow, confidence = flow.flow, flow.confidence
        flow = np.asarray(flow, dtype=np.float32)
        if flow.ndim != 3 or flow.shape[2] != 2 or min(flow.shape[:2]) < 1:
            raise ValueError(f"flow must be (Hg, Wg, 2), got shape {flow.shape}")
        if not is_int(grid) or grid < 1:
            raise ValueError(f"grid={grid!r}: must be an integer >= 1")
        if confidence is not None and np.shape(confidence) != flow.shape[:2]:
            raise ValueError(f"confidence {np.shape(confidence)} must be (Hg, Wg) = {flow.shape[:2]}")
        grippers = _check_rects(gripper_region)
        ox, oy = flow_origin
        xs = ox + grid * np.arange(flow.shape[1]) + (grid - 1) / 2  # block centres [px]
        ys = oy + grid * np.arange(flow.shape[0]) + (grid - 1) / 2
        object_mask = _rect_mask(xs, ys, object_region, cfg.edge_margin_px)
        gripper_mask = np.zeros_like(object_mask)
        for rect in grippers:
            gripper_mask |= _rect_mask(xs, ys, rect, cfg.edge_margin_px)
        gripper_mask &= ~_rect_mask(xs, ys, object_region, 0.0)

        weights = np.ones(flow.shape[:2], np.float32)
        if confidence is not None:
            weights = np.where(confidence >= cfg.min_flow_confidence, confidence, 0.0).astype(np.float32)
        weights[~np.isfinite(flow).all(axis=2)] = 0.0
        textured = None
        if prev_gray is not None:
            prev_gray = _check_gray(prev_gray, "prev_gray")
            textured = self._textured(prev_gray, xs, ys, object_mask | gripper_mask)
            weights = weights * textured

        o_rows, o_cols = np.nonzero(object_mask & (weights > 0))
        g_rows, g_cols = np.nonzero(gripper_mask & (weights > 0))
        area = grid * grid
        valid = min(len(o_rows), len(g_rows)) * area >= cfg.min_textured_area_px
        textured_share = len(o_rows) / max(int(object_mask.sum()), 1)
        if not valid:
            return SlipMeasurement(False, (0.0, 0.0), 0.0, 0.0, math.nan, textured_share, False, _ms(start))

        ego = None
        if ego_motion is not None and cfg.ego_compensation:
            ego = _check_matrix(ego_motion)
        obj = flow[o_rows, o_cols].astype(np.float64)
        grp = flow[g_rows, g_cols].astype(np.float64)
        if ego is not None:
            obj -= _ego_flow(ego, xs[o_cols], ys[o_rows])
            grp -= _ego_flow(ego, xs[g_cols], ys[g_rows])
        w_obj, w_grp = weights[o_rows, o_cols], weights[g_rows, g_cols]
        obj_motion = np.array([trimmed_mean(obj[:, k], w_obj, cfg.trim) for k in range(2)])
        grp_motion = np.array([trimmed_mean(grp[:, k], w_grp, cfg.trim) for k in range(2)])
        relative = obj_motion - grp_motion
        magnitude = float(np.hypot(*relative))
        agreement = 0.0
        if magnitude > 0:
            along = (obj - grp_motion) @ (relative / magnitude)
            agreement = float(w_obj[along > 0].sum() / w_obj.sum())

        candidate = magnitude >= cfg.onset_threshold_px and agreement >= cfg.min_agreement
        warp_ratio = math.nan
        if candidate and cfg.verify_warp and prev_gray is not None and cur_gray is not None:
            cur_gray = _check_gray(cur_gray, "cur_gray")
            if cur_gray.shape != prev_gray.shape:
                raise ValueError(f"prev_gray {prev_gray.shape} and cur_gray {cur_gray.shape} must have the same shape")
            warp_ratio = self._warp_ratio(prev_gray, cur_gray, object_region, obj_motion, grp_motion, ego)
            candidate = warp_ratio <= cfg.max_warp_ratio
        return SlipMeasurement(
            valid=True,
            relative=(float(relative[0]), float(relative[1])),
            magnitude=magnitude,
            agreement=agreement,
            warp_ratio=warp_ratio,
            textured_share=textured_share,
            slipping=bool(candidate),
            timing_ms=_ms(start),
        )

    def _textured(self, prev_gray: np.ndarray, xs: np.ndarray, ys: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """(Hg, Wg) float32 1/0: blocks inside ``mask`` whose centre pixel is textured."""
        out = np.zeros(mask.shape, np.float32)
        rows, cols = np.nonzero(mask)
        if len(rows) == 0:
            return out
        height, width = prev_gray.shape
        px = np.clip(np.rint(xs[cols]).astype(int), 0, width - 1)
        py = np.clip(np.rint(ys[rows]).astype(int), 0, height - 1)
        # Only the crop around the blocks is filtered.
        x0, x1 = max(px.min() - _CROP_PAD, 0), min(px.max() + _CROP_PAD + 1, width)
        y0, y1 = max(py.min() - _CROP_PAD, 0), min(py.max() + _CROP_PAD + 1, height)
        crop = prev_gray[y0:y1, x0:x1]
        # Sobel kernels sum to 8 per px of intensity ramp; scale 1/8 gives grey levels per px.
        gx = cv2.Sobel(crop, cv2.CV_32F, 1, 0, scale=0.125)
        gy = cv2.Sobel(crop, cv2.CV_32F, 0, 1, scale=0.125)
        energy = cv2.boxFilter(gx * gx + gy * gy, -1, (_TEXTURE_WINDOW, _TEXTURE_WINDOW))
        strength = np.sqrt(energy[py - y0, px - x0])
        out[rows, cols] = strength >= self.cfg.texture_threshold
        return out

    def _warp_ratio(self, prev_gray, cur_gray, region: Rect, obj_motion, grp_motion, ego) -> float:
        """Matching error of the object patch under the object's motion over that under the
        gripper's motion (``1 - ZNCC`` each, on frames blurred by ``_WARP_BLUR_SIGMA``)."""
        height, width = prev_gray.shape
        margin = self.cfg.edge_margin_px
        x0, y0 = max(math.ceil(region[0] + margin), 0), max(math.ceil(region[1] + margin), 0)
        x1 = min(math.ceil(region[0] + region[2] - margin), width)
        y1 = min(math.ceil(region[1] + region[3] - margin), height)
        if x1 - x0 < 2 or y1 - y0 < 2:
            return math.nan
        gx, gy = np.meshgrid(np.arange(x0, x1, dtype=np.float64), np.arange(y0, y1, dtype=np.float64))
        base = np.stack([gx, gy], axis=-1)
        if ego is not None:
            base += _ego_flow(ego, gx, gy)
        # Where each hypothesis samples cur [image px], and the crop that holds them and the patch.
        samples = [base + motion for motion in (obj_motion, grp_motion)]
        low = np.floor(np.min([s.min(axis=(0, 1)) for s in samples], axis=0)).astype(int) - _CROP_PAD
        high = np.ceil(np.max([s.max(axis=(0, 1)) for s in samples], axis=0)).astype(int) + _CROP_PAD
        cx0, cy0 = max(min(low[0], x0), 0), max(min(low[1], y0), 0)
        cx1, cy1 = min(max(high[0] + 1, x1), width), min(max(high[1] + 1, y1), height)
        blur = (0, 0)
        patch = cv2.GaussianBlur(prev_gray[cy0:cy1, cx0:cx1].astype(np.float32), blur, _WARP_BLUR_SIGMA)
        patch = patch[y0 - cy0 : y1 - cy0, x0 - cx0 : x1 - cx0]
        target = cv2.GaussianBlur(cur_gray[cy0:cy1, cx0:cx1].astype(np.float32), blur, _WARP_BLUR_SIGMA)
        errors = []
        for sample in samples:
            map_x = (sample[..., 0] - cx0).astype(np.float32)
            map_y = (sample[..., 1] - cy0).astype(np.float32)
            warped = cv2.remap(target, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
            errors.append(1.0 - _zncc(patch, warped))
        return float(errors[0] / errors[1]) if errors[1] > 1e-9 else 1.0


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1e3


def _zncc(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    denominator = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum()) / denominator if denominator > 0 else 0.0


def _rect_mask(xs: np.ndarray, ys: np.ndarray, rect: Rect, margin: float) -> np.ndarray:
    """(len(ys), len(xs)) bool: centres in ``[x + m, x + w - m) x [y + m, y + h - m)``."""
    x, y, w, h = rect
    inside_x = (xs >= x + margin) & (xs < x + w - margin)
    inside_y = (ys >= y + margin) & (ys < y + h - margin)
    return inside_y[:, None] & inside_x[None, :]


def _ego_flow(matrix: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(..., 2) displacement ``matrix @ p - p`` [px] at the points ``(x, y)`` (arrays of one shape)."""
    m = matrix
    w = m[2, 0] * x + m[2, 1] * y + m[2, 2]
    u = (m[0, 0] * x + m[0, 1] * y + m[0, 2]) / w - x
    v = (m[1, 0] * x + m[1, 1] * y + m[1, 2]) / w - y
    return np.stack([u, v], axis=-1)


def trimmed_mean(values: np.ndarray, weights: np.ndarray, trim: float) -> float:
    """Weighted mean of the values between the ``trim`` and ``1 - trim`` weighted quantiles.

    Each sample spans its weight on the sorted axis; the part of that span inside the central
    ``1 - 2 * trim`` of the total weight counts, so the result is continuous in the weights.

    Args:
        values: (N,) float values.
        weights: (N,) float weights >= 0 with a positive sum.
        trim: share cut from each tail, in [0, 0.5).

    Returns:
        The trimmed mean; ``trim=0`` gives the weighted mean, ``trim -> 0.5`` the weighted median.

    >>> v = np.array([0.0, 1.0, 2.0, 3.0, 100.0])
    >>> trimmed_mean(v, np.ones(5), 0.2), trimmed_mean(v, np.ones(5), 0.0)
    (2.0, 21.2)
    """
    order = np.argsort(values, kind="stable")
    v, w = np.asarray(values, np.float64)[order], np.asarray(weights, np.float64)[order]
    upper = np.cumsum(w)
    total = upper[-1]
    kept = np.clip(np.minimum(upper, (1 - trim) * total) - np.maximum(upper - w, trim * total), 0.0, None)
    return float((kept * v).sum() / kept.sum())


def match_brightness(reference: np.ndarray, image: np.ndarray) -> np.ndarray:
    """``image`` with the mean and standard deviation of ``reference`` (a gain and an offset).

    Lighting flicker changes the gain of the whole view between two frames; flow backends that
    assume constant brightness (``torch`` fully, ``dis`` partly) then see motion. Matching
    ``cur`` to ``prev`` on the flow crop before the flow stage removes the global part; what is
    left of local flicker is smooth and handled by the detector's tests.

    Args:
        reference: (h, w) uint8 crop of ``prev``.
        image: (h, w) uint8 crop of ``cur``.

    Returns:
        (h, w) uint8 ``image`` mapped by ``gain * (image - mean) + reference mean``, rounded.

    >>> prev = np.array([[100, 120], [140, 160]], np.uint8)
    >>> match_brightness(prev, (prev * 1.2).astype(np.uint8)).tolist()
    [[100, 120], [140, 160]]
    """
    ref, img = reference.astype(np.float32), image.astype(np.float32)
    gain = float(ref.std()) / max(float(img.std()), 1.0)
    return np.clip(np.rint((img - img.mean()) * gain + ref.mean()), 0, 255).astype(np.uint8)


def slip_crop(
    regions: Sequence[Rect], image_shape: tuple[int, int], margin_px: int = 16, grid: int = 1
) -> tuple[int, int, int, int]:
    """Integer crop around the regions for the flow stage: ``(x, y, w, h)`` [px].

    Computing flow on the crop instead of the frame keeps dense full-resolution flow cheap; hand
    ``(x, y)`` to :meth:`SlipDetector.update` as ``flow_origin``.

    Args:
        regions: ``(x, y, w, h)`` rectangles [px] (gripper parts and object).
        image_shape: ``(H, W)`` of the frame.
        margin_px: context kept around the regions [px], >= 0; flow near a crop border is
            poor, so it should exceed the flow's patch size.
        grid: the crop origin is aligned to multiples of the flow grid.

    Returns:
        The crop, clipped to the image (possibly empty, w or h 0).

    >>> slip_crop([(100, 80, 40, 30), (90, 60, 60, 20)], (240, 320), margin_px=10)
    (80, 50, 80, 70)
    """
    rects = np.array([_check_rect(r, "region") for r in regions], np.float64)
    height, width = image_shape
    x0 = max(math.floor(rects[:, 0].min()) - margin_px, 0) // grid * grid
    y0 = max(math.floor(rects[:, 1].min()) - margin_px, 0) // grid * grid
    x1 = min(math.ceil((rects[:, 0] + rects[:, 2]).max()) + margin_px, width)
    y1 = min(math.ceil((rects[:, 1] + rects[:, 3]).max()) + margin_px, height)
    return x0, y0, max(x1 - x0, 0), max(y1 - y0, 0)


def project_box(
    corners_m: np.ndarray, camera_matrix: np.ndarray, image_size: tuple[int, int], near_m: float = 0.01
) -> tuple[int, int, int, int] | None:
    """Image rectangle of a 3-D box (or any point set) seen by a pinhole camera.

    Points behind the near plane ``z = near_m`` are replaced by where the edges to the points in
    front cross it (every pair of points is treated as an edge, exact for the convex hull), so
    a box that reaches behind the camera still projects correctly. Lens distortion is not
    modelled: use the rectified image's intrinsics (``camera_info`` K, or P's left 3x3).

    Args:
        corners_m: (N, 3) float points [m] in the camera optical frame (x right, y down, z
            forward), e.g. the 8 corners of a bounding box.
        camera_matrix: (3, 3) intrinsics K = [[fx, 0, cx], [0, fy, cy], [0, 0, 1]] [px].
        image_size: ``(W, H)`` of the image [px].
        near_m: near-plane depth [m], > 0.

    Returns:
        ``(x, y, w, h)`` integer rectangle of every pixel the projection touches, clipped to the
        image, or None when nothing of it is in front of the camera and inside the image.

    >>> K = np.array([[500.0, 0, 320], [0, 500, 240], [0, 0, 1]])
    >>> cube = np.array([[x, y, z] for x in (-0.05, 0.05) for y in (-0.05, 0.05) for z in (0.95, 1.05)])
    >>> project_box(cube, K, (640, 480))
    (294, 214, 53, 53)
    """
    points = np.asarray(corners_m, np.float64)
    if points.ndim != 2 or points.shape[1] != 3 or len(points) == 0 or not np.isfinite(points).all():
        raise ValueError(f"corners_m must be a finite (N, 3) array, got shape {points.shape}")
    k = np.asarray(camera_matrix, np.float64)
    if k.shape != (3, 3) or not np.isfinite(k).all() or k[0, 0] <= 0 or k[1, 1] <= 0:
        raise ValueError("camera_matrix must be a finite (3, 3) K with fx, fy > 0")
    front = points[:, 2] >= near_m
    visible = [points[front]]
    behind = points[~front]
    if len(visible[0]) and len(behind):
        # Crossing of each front-behind pair with the near plane.
        a, b = visible[0][:, None, :], behind[None, :, :]
        t = (near_m - a[..., 2]) / (b[..., 2] - a[..., 2])
        visible.append((a + t[..., None] * (b - a)).reshape(-1, 3))
    points = np.concatenate(visible)
    if len(points) == 0:
        return None
    u = k[0, 0] * points[:, 0] / points[:, 2] + k[0, 1] * points[:, 1] / points[:, 2] + k[0, 2]
    v = k[1, 1] * points[:, 1] / points[:, 2] + k[1, 2]
    width, height = image_size
    # Pixel c covers [c - 0.5, c + 0.5): the extent touches columns round(u_min) .. round(u_max).
    x0, x1 = max(math.floor(u.min() + 0.5), 0), min(math.floor(u.max() + 0.5) + 1, width)
    y0, y1 = max(math.floor(v.min() + 0.5), 0), min(math.floor(v.max() + 0.5) + 1, height)
    if x0 >= x1 or y0 >= y1:
        return None
    return x0, y0, x1 - x0, y1 - y0


def make_example() -> tuple[SlipDetector, dict]:
    """A detector and the keyword arguments of one :meth:`SlipDetector.update` call.

    The flow is exact and synthetic: a 48x40 px object region moving 0.5 px/frame to the right
    relative to a gripper region (palm above, two fingers beside it) that moves with the arm.

    >>> detector, kwargs = make_example()
    >>> detector.update(**kwargs) is None  # first slipping frame, k_frames = 2
    True
    >>> event = detector.update(**kwargs)
    >>> event.state.name, round(event.magnitude, 2), event.direction, event.region
    ('ONSET', 0.5, (1.0, 0.0), (56, 40, 48, 40))
    """
    flow = np.zeros((120, 160, 2), np.float32)
    flow[..., 0], flow[..., 1] = 1.2, -0.4  # arm motion (the background stays still elsewhere)
    flow[40:80, 56:104, 0] += 0.5  # the object slips right
    kwargs = {
        "flow": flow,
        "grid": 1,
        "gripper_region": [(40, 20, 80, 16), (40, 36, 16, 40), (104, 36, 16, 40)],
        "object_region": (56, 40, 48, 40),
        "gripper_closed": True,
        "stamp_s": 0.0,
    }
    return SlipDetector(), kwargs


def _check_rect(rect, label: str) -> Rect:
    values = tuple(float(v) for v in np.asarray(rect, np.float64).ravel())
    if len(values) != 4 or not all(math.isfinite(v) for v in values) or values[2] < 0 or values[3] < 0:
        raise ValueError(f"{label}={rect!r}: must be a finite (x, y, w, h) rectangle with w, h >= 0")
    return values


def _check_rects(rects) -> list[Rect]:
    array = np.asarray(rects, np.float64)
    if array.ndim == 1:
        return [_check_rect(array, "gripper_region")]
    if array.ndim != 2 or array.shape[1] != 4 or len(array) == 0:
        raise ValueError(f"gripper_region must be one (x, y, w, h) rectangle or a list of them, got {rects!r}")
    return [_check_rect(r, "gripper_region") for r in array]


def _check_gray(image, label: str) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 2 or min(image.shape) < 1:
        shape = getattr(image, "shape", type(image).__name__)
        raise ValueError(f"{label} must be an (H, W) uint8 grey frame, got {shape} {getattr(image, 'dtype', '')}")
    return image


def _check_matrix(matrix) -> np.ndarray:
    m = np.asarray(matrix, np.float64)
    if m.shape != (3, 3) or not np.isfinite(m).all():
        raise ValueError(f"ego_motion must be a finite (3, 3) matrix, got shape {m.shape}")
    return m
