"""torch texture backend against the float64 NumPy reference."""

from __future__ import annotations

import doctest

import cv2
import numpy as np
import pytest

from fovea_vla.core.foveation import FoveationConfig, foveated_layout
from fovea_vla.core.texture import TEXTURE_BACKENDS, TextureBackend, TextureConfig, base, make_texture
from fovea_vla.core.texture.reference import reference_pyramid, reference_sample

# fp32 pyramid and interpolation against float64: relative error far below 1e-3.
RTOL = 1e-4


def _torch_texture(**overrides):
    texture, selection = make_texture(TextureConfig(backend="torch", device="cpu", **overrides))
    assert selection.name == "torch"
    return texture


def _check(rgb: np.ndarray, seed: int) -> None:
    rng = np.random.default_rng(seed)
    height, width = rgb.shape[:2]
    texture = _torch_texture()
    texture.upload(rgb)
    levels = reference_pyramid(rgb, TextureConfig().max_levels)
    assert [tuple(lvl.shape[-2:]) for lvl in texture.levels] == [lvl.shape[:2] for lvl in levels]
    layout = foveated_layout(FoveationConfig(), width, height, rng.uniform([0, 0], [width - 1, height - 1]))
    centers = layout.centers + rng.uniform(-4, 4, layout.centers.shape)
    sizes = layout.sizes * rng.uniform(0.6, 1.7, layout.sizes.shape)  # fractional levels everywhere
    expected = reference_sample(levels, centers, sizes, 16)
    got = texture.sample(centers, sizes, 16).numpy()
    assert got.shape == (273, 3, 16, 16) and got.dtype == np.float32
    assert np.isfinite(got).all()
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < RTOL
    np.testing.assert_allclose(got, expected, atol=1e-4)


@pytest.mark.parametrize(("height", "width"), [(480, 640), (37, 53), (101, 99), (720, 1280)])
def test_random_frames_match_reference(height, width):
    rng = np.random.default_rng(height * width)
    _check(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), seed=width)


def test_real_frame_matches_reference(shared_data):
    bgr = cv2.imread(str(shared_data / "faldoi-ipol/example_data/clean/easy/frame_0002.png"))
    assert bgr is not None
    _check(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), seed=2)


def test_level_zero_patch_on_pixel_grid_is_the_crop():
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    texture = _torch_texture()
    texture.upload(rgb)
    # A 16 px footprint centred between pixels 24..39 samples exactly those pixel centres.
    patch = texture.sample(np.array([[31.5, 23.5]]), np.array([16.0]), 16).numpy()[0]
    np.testing.assert_allclose(patch.transpose(1, 2, 0) * 255.0, rgb[16:32, 24:40], atol=1e-3)


def test_level_one_patch_is_box_average():
    rng = np.random.default_rng(4)
    rgb = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    texture = _torch_texture()
    texture.upload(rgb)
    patch = texture.sample(np.array([[15.5, 15.5]]), np.array([32.0]), 16).numpy()[0].transpose(1, 2, 0)
    expected = rgb[:32, :32].astype(np.float64).reshape(16, 2, 16, 2, 3).mean(axis=(1, 3)) / 255.0
    np.testing.assert_allclose(patch, expected, atol=1e-5)


def test_sample_before_upload_and_bad_input_raise():
    texture = _torch_texture()
    with pytest.raises(RuntimeError, match="before upload"):
        texture.sample(np.zeros((1, 2)), np.ones(1) * 16, 16)
    with pytest.raises(ValueError, match="uint8"):
        texture.upload(np.zeros((4, 4, 3), np.float32))


def test_unknown_texture_backend_lists_known():
    with pytest.raises(ValueError, match=r"texture\.backend='tourch'.*did you mean 'torch'"):
        make_texture(TextureConfig(backend="tourch"))


def test_device_validation_names_field():
    with pytest.raises(ValueError, match=r"texture\.device="):
        TextureConfig(device="tpu")


def test_doctests():
    assert doctest.testmod(base).failed == 0


def _changed_frame(rgb: np.ndarray, rng, fraction: float, tile: int) -> tuple[np.ndarray, np.ndarray]:
    """A copy of ``rgb`` with a random ``fraction`` of its tiles replaced, and rectangles covering them."""
    height, width = rgb.shape[:2]
    tiles = rng.random((-(-height // tile), -(-width // tile))) < fraction
    rects = base.tiles_to_rects(tiles, tile, width, height)
    changed = rgb.copy()
    for x0, y0, x1, y1 in rects:
        changed[y0:y1, x0:x1] = rng.integers(0, 256, (y1 - y0, x1 - x0, 3))
    return changed, rects


@pytest.mark.parametrize(("height", "width", "tile"), [(197, 333, 32), (480, 640, 32), (37, 53, 16), (250, 130, 48)])
def test_incremental_update_equals_full_upload(height, width, tile):
    """Dirty rectangles (on any tile grid, the backend's own or not) re-uploaded and their mips
    rebuilt give bit-for-bit the pyramid and samples of a full upload of the new frame."""
    rng = np.random.default_rng(height + width + tile)
    first = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    second, rects = _changed_frame(first, rng, 0.2, tile)
    assert len(rects) > 0
    incremental, full = _torch_texture(), _torch_texture()
    incremental.upload(first)
    incremental.upload_rects(second, rects)
    incremental.rebuild_mips(rects)
    full.upload(second)
    assert incremental.num_levels == full.num_levels
    for mine, theirs in zip(incremental.levels, full.levels, strict=True):
        assert np.array_equal(mine.numpy(), theirs.numpy())
    centers = rng.uniform([-10, -10], [width + 10, height + 10], (300, 2))
    sizes = rng.uniform(4, 600, 300)
    assert np.array_equal(incremental.sample(centers, sizes, 16).numpy(), full.sample(centers, sizes, 16).numpy())


def test_rects_only_touch_their_region():
    """Level 0 changes only where uploaded; coarser levels only after rebuild_mips."""
    rng = np.random.default_rng(7)
    first = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    second = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    texture = _torch_texture()
    texture.upload(first)
    before = [lvl.clone() for lvl in texture.levels]
    texture.upload_rects(second, np.array([[32, 64, 64, 96]]))
    level0 = texture.levels[0][0].permute(1, 2, 0).numpy() * 255.0
    np.testing.assert_allclose(level0[64:96, 32:64], second[64:96, 32:64], atol=1e-3)
    np.testing.assert_allclose(level0[:64], first[:64], atol=1e-3)
    assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(before[1:], texture.levels[1:], strict=True))
    texture.rebuild_mips(np.array([[32, 64, 64, 96]]))
    level1 = texture.levels[1][0].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(level1[:32], before[1][0].permute(1, 2, 0).numpy()[:32])
    assert not np.array_equal(level1[32:48, 16:32], before[1][0].permute(1, 2, 0).numpy()[32:48, 16:32])


def test_max_levels_caps_the_pyramid():
    rng = np.random.default_rng(8)
    rgb = rng.integers(0, 256, (120, 200, 3), dtype=np.uint8)
    texture = _torch_texture(max_levels=3)
    texture.upload(rgb)
    assert [tuple(lvl.shape[-2:]) for lvl in texture.levels] == [(120, 200), (60, 100), (30, 50)]
    # Footprints beyond the top level sample the top level, as the reference does.
    centers, sizes = np.array([[100.0, 60.0]]), np.array([400.0])
    expected = reference_sample(reference_pyramid(rgb, 3), centers, sizes, 16)
    np.testing.assert_allclose(texture.sample(centers, sizes, 16).numpy(), expected, atol=1e-5)


def test_bad_rects_and_order_are_refused():
    rng = np.random.default_rng(9)
    rgb = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    texture = _torch_texture()
    with pytest.raises(RuntimeError, match="before upload"):
        texture.upload_rects(rgb, np.array([[0, 0, 8, 8]]))
    texture.upload(rgb)
    for bad in ([[0, 0, 61, 8]], [[5, 5, 5, 9]], [[-1, 0, 4, 4]], [[0.5, 0, 4, 4]]):
        with pytest.raises(ValueError, match="rects"):
            texture.upload_rects(rgb, np.array(bad))
    with pytest.raises(ValueError, match="60x40"):
        texture.upload_rects(rgb[:20], np.array([[0, 0, 4, 4]]))
    with pytest.raises(ValueError, match=r"texture\.max_levels=0"):
        TextureConfig(max_levels=0)


@pytest.mark.gpu
@pytest.mark.parametrize(("height", "width"), [(1080, 1920), (197, 333)])
def test_cuda_incremental_update_equals_full_upload(height, width):
    rng = np.random.default_rng(width)
    first = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    second, rects = _changed_frame(first, rng, 0.1, 32)
    incremental, _ = make_texture(TextureConfig(backend="torch", device="cuda"))
    full, _ = make_texture(TextureConfig(backend="torch", device="cuda"))
    incremental.upload(first)
    incremental.upload_rects(second, rects)
    incremental.rebuild_mips(rects)
    full.upload(second)
    layout = foveated_layout(FoveationConfig(), width, height, (0.3 * width, 0.6 * height))
    got = incremental.sample(layout.centers, layout.sizes, 16)
    expected = full.sample(layout.centers, layout.sizes, 16)
    assert got.device.type == "cuda"
    assert (got - expected).abs().max().item() <= 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize(("height", "width"), [(480, 640), (1080, 1920), (101, 99)])
def test_cuda_texture_matches_reference(height, width):
    import torch

    rng = np.random.default_rng(width)
    rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    texture, _ = make_texture(TextureConfig(backend="torch", device="cuda"))
    texture.upload(rgb)
    layout = foveated_layout(FoveationConfig(), width, height, (0.4 * width, 0.7 * height))
    sizes = layout.sizes * rng.uniform(0.6, 1.7, layout.sizes.shape)
    got = texture.sample(layout.centers, sizes, 16)
    assert got.device.type == "cuda"
    got = got.cpu().numpy()
    expected = reference_sample(reference_pyramid(rgb, TextureConfig().max_levels), layout.centers, sizes, 16)
    # TF32 is off for these ops (no matmul), so fp32 accuracy applies.
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < RTOL
    assert torch.cuda.is_available()


def test_torch_backend_implements_the_protocol():
    texture = _torch_texture()
    assert isinstance(texture, TextureBackend)
    texture.upload(np.full((8, 8, 3), 7, np.uint8))
    texture.synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["torch", "cupy", "gl"])
def test_gpu_backends_implement_the_protocol(name):
    available, reason = TEXTURE_BACKENDS.availability(name, named=True)
    if not available:
        pytest.skip(f"{name}: {reason}")
    texture, _ = make_texture(TextureConfig(backend=name, device="cuda"))
    try:
        assert isinstance(texture, TextureBackend)
        rng = np.random.default_rng(11)
        texture.upload(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
        texture.synchronize()
        assert texture.sample(np.array([[20.0, 18.0]]), np.array([16.0]), 16).shape == (1, 3, 16, 16)
    finally:
        close = getattr(texture, "close", None)
        if close is not None:
            close()


def test_mip_rebuild_rects_goes_whole_above_the_configured_share():
    rects = np.array([[0, 0, 32, 32], [64, 0, 96, 32]], np.int32)  # 2048 of 12800 px = 16 %
    assert base.mip_rebuild_rects(rects, 160, 80, 1.0) is rects
    assert base.mip_rebuild_rects(rects, 160, 80, 0.16) is rects
    assert base.mip_rebuild_rects(rects, 160, 80, 0.15) is None
    empty = np.zeros((0, 4), np.int32)
    assert base.mip_rebuild_rects(empty, 160, 80, 0.0) is empty
    with pytest.raises(ValueError, match=r"texture\.incremental_mips_max_fraction=1\.5"):
        TextureConfig(incremental_mips_max_fraction=1.5)


def test_pipeline_whole_mips_give_the_same_patches_as_incremental_ones():
    """texture.incremental_mips_max_fraction changes only how the mips are rebuilt, not their texels."""
    from fovea_vla.core.frames import Frame
    from fovea_vla.core.pipeline import FoveaPipeline, PipelineConfig

    rng = np.random.default_rng(3)
    background = cv2.resize(rng.uniform(0, 255, (30, 40, 3)).astype(np.float32), (320, 240)).astype(np.uint8)
    outputs = {}
    for fraction in (1.0, 0.0):
        pipeline = FoveaPipeline(
            PipelineConfig(texture=TextureConfig(backend="torch", device="cpu", incremental_mips_max_fraction=fraction))
        )
        for i in range(4):
            image = background.copy()
            image[80:120, 40 + 8 * i : 80 + 8 * i] = (240, 30, 30)
            out = pipeline.process(Frame(rgb=image, stamp_ns=i * 33_333_333, frame_id="camera"))
        outputs[fraction] = out
    assert outputs[1.0].decision == "partial"
    assert np.array_equal(outputs[1.0].layout.centers, outputs[0.0].layout.centers)
    assert bool((outputs[1.0].patches == outputs[0.0].patches).all())
