"""Temporal coherence: decisions, dirty-tile updates and the token cache, through the real pipeline."""

from __future__ import annotations

import numpy as np
import pytest

from fovea_vla.core.coherence import CoherenceConfig, TemporalCoherence
from fovea_vla.core.foveation import AdaptiveBudget, AdaptiveBudgetConfig, FoveationConfig, scene_complexity
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
    pipeline = _encoder_pipeline("cpu", "torch", change_threshold=0.0)
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
    pipeline = _encoder_pipeline("cuda", texture, change_threshold=0.0)
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
