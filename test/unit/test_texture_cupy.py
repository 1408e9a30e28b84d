"""cupy texture backend: CUDA-array pyramid and hardware-filtered sampling against the float64 reference.

Tolerance. Texture units interpolate with 8-bit fixed-point weights (CUDA C++ Programming Guide,
"Texture Fetching": 9-bit fixed point with 8 fractional bits). Each weight is off by less than
1/256, so a bilinear sample is off by less than 2/256 of the range of the 2x2 texels it mixes. Each
sample is held to that bound, blended across levels like the samples, plus slack for float32
coordinates (1e-3 texel) and arithmetic (1e-6). Measured on an H100 (CuPy 14.2, torch 2.11+cu130):
max error / local range 0.0064 (1.63/256); max abs error 4.7e-3 and mean 1.4e-4 to 2.1e-4 on uniform
noise, max 1.9e-3 and mean 4.2e-5 on a Sintel frame. Levels match to float32 rounding, level 0
exactly, and an incremental update equals a full upload bit for bit.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from fovea_vla.core.texture import TEXTURE_BACKENDS, TextureConfig, make_texture
from fovea_vla.core.texture.base import level_rect, level_sizes, patch_sample_offsets, tiles_to_rects
from fovea_vla.core.texture.cupy_texture import _level_rects, _mip_tables, _pack_rects, _table
from fovea_vla.core.texture.reference import bilinear_corners, reference_pyramid, reference_sample

WEIGHT_ERROR = 2 / 256  # of the local texel range: two 8-bit weights, each off by less than 1/256
COORD_SLACK = 1e-3  # texel: float32 sample coordinates against float64
FLOAT_ATOL = 1e-6  # float32 levels and blend against float64
MEAN_ABS_NOISE = 3e-4  # mean |error| on uniform noise (measured 1.4e-4 to 2.1e-4)
MEAN_ABS_REAL = 6e-5  # mean |error| on the Sintel frame (measured 4.2e-5)
PATCH = 16


def _cupy_texture(**kwargs):
    ok, reason = TEXTURE_BACKENDS.availability("cupy", named=True)
    if not ok:
        pytest.skip(f"cupy texture unavailable: {reason}")
    texture, selection = make_texture(TextureConfig(backend="cupy", **kwargs))
    assert selection.name == "cupy"
    return texture


def _random_frame(rng, height: int, width: int) -> np.ndarray:
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def _patches(rng, width: int, height: int, count: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """Centres in and around the frame (both clamps), footprints 4..600 px log-uniform (every level)."""
    centers = rng.uniform([-0.25 * width, -0.25 * height], [1.25 * width, 1.25 * height], (count, 2))
    sizes = np.exp(rng.uniform(np.log(4.0), np.log(600.0), count))
    return centers, sizes


def _quad_range(level: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Per channel max - min of the 2x2 texels a bilinear sample mixes (reference indexing)."""
    x0, y0, x1, y1, _, _ = bilinear_corners(*level.shape[:2], xs, ys)
    quad = np.stack([level[y0, x0], level[y0, x1], level[y1, x0], level[y1, x1]])
    return quad.max(axis=0) - quad.min(axis=0)


def _error_bound(levels, centers: np.ndarray, sizes: np.ndarray, patch: int) -> np.ndarray:
    """(N, 3, P, P) bound on |hardware - reference| per sample, mirroring ``reference_sample``."""
    top = len(levels) - 1
    offsets = patch_sample_offsets(patch)
    bound = np.empty((len(sizes), 3, patch, patch))
    for i, ((cx, cy), size) in enumerate(zip(centers, sizes, strict=True)):
        lod = float(np.clip(np.log2(max(size, 1e-6) / patch), 0.0, top))
        low = int(np.floor(lod))
        high = min(low + 1, top)
        xs = np.broadcast_to(cx + offsets[None, :] * size, (patch, patch))
        ys = np.broadcast_to(cy + offsets[:, None] * size, (patch, patch))
        ranges = [_quad_range(levels[k], (xs + 0.5) / 2.0**k - 0.5, (ys + 0.5) / 2.0**k - 0.5) for k in (low, high)]
        blended = ranges[0] * (1.0 - (lod - low)) + ranges[1] * (lod - low)
        bound[i] = blended.transpose(2, 0, 1)
    return bound * (WEIGHT_ERROR + COORD_SLACK) + FLOAT_ATOL


def _check_against_reference(texture, rgb: np.ndarray, rng, *, max_levels: int = 8, patch: int = PATCH):
    """Levels and samples of ``texture`` (holding ``rgb``) against the reference; returns |error|."""
    import torch

    height, width = rgb.shape[:2]
    levels = reference_pyramid(rgb, max_levels)
    assert (texture.width, texture.height, texture.num_levels) == (width, height, len(levels))
    np.testing.assert_array_equal(texture.download_level(0), rgb)
    for k in range(1, len(levels)):
        np.testing.assert_allclose(texture.download_level(k), levels[k], rtol=0, atol=FLOAT_ATOL)
    centers, sizes = _patches(rng, width, height)
    got = texture.sample(centers, sizes, patch)
    assert got.shape == (len(sizes), 3, patch, patch) and got.dtype == torch.float32
    assert got.device == torch.device(texture.device)
    got = got.cpu().numpy()
    expected = reference_sample(levels, centers, sizes, patch)
    error = np.abs(got - expected)
    bound = _error_bound(levels, centers, sizes, patch)
    ranges = (bound - FLOAT_ATOL) / (WEIGHT_ERROR + COORD_SLACK)
    textured = ranges > 1 / 1024  # where the weights, not float32 rounding, dominate
    ratio = (error[textured] / ranges[textured]).max(initial=0.0)
    print(
        f"cupy texture {width}x{height}: max abs {error.max():.2e}, mean abs {error.mean():.2e}, "
        f"max error / local range {ratio:.5f} (1/256 = {1 / 256:.5f})"
    )
    worst = np.unravel_index(np.argmax(error - bound), error.shape)
    assert (error <= bound).all(), f"error {error[worst]:.3e} > bound {bound[worst]:.3e} at {worst}"
    return error


def _assert_same_texture(texture, other, rng) -> None:
    """Bit-identical levels and samples."""
    assert texture.num_levels == other.num_levels
    for k in range(texture.num_levels):
        np.testing.assert_array_equal(texture.download_level(k), other.download_level(k), err_msg=f"level {k}")
    centers, sizes = _patches(rng, texture.width, texture.height)
    got = texture.sample(centers, sizes, PATCH).cpu().numpy()
    expected = other.sample(centers, sizes, PATCH).cpu().numpy()
    assert np.abs(got - expected).max() == 0.0


def test_unavailable_without_cupy_or_cuda_says_why():
    ok, reason = TEXTURE_BACKENDS.availability("cupy")
    if ok:
        pytest.skip(f"cupy texture available here: {reason}")
    assert "cupy" in reason.lower() or "cuda" in reason.lower(), reason
    with pytest.raises(RuntimeError, match="texture backend 'cupy' is unavailable"):
        make_texture(TextureConfig(backend="cupy"))


def test_level_rects_match_level_rect():
    rng = np.random.default_rng(11)
    width, height = 333, 197
    x0 = rng.integers(0, width, 200)
    y0 = rng.integers(0, height, 200)
    rects = np.stack([x0, y0, rng.integers(x0 + 1, width + 1), rng.integers(y0 + 1, height + 1)], axis=1)
    for level in range(9):
        expected = [level_rect(rect, level, width, height) for rect in rects]
        assert _level_rects(rects, level, width, height).tolist() == [list(r) for r in expected]


def _rect_sets(rng, height: int, width: int):
    """Tile rectangles (merged runs), random rectangles and the whole frame."""
    tiles = rng.random((-(-height // 32), -(-width // 32))) < 0.3
    x0 = rng.integers(0, width, 50)
    y0 = rng.integers(0, height, 50)
    random = np.stack([x0, y0, rng.integers(x0 + 1, width + 1), rng.integers(y0 + 1, height + 1)], axis=1)
    whole = np.array([[0, 0, width, height]])
    return [tiles_to_rects(tiles, 32, width, height).astype(np.int64), random.astype(np.int64), whole]


@pytest.mark.parametrize(("height", "width"), [(1080, 1920), (197, 333), (37, 53)])
def test_pack_rects_equals_per_rect_copies(height, width):
    rng = np.random.default_rng(13)
    rgb = _random_frame(rng, height, width)
    for rects in _rect_sets(rng, height, width):
        expected = np.concatenate([rgb[y0:y1, x0:x1].reshape(-1) for x0, y0, x1, y1 in rects])
        padded = np.zeros((height, width + 5, 3), dtype=np.uint8)
        padded[:, :width] = rgb
        for frame in (rgb, padded[:, :width]):  # C-contiguous and a strided view
            got = np.empty_like(expected)
            _pack_rects(frame, rects, got)
            np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(("height", "width", "max_levels"), [(1080, 1920, 8), (197, 333, 8), (37, 53, 3), (1, 7, 8)])
def test_mip_tables_equal_per_level_tables(height, width, max_levels):
    rng = np.random.default_rng(14)
    sizes = level_sizes(width, height, max_levels)
    if len(sizes) < 2:
        pytest.skip("one level")
    for rects in _rect_sets(rng, height, width):
        expected = [_table(_level_rects(rects, k, width, height)) for k in range(1, len(sizes))]
        flat, totals = _mip_tables(rects, sizes)
        np.testing.assert_array_equal(flat, np.concatenate([table for table, _ in expected]))
        assert totals == [total for _, total in expected]


@pytest.mark.gpu
@pytest.mark.parametrize(("height", "width"), [(197, 333), (37, 53), (1080, 1920)])
def test_random_frames_match_reference(height, width):
    rng = np.random.default_rng(height * width)
    rgb = _random_frame(rng, height, width)
    texture = _cupy_texture()
    texture.upload(rgb)
    error = _check_against_reference(texture, rgb, rng)
    assert error.mean() < MEAN_ABS_NOISE


@pytest.mark.gpu
def test_real_frame_matches_reference(shared_data):
    bgr = cv2.imread(str(shared_data / "faldoi-ipol/example_data/clean/easy/frame_0002.png"))
    assert bgr is not None
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    texture = _cupy_texture()
    texture.upload(rgb)
    error = _check_against_reference(texture, rgb, np.random.default_rng(2))
    assert error.mean() < MEAN_ABS_REAL


@pytest.mark.gpu
def test_pixel_grid_patch_is_the_exact_crop():
    """Samples on level-0 texel centres have zero filter fraction, so 8-bit weights cost nothing."""
    rng = np.random.default_rng(3)
    rgb = _random_frame(rng, 64, 80)
    texture = _cupy_texture()
    texture.upload(rgb)
    patch = texture.sample(np.array([[31.5, 23.5]]), np.array([16.0]), 16).cpu().numpy()[0]
    np.testing.assert_allclose(patch.transpose(1, 2, 0), rgb[16:32, 24:40] / 255.0, rtol=0, atol=FLOAT_ATOL)


@pytest.mark.gpu
def test_incremental_tiles_equal_full_upload():
    rng = np.random.default_rng(5)
    height, width, tile = 197, 333, 32
    first = _random_frame(rng, height, width)
    second = first.copy()
    tiles = rng.random((-(-height // tile), -(-width // tile))) < 0.3
    tiles[-1, -1] = True  # the clipped corner tile
    for i, j in zip(*np.nonzero(tiles), strict=True):
        block = second[i * tile : (i + 1) * tile, j * tile : (j + 1) * tile]
        block[...] = rng.integers(0, 256, block.shape, dtype=np.uint8)
    rects = tiles_to_rects(tiles, tile, width, height)

    texture = _cupy_texture()
    texture.upload(first)
    level1_before = texture.download_level(1)
    texture.upload_rects(second, rects)
    np.testing.assert_array_equal(texture.download_level(0), second)
    np.testing.assert_array_equal(texture.download_level(1), level1_before)  # until rebuild_mips
    texture.rebuild_mips(rects)
    full = _cupy_texture()
    full.upload(second)
    _assert_same_texture(texture, full, rng)


@pytest.mark.gpu
def test_incremental_rects_at_borders_and_odd_offsets_equal_full_upload():
    rng = np.random.default_rng(6)
    height, width = 197, 333
    first = _random_frame(rng, height, width)
    rects = [
        [0, 0, 1, 1],
        [width - 1, height - 1, width, height],
        [width - 3, 0, width, 5],
        [0, height - 2, 7, height],
        [101, 57, 154, 58],
        [5, 9, 6, 120],
        [100, 50, 160, 90],  # overlaps [101, 57, 154, 58]
    ]
    for _ in range(12):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        rects.append([x0, y0, int(rng.integers(x0 + 1, width + 1)), int(rng.integers(y0 + 1, height + 1))])
    rects = np.array(rects, dtype=np.int32)
    second = first.copy()
    for x0, y0, x1, y1 in rects:
        second[y0:y1, x0:x1] = rng.integers(0, 256, (y1 - y0, x1 - x0, 3), dtype=np.uint8)

    texture = _cupy_texture()
    texture.upload(first)
    texture.upload_rects(second, rects)
    texture.rebuild_mips(rects)
    full = _cupy_texture()
    full.upload(second)
    _assert_same_texture(texture, full, rng)


@pytest.mark.gpu
def test_max_levels_and_new_sizes():
    rng = np.random.default_rng(8)
    texture = _cupy_texture(max_levels=3)
    for height, width in [(197, 333), (1, 1), (3, 5), (64, 48)]:
        rgb = _random_frame(rng, height, width)
        texture.upload(rgb)
        _check_against_reference(texture, rgb, rng, max_levels=3, patch=7)


@pytest.mark.gpu
def test_every_output_element_is_written():
    import torch

    rng = np.random.default_rng(9)
    rgb = _random_frame(rng, 197, 333)
    texture = _cupy_texture()
    texture.upload(rgb)
    count = 700  # > 1 MiB of patches: a block torch's caching allocator hands back whole
    centers, sizes = _patches(rng, 333, 197, count)
    poison = torch.full((count, 3, PATCH, PATCH), float("nan"), device=texture.device)
    poisoned = poison.data_ptr()
    del poison
    got = texture.sample(centers, sizes, PATCH)
    assert got.data_ptr() == poisoned, "the allocator did not reuse the poisoned block; the check proves nothing"
    assert torch.isfinite(got).all()


@pytest.mark.gpu
def test_upload_and_sample_queue_on_the_current_stream_without_waiting():
    import torch

    rng = np.random.default_rng(10)
    first, second = _random_frame(rng, 197, 333), _random_frame(rng, 197, 333)
    centers, sizes = _patches(rng, 333, 197)
    texture = _cupy_texture()
    texture.upload(first)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # ~50 ms of GPU time queued ahead of the texture's work
        texture.upload(second)
        got = texture.sample(centers, sizes, PATCH)
        assert not side.query(), "upload or sample waited for the device"
    side.synchronize()
    reference = _cupy_texture()
    reference.upload(second)
    expected = reference.sample(centers, sizes, PATCH)
    assert torch.equal(got, expected)


@pytest.mark.gpu
def test_bad_input_raises():
    rng = np.random.default_rng(12)
    texture = _cupy_texture()
    rgb = _random_frame(rng, 197, 333)
    with pytest.raises(RuntimeError, match="before upload"):
        texture.upload_rects(rgb, np.array([[0, 0, 4, 4]]))
    with pytest.raises(RuntimeError, match="before upload"):
        texture.rebuild_mips()
    with pytest.raises(RuntimeError, match="before upload"):
        texture.sample(np.zeros((1, 2)), np.full(1, 16.0), PATCH)
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        texture.upload(rgb.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        texture.upload(rgb[..., 0])
    texture.upload(rgb)
    with pytest.raises(ValueError, match="333x197"):
        texture.upload_rects(rgb[:100], np.array([[0, 0, 4, 4]]))
    with pytest.raises(ValueError, match="inside 333x197"):
        texture.upload_rects(rgb, np.array([[300, 0, 334, 4]]))
    with pytest.raises(ValueError, match="inside 333x197"):
        texture.rebuild_mips(np.array([[0.0, 0.0, 4.0, 4.0]]))
    with pytest.raises(ValueError, match=r"texture\.device='cpu'"):
        make_texture(TextureConfig(backend="cupy", device="cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["pinned", "pageable", "threads"])
def test_full_upload_copy_modes_and_strided_frames_agree(mode):
    """Every full-upload copy path and a non-contiguous frame give the same texture; synchronize() returns."""
    rng = np.random.default_rng(15)
    rgb = _random_frame(rng, 197, 333)
    texture = _cupy_texture()
    if mode == "threads":
        texture._copy_threads = 3
    else:
        texture._full_copy = mode
    texture.upload(rgb)
    texture.synchronize()
    np.testing.assert_array_equal(texture.download_level(0), rgb)
    strided = _cupy_texture()
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    strided.upload(bgr[..., ::-1])  # an RGB view with a negative channel stride
    strided.upload_rects(bgr[..., ::-1], np.array([[3, 5, 100, 60]]))
    strided.rebuild_mips(np.array([[3, 5, 100, 60]]))
    _assert_same_texture(texture, strided, rng)


@pytest.mark.gpu
def test_repeated_incremental_frames_equal_full_upload():
    """Many frames through the staging ring (buffers reused while earlier copies may be in flight)."""
    rng = np.random.default_rng(16)
    height, width, tile = 1080, 1920, 32
    frame = _random_frame(rng, height, width)
    texture = _cupy_texture()
    texture.upload(frame)
    for _ in range(5):
        tiles = rng.random((-(-height // tile), -(-width // tile))) < 0.1
        rects = tiles_to_rects(tiles, tile, width, height)
        frame = frame.copy()
        for x0, y0, x1, y1 in rects:
            frame[y0:y1, x0:x1] = rng.integers(0, 256, (y1 - y0, x1 - x0, 3), dtype=np.uint8)
        texture.upload_rects(frame, rects)
        texture.rebuild_mips(rects)
        texture.sample(*_patches(rng, width, height), PATCH)
    full = _cupy_texture()
    full.upload(frame)
    _assert_same_texture(texture, full, rng)
