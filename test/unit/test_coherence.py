"""Temporal coherence: decisions, dirty-tile updates and the token cache, through the real pipeline."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest

from fovea_vla.core.coherence import CoherenceConfig, TemporalCoherence, dirty_tokens, keep_token_positions
from fovea_vla.core.foveation import (
    AdaptiveBudget,
    AdaptiveBudgetConfig,
    FoveationConfig,
    foveated_layout,
    scene_complexity,
)
from fovea_vla.core.frames import Frame, rgb_to_gray
from fovea_vla.core.pipeline import FoveaPipeline, PipelineConfig
from fovea_vla.core.texture import TextureConfig, make_texture

FRAME_NS = 33_333_333


def _scene(rng, height=240, width=320):
    """Smooth random background (so flow and the cut detector have texture to work with)."""
    import cv2

    noise = rng.uniform(0, 255, (height // 8, width // 8, 3)).astype(np.float32)
    return cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC).clip(0, 255).astype(np.uint8)


def _pipeline(**coherence) -> FoveaPipeline:
    return FoveaPipeline(
        PipelineConfig(
            texture=TextureConfig(backend="torch", device="cpu"),
            coherence=CoherenceConfig(**coherence),
            foveation=FoveationConfig(num_tokens=96),
        )
    )


def _frames(images):
    return [Frame(rgb=img, stamp_ns=i * FRAME_NS, frame_id="camera") for i, img in enumerate(images)]


def test_static_frames_reuse_cached_tokens():
    rng = np.random.default_rng(0)
    background = _scene(rng)
    pipeline = _pipeline()
    outputs = [pipeline.process(frame) for frame in _frames([background] * 6)]
    assert [o.decision for o in outputs] == ["first"] + ["static"] * 5
    assert [o.tokens_reused for o in outputs] == [False] + [True] * 5
    assert all(o.patches is outputs[0].patches and o.layout is outputs[0].layout for o in outputs)
    assert all(o.tokens_stamp_ns == 0 for o in outputs)
    assert "sampling" not in outputs[-1].timing_ms and "upload" not in outputs[-1].timing_ms
    assert pipeline.frames_reused == 5
    assert pipeline.decision_counts == {"first": 1, "static": 5}


def test_partial_update_equals_full_recompute():
    """A square moving over a still background: only its tiles are uploaded, and the sampled
    patches equal those of a texture that received the whole frame (threshold 0: exact)."""
    rng = np.random.default_rng(1)
    background = _scene(rng)
    images = []
    for i in range(8):
        image = background.copy()
        image[100:140, 60 + 6 * i : 100 + 6 * i] = (230, 40, 30)
        images.append(image)
    pipeline = _pipeline(change_threshold=0.0)
    reference, _ = make_texture(TextureConfig(backend="torch", device="cpu"))
    decisions = []
    for frame in _frames(images):
        out = pipeline.process(frame)
        decisions.append(out.decision)
        if out.decision == "partial":
            assert 0.0 < out.dirty_fraction < 0.2
        reference.upload(frame.rgb)
        expected = reference.sample(out.layout.centers, out.layout.sizes, out.layout.patch_size)
        assert not out.tokens_reused
        assert (out.patches - expected).abs().max().item() <= 1e-6
    assert decisions[0] == "first" and decisions[1:] == ["partial"] * 7


def test_slow_drift_accumulates_into_an_upload():
    """A tile brightening by 1 grey level per frame stays under a 3-level threshold frame to frame,
    but is uploaded once it differs from the texture by more than the threshold."""
    rng = np.random.default_rng(2)
    base = _scene(rng, 64, 64).astype(np.int16)
    coherence = TemporalCoherence(CoherenceConfig(change_threshold=3.0, tile_size=32))
    kinds = []
    for i in range(8):
        image = base.copy()
        image[:32, :32] += i
        kinds.append(coherence.decide(rgb_to_gray(np.clip(image, 0, 255).astype(np.uint8)), i * 0.03).kind)
    assert kinds == ["first", "static", "static", "static", "partial", "static", "static", "static"]


def test_cut_refresh_and_disabled_decisions():
    rng = np.random.default_rng(3)
    a, b = _scene(rng), _scene(rng)
    pipeline = _pipeline(max_token_age_s=0.1)
    kinds = [pipeline.process(f).decision for f in _frames([a, a, a, a, a, b])]
    assert kinds == ["first", "static", "static", "static", "refresh", "cut"]

    pipeline = _pipeline(enabled=False)
    kinds = [pipeline.process(f).decision for f in _frames([a, a, a])]
    assert kinds == ["first", "full", "full"]


def test_moving_fixation_resamples_a_static_frame():
    rng = np.random.default_rng(4)
    background = _scene(rng)
    pipeline = _pipeline()
    frames = _frames([background] * 3)
    first = pipeline.process(frames[0])
    pipeline.set_external_fixation(40.0, 50.0)
    moved = pipeline.process(frames[1])
    assert moved.decision == "static" and not moved.tokens_reused
    assert np.allclose(moved.layout.fixation, (40.0, 50.0))
    assert not np.array_equal(moved.layout.centers, first.layout.centers)
    assert pipeline.process(frames[2]).tokens_reused


def test_size_change_starts_over():
    rng = np.random.default_rng(5)
    pipeline = _pipeline()
    small, large = _scene(rng, 120, 160), _scene(rng)
    kinds = [pipeline.process(f).decision for f in _frames([small, small, large, large])]
    assert kinds == ["first", "static", "first", "static"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tile_size", 2),
        ("change_threshold", -1.0),
        ("full_upload_fraction", 0.0),
        ("max_token_age_s", 0.0),
        ("max_fixation_shift_px", float("nan")),
        ("enabled", 1),
    ],
)
def test_coherence_config_names_bad_field(field, value):
    with pytest.raises(ValueError, match=rf"coherence\.{field}="):
        CoherenceConfig(**{field: value})


def test_adaptive_budget_follows_complexity_and_latency():
    cfg = AdaptiveBudgetConfig(enabled=True, min_tokens=64, max_tokens=512, step=32, latency_target_ms=10.0)
    budget = AdaptiveBudget(cfg, initial=273)
    assert budget.update(0.0, None) == 64
    assert budget.update(1.0, None) == 512
    # 40 ms at 512 tokens is 4x over the target: the budget falls toward 128.
    for _ in range(30):
        tokens = budget.update(1.0, 40.0 * budget.tokens / 512)
    assert tokens == 128
    assert all(budget.update(c, 1.0) % 32 == 0 for c in np.linspace(0, 1, 7))
    with pytest.raises(ValueError, match=r"foveation\.adaptive\.min_tokens=600"):
        AdaptiveBudgetConfig(min_tokens=600, max_tokens=512)


def test_scene_complexity_orders_scenes():
    rng = np.random.default_rng(6)
    flat = np.full((240, 320), 128, np.uint8)
    busy = rng.integers(0, 256, (240, 320), dtype=np.uint8)
    half = flat.copy()
    half[:, :160] = busy[:, :160]
    assert scene_complexity(flat) == 0.0
    assert scene_complexity(busy) == 1.0
    assert 0.3 < scene_complexity(half) < 0.7


def test_pipeline_with_adaptive_budget_changes_token_count():
    rng = np.random.default_rng(7)
    pipeline = FoveaPipeline(
        PipelineConfig(
            texture=TextureConfig(backend="torch", device="cpu"),
            adaptive_budget=AdaptiveBudgetConfig(enabled=True, min_tokens=32, max_tokens=256, step=32),
        )
    )
    flat = np.full((240, 320, 3), 90, np.uint8)
    busy = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
    counts = [pipeline.process(f).layout.num_tokens for f in _frames([flat, flat, busy, busy])]
    assert counts[1] == 32  # the flat frame sets the minimum for the next one
    assert counts[3] > counts[1] and counts[3] % 32 == 0


def _encoder_pipeline(device: str, texture: str, **coherence) -> FoveaPipeline:
    from fovea_vla.core.encoder import EncoderConfig

    return FoveaPipeline(
        PipelineConfig(
            texture=TextureConfig(backend=texture, device=device),
            coherence=CoherenceConfig(**coherence),
            foveation=FoveationConfig(num_tokens=64),
            encoder=EncoderConfig(
                architecture=None, embed_dim=64, depth=2, num_heads=4, device=device, dtype="float32"
            ),
        )
    )


def _moving_square_frames(rng, count: int):
    background = _scene(rng)
    images = []
    for i in range(count):
        image = background.copy()
        image[100:140, 60 + 6 * i : 100 + 6 * i] = (230, 40, 30)
        images.append(image)
    return _frames(images + [images[-1]] * 2)


def _check_tokens_equal_full_recompute(pipeline: FoveaPipeline, frames, texture: str, device: str) -> None:
    reference, _ = make_texture(TextureConfig(backend=texture, device=device))
    decisions = []
    for frame in frames:
        out = pipeline.process(frame)
        decisions.append(out.decision)
        reference.upload(frame.rgb)
        patches = reference.sample(out.layout.centers, out.layout.sizes, out.layout.patch_size)
        expected = pipeline.encoder.encode(patches, out.layout.centers, out.layout.levels, (out.width, out.height))
        assert out.tokens.shape == (64, 64)
        assert (out.tokens.float() - expected.tokens.float()).abs().max().item() <= 1e-3
    assert decisions[1:4] == ["partial"] * 3 and decisions[-1] == "static"


def test_tokens_after_incremental_update_equal_full_recompute():
    rng = np.random.default_rng(8)
    pipeline = _encoder_pipeline("cpu", "torch", change_threshold=0.0, reencode="all")
    frames = _moving_square_frames(rng, 4)
    _check_tokens_equal_full_recompute(pipeline, frames, "torch", "cpu")
    last = pipeline.process(frames[-1])
    assert last.tokens_reused and last.tokens is pipeline.process(frames[-1]).tokens


@pytest.mark.gpu
@pytest.mark.parametrize("texture", ["torch", "cupy", "gl"])
def test_cuda_tokens_after_incremental_update_equal_full_recompute(texture):
    from fovea_vla.core.texture import TEXTURE_BACKENDS

    available, reason = TEXTURE_BACKENDS.availability(texture)
    if not available:
        pytest.skip(f"{texture}: {reason}")
    rng = np.random.default_rng(9)
    pipeline = _encoder_pipeline("cuda", texture, change_threshold=0.0, reencode="all")
    _check_tokens_equal_full_recompute(pipeline, _moving_square_frames(rng, 4), texture, "cuda")


def test_measure_ahead_gives_the_same_decisions_as_decide_alone():
    """The pipeline measures the texture difference beside the flow stage and decides later."""
    rng = np.random.default_rng(11)
    background = _scene(rng)
    images = []
    for i in range(6):
        image = background.copy()
        image[40 + 10 * i : 80 + 10 * i, 50:120] = (220, 30, 30)
        images.append(image)
    grays = [rgb_to_gray(img) for img in [*images, images[-1]]]
    alone, ahead = TemporalCoherence(CoherenceConfig()), TemporalCoherence(CoherenceConfig())
    for index, gray in enumerate(grays):
        now_s = index * FRAME_NS * 1e-9
        measured = ahead.measure(gray)
        assert (measured is None) == (index == 0)
        a, b = alone.decide(gray, now_s), ahead.decide(gray, now_s, measured=measured)
        assert (a.kind, a.dirty_fraction) == (b.kind, b.dirty_fraction) and np.array_equal(a.rects, b.rects)
    assert [alone.decide(g, 1.0).kind for g in grays[-1:]] == ["static"]


# -- token-level reuse ---------------------------------------------------------------------------


def test_kept_positions_follow_the_tolerance_of_each_footprint():
    cfg = FoveationConfig(num_tokens=200)
    before = foveated_layout(cfg, 1280, 720, (640.0, 360.0))
    same, moved = keep_token_positions(before, before, 0.25)
    assert not moved.any() and np.array_equal(same.centers, before.centers)
    # A 6 px shift: within a quarter of every footprint of 32 px and more, beyond the 16 px ones.
    after = foveated_layout(cfg, 1280, 720, (646.0, 360.0))
    kept, moved = keep_token_positions(after, before, 0.25)
    assert np.array_equal(moved, before.sizes < 24.0)
    assert np.array_equal(kept.centers[~moved], before.centers[~moved])
    assert np.array_equal(kept.centers[moved], after.centers[moved])
    assert np.array_equal(kept.levels[~moved], before.levels[~moved])
    offsets = kept.centers - np.array([646.0, 360.0])
    np.testing.assert_allclose(kept.eccentricity, np.hypot(offsets[:, 0], offsets[:, 1]), rtol=1e-6)
    _, none_kept = keep_token_positions(after, before, 0.0)
    assert none_kept.all()
    _, other_budget = keep_token_positions(
        foveated_layout(FoveationConfig(num_tokens=96), 1280, 720, (640, 360)), before, 0.5
    )
    assert other_budget.all()


@pytest.mark.parametrize("fixation", [(200.0, 150.0), (20.0, 230.0)])
def test_tokens_outside_dirty_reach_sample_the_same_patch(fixation):
    """The margin of dirty_tokens is enough: every token it calls clean samples bit-identical
    patches after a partial upload and an incremental mip rebuild (levels 0 to 2.7 here)."""
    rng = np.random.default_rng(12)
    texture, _ = make_texture(TextureConfig(backend="torch", device="cpu"))
    image = _scene(rng, 240, 320)
    texture.upload(image)
    layout = foveated_layout(FoveationConfig(num_tokens=60, e0_fraction=0.05), 320, 240, fixation)
    assert layout.levels.max() > 2.0
    before = texture.sample(layout.centers, layout.sizes, layout.patch_size)
    clean_seen = dirty_seen = 0
    for _ in range(6):
        x0, y0 = int(rng.integers(0, 300)), int(rng.integers(0, 220))
        rects = np.array([[x0, y0, min(320, x0 + 20), min(240, y0 + 20)]], np.int32)
        image = image.copy()
        image[y0 : rects[0, 3], x0 : rects[0, 2]] = rng.integers(0, 256, (rects[0, 3] - y0, rects[0, 2] - x0, 3))
        texture.upload_rects(image, rects)
        texture.rebuild_mips(rects)
        after = texture.sample(layout.centers, layout.sizes, layout.patch_size)
        dirty = dirty_tokens(layout, rects)
        assert dirty.any() and not dirty.all()
        assert torch_equal_rows(before, after, ~dirty)
        clean_seen += int((~dirty).sum())
        dirty_seen += int(dirty.sum())
        before = after
    assert clean_seen > dirty_seen > 0
    assert not dirty_tokens(layout, np.zeros((0, 4), np.int32)).any()


def torch_equal_rows(a, b, rows) -> bool:
    return bool((a[rows] == b[rows]).all())


def _token_level_pipeline(**coherence) -> FoveaPipeline:
    return _encoder_pipeline("cpu", "torch", change_threshold=0.0, reencode="changed", **coherence)


def test_token_level_reuse_samples_only_what_changed():
    """A square moving over a still background with the fixation held: only the tokens whose
    footprint it reaches are sampled and encoded again; the patches equal a full recompute at
    the layout's positions exactly, and the tokens stay close to a full encode of them."""
    rng = np.random.default_rng(13)
    pipeline = _token_level_pipeline(max_reencode_fraction=0.9)
    pipeline.set_external_fixation(160.0, 120.0)
    reference, _ = make_texture(TextureConfig(backend="torch", device="cpu"))
    outputs = []
    for frame in _moving_square_frames(rng, 5):
        out = pipeline.process(frame)
        outputs.append(out)
        reference.upload(frame.rgb)
        expected = reference.sample(out.layout.centers, out.layout.sizes, out.layout.patch_size)
        assert bool((out.patches == expected).all())
        full = pipeline.encoder.encode(expected, out.layout.centers, out.layout.levels, (out.width, out.height))
        relative = (out.tokens - full.tokens).norm(dim=1) / full.tokens.norm(dim=1)
        assert relative.max().item() <= 0.05
    updated = [o.tokens_updated for o in outputs]
    assert updated[0] == 64 and all(0 < n < 64 for n in updated[1:5]) and updated[-2:] == [0, 0]
    assert [o.tokens_reused for o in outputs[-2:]] == [True, True]
    assert pipeline.frames_partly_reused == 4 and pipeline.frames_reused == 2
    assert pipeline.tokens_updated == sum(updated) and pipeline.tokens_total == 64 * len(outputs)


def test_token_level_reuse_encodes_whole_frames_above_the_fraction():
    rng = np.random.default_rng(14)
    pipeline = _token_level_pipeline(max_reencode_fraction=0.01)
    pipeline.set_external_fixation(160.0, 120.0)
    updated = [pipeline.process(frame).tokens_updated for frame in _moving_square_frames(rng, 3)]
    assert updated == [64, 64, 64, 0, 0]
    assert pipeline.frames_partly_reused == 0


def test_token_level_reuse_through_the_asynchronous_encoder():
    """The worker may skip jobs, so it finds what changed by comparing with what it encoded last."""
    rng = np.random.default_rng(15)
    updates = []
    pipeline = FoveaPipeline(replace(_token_level_pipeline().cfg, async_encoder=True), on_tokens=updates.append)
    pipeline.set_external_fixation(160.0, 120.0)
    try:
        for frame in _moving_square_frames(rng, 4):
            pipeline.process(frame)
            deadline = time.monotonic() + 10.0
            while (not updates or updates[-1].stamp_ns != frame.stamp_ns) and time.monotonic() < deadline:
                time.sleep(0.005)
        last = updates[-1]
        full = pipeline.encoder.encode(pipeline._cache.patches, last.layout.centers, last.layout.levels, (320, 240))
        relative = (last.tokens - full.tokens).norm(dim=1) / full.tokens.norm(dim=1)
        assert relative.max().item() <= 0.05
        assert pipeline.encoder_errors == 0
    finally:
        pipeline.close()


def test_token_level_reuse_encodes_whole_after_max_partial_encodes():
    rng = np.random.default_rng(16)
    pipeline = _token_level_pipeline(max_reencode_fraction=0.9, max_partial_encodes=2)
    pipeline.set_external_fixation(160.0, 120.0)
    updated = [pipeline.process(frame).tokens_updated for frame in _moving_square_frames(rng, 7)]
    whole = [i for i, n in enumerate(updated) if n == 64]
    assert whole == [0, 3, 6] and all(0 < updated[i] < 64 for i in (1, 2, 4, 5))
    assert updated[-2:] == [0, 0]  # unchanged frames reuse, whatever the count
