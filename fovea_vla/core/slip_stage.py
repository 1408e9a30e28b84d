"""The grasp-slip stage of the pipeline: dense flow on a crop around the grasp, then the detector.

Slip is sub-pixel motion of the held object against the gripper, which the pipeline's own flow
(coarse, on a grid, often at reduced scale) cannot resolve. This stage therefore runs a second
flow engine at full resolution on a crop around the gripper and object regions only
(:func:`~fovea_vla.core.slip.slip_crop`), with the ``cur`` crop brightness-matched to ``prev``
(lighting flicker), and feeds it to :class:`~fovea_vla.core.slip.SlipDetector` together with the
frame's camera motion from motion analysis.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from fovea_vla.core.flow.base import FlowConfig, make_flow
from fovea_vla.core.slip import SlipConfig, SlipDetector, SlipEvent, match_brightness, slip_crop

__all__ = ["Grasp", "SlipStage", "SlipStageConfig"]

Rect = tuple[float, float, float, float]


@dataclass(frozen=True, kw_only=True)
class SlipStageConfig:
    """Slip stage parameters.

    Attributes:
        detector: thresholds and state machine of the detector.
        flow: the stage's own flow engine: dense (grid 1) at full resolution (scale 1) with a
            preset that refines to the finest level (``dis`` slow, ``torch`` medium), see
            :mod:`fovea_vla.core.slip` for why.
        crop_margin_px: context kept around the regions for the flow [px].
    """

    detector: SlipConfig = field(default_factory=SlipConfig)
    flow: FlowConfig = field(default_factory=lambda: FlowConfig(backend="dis", preset="slow", grid=1, scale=1.0))
    crop_margin_px: int = 16

    def __post_init__(self):
        if self.flow.grid != 1 or self.flow.scale != 1.0:
            raise ValueError(
                f"slip.flow grid={self.flow.grid}, scale={self.flow.scale}: the slip stage needs grid 1 and scale 1"
            )
        if not 0 <= self.crop_margin_px <= 256:
            raise ValueError(f"slip.crop_margin_px={self.crop_margin_px}: must be in [0, 256]")


@dataclass(frozen=True)
class Grasp:
    """What the robot holds, in the previous frame's pixels.

    Attributes:
        gripper_regions: one or more ``(x, y, w, h)`` [px] rectangles of the gripper (fingers, palm).
        object_region: ``(x, y, w, h)`` [px] of the held object.
        closed: whether the gripper is closed on it (the detector resets when it opens).
    """

    gripper_regions: tuple[Rect, ...]
    object_region: Rect
    closed: bool


class SlipStage:
    """Runs the slip flow and detector on consecutive frames."""

    def __init__(self, cfg: SlipStageConfig | None = None):
        self.cfg = cfg or SlipStageConfig()
        self.detector = SlipDetector(self.cfg.detector)
        self._flow, self.backend = make_flow(self.cfg.flow)
        self.timing_ms: dict[str, float] = {}
        self._last_grasp: Grasp | None = None

    def reset(self) -> None:
        self.detector.reset()
        self._flow.reset()
        self._last_grasp = None

    def release(self, stamp_s: float) -> SlipEvent | None:
        """No usable grasp on this frame: end an active slip (CLEARED) and reset, else nothing."""
        last = self._last_grasp
        event = None
        if self.detector.active and last is not None:
            event = self.detector.update(
                np.zeros((1, 1, 2), np.float32), 1, last.gripper_regions, last.object_region, False, stamp_s=stamp_s
            )
        self.reset()
        return event

    def update(
        self,
        prev_gray: np.ndarray,
        cur_gray: np.ndarray,
        grasp: Grasp,
        stamp_s: float,
        ego_motion: np.ndarray | None = None,
    ) -> SlipEvent | None:
        """One frame pair.

        Args:
            prev_gray: (H, W) uint8 previous frame.
            cur_gray: (H, W) uint8 current frame.
            grasp: regions in ``prev_gray`` and the gripper state.
            stamp_s: capture time of ``cur_gray`` [s].
            ego_motion: (3, 3) camera map prev -> cur from motion analysis, or None.

        Returns:
            The detector's event for this frame (ONSET / ONGOING / CLEARED), or None.
        """
        self.timing_ms = {}
        if not grasp.closed:
            self._last_grasp = grasp
            return self.release(stamp_s)
        x, y, w, h = slip_crop([*grasp.gripper_regions, grasp.object_region], prev_gray.shape, self.cfg.crop_margin_px)
        if w < 16 or h < 16:
            return self.release(stamp_s)  # the regions lie outside the image
        self._last_grasp = grasp
        start = time.perf_counter()
        prev_crop = prev_gray[y : y + h, x : x + w]
        flow = self._flow.compute(prev_crop, match_brightness(prev_crop, cur_gray[y : y + h, x : x + w]))
        self.timing_ms["slip_flow"] = (time.perf_counter() - start) * 1e3
        start = time.perf_counter()
        event = self.detector.update(
            flow,
            1,
            grasp.gripper_regions,
            grasp.object_region,
            True,
            stamp_s=stamp_s,
            ego_motion=ego_motion,
            prev_gray=prev_gray,
            cur_gray=cur_gray,
            flow_origin=(x, y),
        )
        self.timing_ms["slip"] = (time.perf_counter() - start) * 1e3
        return event
