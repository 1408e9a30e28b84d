"""Drawing the pipeline's state on an image (the node's ``debug_image`` and the demo video).

The colours are shared with the RViz markers, so the two views read the same way.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from fovea_vla.core.fixation import FixationSource, FixationState, grid_centers
from fovea_vla.core.foveation import FoveatedLayout

__all__ = ["SOURCE_COLORS", "draw_overlay", "level_color", "level_colors"]

# RGB per fixation source.
SOURCE_COLORS: dict[FixationSource, tuple[int, int, int]] = {
    FixationSource.DEFAULT: (200, 200, 200),
    FixationSource.PURSUIT: (40, 220, 80),
    FixationSource.SACCADE: (255, 170, 0),
    FixationSource.EXTERNAL: (60, 140, 255),
    FixationSource.QUERY: (230, 60, 230),
}

_LEVEL_COLORS = np.array(
    [(0, 230, 255), (40, 220, 80), (255, 220, 0), (255, 120, 0), (255, 40, 40), (200, 0, 200)],
    dtype=np.float64,
)


def level_colors(levels: np.ndarray) -> np.ndarray:
    """Vectorised :func:`level_color`: (N,) levels -> (N, 3) float64 RGB in [0, 255]."""
    position = np.clip(np.asarray(levels, dtype=np.float64), 0.0, len(_LEVEL_COLORS) - 1)
    low = np.floor(position).astype(np.int64)
    high = np.minimum(low + 1, len(_LEVEL_COLORS) - 1)
    mix = (position - low)[:, None]
    return _LEVEL_COLORS[low] * (1.0 - mix) + _LEVEL_COLORS[high] * mix


def level_color(level: float) -> tuple[int, int, int]:
    """RGB colour of a mip level (cyan at full resolution through green, yellow, orange, red).

    Example:
        >>> level_color(0.0)
        (0, 230, 255)
    """
    position = float(np.clip(level, 0.0, len(_LEVEL_COLORS) - 1))
    low = math.floor(position)
    high = min(low + 1, len(_LEVEL_COLORS) - 1)
    mix = _LEVEL_COLORS[low] * (1.0 - (position - low)) + _LEVEL_COLORS[high] * (position - low)
    return tuple(round(c) for c in mix)


def draw_overlay(
    rgb: np.ndarray,
    fixation: FixationState,
    layout: FoveatedLayout | None = None,
    flow: np.ndarray | None = None,
    flow_grid: int = 1,
    *,
    arrow_spacing_px: int = 32,
    label: str | None = None,
    others: list[FixationState] | tuple = (),
) -> np.ndarray:
    """Draw patch footprints, flow arrows and the fixation on a copy of ``rgb``.

    Args:
        rgb: (H, W, 3) uint8 RGB frame.
        fixation: the fixation to draw (circle = pursuit window, dot = centre).
        layout: patch footprints to draw as squares coloured by mip level.
        flow: (Hg, Wg, 2) float32 flow [px/frame] to draw as arrows every ``arrow_spacing_px``.
        flow_grid: block side [px] of ``flow``.
        label: text for the top-left corner.
        others: further simultaneous fixations, drawn as thinner circles of their window.

    Returns:
        (H, W, 3) uint8 RGB annotated copy.
    """
    canvas = np.ascontiguousarray(rgb).copy()
    if layout is not None:
        for (cx, cy), size, level in zip(layout.centers, layout.sizes, layout.levels, strict=True):
            half = 0.5 * float(size)
            cv2.rectangle(
                canvas,
                (round(cx - half), round(cy - half)),
                (round(cx + half), round(cy + half)),
                level_color(float(level)),
                1,
                cv2.LINE_AA,
            )
        ring = round(layout.e0)
        cv2.circle(
            canvas, (round(layout.fixation[0]), round(layout.fixation[1])), ring, (255, 255, 255), 1, cv2.LINE_AA
        )
    if flow is not None:
        step = max(1, arrow_spacing_px // max(flow_grid, 1))
        xs, ys = grid_centers(flow.shape[:2], flow_grid)
        for row in range(step // 2, flow.shape[0], step):
            for col in range(step // 2, flow.shape[1], step):
                u, v = flow[row, col]
                if u * u + v * v < 0.25:
                    continue
                start = (round(xs[col]), round(ys[row]))
                # Arrows show 3 frames of motion so slow flow stays visible.
                end = (round(xs[col] + 3 * u), round(ys[row] + 3 * v))
                cv2.arrowedLine(canvas, start, end, (255, 60, 200), 1, cv2.LINE_AA, tipLength=0.3)
    for other in others:
        other_centre = (round(other.x), round(other.y))
        cv2.circle(
            canvas, other_centre, max(2, round(0.6 * other.window_radius)), SOURCE_COLORS[other.source], 1, cv2.LINE_AA
        )
        cv2.drawMarker(canvas, other_centre, SOURCE_COLORS[other.source], cv2.MARKER_TILTED_CROSS, 10, 1, cv2.LINE_AA)
    color = SOURCE_COLORS[fixation.source]
    centre = (round(fixation.x), round(fixation.y))
    cv2.circle(canvas, centre, max(2, round(fixation.window_radius)), color, 2, cv2.LINE_AA)
    cv2.drawMarker(canvas, centre, color, cv2.MARKER_CROSS, 14, 2, cv2.LINE_AA)
    if abs(fixation.vx) + abs(fixation.vy) > 1.0:
        # Velocity arrow: where the target will be in 0.25 s.
        tip = (round(fixation.x + 0.25 * fixation.vx), round(fixation.y + 0.25 * fixation.vy))
        cv2.arrowedLine(canvas, centre, tip, color, 2, cv2.LINE_AA, tipLength=0.25)
    if label:
        cv2.putText(canvas, label, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(canvas, label, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
    return canvas
