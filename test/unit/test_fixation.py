"""Fixation controller on constructed flow fields (exact ground truth) and on rendered scenes."""

from __future__ import annotations

import numpy as np
import pytest

from fovea_vla.core.fixation import FixationConfig, FixationController, FixationSource

WIDTH, HEIGHT, GRID, FPS = 640, 480, 4, 30.0


def blob_flow(center, velocity_px_frame, radius=30.0, camera=(0.0, 0.0)) -> np.ndarray:
    """Flow on a 4-px grid: camera motion everywhere, plus a disc moving with the given velocity."""
    hg, wg = HEIGHT // GRID, WIDTH // GRID
    flow = np.empty((hg, wg, 2), np.float32)
    flow[...] = camera
    ys, xs = np.mgrid[0:hg, 0:wg] * GRID + (GRID - 1) / 2
    inside = (xs - center[0]) ** 2 + (ys - center[1]) ** 2 <= radius**2
    flow[inside] = velocity_px_frame
    return flow


@pytest.mark.parametrize("camera", [(0.0, 0.0), (2.5, -1.5)])
def test_pursuit_follows_a_moving_target(camera):
    ctrl = FixationController(FixationConfig(), WIDTH, HEIGHT)
    position = np.array([300.0, 250.0])  # within the window of the centre start
    velocity = np.array([3.0, 1.5])  # px/frame; stays in the image for 45 frames with the camera term
    errors = []
    for i in range(45):
        state = ctrl.update(blob_flow(position, velocity + camera, camera=camera), GRID, i / FPS)
        position = position + velocity + camera  # where the target is on the new frame
        errors.append(np.linalg.norm(state.position - position))
    assert state.source == FixationSource.PURSUIT
    assert max(errors[20:]) < 6.0, errors
    # The velocity estimate converges to the target's image velocity [px/s].
    true_velocity = (velocity + camera) * FPS
    assert np.linalg.norm([state.vx - true_velocity[0], state.vy - true_velocity[1]]) < 0.1 * np.linalg.norm(
        true_velocity
    )


def test_no_motion_holds_still():
    ctrl = FixationController(FixationConfig(), WIDTH, HEIGHT)
    for i in range(30):
        state = ctrl.update(np.zeros((HEIGHT // GRID, WIDTH // GRID, 2), np.float32), GRID, i / FPS)
    assert (state.x, state.y) == pytest.approx(((WIDTH - 1) / 2, (HEIGHT - 1) / 2))
    assert state.source == FixationSource.DEFAULT


def test_saccade_to_motion_outside_the_fovea_after_idle_time():
    cfg = FixationConfig(acquire_after_s=0.3)
    ctrl = FixationController(cfg, WIDTH, HEIGHT)
    target = np.array([80.0, 400.0])
    times = []
    for i in range(30):
        state = ctrl.update(blob_flow(target, (1.5, 0.0)), GRID, i / FPS)
        target = target + np.array([1.5, 0.0])
        if state.source == FixationSource.SACCADE:
            times.append(i / FPS)
            break
    assert times, "no saccade"
    assert times[0] >= cfg.acquire_after_s - 1e-9
    assert np.linalg.norm(state.position - target) < 12.0


def test_external_fixation_holds_then_expires():
    ctrl = FixationController(FixationConfig(), WIDTH, HEIGHT)
    ctrl.set_external(100.0, 50.0, now_s=0.0, hold_s=0.5)
    moving = blob_flow((100.0, 50.0), (5.0, 0.0))
    for i in range(1, 10):
        state = ctrl.update(moving, GRID, i / FPS)
        assert state.source == FixationSource.EXTERNAL and (state.x, state.y) == (100.0, 50.0)
    state = ctrl.update(moving, GRID, 0.6)
    assert state.source != FixationSource.EXTERNAL
    assert not ctrl.external_active


def test_external_fixation_is_clamped_and_clearable():
    ctrl = FixationController(FixationConfig(), WIDTH, HEIGHT)
    state = ctrl.set_external(-20.0, 1e4, now_s=0.0)
    assert (state.x, state.y) == (0.0, HEIGHT - 1.0)
    ctrl.clear_external()
    assert not ctrl.external_active


@pytest.mark.parametrize("field", ["window_fraction", "alpha", "motion_threshold_px", "external_hold_s"])
def test_config_errors_name_the_field(field):
    with pytest.raises(ValueError, match=rf"fixation\.{field}="):
        FixationConfig(**{field: -1.0})
