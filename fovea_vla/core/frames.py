"""Camera frames: ROS image message fields <-> NumPy arrays, without cv_bridge or rclpy.

The ROS node passes the raw fields of ``sensor_msgs/Image`` (``data, width, height, encoding,
step, is_bigendian``) or ``sensor_msgs/CompressedImage`` (``data, format``) in here; nothing in
this module imports ROS.

Pixel conventions:

* The pipeline works on **RGB**: ``(H, W, 3)`` ``uint8``, C-contiguous, channel order R, G, B,
  row 0 at the top (OpenCV's own functions elsewhere use BGR; convert at the boundary only).
* A raw ``Image`` stores ``height`` rows of ``step`` bytes each; a row holds ``width`` pixels of
  ``bytes_per_pixel`` bytes, followed by ``step - width * bytes_per_pixel`` padding bytes.
  Multi-byte samples (16-bit, float) are little-endian unless ``is_bigendian`` is set.
* ``8UC3`` / ``8UC4`` are read as ``bgr8`` / ``bgra8`` and ``8UC1`` / ``16UC1`` as mono, as
  cv_bridge does. ``yuv422`` (= ``uyvy``) is byte order U Y0 V Y1 and ``yuv422_yuy2``
  (= ``yuyv``) is Y0 U Y1 V, both BT.601 limited range as decoded by OpenCV. ``bayer_XXXX``
  names the colours of the top-left 2x2 block, row by row (``rggb``: R G / G B).
* Reduction to 8 bits for the pipeline: 16-bit samples keep their high byte (``value >> 8``);
  ``32FC1`` (e.g. depth in metres) maps the finite minimum..maximum of each frame linearly onto
  0..255, and NaN / +-inf become 0 (so does every pixel of a constant frame).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import cv2
import numpy as np

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "SUPPORTED_ENCODINGS",
    "Frame",
    "FrameError",
    "compressed_to_rgb",
    "image_to_array",
    "image_to_rgb",
    "parse_compressed",
    "rgb_to_compressed",
    "rgb_to_gray",
    "rgb_to_image_fields",
]

DEFAULT_MAX_PIXELS = 8192 * 8192


class FrameError(ValueError):
    """Input that cannot be converted into a frame.

    Attributes:
        reason: short snake_case drop reason, used as a counter key: ``bad_encoding``,
            ``zero_size``, ``truncated``, ``corrupt_compressed``, ``too_large`` or ``bad_format``.
    """

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _check_rgb(rgb: np.ndarray, what: str = "rgb") -> None:
    if not (isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3):
        desc = f"{rgb.dtype} {rgb.shape}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
        raise ValueError(f"{what} must be an (H, W, 3) uint8 array, got {desc}")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"{what} must not be empty, got shape {rgb.shape}")


@dataclass(frozen=True)
class Frame:
    """One camera image as the pipeline sees it.

    Attributes:
        rgb: ``(H, W, 3)`` ``uint8`` RGB, C-contiguous (may be read-only).
        stamp_ns: capture time (``header.stamp``) in nanoseconds.
        frame_id: the camera's optical frame.
        device_rgb: the same pixels as a ``(H, W, 3)`` ``uint8`` C-contiguous torch tensor on a
            CUDA device when a GPU decoder produced the frame there (see
            :mod:`fovea_vla.core.decode`), else None. A texture on that device uploads from it, so
            the pixels never go device -> host -> device.
    """

    rgb: np.ndarray
    stamp_ns: int
    frame_id: str
    device_rgb: object = None

    def __post_init__(self):
        _check_rgb(self.rgb, "Frame.rgb")
        if not self.rgb.flags.c_contiguous:
            raise ValueError("Frame.rgb must be C-contiguous")
        device = self.device_rgb
        if device is not None and (
            tuple(device.shape) != self.rgb.shape or str(device.dtype) != "torch.uint8" or not device.is_contiguous()
        ):
            raise ValueError(
                f"Frame.device_rgb must be a C-contiguous uint8 tensor of shape {self.rgb.shape}, "
                f"got {device.dtype} {tuple(device.shape)}"
            )


class _Encoding(NamedTuple):
    dtype: str  # NumPy sample type, byte order not yet applied
    channels: int  # samples per pixel in the native array
    to_rgb: int | None  # cv2.cvtColor code from the 8-bit native array to RGB; None: already RGB


# OpenCV names a Bayer pattern after the second row's 2nd and 3rd pixels, one diagonal step
# from ROS's top-left 2x2 block: ROS rggb is OpenCV "BG", and so on (same table as cv_bridge).
_BAYER_CODES = {
    "rggb": cv2.COLOR_BayerBG2RGB,
    "bggr": cv2.COLOR_BayerRG2RGB,
    "gbrg": cv2.COLOR_BayerGR2RGB,
    "grbg": cv2.COLOR_BayerGB2RGB,
}

_ENCODINGS: dict[str, _Encoding] = {
    "rgb8": _Encoding("u1", 3, None),
    "bgr8": _Encoding("u1", 3, cv2.COLOR_BGR2RGB),
    "rgba8": _Encoding("u1", 4, cv2.COLOR_RGBA2RGB),
    "bgra8": _Encoding("u1", 4, cv2.COLOR_BGRA2RGB),
    "rgb16": _Encoding("u2", 3, None),
    "bgr16": _Encoding("u2", 3, cv2.COLOR_BGR2RGB),
    "rgba16": _Encoding("u2", 4, cv2.COLOR_RGBA2RGB),
    "bgra16": _Encoding("u2", 4, cv2.COLOR_BGRA2RGB),
    "mono8": _Encoding("u1", 1, cv2.COLOR_GRAY2RGB),
    "mono16": _Encoding("u2", 1, cv2.COLOR_GRAY2RGB),
    "8UC1": _Encoding("u1", 1, cv2.COLOR_GRAY2RGB),
    "8UC3": _Encoding("u1", 3, cv2.COLOR_BGR2RGB),
    "8UC4": _Encoding("u1", 4, cv2.COLOR_BGRA2RGB),
    "16UC1": _Encoding("u2", 1, cv2.COLOR_GRAY2RGB),
    "32FC1": _Encoding("f4", 1, cv2.COLOR_GRAY2RGB),
    "uyvy": _Encoding("u1", 2, cv2.COLOR_YUV2RGB_UYVY),
    "yuv422": _Encoding("u1", 2, cv2.COLOR_YUV2RGB_UYVY),
    "yuyv": _Encoding("u1", 2, cv2.COLOR_YUV2RGB_YUY2),
    "yuv422_yuy2": _Encoding("u1", 2, cv2.COLOR_YUV2RGB_YUY2),
    **{
        f"bayer_{p}{bits}": _Encoding(dt, 1, code)
        for p, code in _BAYER_CODES.items()
        for bits, dt in (("8", "u1"), ("16", "u2"))
    },
}

SUPPORTED_ENCODINGS: tuple[str, ...] = tuple(_ENCODINGS)

_BAYER_CODE_SET = frozenset(_BAYER_CODES.values())

_YUV422 = frozenset({"uyvy", "yuv422", "yuyv", "yuv422_yuy2"})


def _byte_view(data) -> np.ndarray:
    """Flat ``uint8`` view of a bytes-like object or array, copying only non-contiguous arrays."""
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"image data must be bytes, bytearray, memoryview, array.array or a numpy array, got {type(data).__name__}"
        ) from exc


def image_to_array(
    data,
    width: int,
    height: int,
    encoding: str,
    step: int,
    is_bigendian: bool = False,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Views the pixels of a ``sensor_msgs/Image`` as a NumPy array in the encoding's own type.

    Args:
        data: the message's ``data``: bytes, bytearray, memoryview, ``array.array('B')`` or a
            NumPy array (its raw bytes). Bytes after ``step * height`` are ignored.
        width: pixels per row.
        height: rows.
        encoding: one of :data:`SUPPORTED_ENCODINGS` (case-sensitive, as in ROS).
        step: bytes per row including padding; at least ``width * bytes_per_pixel``.
        is_bigendian: byte order of 16-bit and float samples; ignored for 8-bit encodings.
        max_pixels: largest accepted ``width * height``.

    Returns:
        ``(H, W)`` for one-sample encodings (mono, ``16UC1``, ``32FC1``, Bayer mosaics), else
        ``(H, W, C)``; dtype ``uint8``, ``uint16`` or ``float32`` in native byte order. YUV 4:2:2
        gives ``(H, W, 2)`` ``uint8``, the raw byte pairs in message order. Row padding is not
        part of the shape. Without a byte swap or misaligned samples this is a view of ``data``
        (read-only if ``data`` is), strided when rows are padded; otherwise a C-contiguous copy.

    Raises:
        FrameError: with ``reason`` ``bad_encoding``, ``zero_size``, ``too_large`` or
            ``truncated`` (also for an odd width in a YUV 4:2:2 encoding, whose last U Y V Y
            macropixel would be cut in half).
        TypeError: ``data`` is not bytes-like.
    """
    spec = _ENCODINGS.get(encoding)
    if spec is None:
        raise FrameError(
            "bad_encoding",
            f"unsupported image encoding {encoding!r}; supported: {', '.join(SUPPORTED_ENCODINGS)}",
        )
    width, height, step = int(width), int(height), int(step)
    buf = _byte_view(data)
    if width <= 0 or height <= 0 or buf.size == 0:
        raise FrameError("zero_size", f"{encoding} image is empty: {width}x{height} pixels, {buf.size} data bytes")
    if width * height > max_pixels:
        raise FrameError("too_large", f"{encoding} image {width}x{height} exceeds max_pixels={max_pixels}")
    if encoding in _YUV422 and width % 2:
        raise FrameError("truncated", f"{encoding} needs an even width (2 pixels per U Y V Y group), got {width}")
    dtype = np.dtype(spec.dtype).newbyteorder(">" if is_bigendian else "<")
    bpp = dtype.itemsize * spec.channels
    if step < width * bpp:
        raise FrameError(
            "truncated",
            f"{encoding} step {step} is less than width {width} x {bpp} bytes per pixel = {width * bpp}",
        )
    if buf.size < step * height:
        raise FrameError(
            "truncated",
            f"{encoding} {width}x{height} with step {step} needs {step * height} data bytes, got {buf.size}",
        )
    if spec.channels == 1:
        shape, strides = (height, width), (step, bpp)
    else:
        shape, strides = (height, width, spec.channels), (step, bpp, dtype.itemsize)
    arr = np.ndarray(shape, dtype=dtype, buffer=buf, strides=strides)
    # Swapped or misaligned samples get a native, aligned copy: cv2 and torch reject the others.
    if not (dtype.isnative and arr.flags.aligned):
        arr = arr.astype(dtype.newbyteorder("="), order="C")
    return arr


def _float_to_u8(values: np.ndarray) -> np.ndarray:
    """``(H, W)`` float -> ``(H, W)`` uint8: finite min..max -> 0..255, non-finite -> 0."""
    out = np.zeros(values.shape, np.uint8)
    finite = np.isfinite(values)
    if not finite.any():
        return out
    # float64 so that hi - lo cannot overflow for extreme float32 values.
    vals = values[finite].astype(np.float64)
    lo, hi = vals.min(), vals.max()
    if hi > lo:
        out[finite] = np.rint((vals - lo) * (255.0 / (hi - lo))).astype(np.uint8)
    return out


def _cvt_to_rgb(img: np.ndarray, code: int) -> np.ndarray:
    """``cv2.cvtColor`` that also demosaics images under 3x3, which OpenCV turns black."""
    if code in _BAYER_CODE_SET and min(img.shape[:2]) < 3:
        h, w = img.shape[:2]
        # Reflect-101 padding at the bottom/right keeps the Bayer phase of every pixel.
        padded = cv2.copyMakeBorder(img, 0, 2, 0, 2, cv2.BORDER_REFLECT_101)
        return np.ascontiguousarray(cv2.cvtColor(padded, code)[:h, :w])
    return cv2.cvtColor(img, code)


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint16:
        return (arr >> 8).astype(np.uint8)
    if arr.dtype == np.float32:
        return _float_to_u8(arr)
    return arr


def image_to_rgb(
    data,
    width: int,
    height: int,
    encoding: str,
    step: int,
    is_bigendian: bool = False,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Converts a ``sensor_msgs/Image`` into the pipeline's RGB array.

    Colour encodings are reordered exactly (alpha dropped), mono is replicated into all three
    channels, 16-bit samples keep their high byte, ``32FC1`` is min-max normalised per frame
    (non-finite -> 0), YUV 4:2:2 and Bayer mosaics are converted with OpenCV (BT.601 limited
    range; bilinear demosaicing, which needs at least 2x2 pixels to see all three colours).
    Arguments are those of :func:`image_to_array`.

    Returns:
        ``(H, W, 3)`` ``uint8`` RGB, C-contiguous. For unpadded ``rgb8`` this is a view of
        ``data`` (read-only if ``data`` is); every other case returns a new array.

    Raises:
        FrameError: as :func:`image_to_array`.
        TypeError: ``data`` is not bytes-like.
    """
    arr = _to_uint8(image_to_array(data, width, height, encoding, step, is_bigendian, max_pixels=max_pixels))
    code = _ENCODINGS[encoding].to_rgb
    if code is None:
        return np.ascontiguousarray(arr)
    try:
        return _cvt_to_rgb(arr, code)
    except cv2.error as exc:
        raise FrameError("bad_encoding", f"OpenCV cannot convert {encoding} {width}x{height} to RGB: {exc}") from exc


_CODECS = {"jpeg": ".jpg", "jpg": ".jpg", "png": ".png"}
_SIGNATURES = {".jpg": b"\xff\xd8", ".png": b"\x89PNG\r\n\x1a\n"}  # the first bytes of each file type


def _parse_format(fmt: str) -> tuple[str, str]:
    """``CompressedImage.format`` -> (file extension for OpenCV, original raw encoding or "").

    Accepts a bare codec ("jpeg", "jpg", "png") and image_transport's
    "<encoding>; <codec> compressed <encoding>" form.
    """
    original, sep, rest = fmt.partition(";")
    if not sep:
        original, rest = "", fmt
    words = rest.lower().split()
    if "compresseddepth" in words:
        raise FrameError(
            "bad_format", f"compressed format {fmt!r}: compressedDepth is not supported; use the raw topic"
        )
    ext = _CODECS.get(words[0]) if words else None
    if ext is None:
        raise FrameError(
            "bad_format",
            f"unknown compressed format {fmt!r}; expected jpeg, jpg or png (optionally "
            "as '<encoding>; <codec> compressed <encoding>')",
        )
    return ext, original.strip()


_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # DHT, JPG, DAC are not frames
_JPEG_NO_LENGTH = frozenset(range(0xD0, 0xDA)) | {0x01}


def _header_size(buf: np.ndarray) -> tuple[int, int] | None:
    """(width, height) read from a PNG or JPEG header without decoding, or None if not found."""
    head = bytes(buf[:24])
    if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR":
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if not head.startswith(b"\xff\xd8"):
        return None
    i, n = 2, buf.size
    while i + 4 <= n:
        if buf[i] != 0xFF:
            return None
        marker = int(buf[i + 1])
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker in _JPEG_NO_LENGTH:
            i += 2
        elif marker in _JPEG_SOF:
            if i + 9 > n:
                return None
            s = bytes(buf[i + 5 : i + 9])
            return int.from_bytes(s[2:4], "big"), int.from_bytes(s[0:2], "big")
        else:
            i += 2 + (int(buf[i + 2]) << 8 | int(buf[i + 3]))
    return None


def parse_compressed(data, fmt: str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, str, str]:
    """Checks a ``sensor_msgs/CompressedImage`` before decoding (shared by every decoder backend).

    Args:
        data: the message's ``data`` (any type :func:`image_to_array` accepts).
        fmt: the message's ``format`` (see :func:`compressed_to_rgb`).
        max_pixels: largest accepted ``width * height`` in the PNG / JPEG header.

    Returns:
        ``(buf, ext, original)``: the data as a flat ``uint8`` view, the codec as a file
        extension (``".jpg"`` or ``".png"``) and the original raw encoding named in ``fmt`` ("" if none).

    Raises:
        FrameError: ``bad_format``, ``zero_size``, ``corrupt_compressed`` (the data is not of the
            format's codec) or ``too_large`` (from the header).
        TypeError: ``data`` is not bytes-like.
    """
    ext, original = _parse_format(fmt)
    buf = _byte_view(data)
    if buf.size == 0:
        raise FrameError("zero_size", f"compressed image ({fmt!r}) has no data")
    # OpenCV decodes whatever the bytes are (WebP, TIFF, ...): a few bytes of those can claim a huge
    # image, and only PNG and JPEG headers are size-checked here before anything is allocated.
    if not bytes(buf[:8]).startswith(_SIGNATURES[ext]):
        raise FrameError(
            "corrupt_compressed", f"format {fmt!r} but the data starts with {bytes(buf[:8])!r}, not a {ext[1:]} file"
        )
    size = _header_size(buf)
    if size is not None and size[0] * size[1] > max_pixels:
        raise FrameError(
            "too_large", f"compressed image header says {size[0]}x{size[1]}, above max_pixels={max_pixels}"
        )
    return buf, ext, original


def compressed_to_rgb(data, fmt: str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decodes a ``sensor_msgs/CompressedImage`` into the pipeline's RGB array.

    Colour images are decoded as OpenCV's BGR(A) and reordered; gray is replicated; 16-bit PNG
    keeps the high byte; a single-channel image whose format names a ``bayer_*`` original
    encoding is demosaiced. The header's size is checked against ``max_pixels`` before decoding
    (PNG, JPEG) and the decoded size again after.

    Args:
        data: the message's ``data`` (any type :func:`image_to_array` accepts).
        fmt: the message's ``format``, e.g. ``"jpeg"``, ``"png"``, ``"rgb8; jpeg compressed bgr8"``.
        max_pixels: largest accepted ``width * height``.

    Returns:
        ``(H, W, 3)`` ``uint8`` RGB, C-contiguous, newly allocated.

    Raises:
        FrameError: ``bad_format`` (unknown format string, compressedDepth), ``zero_size``
            (empty data), ``too_large``, ``corrupt_compressed`` (not a file of the format's codec,
            or does not decode).
        TypeError: ``data`` is not bytes-like.
    """
    buf, ext, original = parse_compressed(data, fmt, max_pixels=max_pixels)
    try:
        img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise FrameError("corrupt_compressed", f"{ext[1:]} data ({buf.size} bytes) failed to decode: {exc}") from exc
    if img is None or img.size == 0:
        raise FrameError("corrupt_compressed", f"{ext[1:]} data ({buf.size} bytes) does not decode")
    if img.shape[0] * img.shape[1] > max_pixels:
        raise FrameError("too_large", f"decoded image {img.shape[1]}x{img.shape[0]} exceeds max_pixels={max_pixels}")
    channels = 1 if img.ndim == 2 else img.shape[2]
    if img.dtype not in (np.uint8, np.uint16) or channels not in (1, 3, 4):
        raise FrameError("corrupt_compressed", f"unexpected decoded image: {img.dtype} {img.shape}")
    img = _to_uint8(img)
    if channels == 1:
        bayer = _ENCODINGS.get(original) if original.startswith("bayer_") else None
        code = cv2.COLOR_GRAY2RGB if bayer is None else bayer.to_rgb
        return _cvt_to_rgb(img.reshape(img.shape[:2]), code)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB if channels == 3 else cv2.COLOR_BGRA2RGB)


_PUBLISH = {
    "rgb8": (None, 3),
    "bgr8": (cv2.COLOR_RGB2BGR, 3),
    "rgba8": (cv2.COLOR_RGB2RGBA, 4),
    "bgra8": (cv2.COLOR_RGB2BGRA, 4),
    "mono8": (cv2.COLOR_RGB2GRAY, 1),
}


def rgb_to_image_fields(rgb: np.ndarray, encoding: str = "rgb8") -> tuple[bytes, int]:
    """Builds ``sensor_msgs/Image`` ``data`` and ``step`` from an RGB array (for publishing).

    Args:
        rgb: ``(H, W, 3)`` ``uint8`` RGB.
        encoding: ``rgb8``, ``bgr8``, ``rgba8`` / ``bgra8`` (alpha 255) or ``mono8`` (BT.601 luma,
            as :func:`rgb_to_gray`).

    Returns:
        ``(data, step)``: unpadded rows, ``step = W * channels``; the message also needs
        ``width=W``, ``height=H``, ``encoding`` and ``is_bigendian=0``.

    Raises:
        FrameError: ``bad_encoding`` for another encoding.
        ValueError: ``rgb`` is not ``(H, W, 3)`` ``uint8``.
    """
    if encoding not in _PUBLISH:
        raise FrameError("bad_encoding", f"cannot publish encoding {encoding!r}; supported: {', '.join(_PUBLISH)}")
    _check_rgb(rgb)
    code, channels = _PUBLISH[encoding]
    out = rgb if code is None else cv2.cvtColor(rgb, code)
    return np.ascontiguousarray(out).tobytes(), rgb.shape[1] * channels


def rgb_to_compressed(rgb: np.ndarray, fmt: str = "jpeg", quality: int = 90) -> bytes:
    """Encodes an RGB array as ``sensor_msgs/CompressedImage`` ``data``.

    Args:
        rgb: ``(H, W, 3)`` ``uint8`` RGB.
        fmt: ``"jpeg"``, ``"jpg"``, ``"png"`` or image_transport's long form; publish it as
            ``"rgb8; jpeg compressed bgr8"`` (or ``png``) for image_transport subscribers.
        quality: JPEG quality 0..100; ignored for PNG, which is lossless.

    Returns:
        The encoded file bytes.

    Raises:
        FrameError: ``bad_format`` for an unknown ``fmt``.
        ValueError: bad ``rgb`` or ``quality``.
    """
    ext, _ = _parse_format(fmt)
    _check_rgb(rgb)
    if not 0 <= quality <= 100:
        raise ValueError(f"quality must be in 0..100, got {quality}")
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if ext == ".jpg" else []
    ok, encoded = cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise FrameError("bad_format", f"OpenCV could not encode {rgb.shape} as {ext[1:]}")
    return encoded.tobytes()


def rgb_to_gray(rgb: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` ``uint8`` RGB -> ``(H, W)`` ``uint8`` BT.601 luma (0.299 R + 0.587 G + 0.114 B).

    Raises:
        ValueError: ``rgb`` is not ``(H, W, 3)`` ``uint8``.
    """
    _check_rgb(rgb)
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
