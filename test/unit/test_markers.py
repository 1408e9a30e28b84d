"""MarkerBuilder's vectorised geometry: flow arrows and per-level patch outlines."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fovea_vla.core.fixation import grid_centers
from fovea_vla.core.foveation import FoveationConfig, foveated_layout

# The marker builder makes ROS messages: without the ROS wheels (a GPU machine running only the
# GPU tests) this module is skipped, not an error that stops the whole collection.
Header = pytest.importorskip("std_msgs.msg").Header
Marker = pytest.importorskip("visualization_msgs.msg").Marker

from fovea_vla.nodes.markers import MarkerBuilder  # noqa: E402
from fovea_vla.nodes.messages import CameraModel  # noqa: E402


def reference_arrows(field: np.ndarray, grid: int, spacing: int) -> list[tuple[float, float]]:
    """Arrow end points one vector at a time: shaft, then each barb from the tip."""
    xs, ys = grid_centers(field.shape[:2], grid)
    step = max(1, spacing // grid)
    points = []
    for row in range(step // 2, field.shape[0], step):
        for col in range(step // 2, field.shape[1], step):
            u, v = (float(c) for c in field[row, col])
            if u * u + v * v < 0.25:
                continue
            x0, y0 = float(xs[col]), float(ys[row])
            x1, y1 = x0 + 3 * u, y0 + 3 * v
            angle = math.atan2(y1 - y0, x1 - x0)
            head = 0.3 * math.hypot(x1 - x0, y1 - y0)
            points += [(x0, y0), (x1, y1)]
            for side in (-0.5, 0.5):
                points += [(x1, y1), (x1 - head * math.cos(angle + side), y1 - head * math.sin(angle + side))]
    return points


@pytest.mark.parametrize(("grid", "spacing"), [(4, 48), (1, 16), (8, 20)])
def test_arrow_segments_match_a_per_vector_reference(grid, spacing):
    rng = np.random.default_rng(grid)
    field = rng.normal(0.0, 1.5, (37, 53, 2)).astype(np.float32)
    field[1::3, 1::2] = 0.1  # some vectors under the 0.5 px floor
    builder = MarkerBuilder(CameraModel(), flow_spacing_px=spacing)
    segments = builder._arrow_segments(field, grid)
    expected = np.array(reference_arrows(field, grid, spacing)).reshape(-1, 2)
    assert segments.shape == expected.shape and len(expected) > 0
    np.testing.assert_allclose(segments, expected, rtol=0, atol=1e-9)


def test_arrow_segments_empty_for_a_still_field():
    builder = MarkerBuilder(CameraModel())
    assert builder._arrow_segments(np.zeros((20, 30, 2), np.float32), 4).shape == (0, 2)


def test_patch_outlines_one_marker_per_level_with_every_patch():
    width, height = 1280, 720
    layout = foveated_layout(FoveationConfig(), width, height, (300.0, 200.0))
    builder = MarkerBuilder(CameraModel(60.0))
    builder._intrinsics = builder.camera.intrinsics(width, height)
    markers = builder._patch_markers(layout, Header(frame_id="camera"), 0.001)
    levels = np.rint(layout.levels).astype(int)
    assert [m.id for m in markers] == list(range(8))
    for marker in markers:
        count = int((levels == marker.id).sum())
        assert marker.ns == "patches" and marker.type == Marker.LINE_LIST
        assert len(marker.points) == 8 * count
        assert marker.action == (Marker.ADD if count else Marker.DELETE)
    assert sum(len(m.points) for m in markers) == 8 * layout.num_tokens
    colors = {(m.color.r, m.color.g, m.color.b) for m in markers if m.action == Marker.ADD}
    assert len(colors) == len(np.unique(levels)) >= 3
    # A later layout with fewer levels (a larger budget) keeps the ids and deletes the missing ones.
    dense = foveated_layout(FoveationConfig(num_tokens=1024), width, height, (640.0, 360.0))
    assert np.rint(dense.levels).max() < levels.max()
    again = builder._patch_markers(dense, Header(frame_id="camera"), 0.001)
    assert [m.id for m in again] == [m.id for m in markers]
    assert again[int(levels.max())].action == Marker.DELETE
    assert sum(len(m.points) for m in again) == 8 * dense.num_tokens
