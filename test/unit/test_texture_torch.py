"""torch texture backend against the float64 NumPy reference."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from fovea_vla.core.foveation import FoveationConfig, foveated_layout
from fovea_vla.core.texture import TextureConfig, make_texture
from fovea_vla.core.texture.reference import reference_pyramid, reference_sample

# fp32 pyramid and interpolation against float64: relative error far below 1e-3.
RTOL = 1e-4


def _torch_texture():
    texture, selection = make_texture(TextureConfig(backend="torch", device="cpu"))
    assert selection.name == "torch"
    return texture


def _check(rgb: np.ndarray, seed: int) -> None:
    rng = np.random.default_rng(seed)
    height, width = rgb.shape[:2]
    texture = _torch_texture()
    texture.upload(rgb)
    levels = reference_pyramid(rgb)
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
    expected = reference_sample(reference_pyramid(rgb), layout.centers, sizes, 16)
    # TF32 is off for these ops (no matmul), so fp32 accuracy applies.
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < RTOL
    assert torch.cuda.is_available()
