"""Tests of fovea_vla.core.frames against ROS byte layouts built by hand with NumPy."""

from __future__ import annotations

import array
import dataclasses
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from fovea_vla.core import frames
from fovea_vla.core.frames import (
    SUPPORTED_ENCODINGS,
    Frame,
    FrameError,
    compressed_to_rgb,
    image_to_array,
    image_to_rgb,
    rgb_to_compressed,
    rgb_to_gray,
    rgb_to_image_fields,
)

REPO_ROOT = Path(__file__).resolve().parents[2]

SIZES = [(1, 1), (3, 5), (479, 641)]  # (height, width)
EXACT = [
    "rgb8", "bgr8", "8UC3", "rgba8", "bgra8", "8UC4", "rgb16", "bgr16", "rgba16", "bgra16",
    "mono8", "8UC1", "mono16", "16UC1", "32FC1",
]  # fmt: skip
YUV = ["yuv422", "uyvy", "yuv422_yuy2", "yuyv"]
BAYER = [f"bayer_{p}{bits}" for p in ("rggb", "bggr", "gbrg", "grbg") for bits in (8, 16)]
WIDE = ["rgb16", "bgr16", "rgba16", "bgra16", "mono16", "16UC1", "32FC1", "bayer_rggb16"]

# Independent reference encoder: BT.601 limited range, the matrix OpenCV's YUV422 decoder inverts.
YUV_TOLERANCE = 2  # max abs error per channel after rounding in both directions
JPEG_MAX_MAE = 2.0  # mean abs error of a smooth image at quality 90


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def _serialise(samples: np.ndarray, big: bool = False, pad: int = 0) -> tuple[bytes, int]:
    """ROS ``data`` and ``step`` for native samples ``(H, W[, C])``: rows of pixels plus padding."""
    h, w = samples.shape[:2]
    dtype = samples.dtype.newbyteorder(">" if big else "<")
    rows = samples.astype(dtype).reshape(h, w, -1).view(np.uint8).reshape(h, -1)
    rows = np.concatenate([rows, np.full((h, pad), 0xAB, np.uint8)], axis=1)
    return rows.tobytes(), rows.shape[1]


def _exact_case(encoding: str, h: int, w: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """(native samples as the message holds them, expected RGB) for channel-exact encodings."""
    if encoding in ("mono8", "8UC1"):
        gray = rng.integers(0, 256, (h, w), dtype=np.uint8)
        return gray, np.repeat(gray[..., None], 3, axis=2)
    if encoding in ("mono16", "16UC1"):
        gray = rng.integers(0, 65536, (h, w), dtype=np.uint16)
        return gray, np.repeat((gray >> 8).astype(np.uint8)[..., None], 3, axis=2)
    if encoding == "32FC1":
        level = rng.integers(0, 256, (h, w), dtype=np.uint8)
        level.flat[0], level.flat[-1] = 0, 255
        depth = level.astype(np.float32) * np.float32(0.01) + np.float32(0.5)
        bad = rng.random((h, w)) < 0.1
        bad.flat[0] = bad.flat[-1] = False
        depth[bad] = rng.choice(np.array([np.nan, np.inf, -np.inf], np.float32), size=int(bad.sum()))
        expected = np.where(bad, 0, level) if h * w > 1 else np.zeros((h, w), np.uint8)  # constant -> 0
        return depth, np.repeat(expected.astype(np.uint8)[..., None], 3, axis=2)
    wide = encoding.endswith("16")
    rgb_n = rng.integers(0, 65536 if wide else 256, (h, w, 3), dtype=np.uint16 if wide else np.uint8)
    expected = (rgb_n >> 8).astype(np.uint8) if wide else rgb_n
    ordered = rgb_n[..., ::-1] if encoding in ("bgr8", "8UC3", "bgra8", "8UC4", "bgr16", "bgra16") else rgb_n
    if encoding in ("rgba8", "bgra8", "8UC4", "rgba16", "bgra16"):
        alpha = rng.integers(0, 256, (h, w, 1), dtype=rgb_n.dtype)
        ordered = np.concatenate([ordered, alpha], axis=2)
    return np.ascontiguousarray(ordered), expected


def _mosaic(rgb: np.ndarray, pattern: str) -> np.ndarray:
    """ROS Bayer mosaic: ``pattern`` gives the colours of the top-left 2x2 block, row by row."""
    out = np.empty(rgb.shape[:2], rgb.dtype)
    for dy in range(2):
        for dx in range(2):
            out[dy::2, dx::2] = rgb[dy::2, dx::2, "rgb".index(pattern[2 * dy + dx])]
    return out


def _yuv422(rgb: np.ndarray, uyvy: bool) -> np.ndarray:
    """(H, W, 2) uint8 UYVY or YUYV bytes of an RGB image whose horizontal pixel pairs are equal."""
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    y = 16 + 0.257 * r + 0.504 * g + 0.098 * b
    u = 128 - 0.148 * r - 0.291 * g + 0.439 * b
    v = 128 + 0.439 * r - 0.368 * g - 0.071 * b
    y, u, v = (np.clip(np.rint(c), 0, 255).astype(np.uint8) for c in (y, u, v))
    y0, y1, u, v = y[:, 0::2], y[:, 1::2], u[:, 0::2], v[:, 0::2]
    groups = [u, y0, v, y1] if uyvy else [y0, u, y1, v]
    return np.stack(groups, axis=-1).reshape(rgb.shape[0], rgb.shape[1], 2)


def _gray_ref(rgb: np.ndarray) -> np.ndarray:
    return np.rint(rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])).astype(np.int16)


def _smooth_rgb(h: int = 120, w: int = 160) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), (xx + yy) * 255 // (h + w - 2)], -1).astype(np.uint8)


def test_required_encodings_supported():
    required = {"rgb8", "bgr8", "rgba8", "bgra8", "mono8", "mono16", "8UC1", "8UC3", "8UC4", "16UC1"}
    required |= {"32FC1", "yuv422", "uyvy", "yuv422_yuy2", "yuyv", "rgb16", "bgr16", *BAYER}
    assert required <= set(SUPPORTED_ENCODINGS)
    assert set(EXACT + YUV + BAYER) == set(SUPPORTED_ENCODINGS)


@pytest.mark.parametrize("pad", [0, 3])
@pytest.mark.parametrize("h,w", SIZES)
@pytest.mark.parametrize("encoding", EXACT)
def test_exact_encodings_round_trip(encoding, h, w, pad, rng):
    samples, expected = _exact_case(encoding, h, w, rng)
    data, step = _serialise(samples, pad=pad)
    native = image_to_array(data, w, h, encoding, step)
    assert native.dtype == samples.dtype and native.shape == samples.shape
    np.testing.assert_array_equal(native, samples)
    out = image_to_rgb(data, w, h, encoding, step)
    assert out.shape == (h, w, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("pad", [0, 1])
@pytest.mark.parametrize("encoding", WIDE)
def test_big_endian(encoding, pad, rng):
    h, w = 4, 6
    samples = (
        _mosaic(rng.integers(0, 65536, (h, w, 3), dtype=np.uint16), "rggb")
        if encoding.startswith("bayer")
        else _exact_case(encoding, h, w, rng)[0]
    )
    little, step = _serialise(samples, big=False, pad=pad)
    big, _ = _serialise(samples, big=True, pad=pad)
    assert little != big
    native = image_to_array(big, w, h, encoding, step, is_bigendian=True)
    assert native.dtype.isnative and native.flags.c_contiguous
    np.testing.assert_array_equal(native, samples)
    np.testing.assert_array_equal(
        image_to_rgb(big, w, h, encoding, step, is_bigendian=True), image_to_rgb(little, w, h, encoding, step)
    )


@pytest.mark.parametrize("pad", [0, 2])
@pytest.mark.parametrize("h,w", [(1, 2), (3, 6), (479, 642)])
@pytest.mark.parametrize("encoding", YUV)
def test_yuv422_round_trip(encoding, h, w, pad, rng):
    rgb = np.repeat(rng.integers(0, 256, (h, w // 2, 3), dtype=np.uint8), 2, axis=1)
    samples = _yuv422(rgb, uyvy=encoding in ("yuv422", "uyvy"))
    data, step = _serialise(samples, pad=pad)
    np.testing.assert_array_equal(image_to_array(data, w, h, encoding, step), samples)
    out = image_to_rgb(data, w, h, encoding, step)
    assert out.shape == (h, w, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(np.int16) - rgb).max() <= YUV_TOLERANCE


@pytest.mark.parametrize("pad", [0, 3])
@pytest.mark.parametrize("h,w", [(2, 2), (2, 5), (3, 5), (479, 641)])
@pytest.mark.parametrize("encoding", BAYER)
def test_bayer_keeps_a_known_colour(encoding, h, w, pad):
    wide = encoding.endswith("16")
    colour = np.array([200, 100, 50], np.uint8)
    rgb = np.broadcast_to(colour.astype(np.uint16) << 8 if wide else colour, (h, w, 3))
    samples = _mosaic(rgb, encoding[6:10])
    data, step = _serialise(samples, pad=pad)
    np.testing.assert_array_equal(image_to_array(data, w, h, encoding, step), samples)
    out = image_to_rgb(data, w, h, encoding, step)
    assert out.shape == (h, w, 3) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, np.broadcast_to(colour, (h, w, 3)))


@pytest.mark.parametrize("encoding", BAYER[::2])
def test_bayer_gradient_interior(encoding):
    rgb = _smooth_rgb(40, 60)
    out = image_to_rgb(_mosaic(rgb, encoding[6:10]).tobytes(), 60, 40, encoding, 60)
    assert np.abs(out.astype(np.int16) - rgb)[2:-2, 2:-2].max() <= 3


@pytest.mark.parametrize("h,w", [(1, 1), (1, 4), (5, 1)])
def test_bayer_thin_images_convert(h, w):
    out = image_to_rgb(bytes(range(h * w)), w, h, "bayer_rggb8", w)
    assert out.shape == (h, w, 3) and out.dtype == np.uint8


def test_32fc1_normalisation():
    depth = np.array([[1.0, 1.5, 3.0, np.nan, np.inf, -np.inf]], np.float32)
    out = image_to_rgb(depth.tobytes(), 6, 1, "32FC1", 24)
    np.testing.assert_array_equal(out[0, :, 0], [0, 64, 255, 0, 0, 0])
    flat = np.full((2, 3), 7.0, np.float32)
    assert not image_to_rgb(flat.tobytes(), 3, 2, "32FC1", 12).any()
    allnan = np.full((2, 3), np.nan, np.float32)
    assert not image_to_rgb(allnan.tobytes(), 3, 2, "32FC1", 12).any()


def test_extra_trailing_data_allowed(rng):
    samples, expected = _exact_case("bgr8", 3, 5, rng)
    data, step = _serialise(samples)
    np.testing.assert_array_equal(image_to_rgb(data + b"\x00" * 7, 5, 3, "bgr8", step), expected)


_INPUTS = {
    "bytes": bytes,
    "bytearray": bytearray,
    "memoryview": memoryview,
    "array": lambda b: array.array("B", b),
    "ndarray": lambda b: np.frombuffer(b, np.uint8).copy(),
    "ndarray_2d": lambda b: np.frombuffer(b, np.uint8).reshape(3, -1).copy(),
    "ndarray_strided": lambda b: np.repeat(np.frombuffer(b, np.uint8), 2)[::2],
}


@pytest.mark.parametrize("kind", list(_INPUTS))
def test_accepts_buffer_types(kind, rng):
    rgb = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
    data = _INPUTS[kind](rgb.tobytes())
    np.testing.assert_array_equal(image_to_rgb(data, 4, 3, "rgb8", 12), rgb)
    np.testing.assert_array_equal(image_to_rgb(data, 4, 3, "bgr8", 12), rgb[..., ::-1])
    png = _INPUTS[kind](rgb_to_compressed(rgb, "png"))
    if kind != "ndarray_2d":
        np.testing.assert_array_equal(compressed_to_rgb(png, "png"), rgb)


def test_rejects_non_buffer():
    with pytest.raises(TypeError, match="image data"):
        image_to_rgb([0] * 12, 2, 2, "rgb8", 6)


def test_views_without_copy(rng):
    rgb = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
    mutable = bytearray(rgb.tobytes())
    out = image_to_rgb(mutable, 4, 3, "rgb8", 12)
    assert np.shares_memory(out, np.frombuffer(mutable, np.uint8))
    immutable = image_to_rgb(rgb.tobytes(), 4, 3, "rgb8", 12)
    assert not immutable.flags.writeable
    buf = array.array("B", rgb.tobytes() + bytes(6))
    padded = image_to_array(buf, 2, 3, "rgb8", 8)
    assert np.shares_memory(padded, np.frombuffer(buf, np.uint8)) and not padded.flags.c_contiguous
    mono16 = bytearray(rng.integers(0, 256, 24, dtype=np.uint8).tobytes())
    assert np.shares_memory(image_to_array(mono16, 4, 3, "mono16", 8), np.frombuffer(mono16, np.uint8))
    swapped = image_to_array(mono16, 4, 3, "mono16", 8, is_bigendian=True)
    assert not np.shares_memory(swapped, np.frombuffer(mono16, np.uint8))


@pytest.mark.parametrize(
    "kwargs,reason,text",
    [
        ({"encoding": "nv21"}, "bad_encoding", "nv21"),
        ({"encoding": "RGB8"}, "bad_encoding", "RGB8"),
        ({"encoding": ""}, "bad_encoding", "unsupported"),
        ({"width": 0}, "zero_size", "0x3"),
        ({"height": 0}, "zero_size", "4x0"),
        ({"data": b""}, "zero_size", "0 data bytes"),
        ({"data": bytes(35)}, "truncated", "needs 36 data bytes, got 35"),
        ({"step": 11}, "truncated", "step 11"),
        ({"step": 13}, "truncated", "needs 39 data bytes, got 36"),
        ({"encoding": "mono16", "step": 7}, "truncated", "= 8"),
        ({"encoding": "yuv422", "width": 5, "step": 10, "data": bytes(30)}, "truncated", "even width"),
        ({"max_pixels": 11}, "too_large", "max_pixels=11"),
        ({"width": 100_000, "height": 100_000}, "too_large", "100000x100000"),
    ],
)
def test_image_errors(kwargs, reason, text):
    args = {"data": bytes(36), "width": 4, "height": 3, "encoding": "rgb8", "step": 12, **kwargs}
    for convert in (image_to_array, image_to_rgb):
        with pytest.raises(FrameError, match=text) as info:
            convert(**args)
        assert info.value.reason == reason
        assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("h,w", [(1, 1), (3, 5), (479, 641)])
def test_png_round_trip_exact(h, w, rng):
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    np.testing.assert_array_equal(compressed_to_rgb(rgb_to_compressed(rgb, "png"), "png"), rgb)


@pytest.mark.parametrize("fmt", ["jpeg", "jpg", "rgb8; jpeg compressed bgr8"])
def test_jpeg_round_trip(fmt):
    rgb = _smooth_rgb()
    out = compressed_to_rgb(rgb_to_compressed(rgb, fmt, quality=90), fmt)
    assert out.shape == rgb.shape and out.flags.c_contiguous
    assert np.abs(out.astype(np.int16) - rgb).mean() < JPEG_MAX_MAE
    assert len(rgb_to_compressed(rgb, "jpeg", quality=20)) < len(rgb_to_compressed(rgb, "jpeg", quality=95))


@pytest.mark.parametrize(
    "fmt,ext",
    [
        ("jpeg", ".jpg"),
        ("JPEG", ".jpg"),
        ("jpg", ".jpg"),
        ("rgb8; jpeg compressed bgr8", ".jpg"),
        ("png", ".png"),
        ("bgr8; png compressed bgr8", ".png"),
        ("8UC3; png compressed bgr8", ".png"),
    ],
)
def test_decodes_opencv_bgr_files(fmt, ext):
    rgb = _smooth_rgb(30, 40)
    ok, encoded = cv2.imencode(ext, np.ascontiguousarray(rgb[..., ::-1]))
    assert ok
    out = compressed_to_rgb(encoded.tobytes(), fmt)
    assert np.abs(out.astype(np.int16) - rgb).mean() < (JPEG_MAX_MAE if ext == ".jpg" else 1e-9)


def test_decodes_gray_16bit_and_alpha(rng):
    gray = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    expected_gray = np.repeat(gray[..., None], 3, axis=2)
    png = cv2.imencode(".png", gray)[1].tobytes()
    np.testing.assert_array_equal(compressed_to_rgb(png, "mono8; png compressed mono8"), expected_gray)
    jpg = cv2.imencode(".jpg", _smooth_rgb()[..., 0])[1].tobytes()
    out = compressed_to_rgb(jpg, "mono8; jpeg compressed mono8")
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 0] == out[..., 2]).all()
    gray16 = rng.integers(0, 65536, (5, 7), dtype=np.uint16)
    png16 = cv2.imencode(".png", gray16)[1].tobytes()
    out = compressed_to_rgb(png16, "mono16; png compressed mono16")
    np.testing.assert_array_equal(out, np.repeat((gray16 >> 8).astype(np.uint8)[..., None], 3, axis=2))
    rgb16 = rng.integers(0, 65536, (5, 7, 3), dtype=np.uint16)
    png16c = cv2.imencode(".png", np.ascontiguousarray(rgb16[..., ::-1]))[1].tobytes()
    np.testing.assert_array_equal(compressed_to_rgb(png16c, "png"), (rgb16 >> 8).astype(np.uint8))
    rgba = rng.integers(0, 256, (5, 7, 4), dtype=np.uint8)
    bgra_png = cv2.imencode(".png", np.ascontiguousarray(rgba[..., [2, 1, 0, 3]]))[1].tobytes()
    np.testing.assert_array_equal(compressed_to_rgb(bgra_png, "png"), rgba[..., :3])


def test_decodes_compressed_bayer_mosaic():
    colour = np.array([200, 100, 50], np.uint8)
    mosaic = _mosaic(np.broadcast_to(colour, (6, 8, 3)), "grbg")
    png = cv2.imencode(".png", mosaic)[1].tobytes()
    out = compressed_to_rgb(png, "bayer_grbg8; png compressed bayer_grbg8")
    np.testing.assert_array_equal(out, np.broadcast_to(colour, (6, 8, 3)))


def _png_header(width: int, height: int) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\x0dIHDR" + width.to_bytes(4, "big") + height.to_bytes(4, "big")


def _jpeg_claiming(width: int, height: int) -> bytes:
    jpg = bytearray(rgb_to_compressed(_smooth_rgb(), "jpeg"))
    sof = jpg.index(b"\xff\xc0")
    jpg[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(jpg)


@pytest.mark.parametrize(
    "data,fmt,kwargs,reason",
    [
        (b"", "jpeg", {}, "zero_size"),
        (array.array("B"), "png", {}, "zero_size"),
        (b"\xff\xd8\xff\xe0 definitely not a jpeg", "jpeg", {}, "corrupt_compressed"),
        (
            bytes(np.random.default_rng(7).integers(0, 256, 600, dtype=np.uint8)),
            "jpeg",
            {},
            "corrupt_compressed",
        ),
        (_jpeg_claiming(160, 120)[:300], "jpeg", {}, "corrupt_compressed"),
        (_png_header(4, 4) + bytes(20), "png", {}, "corrupt_compressed"),
        (b"\x00" * 10, "theora", {}, "bad_format"),
        (b"\x00" * 10, "", {}, "bad_format"),
        (b"\x00" * 10, "16UC1; compressedDepth png", {}, "bad_format"),
        (_png_header(100_000, 100_000), "png", {}, "too_large"),
        (_jpeg_claiming(60_000, 60_000), "jpeg", {}, "too_large"),
        (_jpeg_claiming(160, 120), "jpeg", {"max_pixels": 160 * 120 - 1}, "too_large"),
    ],
)
def test_compressed_errors(data, fmt, kwargs, reason):
    with pytest.raises(FrameError) as info:
        compressed_to_rgb(data, fmt, **kwargs)
    assert info.value.reason == reason


def test_decoded_size_checked_when_header_unknown(monkeypatch):
    monkeypatch.setattr(frames, "_header_size", lambda buf: None)
    png = rgb_to_compressed(np.zeros((10, 10, 3), np.uint8), "png")
    with pytest.raises(FrameError) as info:
        compressed_to_rgb(png, "png", max_pixels=99)
    assert info.value.reason == "too_large"


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8", "mono8"])
@pytest.mark.parametrize("h,w", [(1, 1), (3, 5)])
def test_rgb_to_image_fields_round_trip(encoding, h, w, rng):
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    data, step = rgb_to_image_fields(rgb, encoding)
    channels = {"mono8": 1, "rgb8": 3, "bgr8": 3}.get(encoding, 4)
    assert isinstance(data, bytes) and step == w * channels and len(data) == step * h
    out = image_to_rgb(data, w, h, encoding, step)
    if encoding == "mono8":
        assert np.abs(out[..., 0].astype(np.int16) - _gray_ref(rgb)).max() <= 1
        assert (out == out[..., :1]).all()
    else:
        np.testing.assert_array_equal(out, rgb)
    if channels == 4:
        assert set(np.frombuffer(data, np.uint8)[3::4]) == {255}


def test_output_argument_errors():
    rgb = np.zeros((2, 2, 3), np.uint8)
    with pytest.raises(FrameError) as info:
        rgb_to_image_fields(rgb, "yuv422")
    assert info.value.reason == "bad_encoding"
    with pytest.raises(FrameError) as info:
        rgb_to_compressed(rgb, "webp")
    assert info.value.reason == "bad_format"
    with pytest.raises(ValueError, match="quality"):
        rgb_to_compressed(rgb, "jpeg", quality=101)
    for bad in (np.zeros((2, 2), np.uint8), np.zeros((2, 2, 3), np.float32), np.zeros((0, 2, 3), np.uint8)):
        for fn in (rgb_to_image_fields, rgb_to_compressed, rgb_to_gray):
            with pytest.raises(ValueError, match="rgb"):
                fn(bad)


def test_rgb_to_gray(rng):
    rgb = rng.integers(0, 256, (3, 5, 3), dtype=np.uint8)
    gray = rgb_to_gray(rgb)
    assert gray.shape == (3, 5) and gray.dtype == np.uint8
    assert np.abs(gray.astype(np.int16) - _gray_ref(rgb)).max() <= 1


def test_frame_validates_and_is_frozen():
    frame = Frame(rgb=np.zeros((2, 3, 3), np.uint8), stamp_ns=5, frame_id="cam_optical")
    with pytest.raises(dataclasses.FrozenInstanceError):
        frame.stamp_ns = 6
    for bad in (
        np.zeros((2, 3), np.uint8),
        np.zeros((2, 3, 3), np.float32),
        np.zeros((3, 4, 3), np.uint8)[:, ::2],
    ):
        with pytest.raises(ValueError):
            Frame(rgb=bad, stamp_ns=0, frame_id="cam")


def test_module_does_not_import_ros():
    code = (
        "import sys, fovea_vla.core.frames; "
        "bad = [m for m in ('rclpy', 'sensor_msgs', 'cv_bridge') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, timeout=60)
