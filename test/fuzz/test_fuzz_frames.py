"""Fuzzing the ROS-free frame conversions with random and adversarial message fields.

Whatever the fields, a conversion either returns the pipeline's ``(H, W, 3)`` uint8 RGB frame of
the message's size or raises :class:`FrameError` with one of the known drop reasons; nothing else
escapes, and no frame above ``max_pixels`` is ever produced.
"""

from __future__ import annotations

import numpy as np
from hypothesis import event, example, given
from hypothesis import strategies as st

from fovea_vla.core.frames import FrameError, compressed_to_rgb, image_to_rgb

from .strategies import FOREIGN, FRAME_REASONS, MAX_PIXELS, compressed_fields, image_fields, scaled


def _check_rgb(rgb: np.ndarray, width: int, height: int) -> None:
    assert isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8 and rgb.flags.c_contiguous
    assert rgb.shape == (height, width, 3) and width * height <= MAX_PIXELS


@scaled(2.0)
@given(fields=image_fields())
def test_raw_image_converts_or_is_refused_with_a_reason(fields):
    try:
        rgb = image_to_rgb(**fields, max_pixels=MAX_PIXELS)
    except FrameError as exc:
        event(f"refused: {exc.reason}")
        assert exc.reason in FRAME_REASONS, exc
        return
    event("converted")
    _check_rgb(rgb, fields["width"], fields["height"])


@scaled(1.0)
# Regression: a 1 KiB WebP was decoded to its 1000 x 1000 pixels before max_pixels refused it.
@example(fields=(FOREIGN[0], "jpeg"), max_pixels=MAX_PIXELS)
@given(fields=compressed_fields(), max_pixels=st.sampled_from([MAX_PIXELS, 1, 100, 2**40]))
def test_compressed_image_decodes_or_is_refused_with_a_reason(fields, max_pixels):
    data, fmt = fields
    png_or_jpeg = data.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8"))
    try:
        rgb = compressed_to_rgb(data, fmt, max_pixels=max_pixels)
    except FrameError as exc:
        event(f"refused: {exc.reason}")
        assert exc.reason in FRAME_REASONS, exc
        # Only PNG and JPEG are decoded (their header size checked first): anything else is refused unread.
        assert png_or_jpeg or exc.reason in ("bad_format", "zero_size", "corrupt_compressed"), exc
        return
    event("converted")
    assert png_or_jpeg
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.flags.c_contiguous
    assert 0 < rgb.shape[0] * rgb.shape[1] <= max_pixels
