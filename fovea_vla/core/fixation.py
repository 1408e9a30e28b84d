"""Fixation control: where the fovea points on each frame.

The controller pursues motion inside the foveal window with an alpha-beta filter, jumps
(saccades) to the strongest independently moving region when the fovea has had nothing to follow
for a while, and yields to an external fixation (operator, planner) for a hold time.

Inputs are optical flow fields from :mod:`fovea_vla.core.flow`: (Hg, Wg, 2) float32 vectors in
full-resolution pixels per frame, one per ``grid x grid`` block. Camera motion is removed as the
median flow of the frame (a robust translation estimate), so pursuit follows objects that move
relative to the scene rather than the scene itself.

Pixel convention: x right, y down, the centre of the top-left pixel is (0, 0).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import cv2
import numpy as np

__all__ = ["FixationConfig", "FixationController", "FixationSource", "FixationState", "grid_centers"]


class FixationSource(enum.IntEnum):
    """Why the fixation is where it is (same values as fovea_vla_msgs/Fixation SOURCE_*)."""

    DEFAULT = 0
    PURSUIT = 1
    SACCADE = 2
    EXTERNAL = 3
    QUERY = 4


@dataclass(frozen=True, kw_only=True)
class FixationConfig:
    """Fixation controller parameters.

    Attributes:
        window_fraction: radius of the pursuit window as a fraction of the image half-diagonal.
        motion_threshold_px: flow magnitude [px/frame], after removing camera motion, above which
            a block counts as moving.
        min_moving_fraction: share of the window's blocks that must move for pursuit to engage.
        alpha: position gain of the alpha-beta filter, in (0, 1].
        beta: velocity gain of the alpha-beta filter, in [0, 1).
        velocity_decay: per-second decay of the predicted velocity while nothing is pursued.
        acquire_after_s: time without motion in the fovea before a saccade to motion elsewhere.
        min_saccade_interval_s: shortest time between two saccades.
        min_target_fraction: smallest moving region worth a saccade, as a fraction of the image.
        external_hold_s: how long an external fixation holds when the request gives no time.
    """

    window_fraction: float = 0.15
    motion_threshold_px: float = 0.6
    min_moving_fraction: float = 0.04
    alpha: float = 0.5
    beta: float = 0.15
    velocity_decay: float = 3.0
    acquire_after_s: float = 0.4
    min_saccade_interval_s: float = 0.25
    min_target_fraction: float = 0.002
    external_hold_s: float = 3.0

    def __post_init__(self):
        checks = {
            "window_fraction": 0.0 < self.window_fraction <= 1.0,
            "motion_threshold_px": self.motion_threshold_px > 0.0,
            "min_moving_fraction": 0.0 < self.min_moving_fraction <= 1.0,
            "alpha": 0.0 < self.alpha <= 1.0,
            "beta": 0.0 <= self.beta < 1.0,
            "velocity_decay": self.velocity_decay >= 0.0,
            "acquire_after_s": self.acquire_after_s >= 0.0,
            "min_saccade_interval_s": self.min_saccade_interval_s >= 0.0,
            "min_target_fraction": 0.0 < self.min_target_fraction < 1.0,
            "external_hold_s": self.external_hold_s > 0.0,
        }
        for field, ok in checks.items():
            if not ok:
                raise ValueError(f"fixation.{field}={getattr(self, field)}: out of range")


@dataclass(frozen=True)
class FixationState:
    """The fixation after one frame.

    Attributes:
        x, y: position [px].
        vx, vy: estimated image velocity of the pursued target [px/s].
        source: what placed the fixation here.
        confidence: [0, 1] support from the evidence on this frame.
        window_radius: pursuit window radius [px].
    """

    x: float
    y: float
    vx: float
    vy: float
    source: FixationSource
    confidence: float
    window_radius: float

    @property
    def position(self) -> np.ndarray:
        return np.array([self.x, self.y], dtype=np.float32)


def grid_centers(grid_shape: tuple[int, int], grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Full-resolution pixel centres of flow blocks.

    Args:
        grid_shape: (Hg, Wg) blocks.
        grid: block side [px].

    Returns:
        xs (Wg,) and ys (Hg,) float32 block centres [px].

    Example:
        >>> grid_centers((2, 3), 4)[0]
        array([ 1.5,  5.5,  9.5], dtype=float32)
    """
    offset = (grid - 1) / 2.0
    xs = (np.arange(grid_shape[1], dtype=np.float32) * grid + offset).astype(np.float32)
    ys = (np.arange(grid_shape[0], dtype=np.float32) * grid + offset).astype(np.float32)
    return xs, ys


class FixationController:
    """Pursuit / saccade / external-override state machine over flow fields.

    Args:
        cfg: controller parameters.
        width, height: image size [px].
    """

    def __init__(self, cfg: FixationConfig, width: int, height: int):
        self.cfg = cfg
        self.width = width
        self.height = height
        self.window_radius = cfg.window_fraction * 0.5 * math.hypot(width, height)
        self.reset()

    def reset(self) -> None:
        """Back to the image centre with no motion and no override."""
        self._pos = np.array([(self.width - 1) / 2.0, (self.height - 1) / 2.0])
        self._vel = np.zeros(2)
        self._source = FixationSource.DEFAULT
        self._confidence = 0.0
        self._last_time_s: float | None = None
        self._idle_since_s: float | None = None
        self._last_saccade_s = -math.inf
        self._external_until_s: float | None = None

    @property
    def state(self) -> FixationState:
        return FixationState(
            x=float(self._pos[0]),
            y=float(self._pos[1]),
            vx=float(self._vel[0]),
            vy=float(self._vel[1]),
            source=self._source,
            confidence=float(self._confidence),
            window_radius=float(self.window_radius),
        )

    def set_external(self, x: float, y: float, now_s: float, hold_s: float | None = None) -> FixationState:
        """Fix the gaze at (x, y) [px] until ``now_s + hold_s`` (default ``external_hold_s``)."""
        hold = self.cfg.external_hold_s if hold_s is None or hold_s <= 0 else hold_s
        self._pos = self._clamp(np.array([x, y], dtype=np.float64))
        self._vel[:] = 0.0
        self._source = FixationSource.EXTERNAL
        self._confidence = 1.0
        self._external_until_s = now_s + hold
        self._idle_since_s = now_s
        return self.state

    def clear_external(self) -> None:
        """Return to automatic control from the current position."""
        self._external_until_s = None
        if self._source == FixationSource.EXTERNAL:
            self._source = FixationSource.DEFAULT

    @property
    def external_active(self) -> bool:
        return self._external_until_s is not None

    def on_scene_cut(self, now_s: float) -> None:
        """Forget the pursued target: the next frame may saccade at once."""
        self._vel[:] = 0.0
        self._confidence = 0.0
        self._idle_since_s = now_s - self.cfg.acquire_after_s
        self._last_saccade_s = -math.inf

    def update(
        self,
        flow: np.ndarray | None,
        grid: int,
        now_s: float,
        *,
        residual: np.ndarray | None = None,
        independent: np.ndarray | None = None,
    ) -> FixationState:
        """Advance the controller by one frame.

        Args:
            flow: (Hg, Wg, 2) float32 flow from the previous frame to this one [px/frame], or
                None on the first frame (or when flow is off): the fixation then holds.
            grid: block side [px] of ``flow``.
            now_s: capture time of this frame [s].
            residual: (Hg, Wg, 2) flow minus the camera's own motion, from motion analysis; when
                None the camera motion is taken as the median flow.
            independent: (Hg, Wg) bool blocks that move independently of the camera (motion
                analysis); when None, blocks whose residual exceeds ``motion_threshold_px``.

        Returns:
            The new fixation.
        """
        dt = 1.0 / 30.0 if self._last_time_s is None else min(max(now_s - self._last_time_s, 1e-3), 1.0)
        self._last_time_s = now_s
        if self._external_until_s is not None:
            if now_s < self._external_until_s:
                return self.state
            self.clear_external()
        if self._idle_since_s is None:
            self._idle_since_s = now_s
        if flow is None:
            return self.state

        xs, ys = grid_centers(flow.shape[:2], grid)
        if residual is None:
            residual = flow - np.median(flow.reshape(-1, 2), axis=0)
        residual = np.linalg.norm(residual, axis=2)
        moving = residual > self.cfg.motion_threshold_px if independent is None else independent

        dx = xs[None, :] - self._pos[0]
        dy = ys[:, None] - self._pos[1]
        window = dx * dx + dy * dy <= self.window_radius**2
        in_window = int(window.sum())
        pursued = moving & window
        fraction = pursued.sum() / max(in_window, 1)
        if in_window and fraction >= self.cfg.min_moving_fraction:
            self._pursue(flow, xs, ys, pursued, residual, dt)
            self._confidence = float(min(1.0, fraction / (4.0 * self.cfg.min_moving_fraction)))
            self._idle_since_s = now_s
            return self.state

        # Nothing to follow here: coast on the decaying velocity, then look for motion elsewhere.
        self._vel *= math.exp(-self.cfg.velocity_decay * dt)
        self._pos = self._clamp(self._pos + self._vel * dt)
        self._confidence *= 0.8
        idle = now_s - self._idle_since_s
        if idle >= self.cfg.acquire_after_s and now_s - self._last_saccade_s >= self.cfg.min_saccade_interval_s:
            target = self._strongest_motion(flow, xs, ys, moving, residual)
            if target is not None:
                self._pos, self._vel = self._clamp(target[0]), target[1] / dt
                self._source = FixationSource.SACCADE
                self._confidence = 0.5
                self._last_saccade_s = now_s
                self._idle_since_s = now_s
        return self.state

    def _pursue(self, flow, xs, ys, mask, residual, dt) -> None:
        rows, cols = np.nonzero(mask)
        vectors = flow[rows, cols]
        weights = residual[rows, cols]
        # Where the moving blocks are now: their previous-frame centres displaced by their flow.
        landed = np.stack([xs[cols], ys[rows]], axis=1) + vectors
        measured = (landed * weights[:, None]).sum(axis=0) / weights.sum()
        predicted = self._pos + self._vel * dt
        innovation = measured - predicted
        self._pos = self._clamp(predicted + self.cfg.alpha * innovation)
        self._vel = self._vel + (self.cfg.beta / dt) * innovation
        # Keep the velocity estimate anchored to the blocks' own median motion.
        self._vel = 0.5 * self._vel + 0.5 * np.median(vectors, axis=0) / dt
        self._source = FixationSource.PURSUIT

    def _strongest_motion(self, flow, xs, ys, moving, residual):
        """Centroid (in this frame) and median flow of the largest moving region away from the fovea."""
        count, labels, stats, _ = cv2.connectedComponentsWithStats(moving.astype(np.uint8), connectivity=8)
        min_blocks = max(1, int(self.cfg.min_target_fraction * moving.size))
        best, best_score = None, 0.0
        for label in range(1, count):
            if stats[label, cv2.CC_STAT_AREA] < min_blocks:
                continue
            rows, cols = np.nonzero(labels == label)
            weights = residual[rows, cols]
            vectors = flow[rows, cols]
            landed = np.stack([xs[cols], ys[rows]], axis=1) + vectors
            centroid = (landed * weights[:, None]).sum(axis=0) / weights.sum()
            if np.linalg.norm(centroid - self._pos) < 0.5 * self.window_radius:
                continue
            score = float(weights.sum())
            if score > best_score:
                best, best_score = (centroid, np.median(vectors, axis=0)), score
        return best

    def _clamp(self, position: np.ndarray) -> np.ndarray:
        return np.clip(position, [0.0, 0.0], [self.width - 1.0, self.height - 1.0]).astype(np.float64)
