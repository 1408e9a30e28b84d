"""Fixation controller: pursuit, holds and requests on constructed flow fields (exact ground truth),
and the pipeline's fixation wiring. Saccade scheduling is in test_saccades.py."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from fovea_vla.core.fixation import (
    FixationConfig,
    FixationController,
    FixationMode,
    FixationSource,
    _Blocks,
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


# -- the controller's local shortcuts against whole-map references ---------------------------------


def _blob_masks(seed: int, count: int = 40) -> list[np.ndarray]:
    """(120, 160) bool masks of a 120x160 block grid: discs and boxes that move, vanish and come
    back elsewhere, some on the border, some below the new-motion size, plus specks and empty frames."""
    rng = np.random.default_rng(seed)
    hg, wg = HEIGHT // GRID, WIDTH // GRID
    rows, cols = np.mgrid[0:hg, 0:wg]
    # Per blob and appearance: start (x, y), velocity (vx, vy) [blocks/frame] and size [blocks].
    paths = rng.uniform([0, 0, -3, -3, 2], [wg, hg, 3, 3, 9], (4, count // 11 + 2, 5))
    masks = []
    for i in range(count):
        mask = np.zeros((hg, wg), bool)
        if i % 13 != 12:
            for k in range(len(paths)):
                appearance, age = divmod(i + 3 * k, 11)
                if age < 8:  # each blob is gone for 3 frames, then appears somewhere else
                    x, y, vx, vy, r = paths[k, appearance]
                    cx, cy = x + vx * age, y + vy * age
                    if k % 2:
                        mask |= (np.abs(cols - cx) <= r) & (np.abs(rows - cy) <= 0.5 * r)
                    else:
                        mask |= (cols - cx) ** 2 + (rows - cy) ** 2 <= r * r
            mask |= rng.random((hg, wg)) < 0.0005  # single-block specks
        masks.append(mask)
    return masks


def _reference_novel_motion(moving, magnitude, memory, min_blocks, dt):
    """The whole-map version of the controller's new-motion test: (novel, new memory)."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(moving.view(np.uint8), connectivity=8)
    seen = None
    if memory is not None:
        step = float(magnitude[moving].max()) if moving.any() else 0.0
        radius = min(8, 1 + math.ceil(step / GRID))
        kernel = np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)
        seen = cv2.dilate((memory > 0.1).view(np.uint8), kernel).astype(bool)
    decay = math.exp(-dt / 0.5)
    memory = np.maximum(memory * decay if memory is not None else 0.0, moving.astype(np.float32))
    novel = np.zeros_like(moving)
    for label in range(1, count):
        blob = labels == label
        if stats[label, cv2.CC_STAT_AREA] >= min_blocks and (seen is None or seen[blob].mean() < 0.5):
            novel |= blob
    return novel, memory


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_novel_motion_matches_the_whole_map_reference(seed):
    """New-motion blobs are labelled and judged on the moving blocks' bounding box only; the
    result and the motion memory equal labelling the whole map, frame by frame."""
    ctrl = FixationController(FixationConfig(), WIDTH, HEIGHT)
    rng = np.random.default_rng(seed)
    memory = None
    min_blocks = max(1, int(FixationConfig().min_target_fraction * (HEIGHT // GRID) * (WIDTH // GRID)))
    novel_frames = 0
    for i, moving in enumerate(_blob_masks(seed)):
        # Residuals of exact magnitude (multiples of the 3-4-5 triangle), so both sides see the
        # same step; now and then a fast one, which dilates the memory more.
        scale = 2.0 if i % 9 == 4 else 0.125
        residual = (rng.integers(0, 4, (*moving.shape, 1)) * scale * np.array([3.0, 4.0])).astype(np.float32)
        blocks = _Blocks(residual, GRID, residual, None)
        dt = 1.0 / FPS if i % 7 else 0.2
        novel = ctrl._novel_motion(moving, blocks, GRID, dt)
        expected, memory = _reference_novel_motion(moving, 5.0 * residual[..., 0] / 3.0, memory, min_blocks, dt)
        novel_frames += bool(expected.any())
        np.testing.assert_array_equal(novel, expected, err_msg=f"frame {i}")
        np.testing.assert_array_equal(ctrl._motion_memory, memory, err_msg=f"frame {i}")
    assert novel_frames >= 3  # blobs that come back elsewhere are new


@pytest.mark.parametrize(("shift", "is_new"), [(11, False), (14, True)])
def test_novel_motion_counts_memory_beside_the_blob(shift, is_new):
    """A blob that moved by less than the dilation (here 6 blocks: 1 + ceil(20 px / 4 px)) from
    where motion was is not new, although the memory lies outside its own bounding box."""
    ctrl = FixationController(FixationConfig(), WIDTH, HEIGHT)
    hg, wg = HEIGHT // GRID, WIDTH // GRID
    residual = np.zeros((hg, wg, 2), np.float32)
    residual[...] = (12.0, 16.0)  # 20 px/frame
    before, after = np.zeros((hg, wg), bool), np.zeros((hg, wg), bool)
    before[50:60, 50:60] = True
    after[50:60, 50 + shift : 60 + shift] = True
    assert ctrl._novel_motion(before, _Blocks(residual, GRID, residual, None), GRID, 1 / FPS).any()
    novel = ctrl._novel_motion(after, _Blocks(residual, GRID, residual, None), GRID, 1 / FPS)
    assert novel.any() == is_new and (not is_new or (novel == after).all())


def test_blocks_around_holds_every_block_within_the_radius():
    xs_grid = (np.arange(WIDTH // GRID) * GRID + 1.5).astype(np.float32)
    ys_grid = (np.arange(HEIGHT // GRID) * GRID + 1.5).astype(np.float32)
    blocks = _Blocks(np.zeros((HEIGHT // GRID, WIDTH // GRID, 2), np.float32), GRID, None, None)
    rng = np.random.default_rng(3)
    for centre, radius in [((-300.0, 50.0), 320.0), ((WIDTH + 5.0, HEIGHT + 5.0), 40.0), ((0.0, 0.0), 0.0)] + [
        ((rng.uniform(-50, WIDTH + 50), rng.uniform(-50, HEIGHT + 50)), rng.uniform(0, 300)) for _ in range(50)
    ]:
        rows, cols = blocks.around(np.array(centre), radius)
        within = (xs_grid[None, :] - centre[0]) ** 2 + (ys_grid[:, None] - centre[1]) ** 2 <= radius**2
        outside = within.copy()
        outside[rows, cols] = False
        assert not outside.any(), (centre, radius)


def test_blocks_magnitude_parts_are_parts_of_the_whole():
    rng = np.random.default_rng(4)
    residual = rng.normal(0, 3, (HEIGHT // GRID, WIDTH // GRID, 2)).astype(np.float32)
    whole = cv2.magnitude(residual[..., 0], residual[..., 1])
    box = (slice(10, 57), slice(33, 101))
    mask = rng.random(whole.shape) < 0.1
    # cv2.magnitude itself rounds a few elements differently by buffer alignment (1 ulp).
    np.testing.assert_allclose(_Blocks(residual, GRID, residual, None).magnitude(box), whole[box], rtol=2e-7)
    np.testing.assert_allclose(
        _Blocks(residual, GRID, residual, None).magnitude(np.flatnonzero(mask)), whole[mask], rtol=2e-7
    )
    # Once the whole field was computed, parts are its slices.
    blocks = _Blocks(residual, GRID, residual, None)
    full = blocks.magnitude()
    np.testing.assert_array_equal(blocks.magnitude(box), full[box])
    np.testing.assert_array_equal(blocks.magnitude(np.flatnonzero(mask)), full[mask])


def test_pursuit_predicted_off_the_flow_grid_coasts():
    """After a long frame gap a fast target is predicted far beyond the image: no block is near
    the prediction, nothing is measured, and the fixation stays in the image."""
    ctrl = FixationController(FixationConfig(), WIDTH, HEIGHT)
    ctrl.start_pursuit(560.0, 240.0, 0.0)
    for i in range(1, 6):
        state = ctrl.update(blob_flow((550.0 + 10 * i, 240.0), (10.0, 0.0)), GRID, i / FPS)
    assert state.mode == FixationMode.PURSUE and state.vx > 150.0
    state = ctrl.update(np.zeros((HEIGHT // GRID, WIDTH // GRID, 2), np.float32), GRID, 5 / FPS + 1.0)
    assert 0.0 <= state.x <= WIDTH - 1 and 0.0 <= state.y <= HEIGHT - 1
    empty = _Blocks(np.zeros((4, 4, 2), np.float32), GRID, None, None).around(np.array([900.0, 5.0]), 10.0)
    assert _Blocks(np.zeros((4, 4, 2), np.float32), GRID, None, None).magnitude(empty).shape == (4, 0)


@pytest.mark.parametrize("num_fixations", [1, 3])
def test_controller_is_deterministic(num_fixations):
    """Same inputs, same fixations: positions, metadata, weights and the saccade trigger."""

    def run():
        cfg = FixationConfig(num_fixations=num_fixations, saccade_rate_hz=6.0, latency_s=0.05)
        ctrl = FixationController(cfg, WIDTH, HEIGHT)
        rng = np.random.default_rng(5)
        gray = cv2.GaussianBlur(rng.integers(0, 256, (HEIGHT, WIDTH), dtype=np.uint8), (0, 0), 3.0)
        sets = []
        for i, moving in enumerate(_blob_masks(6, 30)):
            if i == 8:
                ctrl.set_external(500.0, 60.0, i / FPS, 0.1)
            flow = np.where(moving[..., None], np.float32([2.5, -1.0]), np.float32([0.2, 0.1]))
            ctrl.update(flow, GRID, i / FPS, independent=moving, gray=gray, is_cut=i == 20)
            sets.append(ctrl.fixations)
        return sets

    first, second = run(), run()
    assert first == second
    assert all(len(s.fixations) == len(s.weights) and sum(s.weights) == pytest.approx(1.0) for s in first)
    assert any(s.saccade for s in first)
