"""Synthetic scene: determinism, ground truth against the rendered pixels, cuts, validation."""

from __future__ import annotations

import itertools

import cv2
import numpy as np
import pytest

from fovea_vla.core.synthetic import SceneTruth, SyntheticScene, SyntheticSceneConfig, make_example

SMALL = {"width": 160, "height": 120, "object_size_px": (16, 40), "object_speed_px_s": (20.0, 60.0)}


def _gray(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)


def test_make_example_renders_a_small_rgb_frame():
    rgb, truth = make_example().render(0)
    assert rgb.shape == (120, 160, 3) and rgb.dtype == np.uint8
    assert isinstance(truth, SceneTruth)
    assert truth.object_centers.shape == (3, 2) and truth.object_centers.dtype == np.float32
    assert truth.object_velocities.shape == (3, 2)
    assert truth.object_boxes.shape == (3, 4)
    assert truth.camera_offset.shape == (2,)
    assert truth.is_cut is False and truth.segment == 0
    # A real scene, not a flat fill: plenty of contrast.
    assert _gray(rgb).std() > 15


def test_render_is_deterministic_in_any_order():
    scene = make_example()
    first = {i: scene.render(i)[0] for i in (5, 0, 17)}
    np.testing.assert_array_equal(scene.render(5)[0], first[5])
    np.testing.assert_array_equal(scene.render(0)[0], first[0])
    fresh = make_example()
    np.testing.assert_array_equal(fresh.render(17)[0], first[17])
    np.testing.assert_array_equal(fresh.truth(17).object_centers, scene.render(17)[1].object_centers)
    assert not np.array_equal(first[5], first[17])


def test_seed_changes_the_scene():
    a = SyntheticScene(SyntheticSceneConfig(**SMALL, seed=1)).render(0)[0]
    b = SyntheticScene(SyntheticSceneConfig(**SMALL, seed=2)).render(0)[0]
    assert np.abs(a.astype(np.int16) - b).mean() > 10


def test_frames_stay_identical_when_segments_leave_the_cache():
    cfg = SyntheticSceneConfig(**SMALL, fps=10.0, scene_cut_every_s=0.5)
    scene = SyntheticScene(cfg)
    order = [1, 7, 12, 16, 3, 13, 8]  # segments 0, 1, 2, 3, 0, 2, 1: more than the cache holds
    frames = [scene.render(i)[0] for i in order]
    fresh = SyntheticScene(cfg)
    for i, rgb in zip(order, frames, strict=True):
        np.testing.assert_array_equal(fresh.render(i)[0], rgb)


@pytest.mark.parametrize("camera_motion", [False, True])
def test_objects_move_by_their_velocity_and_stay_inside(camera_motion):
    cfg = SyntheticSceneConfig(camera_motion=camera_motion)
    scene = SyntheticScene(cfg)
    truths = [scene.truth(i) for i in range(120)]
    for a, b in itertools.pairwise(truths):
        step = b.object_centers - a.object_centers
        np.testing.assert_allclose(step, a.object_velocities / cfg.fps, atol=0.5)
    speeds = np.linalg.norm(np.stack([t.object_velocities for t in truths]), axis=2)
    assert speeds.mean() > 0.5 * cfg.object_speed_px_s[0]
    if not camera_motion:
        assert all(np.all(t.camera_offset == 0) for t in truths)


@pytest.mark.parametrize("seed", range(4))
def test_object_boxes_stay_inside_the_frame(seed):
    cfg = SyntheticSceneConfig(seed=seed, scene_cut_every_s=20.0)
    scene = SyntheticScene(cfg)
    boxes = np.stack([scene.truth(i).object_boxes for i in range(0, 3000, 7)])
    x, y, w, h = np.moveaxis(boxes, -1, 0)
    assert x.min() >= 0 and y.min() >= 0
    assert (x + w).max() <= cfg.width - 1 and (y + h).max() <= cfg.height - 1
    lo, hi = cfg.object_size_px
    assert w.min() >= lo and w.max() <= hi and h.min() >= lo and h.max() <= hi


def test_cut_flags_and_segments_follow_the_configured_period():
    cfg = SyntheticSceneConfig(**SMALL, fps=10.0, scene_cut_every_s=1.0)
    scene = SyntheticScene(cfg)
    truths = [scene.truth(i) for i in range(35)]
    assert [i for i, t in enumerate(truths) if t.is_cut] == [10, 20, 30]
    assert [t.segment for t in truths] == [i // 10 for i in range(35)]


def test_cut_at_a_fractional_frame_falls_on_the_next_frame():
    # 13.5 frames per segment: cuts at t = 0.45 s, 0.9 s, 1.35 s -> frames 14, 27, 41.
    scene = SyntheticScene(SyntheticSceneConfig(**SMALL, fps=30.0, scene_cut_every_s=0.45))
    assert [i for i in range(45) if scene.truth(i).is_cut] == [14, 27, 41]


def test_image_changes_strongly_at_a_cut_only():
    scene = SyntheticScene(SyntheticSceneConfig(**SMALL, fps=10.0, scene_cut_every_s=1.0))
    frames = [_gray(scene.render(i)[0]) for i in range(5, 16)]
    diffs = [np.abs(b - a).mean() for a, b in itertools.pairwise(frames)]
    cut_diff = diffs.pop(4)  # frame 9 -> 10
    assert cut_diff > 3 * max(diffs)


def test_camera_motion_moves_the_background_by_the_truth_offset():
    # No objects, so the whole frame is background.
    scene = SyntheticScene(SyntheticSceneConfig(camera_motion=True, num_objects=0))
    window = cv2.createHanningWindow((1280, 960), cv2.CV_32F)
    moved = 0.0
    for i in (0, 20, 45, 80, 130):
        a, truth_a = scene.render(i)
        b, truth_b = scene.render(i + 1)
        expected = -(truth_b.camera_offset - truth_a.camera_offset)
        # 2x upsampling halves the bias of phaseCorrelate's sub-pixel peak estimate.
        up_a, up_b = (cv2.resize(_gray(x), (1280, 960), interpolation=cv2.INTER_LINEAR) for x in (a, b))
        (dx, dy), _ = cv2.phaseCorrelate(up_a, up_b, window)
        np.testing.assert_allclose(np.array([dx, dy]) / 2, expected, atol=0.3)
        moved += float(np.abs(expected).sum())
    assert moved > 3.0  # the camera really moved


@pytest.mark.parametrize("noise_std", [0.0, 2.0])
def test_dense_flow_explains_the_next_frame(noise_std):
    cfg = SyntheticSceneConfig(camera_motion=True, noise_std=noise_std)
    scene = SyntheticScene(cfg)
    xs, ys = np.meshgrid(np.arange(cfg.width, dtype=np.float32), np.arange(cfg.height, dtype=np.float32))
    inner = np.s_[8:-8, 8:-8]
    for i in (0, 13, 40):
        a, _ = scene.render(i)
        b, _ = scene.render(i + 1)
        flow = scene.dense_flow(i)
        assert flow.shape == (cfg.height, cfg.width, 2) and flow.dtype == np.float32
        back = cv2.remap(b, xs + flow[..., 0], ys + flow[..., 1], cv2.INTER_LINEAR)
        err = np.abs(back[inner].astype(np.float32) - a[inner]).mean()
        baseline = np.abs(b[inner].astype(np.float32) - a[inner]).mean()
        assert err < 0.4 * baseline
        # Noise-free, only occlusion borders and interpolation remain.
        assert err < (1.0 if noise_std == 0 else 1.0 + 1.2 * noise_std)


def test_dense_flow_inside_objects_is_their_displacement():
    scene = SyntheticScene(SyntheticSceneConfig(camera_motion=True))
    a, b = scene.truth(10), scene.truth(11)
    flow = scene.dense_flow(10)
    # The front-most object (last) owns its centre pixel.
    cx, cy = np.round(a.object_centers[-1]).astype(int)
    np.testing.assert_allclose(flow[cy, cx], b.object_centers[-1] - a.object_centers[-1], atol=1e-4)
    background = -(b.camera_offset - a.camera_offset)
    x0, y0, w, h = a.object_boxes.T
    outside = np.ones(flow.shape[:2], bool)
    for bx, by, bw, bh in zip(x0, y0, w, h, strict=True):
        outside[int(by) : int(by + bh) + 2, int(bx) : int(bx + bw) + 2] = False
    np.testing.assert_allclose(flow[outside], np.broadcast_to(background, flow[outside].shape), atol=1e-4)


def test_dense_flow_is_nan_across_a_cut():
    scene = SyntheticScene(SyntheticSceneConfig(**SMALL, fps=10.0, scene_cut_every_s=1.0))
    assert np.isnan(scene.dense_flow(9)).all()
    assert np.isfinite(scene.dense_flow(10)).all()


def test_noise_has_the_configured_std_and_differs_per_frame():
    clean = SyntheticScene(SyntheticSceneConfig(**SMALL, num_objects=0, noise_std=0.0))
    noisy = SyntheticScene(SyntheticSceneConfig(**SMALL, num_objects=0, noise_std=3.0))
    base = clean.render(0)[0].astype(np.float32)
    n0 = noisy.render(0)[0] - base
    n1 = noisy.render(1)[0] - base  # static scene: only the noise differs
    assert abs(n0.std() - 3.0) < 0.3 and abs(n0.mean()) < 0.1
    assert abs(np.corrcoef(n0.ravel(), n1.ravel())[0, 1]) < 0.02


def test_config_accepts_sequences_and_numpy_scalars():
    cfg = SyntheticSceneConfig(width=np.int64(320), object_size_px=[10, 20], object_speed_px_s=np.array([1, 2]))
    assert cfg.width == 320 and type(cfg.width) is int
    assert cfg.object_size_px == (10, 20) and cfg.object_speed_px_s == (1.0, 2.0)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("width", 8),
        ("height", 10.5),
        ("fps", 0.0),
        ("num_objects", -1),
        ("object_speed_px_s", (100.0, 50.0)),
        ("object_speed_px_s", (1.0,)),
        ("object_size_px", (2, 10)),
        ("object_size_px", (50, 400)),
        ("camera_motion", "yes"),
        ("camera_speed_px_s", -1.0),
        ("scene_cut_every_s", 0.01),
        ("noise_std", float("nan")),
        ("seed", -3),
        ("seed", True),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"synthetic\.{field}="):
        SyntheticSceneConfig(**{field: value})


def test_negative_index_is_rejected():
    with pytest.raises(ValueError, match="index"):
        make_example().render(-1)
