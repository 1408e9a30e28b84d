"""gl texture backend against the float64 NumPy reference.

The GL passes (unpack, downsample, sample) run on any OpenGL 4.5 implementation: these tests use
:class:`GlPyramid` alone and read results back with GL (test-only read-backs), so they run on
Mesa's llvmpipe in CI and on the NVIDIA driver alike. Tests marked ``gpu`` cover the CUDA hand-over
of :class:`GlTexture` and need an NVIDIA GPU with EGL.
"""

from __future__ import annotations

import gc
import subprocess
import sys

import cv2
import numpy as np
import pytest

from fovea_vla.core.texture import TEXTURE_BACKENDS, TextureConfig, make_texture
from fovea_vla.core.texture.base import level_sizes, tiles_to_rects
from fovea_vla.core.texture.reference import reference_pyramid, reference_sample

FORMATS = ("rgba32f", "rgba16f", "rgba8")
# Bound on |texel - reference| at level k: fp32 rounding for rgba32f; one unit in the last place
# per level for the rounded formats (truncating hardware, e.g. llvmpipe's fp16; round-to-nearest,
# the spec's preference, gives half), since each level is rounded from an already rounded one.
# Level 0 of rgba8 is exact (k / 255 is what unorm8 stores).
ULP = {"rgba32f": 0.0, "rgba16f": 2.0**-11, "rgba8": 1.0 / 255.0}
FP32 = 1e-5
# GL entry points that move buffer or texture contents to the host.
READ_BACKS = (
    "glGetBufferSubData",
    "glGetNamedBufferSubData",
    "glMapBuffer",
    "glMapBufferRange",
    "glMapNamedBuffer",
    "glMapNamedBufferRange",
    "glGetTexImage",
    "glGetTextureImage",
    "glGetTextureSubImage",
    "glReadPixels",
)


def level_bound(texel_format: str, level: int) -> float:
    return FP32 + ULP[texel_format] * (level if texel_format == "rgba8" else level + 1)


@pytest.fixture(scope="module")
def gl():
    pytest.importorskip("OpenGL")
    from fovea_vla.core.texture.gl import _gl_modules

    try:
        return _gl_modules()[1]
    except RuntimeError as exc:
        pytest.skip(str(exc))


@pytest.fixture
def make_pyramid(gl):
    from fovea_vla.core.texture.gl import GlPyramid

    made = []

    def make(texel_format: str = "rgba32f", max_levels: int = 8):
        try:
            made.append(GlPyramid(max_levels, texel_format))
        except RuntimeError as exc:
            pytest.skip(f"no headless OpenGL 4.5 context: {exc}")
        return made[-1]

    yield make
    for pyramid in made:
        pyramid.close()


def read_level(gl, pyramid, k: int) -> np.ndarray:
    """Level k as (H_k, W_k, 3) float32 (GL's padded level cropped to the convention's size)."""
    size = np.zeros(1, np.int32)
    gl.glGetTextureLevelParameteriv(pyramid.texture, k, gl.GL_TEXTURE_WIDTH, size)
    width = int(size[0])
    gl.glGetTextureLevelParameteriv(pyramid.texture, k, gl.GL_TEXTURE_HEIGHT, size)
    texels = np.empty((int(size[0]), width, 4), np.float32)
    gl.glGetTextureImage(pyramid.texture, k, gl.GL_RGBA, gl.GL_FLOAT, texels.nbytes, texels)
    w_k, h_k = level_sizes(pyramid.width, pyramid.height, pyramid.max_levels)[k]
    return texels[:h_k, :w_k, :3]


def gl_sample(gl, pyramid, centers, sizes, patch_size: int) -> np.ndarray:
    """``pyramid.sample`` read back from its storage buffer: (N, 3, P, P) float32."""
    count = pyramid.sample(centers, sizes, patch_size)
    gl.glMemoryBarrier(gl.GL_BUFFER_UPDATE_BARRIER_BIT)
    out = np.empty((count, 3, patch_size, patch_size), np.float32)
    gl.glGetNamedBufferSubData(pyramid.samples.name, 0, out.nbytes, out)
    return out


def random_patches(rng, width: int, height: int, count: int = 273):
    """Centres up to 80 px outside the frame, footprints log-uniform in [4, 600] px."""
    centers = rng.uniform([-80, -80], [width + 80, height + 80], (count, 2))
    sizes = np.exp(rng.uniform(np.log(4.0), np.log(600.0), count))
    return centers, sizes


def changed_frame(rng, rgb: np.ndarray, tile: int = 32, fraction: float = 0.1):
    """``rgb`` with ~``fraction`` of its tiles replaced, and rectangles covering every change:
    the tiles (runs per row), plus an odd rectangle on the bottom-right corner and one overlapping
    another rectangle."""
    height, width = rgb.shape[:2]
    tiles = rng.random((-(-height // tile), -(-width // tile))) < fraction
    rects = np.concatenate(
        [
            tiles_to_rects(tiles, tile, width, height),
            [[width - 7, height - 5, width, height], [3, 1, 40, 38]],
        ]
    )
    new = rgb.copy()
    for x0, y0, x1, y1 in rects:
        new[y0:y1, x0:x1] = rng.integers(0, 256, (y1 - y0, x1 - x0, 3), dtype=np.uint8)
    return new, rects


def test_padded_box_pyramid_is_not_the_convention():
    """Why levels are not built by glGenerateMipmap over an edge-padded level 0: box-filtering
    padded levels mixes real and replicated texels, so the last column of a level whose parent
    had an odd size differs from the convention; clamping the 2x2 source to each level's own
    size (what the downsample pass does) is exact."""
    rng = np.random.default_rng(0)
    rgb = rng.random((6, 6, 1))
    levels = reference_pyramid(rgb, 3)  # widths 6, 3, 2: level 1 is odd
    padded = np.pad(rgb, ((0, 2), (0, 2), (0, 0)), mode="edge")  # to a multiple of 2**(3 - 1)
    for k in (1, 2):
        padded = padded.reshape(padded.shape[0] // 2, 2, padded.shape[1] // 2, 2, 1).mean(axis=(1, 3))
        h, w = levels[k].shape[:2]
        clamped = np.empty_like(levels[k])
        for y in range(h):
            for x in range(w):
                ys = [min(2 * y + d, levels[k - 1].shape[0] - 1) for d in (0, 1)]
                xs = [min(2 * x + d, levels[k - 1].shape[1] - 1) for d in (0, 1)]
                clamped[y, x] = levels[k - 1][np.ix_(ys, xs)].mean(axis=(0, 1))
        np.testing.assert_allclose(clamped, levels[k], atol=1e-15)
    assert np.abs(padded[:h, :w] - levels[2]).max() > 1e-3
    np.testing.assert_allclose(padded[0, 0], levels[2][0, 0])  # the interior agrees


@pytest.mark.parametrize("texel_format", FORMATS)
@pytest.mark.parametrize(("height", "width"), [(197, 333), (5, 3), (1, 1), (64, 64), (1, 37)])
def test_levels_match_reference(gl, make_pyramid, texel_format, height, width):
    rgb = np.random.default_rng(width * height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    pyramid = make_pyramid(texel_format)
    pyramid.upload(rgb)
    levels = reference_pyramid(rgb, 8)
    assert pyramid.num_levels == len(levels) == len(level_sizes(width, height, 8))
    errors = [float(np.abs(read_level(gl, pyramid, k) - levels[k]).max()) for k in range(len(levels))]
    print(f"{texel_format} {width}x{height}: max |level - reference| per level {[f'{e:.1e}' for e in errors]}")
    for k, error in enumerate(errors):
        assert error <= level_bound(texel_format, k), f"level {k}"


@pytest.mark.parametrize("texel_format", FORMATS)
def test_samples_match_reference(gl, make_pyramid, texel_format):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (197, 333, 3), dtype=np.uint8)
    pyramid = make_pyramid(texel_format)
    pyramid.upload(rgb)
    centers, sizes = random_patches(rng, 333, 197)
    # A patch on the pixel grid at level 0 and one at an exact integer level (lod 2).
    centers = np.concatenate([centers, [[31.5, 23.5], [100.0, 60.0]]])
    sizes = np.concatenate([sizes, [16.0, 64.0]])
    got = gl_sample(gl, pyramid, centers, sizes, 16)
    expected = reference_sample(reference_pyramid(rgb, 8), centers, sizes, 16)
    error = np.abs(got - expected).max()
    print(f"{texel_format}: max |sample - reference| {error:.2e}, mean {np.abs(got - expected).mean():.2e}")
    # Trilinear samples are convex combinations of texels: the texel bound carries over.
    assert error <= level_bound(texel_format, pyramid.num_levels - 1)
    np.testing.assert_allclose(
        got[-2].transpose(1, 2, 0) * 255.0, rgb[16:32, 24:40], atol=255 * level_bound(texel_format, 0)
    )


def test_odd_patch_size_and_max_levels(gl, make_pyramid):
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (101, 99, 3), dtype=np.uint8)
    pyramid = make_pyramid(max_levels=3)
    pyramid.upload(rgb)
    assert pyramid.num_levels == 3
    centers, sizes = random_patches(rng, 99, 101, 50)  # footprints past the top level's reach
    got = gl_sample(gl, pyramid, centers, sizes, 7)
    np.testing.assert_allclose(got, reference_sample(reference_pyramid(rgb, 3), centers, sizes, 7), atol=FP32, rtol=0)


def test_real_frame_matches_reference(gl, make_pyramid, shared_data):
    bgr = cv2.imread(str(shared_data / "faldoi-ipol/example_data/clean/easy/frame_0002.png"))
    assert bgr is not None
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    height, width = rgb.shape[:2]
    pyramid = make_pyramid()
    pyramid.upload(rgb)
    centers, sizes = random_patches(np.random.default_rng(3), width, height)
    got = gl_sample(gl, pyramid, centers, sizes, 16)
    np.testing.assert_allclose(got, reference_sample(reference_pyramid(rgb, 8), centers, sizes, 16), atol=FP32, rtol=0)


@pytest.mark.parametrize("texel_format", FORMATS)
def test_incremental_update_equals_full_upload(gl, make_pyramid, texel_format):
    """upload(f1) + upload_rects(f2, rects) + rebuild_mips(rects) == upload(f2), bit for bit."""
    rng = np.random.default_rng(4)
    first = rng.integers(0, 256, (197, 333, 3), dtype=np.uint8)
    second, rects = changed_frame(rng, first)
    incremental, full = make_pyramid(texel_format), make_pyramid(texel_format)
    incremental.upload(first)
    incremental.upload_rects(second, rects)
    incremental.rebuild_mips(rects)
    full.upload(second)
    for k in range(full.num_levels):
        np.testing.assert_array_equal(read_level(gl, incremental, k), read_level(gl, full, k), err_msg=f"level {k}")
    centers, sizes = random_patches(rng, 333, 197)
    expected = gl_sample(gl, full, centers, sizes, 16)
    np.testing.assert_array_equal(gl_sample(gl, incremental, centers, sizes, 16), expected)
    # Rectangles adding up to more than a frame: the staging buffer is replaced by a larger one.
    whole = np.array([[0, 0, 333, 197]] * 3)
    incremental.upload_rects(first, whole)
    incremental.upload_rects(second, whole)
    incremental.rebuild_mips(whole)
    np.testing.assert_array_equal(gl_sample(gl, incremental, centers, sizes, 16), expected)


def test_levels_wait_for_rebuild_mips(gl, make_pyramid):
    rng = np.random.default_rng(5)
    first = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    second = 255 - first
    pyramid = make_pyramid()
    pyramid.upload(first)
    pyramid.upload_rects(second, [[0, 0, 80, 64]])
    np.testing.assert_allclose(read_level(gl, pyramid, 0), second / 255.0, atol=FP32)
    np.testing.assert_allclose(read_level(gl, pyramid, 1), reference_pyramid(first)[1], atol=FP32)
    pyramid.rebuild_mips(np.array([[0, 0, 80, 64]]))
    np.testing.assert_allclose(read_level(gl, pyramid, 1), reference_pyramid(second)[1], atol=FP32)


def test_poisoned_output_is_fully_written(gl, make_pyramid):
    rng = np.random.default_rng(6)
    rgb = rng.integers(0, 256, (45, 61, 3), dtype=np.uint8)
    pyramid = make_pyramid()
    pyramid.upload(rgb)
    centers, sizes = random_patches(rng, 61, 45, 5)
    pyramid.samples.reserve(pyramid.sample_bytes(5, 7))
    nan = np.array([np.nan], np.float32)
    gl.glClearNamedBufferData(pyramid.samples.name, gl.GL_R32F, gl.GL_RED, gl.GL_FLOAT, nan)
    got = gl_sample(gl, pyramid, centers, sizes, 7)  # 245 samples: not a multiple of the group size
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, reference_sample(reference_pyramid(rgb, 8), centers, sizes, 7), atol=FP32, rtol=0)


def test_bad_input_raises(gl, make_pyramid):
    from fovea_vla.core.texture.gl import GlPyramid

    rgb = np.zeros((20, 30, 3), np.uint8)
    pyramid = make_pyramid()
    with pytest.raises(RuntimeError, match="before upload"):
        pyramid.upload_rects(rgb, [[0, 0, 4, 4]])
    with pytest.raises(RuntimeError, match="before upload"):
        pyramid.sample(np.zeros((1, 2)), np.ones(1), 16)
    with pytest.raises(RuntimeError, match="before upload"):
        pyramid.rebuild_mips()
    with pytest.raises(ValueError, match="uint8"):
        pyramid.upload(rgb.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        pyramid.upload(rgb[..., 0])
    with pytest.raises(ValueError, match="non-empty"):
        pyramid.upload(rgb[:0])
    pyramid.upload(rgb)
    with pytest.raises(ValueError, match="30x20"):
        pyramid.upload_rects(np.zeros((21, 30, 3), np.uint8), [[0, 0, 4, 4]])
    for rects in ([[0, 0, 31, 4]], [[-1, 0, 4, 4]], [[4, 0, 4, 4]], [[0.5, 0, 4, 4]]):
        with pytest.raises(ValueError, match="rects"):
            pyramid.upload_rects(rgb, np.array(rects))
    with pytest.raises(ValueError, match="rects"):
        pyramid.rebuild_mips(np.array([[0, 0, 4, 21]]))
    with pytest.raises(ValueError, match="2 sizes"):
        pyramid.sample(np.zeros((1, 2)), np.ones(2), 16)
    with pytest.raises(ValueError, match="finite"):
        pyramid.sample(np.array([[np.nan, 0.0]]), np.ones(1), 16)
    with pytest.raises(ValueError, match="patch_size"):
        pyramid.sample(np.zeros((1, 2)), np.ones(1), 0)
    with pytest.raises(ValueError, match="texel_format"):
        GlPyramid(texel_format="rgb8")
    pyramid.close()
    with pytest.raises(RuntimeError, match="after close"):
        pyramid.upload(rgb)
    pyramid.close()  # twice is harmless


_TEXTURE_LOD = """#version 450
layout(local_size_x = 64) in;
layout(binding = 0) uniform sampler2D pyramid;
layout(std430, binding = 0) readonly buffer Coords { vec4 coords[]; };  // (u, v, lod, -)
layout(std430, binding = 1) writeonly buffer Values { vec4 values[]; };
uniform uint count;
void main() {
    uint i = gl_GlobalInvocationID.x;
    if (i < count) values[i] = textureLod(pyramid, coords[i].xy, coords[i].z);
}
"""


def test_texture_unit_filtering_is_less_accurate_than_the_shader(gl, make_pyramid):
    """Measures hardware trilinear filtering (textureLod, GL_LINEAR_MIPMAP_LINEAR) on the same
    rgba32f pyramid, on patches far enough inside the frame that edge handling plays no part:
    texture units quantise filter weights (8 fractional bits on NVIDIA), the shader does not."""
    from fovea_vla.core.texture.base import patch_sample_offsets
    from fovea_vla.core.texture.gl import _compile

    rng = np.random.default_rng(7)
    rgb = rng.integers(0, 256, (197, 333, 3), dtype=np.uint8)
    pyramid = make_pyramid()
    pyramid.upload(rgb)
    count, patch = 64, 16
    centers = rng.uniform([48, 48], [333 - 48, 197 - 48], (count, 2))
    sizes = rng.uniform(4, 64, count)  # lod <= 2, samples stay >= 8 px inside
    expected = reference_sample(reference_pyramid(rgb, 8), centers, sizes, patch)
    ours = np.abs(gl_sample(gl, pyramid, centers, sizes, patch) - expected).max()

    offsets = patch_sample_offsets(patch)
    xs, ys = np.broadcast_arrays(
        centers[:, 0, None, None] + offsets[None, None, :] * sizes[:, None, None],
        centers[:, 1, None, None] + offsets[None, :, None] * sizes[:, None, None],
    )  # (N, P, P) [px]
    unit = 1 << (pyramid.num_levels - 1)
    padded_w, padded_h = -(-333 // unit) * unit, -(-197 // unit) * unit
    lod = np.broadcast_to(np.clip(np.log2(sizes / patch), 0, pyramid.num_levels - 1)[:, None, None], xs.shape)
    coords = np.stack([(xs + 0.5) / padded_w, (ys + 0.5) / padded_h, lod, np.zeros_like(xs)], -1).astype(np.float32)
    buffers = np.zeros(2, np.uint32)
    gl.glCreateBuffers(2, buffers)
    sampler = np.zeros(1, np.uint32)
    gl.glCreateSamplers(1, sampler)
    program = _compile(gl, _TEXTURE_LOD, "textureLod")
    try:
        gl.glNamedBufferData(int(buffers[0]), coords.nbytes, coords, gl.GL_STATIC_DRAW)
        gl.glNamedBufferData(int(buffers[1]), coords.nbytes, None, gl.GL_STATIC_DRAW)
        gl.glSamplerParameteri(int(sampler[0]), gl.GL_TEXTURE_MIN_FILTER, gl.GL_LINEAR_MIPMAP_LINEAR)
        gl.glSamplerParameteri(int(sampler[0]), gl.GL_TEXTURE_MAG_FILTER, gl.GL_LINEAR)
        gl.glUseProgram(program)
        gl.glBindTextureUnit(0, pyramid.texture)
        gl.glBindSampler(0, int(sampler[0]))
        gl.glBindBufferBase(gl.GL_SHADER_STORAGE_BUFFER, 0, int(buffers[0]))
        gl.glBindBufferBase(gl.GL_SHADER_STORAGE_BUFFER, 1, int(buffers[1]))
        gl.glUniform1ui(gl.glGetUniformLocation(program, "count"), xs.size)
        gl.glDispatchCompute(-(-xs.size // 64), 1, 1)
        gl.glMemoryBarrier(gl.GL_BUFFER_UPDATE_BARRIER_BIT)
        values = np.empty_like(coords)
        gl.glGetNamedBufferSubData(int(buffers[1]), 0, values.nbytes, values)
    finally:
        gl.glBindSampler(0, 0)
        gl.glDeleteSamplers(1, sampler)
        gl.glDeleteBuffers(2, buffers)
        gl.glDeleteProgram(program)
    hardware = np.abs(values[..., :3].transpose(0, 3, 1, 2) - expected).max()
    print(f"{pyramid.renderer}: max |error| texture unit {hardware:.2e}, shader {ours:.2e}")
    assert ours <= FP32
    assert ours <= hardware


def test_module_imports_and_reports_without_pyopengl():
    code = (
        "import sys; sys.modules['OpenGL'] = None\n"
        "from fovea_vla.core.texture import TEXTURE_BACKENDS\n"
        "ok, reason = TEXTURE_BACKENDS.availability('gl')\n"
        "assert 'gl' in TEXTURE_BACKENDS.names() and not ok and reason, reason\n"
        "print(reason)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_unavailable_without_a_gpu_says_why():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    ok, reason = TEXTURE_BACKENDS.availability("gl")
    assert not ok and "CUDA" in reason
    with pytest.raises(RuntimeError, match="gl"):
        make_texture(TextureConfig(backend="gl"))


def _gl_texture(**kwargs):
    ok, reason = TEXTURE_BACKENDS.availability("gl")
    if not ok:
        pytest.skip(f"gl unavailable: {reason}")
    from fovea_vla.core.texture.gl import GlTexture

    return GlTexture(TextureConfig(backend="gl", device="cuda"), **kwargs)


@pytest.fixture
def gpu_texture():
    made = []

    def make(**kwargs):
        made.append(_gl_texture(**kwargs))
        return made[-1]

    yield make
    for texture in made:
        texture.close()


@pytest.mark.gpu
def test_gpu_registry_builds_the_backend():
    ok, reason = TEXTURE_BACKENDS.availability("gl")
    if not ok:
        pytest.skip(f"gl unavailable: {reason}")
    print(reason)
    texture, selection = make_texture(TextureConfig(backend="gl"))
    try:
        assert selection.name == "gl" and texture.name == "gl" and texture.device.startswith("cuda")
        texture.upload(np.zeros((8, 8, 3), np.uint8))
        assert texture.num_levels == 4 and (texture.width, texture.height) == (8, 8)
    finally:
        texture.close()


@pytest.mark.gpu
@pytest.mark.parametrize("texel_format", FORMATS)
@pytest.mark.parametrize(("height", "width"), [(197, 333), (1080, 1920)])
def test_gpu_samples_match_reference(gpu_texture, texel_format, height, width):
    rng = np.random.default_rng(width)
    rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    texture = gpu_texture(texel_format=texel_format)
    texture.upload(rgb)
    centers, sizes = random_patches(rng, width, height)
    got = texture.sample(centers, sizes, 16)
    assert got.shape == (273, 3, 16, 16) and got.is_cuda and str(got.device) == texture.device
    got = got.cpu().numpy()
    expected = reference_sample(reference_pyramid(rgb, 8), centers, sizes, 16)
    print(f"{texel_format} {width}x{height}: max |sample - reference| {np.abs(got - expected).max():.2e}")
    assert np.abs(got - expected).max() <= level_bound(texel_format, texture.num_levels - 1)


@pytest.mark.gpu
def test_gpu_real_frame_matches_reference(gpu_texture, shared_data):
    bgr = cv2.imread(str(shared_data / "faldoi-ipol/example_data/clean/easy/frame_0002.png"))
    assert bgr is not None
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    texture = gpu_texture()
    texture.upload(rgb)
    centers, sizes = random_patches(np.random.default_rng(8), rgb.shape[1], rgb.shape[0])
    expected = reference_sample(reference_pyramid(rgb, 8), centers, sizes, 16)
    np.testing.assert_allclose(texture.sample(centers, sizes, 16).cpu().numpy(), expected, atol=FP32, rtol=0)


@pytest.mark.gpu
def test_gpu_incremental_update_equals_full_upload(gpu_texture):
    import torch

    rng = np.random.default_rng(9)
    first = rng.integers(0, 256, (1080, 1920, 3), dtype=np.uint8)
    second, rects = changed_frame(rng, first)
    centers, sizes = random_patches(rng, 1920, 1080)
    texture = gpu_texture()
    texture.upload(second)
    full = texture.sample(centers, sizes, 16).clone()
    texture.upload(first)
    texture.upload_rects(second, rects)
    texture.rebuild_mips(rects)
    assert torch.equal(texture.sample(centers, sizes, 16), full)


@pytest.mark.gpu
def test_gpu_samples_are_a_view_of_the_mapped_gl_buffer(gpu_texture, monkeypatch):
    """No host read-back by construction: the result's memory is the GL buffer as CUDA maps it
    (its data pointer lies in the mapped range), torch allocates nothing for it, and sample()
    runs with every GL read-back entry point replaced by one that fails."""
    import torch

    from fovea_vla.core.texture.gl import _gl_modules

    rng = np.random.default_rng(10)
    rgb = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    texture = gpu_texture()
    texture.upload(rgb)
    centers, sizes = random_patches(rng, 640, 480)
    texture.sample(centers, sizes, 16)  # registers and maps the buffer once
    gl = _gl_modules()[1]

    def forbidden(*args, **kwargs):
        raise AssertionError("host read-back during sample()")

    for name in READ_BACKS:
        monkeypatch.setattr(gl, name, forbidden)
    torch.cuda.synchronize()
    # Earlier tests' garbage freed by a collection inside sample() would lower the count (seen on an
    # H100): collect first and keep the collector off while measuring.
    gc.collect()
    gc.disable()
    try:
        allocated = torch.cuda.memory_allocated()
        got = texture.sample(centers, sizes, 16)
        assert torch.cuda.memory_allocated() == allocated
    finally:
        gc.enable()
    pointer, nbytes = texture.mapped_range()
    assert got.is_cuda and got.is_contiguous() and got.dtype == torch.float32
    assert pointer <= got.data_ptr() and got.data_ptr() + got.numel() * 4 <= pointer + nbytes
    expected = reference_sample(reference_pyramid(rgb, 8), centers, sizes, 16)
    np.testing.assert_allclose(got.cpu().numpy(), expected, atol=FP32, rtol=0)


@pytest.mark.gpu
def test_gpu_poisoned_output_is_fully_written_and_buffer_grows(gpu_texture):
    import torch

    rng = np.random.default_rng(11)
    rgb = rng.integers(0, 256, (197, 333, 3), dtype=np.uint8)
    levels = reference_pyramid(rgb, 8)
    texture = gpu_texture()
    texture.upload(rgb)
    centers, sizes = random_patches(rng, 333, 197, 5)
    texture.sample(centers, sizes, 7).fill_(float("nan"))  # CUDA writes the mapped buffer
    got = texture.sample(centers, sizes, 7)
    assert torch.isfinite(got).all()
    np.testing.assert_allclose(got.cpu().numpy(), reference_sample(levels, centers, sizes, 7), atol=FP32, rtol=0)
    centers, sizes = random_patches(rng, 333, 197, 4000)  # 12 MB: the buffer is reallocated
    got = texture.sample(centers, sizes, 16)
    np.testing.assert_allclose(got.cpu().numpy(), reference_sample(levels, centers, sizes, 16), atol=FP32, rtol=0)
    assert texture.sample(centers[:0], sizes[:0], 16).shape == (0, 3, 16, 16)


@pytest.mark.gpu
def test_gpu_close_releases_and_refuses_further_use(gpu_texture):
    texture = gpu_texture()
    texture.upload(np.zeros((16, 16, 3), np.uint8))
    texture.sample(np.zeros((1, 2)), np.ones(1) * 16, 16)
    texture.close()
    assert texture.mapped_range() == (0, 0)
    with pytest.raises(RuntimeError, match="after close"):
        texture.sample(np.zeros((1, 2)), np.ones(1) * 16, 16)
    texture.close()
