"""Hypothesis strategies for random and adversarial camera and robot-state messages (ROS-free parts).

Each strategy mixes well-formed inputs (so the accepting paths run too) with the malformed ones a
misconfigured driver or a corrupted transport produces: wrong encodings, sizes, steps and lengths,
NaN / inf samples, headers claiming huge images.
"""

from __future__ import annotations

import array
import math

import cv2
import numpy as np
from hypothesis import settings
from hypothesis import strategies as st

from fovea_vla.core.frames import SUPPORTED_ENCODINGS

# Every reason a camera frame may be refused with (fovea_vla.core.frames.FrameError).
FRAME_REASONS = frozenset({"bad_encoding", "zero_size", "truncated", "corrupt_compressed", "too_large", "bad_format"})

# Small enough that valid random frames are cheap, large enough for every encoding's minimum.
MAX_PIXELS = 64 * 64

# Bytes per pixel of each supported encoding (for building exactly sized, hence valid, messages).
_BPP = {
    **dict.fromkeys(("rgb8", "bgr8", "8UC3"), 3),
    **dict.fromkeys(("rgba8", "bgra8", "8UC4"), 4),
    **dict.fromkeys(("rgb16", "bgr16"), 6),
    **dict.fromkeys(("rgba16", "bgra16"), 8),
    **dict.fromkeys(("mono8", "8UC1"), 1),
    **dict.fromkeys(("mono16", "16UC1"), 2),
    "32FC1": 4,
    **dict.fromkeys(("uyvy", "yuv422", "yuyv", "yuv422_yuy2"), 2),
}
_BPP.update({name: 2 if name.endswith("16") else 1 for name in SUPPORTED_ENCODINGS if name.startswith("bayer_")})

UINT32 = st.integers(0, 2**32 - 1)
# Mostly small sizes, sometimes the extremes a uint32 field can carry.
DIMENSION = st.one_of(st.integers(0, 70), st.sampled_from([2**16, 100_000, 2**31 - 1, 2**32 - 1]), UINT32)
ENCODING = st.one_of(
    st.sampled_from(SUPPORTED_ENCODINGS),
    st.sampled_from(["RGB8", "rgb", "8UC2", "16SC1", "32FC3", "64FC1", "bayer_rggb", "jpeg", "", " rgb8"]),
    st.text(max_size=12),
)
FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=64)


def scaled(fraction: float) -> settings:
    """The loaded profile's settings with ``fraction`` of its max_examples (the suite's budget share)."""
    return settings(max_examples=max(1, round(settings.default.max_examples * fraction)))


def _as_container(data: bytes, kind: str):
    """The same bytes as each type a message's ``data`` field may hold."""
    if kind == "bytes":
        return data
    if kind == "bytearray":
        return bytearray(data)
    if kind == "array":
        return array.array("B", data)
    if kind == "memoryview":
        return memoryview(data)
    return np.frombuffer(data, np.uint8)


@st.composite
def image_fields(draw) -> dict:
    """Fields of a sensor_msgs/Image: ``data, width, height, encoding, step, is_bigendian``.

    Two thirds are well-formed small images of a supported encoding (some with row padding, a
    byte too few or too many, or odd widths for YUV), the rest have random encodings, sizes up to
    the uint32 limit, steps and data lengths.
    """
    if draw(st.sampled_from([True, True, False])):
        encoding = draw(st.sampled_from(SUPPORTED_ENCODINGS))
        width = draw(st.integers(1, 64))
        height = draw(st.integers(1, MAX_PIXELS // width))
        step = width * _BPP[encoding] + draw(st.sampled_from([0, 0, 0, 1, 3, 7]))
    else:
        encoding = draw(ENCODING)
        width, height = draw(DIMENSION), draw(DIMENSION)
        step = draw(st.one_of(st.integers(0, 600), UINT32, st.just(width * _BPP.get(encoding, 3))))
    step = min(step, 2**32 - 1)
    size = step * height
    if size <= 64 * 1024 and draw(st.sampled_from([True, True, True, False])):
        size = max(0, size + draw(st.sampled_from([0, 0, 0, 0, 0, -1, 1, -step])))
        if encoding == "32FC1" and size >= 4 and draw(st.booleans()):
            # Real floats (NaN, inf, subnormals, extremes) rather than random bit patterns.
            pattern = np.asarray(draw(st.lists(st.floats(width=32), min_size=1, max_size=256)), np.float32).tobytes()
        else:
            pattern = draw(st.binary(min_size=1, max_size=1024))
        # Hypothesis draws a few KiB at most per example: larger frames repeat the random pattern.
        data = (pattern * (size // len(pattern) + 1))[:size]
    else:
        data = draw(st.binary(max_size=256))
    return {
        "data": _as_container(data, draw(st.sampled_from(["bytes", "bytearray", "array", "memoryview", "numpy"]))),
        "width": width,
        "height": height,
        "encoding": encoding,
        "step": step,
        "is_bigendian": draw(st.sampled_from([0, 1, 255])),
    }


def _encoded_examples() -> list[bytes]:
    """Small valid PNG and JPEG files (colour, grey, 16-bit, alpha) to mutate."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    images = [
        (".png", rgb),
        (".jpg", rgb),
        (".png", rgb[..., 0]),
        (".jpg", rgb[..., 0]),
        (".png", rng.integers(0, 65536, (5, 7, 3), dtype=np.uint16)),
        (".png", rng.integers(0, 256, (5, 7, 4), dtype=np.uint8)),
        (".png", rgb[:1, :1]),
    ]
    return [cv2.imencode(ext, img)[1].tobytes() for ext, img in images]


ENCODED = _encoded_examples()
# Files OpenCV decodes but a CompressedImage does not carry; the WebP is a 1 KiB image of 1000 x 1000 pixels.
FOREIGN = [
    cv2.imencode(ext, np.zeros(shape, np.uint8))[1].tobytes()
    for ext, shape in ((".webp", (1000, 1000, 3)), (".bmp", (4, 4, 3)), (".tiff", (4, 4)), (".ppm", (4, 4, 3)))
]
_JPEG_FORMATS = ["jpeg", "jpg", "rgb8; jpeg compressed bgr8", "mono8; jpeg compressed mono8"]
_PNG_FORMATS = ["png", "bgr8; png compressed bgr8", "bayer_rggb8; png compressed bayer_rggb8"]
_GOOD_FORMATS = _JPEG_FORMATS + _PNG_FORMATS
_BAD_FORMATS = ["PNG", "16UC1; compressedDepth png", "bgr8; ", ";", "", "theora", "jpeg2000"]


@st.composite
def compressed_format(draw) -> str:
    """A CompressedImage ``format``: two thirds valid, the rest odd names and random text.

    (An explicit choice: Hypothesis avoids repeating inputs, so a plain one_of of the few valid
    names and unbounded text would give text nearly every time.)
    """
    if draw(st.integers(0, 2)) < 2:
        return draw(st.sampled_from(_GOOD_FORMATS))
    return draw(st.one_of(st.sampled_from(_BAD_FORMATS), st.text(max_size=30)))


@st.composite
def compressed_data(draw) -> bytes:
    """Valid small PNG / JPEG files, their mutations (flipped bytes, truncation, huge header sizes), noise and
    files of other types."""
    kind = draw(st.sampled_from(["valid", "valid", "mutated", "truncated", "huge", "noise", "prefixed", "foreign"]))
    if kind == "noise":
        return draw(st.binary(max_size=512))
    if kind == "foreign":
        return draw(st.sampled_from(FOREIGN))
    data = bytearray(draw(st.sampled_from(ENCODED)))
    if kind == "mutated":
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    elif kind == "truncated":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif kind == "huge":
        # Overwrite the PNG IHDR or the JPEG SOF size with a large claim.
        if data.startswith(b"\x89PNG"):
            data[16:24] = draw(UINT32).to_bytes(4, "big") + draw(UINT32).to_bytes(4, "big")
        else:
            w, h = draw(st.integers(0, 2**16 - 1)), draw(st.integers(0, 2**16 - 1))
            sof = data.find(b"\xff\xc0")
            if sof > 0:
                data[sof + 5 : sof + 9] = h.to_bytes(2, "big") + w.to_bytes(2, "big")
    elif kind == "prefixed":
        data = bytearray(draw(st.binary(max_size=16))) + data
    return bytes(data)


# Specials a float field of a ROS message may carry.
SPECIAL_FLOATS = st.sampled_from([0.0, -0.0, -1.0, 1e-300, 1e300, -1e300, math.nan, math.inf, -math.inf])


@st.composite
def camera_k(draw, width: int, height: int) -> list[float]:
    """A CameraInfo ``k``: a valid pinhole matrix for ``width`` x ``height``, one of its entries
    replaced (a special value, a random float), all zeros, transposed, or nine random floats."""
    fx = draw(st.floats(0.1, 1e5)) * max(width, 1) / 640
    fy = fx * draw(st.sampled_from([1.0, 1.0, 0.5, 2.0]))
    cx, cy = draw(st.floats(-0.5, max(width - 0.5, -0.5))), draw(st.floats(-0.5, max(height - 0.5, -0.5)))
    k = [fx, 0.0, cx, 0.0, fy, cy, 0.0, 0.0, 1.0]
    kind = draw(st.sampled_from(["valid", "entry", "entry", "zeros", "transposed", "random"]))
    if kind == "entry":
        k[draw(st.integers(0, 8))] = draw(st.one_of(SPECIAL_FLOATS, FLOATS))
    elif kind == "zeros":
        k = [0.0] * 9
    elif kind == "transposed":
        k = [k[0], k[3], k[6], k[1], k[4], k[7], k[2], k[5], k[8]]
    elif kind == "random":
        k = draw(st.lists(st.one_of(SPECIAL_FLOATS, FLOATS), min_size=9, max_size=9))
    return k


# Joint names from a small alphabet, so that duplicates and the names a node wants both come up.
JOINT_NAME = st.one_of(
    st.sampled_from(["panda_joint1", "panda_joint2", "panda_finger_joint1", "gripper", ""]), st.text(max_size=8)
)
JOINT_VALUE = st.one_of(SPECIAL_FLOATS, st.floats(-10.0, 10.0), FLOATS)


@st.composite
def joint_lists(draw, names: tuple[str, ...] = ()) -> tuple[list[str], list[float]]:
    """``(name, position)`` of a JointState: ``names`` (in random order, with others) or random
    names, mostly one position per name, sometimes more or fewer."""
    chosen = list(draw(st.permutations(names))) if names and draw(st.booleans()) else []
    chosen += draw(st.lists(JOINT_NAME, max_size=6))
    count = len(chosen) + draw(st.sampled_from([0, 0, 0, 0, -1, 1, 3]))
    positions = draw(st.lists(JOINT_VALUE, min_size=max(count, 0), max_size=max(count, 0)))
    return chosen, positions


@st.composite
def compressed_fields(draw) -> tuple[bytes, str]:
    """``(data, format)`` of a CompressedImage: two thirds with a format naming the data's own codec."""
    data = draw(compressed_data())
    if draw(st.integers(0, 2)) < 2:
        return data, draw(st.sampled_from(_PNG_FORMATS if data.startswith(b"\x89PNG") else _JPEG_FORMATS))
    return data, draw(compressed_format())
