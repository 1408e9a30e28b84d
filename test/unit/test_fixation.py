"""Fixation controller: pursuit, holds and requests on constructed flow fields (exact ground truth),
and the pipeline's fixation wiring. Saccade scheduling is in test_saccades.py."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from fovea_vla.core.fixation import (
    FixationConfig,
    FixationController,
    FixationMode,
    FixationSource,
    make_example,
    spectral_residual_saliency,
)
from fovea_vla.core.flow import FlowConfig
from fovea_vla.core.frames import Frame
from fovea_vla.core.pipeline import FoveaPipeline, PipelineConfig
from fovea_vla.core.texture import TextureConfig

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
    """The ``idle`` event alone (no schedule, no new-motion event) acquires motion elsewhere."""
    cfg = FixationConfig(acquire_after_s=0.3, saccade_rate_hz=0.0, saccade_events=("idle",))
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
    assert ctrl.fixations.saccade == "idle"
    # It lands on the mover at the mover's velocity and pursues it from the next frame.
    assert state.vx == pytest.approx(1.5 * FPS, rel=0.05)
    state = ctrl.update(blob_flow(target, (1.5, 0.0)), GRID, times[0] + 1 / FPS)
    assert state.mode == FixationMode.PURSUE


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


@pytest.mark.parametrize(
    "field",
    [
        "window_fraction",
        "alpha",
        "motion_threshold_px",
        "external_hold_s",
        "coast_s",
        "latency_s",
        "saccade_rate_hz",
        "ior_window_s",
        "ior_radius_fraction",
        "primary_weight",
        "velocity_gate_px",
    ],
)
def test_config_errors_name_the_field(field):
    with pytest.raises(ValueError, match=rf"fixation\.{field}="):
        FixationConfig(**{field: -1.0})


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_fixations": 0}, "num_fixations"),
        ({"num_fixations": 2.5}, "num_fixations"),
        ({"saccade_events": ("new_motion", "blink")}, "saccade_events"),
        ({"saccade_events": "cut"}, "saccade_events"),
        ({"alpha": float("nan")}, "alpha"),
    ],
)
def test_config_errors_name_the_field_for_other_types(kwargs, field):
    with pytest.raises(ValueError, match=rf"fixation\.{field}="):
        FixationConfig(**kwargs)


def test_example_pursues():
    ctrl, flow, grid = make_example()
    state = ctrl.update(flow, grid, 0.0)
    assert state.mode == FixationMode.PURSUE and state.source == FixationSource.PURSUIT


def test_pursuit_coasts_through_a_short_occlusion():
    """The target vanishes for 0.3 s (< coast_s): the fixation keeps moving with it."""
    ctrl = FixationController(FixationConfig(coast_s=0.5), WIDTH, HEIGHT)
    position, velocity = np.array([300.0, 240.0]), np.array([3.0, 0.0])
    empty = np.zeros((HEIGHT // GRID, WIDTH // GRID, 2), np.float32)
    for i in range(60):
        occluded = 25 <= i < 34
        state = ctrl.update(empty if occluded else blob_flow(position, velocity), GRID, i / FPS)
        position = position + velocity
        if occluded:
            assert state.mode == FixationMode.PURSUE
            assert state.confidence < 1.0
        # Never more than a few px behind, occlusion included.
        if i >= 10:
            assert np.linalg.norm(state.position - position) < 8.0, i
    assert state.mode == FixationMode.PURSUE and state.confidence == 1.0


def test_pursuit_gives_up_after_the_coast_time():
    ctrl = FixationController(FixationConfig(coast_s=0.2, saccade_rate_hz=0.0), WIDTH, HEIGHT)
    position = np.array([300.0, 240.0])
    velocity = np.array([3.0, 0.0])
    for i in range(20):
        ctrl.update(blob_flow(position, velocity), GRID, i / FPS)
        position = position + velocity
    empty = np.zeros((HEIGHT // GRID, WIDTH // GRID, 2), np.float32)
    modes = [ctrl.update(empty, GRID, (20 + i) / FPS).mode for i in range(12)]
    # Coasting until 0.2 s after the last measurement (frame 19), then holding.
    assert modes[:6] == [FixationMode.PURSUE] * 6
    assert modes[7:] == [FixationMode.HOLD] * 5
    assert abs(ctrl.state.vx) < 3.0 * FPS


def test_pursuit_ignores_a_different_mover_crossing_the_window():
    """A fast object passing through the window (the car in OTB Crossing) does not take over.

    Saccades are off: with the default events, the car's appearance would pull the gaze (a
    ``new_motion`` event, test_saccades.py).
    """
    ctrl = FixationController(FixationConfig(saccade_rate_hz=0.0, saccade_events=()), WIDTH, HEIGHT)
    walker, walker_velocity = np.array([320.0, 240.0]), np.array([-1.2, -0.4])
    car, car_velocity = np.array([220.0, 215.0]), np.array([5.0, 0.0])
    for i in range(60):
        flow = blob_flow(walker, walker_velocity, radius=14.0)
        if i >= 10:
            passing = blob_flow(car, car_velocity, radius=22.0)
            moving = np.linalg.norm(passing, axis=2) > 0
            flow[moving] = passing[moving]
            car = car + car_velocity
        state = ctrl.update(flow, GRID, i / FPS)
        walker = walker + walker_velocity
        assert np.linalg.norm(state.filtered - walker) < 10.0, i
    assert state.vx == pytest.approx(walker_velocity[0] * FPS, abs=10.0)


def test_start_pursuit_follows_the_target_from_there():
    ctrl = FixationController(FixationConfig(), WIDTH, HEIGHT)
    position = np.array([100.0, 380.0])  # far outside the window of the centre start
    state = ctrl.start_pursuit(*position, now_s=0.0)
    assert state.mode == FixationMode.PURSUE and state.source == FixationSource.PURSUIT
    velocity = np.array([2.0, -1.0])
    for i in range(1, 31):
        state = ctrl.update(blob_flow(position, velocity), GRID, i / FPS)
        position = position + velocity
    assert np.linalg.norm(state.position - position) < 6.0


def test_query_target_holds_with_its_own_source():
    ctrl = FixationController(FixationConfig(), WIDTH, HEIGHT)
    state = ctrl.set_query_target(500.0, 100.0, now_s=0.0, hold_s=0.5)
    assert state.source == FixationSource.QUERY and ctrl.external_active
    gray = np.zeros((HEIGHT, WIDTH), np.uint8)
    gray[300:340, 50:90] = 255
    state = ctrl.update(blob_flow((200.0, 200.0), (4.0, 0.0)), GRID, 0.4, gray=gray)
    assert (state.x, state.y, state.mode) == (500.0, 100.0, FixationMode.HOLD)
    state = ctrl.update(blob_flow((200.0, 200.0), (4.0, 0.0)), GRID, 0.6, gray=gray)
    assert state.source != FixationSource.QUERY and not ctrl.external_active


def test_saliency_marks_the_odd_one_out():
    """Spectral residual: one bright disc on a textured field is the most salient region."""
    rng = np.random.default_rng(1)
    gray = rng.integers(40, 80, (HEIGHT, WIDTH), dtype=np.uint8)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    gray[(xx - 450) ** 2 + (yy - 130) ** 2 <= 20**2] = 230
    saliency = spectral_residual_saliency(gray)
    assert saliency.shape == (48, 64) and saliency.dtype == np.float32
    assert saliency.min() >= 0.0 and saliency.max() == pytest.approx(1.0)
    row, col = np.unravel_index(saliency.argmax(), saliency.shape)
    assert np.hypot((col + 0.5) * 10 - 450, (row + 0.5) * 10 - 130) < 30
    assert not spectral_residual_saliency(np.full((HEIGHT, WIDTH), 7, np.uint8)).any()


def _moving_square_frames(count=6):
    """320x240 frames of smooth texture with a textured 40-px square moving 4 px/frame right."""
    rng = np.random.default_rng(0)
    background = cv2.GaussianBlur(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8), (0, 0), 2.0)
    square = cv2.GaussianBlur(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8), (0, 0), 1.0)
    frames = []
    for i in range(count):
        rgb = background.copy()
        rgb[100:140, 60 + 4 * i : 100 + 4 * i] = square
        frames.append(Frame(rgb=rgb, stamp_ns=i * 33_333_333, frame_id="camera"))
    return frames


@pytest.mark.parametrize("num_fixations", [1, 3])
def test_pipeline_reports_every_fixation_and_splits_the_layout(num_fixations):
    cfg = PipelineConfig(
        flow=FlowConfig(backend="dis", grid=4, preset="medium", scale=1.0),
        texture=TextureConfig(backend="torch", device="cpu"),
        fixation=FixationConfig(num_fixations=num_fixations),
    )
    pipeline = FoveaPipeline(cfg)
    pipeline.start_pursuit(79.5, 119.5)
    for frame in _moving_square_frames():
        out = pipeline.process(frame)
    assert out.fixation == out.fixations[0]
    assert out.fixation.mode == FixationMode.PURSUE
    assert abs(out.fixation.filtered_x - (79.5 + 4 * 5)) < 6.0
    assert len(out.fixations) == len(out.weights) == num_fixations
    assert sum(out.weights) == pytest.approx(1.0)
    assert out.layout.num_tokens == cfg.foveation.num_tokens
    assert sorted(set(out.layout.regions.tolist())) == list(range(num_fixations))
    # The layout samples this frame, so it is centred on the capture-time estimate.
    np.testing.assert_allclose(out.layout.fixation, out.fixation.filtered, atol=1e-3)


def test_pipeline_instruction_change_and_query():
    pipeline = FoveaPipeline(PipelineConfig(texture=TextureConfig(backend="torch", device="cpu")))
    frames = _moving_square_frames(4)
    pipeline.process(frames[0])
    pipeline.set_query_fixation(300.0, 20.0, hold_s=0.05)
    out = pipeline.process(frames[1])
    assert out.fixation.source == FixationSource.QUERY and (out.fixation.x, out.fixation.y) == (300.0, 20.0)
    pipeline.notify_instruction_change()
    out = pipeline.process(frames[3])  # the hold has expired by then
    assert out.fixation.source == FixationSource.SACCADE and out.saccade == "instruction"
