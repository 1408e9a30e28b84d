"""Fuzzing the ROS message conversions of fovea_vla.nodes.messages with real message objects.

Image / CompressedImage -> Frame (through the decoder fovea_node uses), CameraInfo -> the camera
model's intrinsics, JointState -> joint positions: each either converts into a well-formed value or
raises / returns an error with a known drop reason, and a refused CameraInfo leaves the model as it was.
"""

from __future__ import annotations

import math

from builtin_interfaces.msg import Time
from hypothesis import example, given
from hypothesis import strategies as st
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, JointState

from fovea_vla.core.decode import DecodeConfig, make_image_decoder
from fovea_vla.core.frames import FrameError
from fovea_vla.nodes.messages import (
    CameraModel,
    MessageError,
    frame_from_compressed,
    frame_from_image,
    joint_positions,
    stamp_to_ns,
)

from .strategies import (
    DIMENSION,
    FRAME_REASONS,
    MAX_PIXELS,
    UINT32,
    camera_k,
    compressed_fields,
    image_fields,
    joint_lists,
    scaled,
)

CAMERA_INFO_REASONS = frozenset({"uncalibrated", "zero_size", "not_finite", "bad_intrinsics"})
JOINT_STATE_REASONS = frozenset({"length_mismatch", "duplicate_names", "not_finite"})

DECODER, _ = make_image_decoder(DecodeConfig(backend="opencv", max_pixels=MAX_PIXELS))
STAMP = st.builds(Time, sec=st.integers(-(2**31), 2**31 - 1), nanosec=UINT32)
FRAME_ID = st.text(max_size=20)


@scaled(0.5)
@given(fields=image_fields(), stamp=STAMP, frame_id=FRAME_ID)
def test_image_message_becomes_a_frame_or_a_counted_reason(fields, stamp, frame_id):
    msg = Image(
        width=fields["width"],
        height=fields["height"],
        encoding=fields["encoding"],
        step=fields["step"],
        is_bigendian=fields["is_bigendian"],
        data=bytes(fields["data"]),
    )
    msg.header.stamp, msg.header.frame_id = stamp, frame_id
    try:
        frame = frame_from_image(msg, DECODER)
    except FrameError as exc:
        assert exc.reason in FRAME_REASONS, exc
        return
    assert frame.rgb.shape == (msg.height, msg.width, 3)
    assert frame.stamp_ns == stamp_to_ns(stamp) and frame.frame_id == frame_id


@scaled(0.3)
@given(fields=compressed_fields(), stamp=STAMP)
def test_compressed_message_becomes_a_frame_or_a_counted_reason(fields, stamp):
    data, fmt = fields
    msg = CompressedImage(format=fmt, data=data)
    msg.header.stamp = stamp
    try:
        frame = frame_from_compressed(msg, DECODER)
    except FrameError as exc:
        assert exc.reason in FRAME_REASONS, exc
        return
    assert 0 < frame.rgb.shape[0] * frame.rgb.shape[1] <= MAX_PIXELS


@st.composite
def camera_infos(draw) -> CameraInfo:
    width, height = draw(DIMENSION), draw(DIMENSION)
    return CameraInfo(width=width, height=height, k=draw(camera_k(width, height)))


NONE_YET = {"first": CameraInfo(), "size": (640, 480)}


@scaled(0.6)
# Regressions: each was adopted before CameraInfo was checked, giving NaN / inf or wrong intrinsics.
@example(info=CameraInfo(width=640, height=480, k=[500.0, 0, math.nan, 0, 500.0, 240, 0, 0, 1]), **NONE_YET)
@example(info=CameraInfo(width=640, height=480, k=[math.inf, 0, 320, 0, 500.0, 240, 0, 0, 1]), **NONE_YET)
@example(info=CameraInfo(width=0, height=0, k=[500.0, 0, 320, 0, 500.0, 240, 0, 0, 1]), **NONE_YET)
@example(info=CameraInfo(width=640, height=480, k=[500.0, 0, 0, 0, 500.0, 0, 320, 240, 1]), **NONE_YET)
@example(info=CameraInfo(width=1, height=1, k=[1e308, 0, 0, 0, 1e308, 0, 0, 0, 1]), **NONE_YET)
@given(info=camera_infos(), first=camera_infos(), size=st.tuples(st.integers(1, 8192), st.integers(1, 8192)))
def test_camera_info_gives_finite_intrinsics_or_is_refused_with_a_reason(info, first, size):
    camera = CameraModel(default_fov_deg=60.0)
    camera.update(first)
    before = (camera.known, camera.intrinsics(*size))
    problem = camera.update(info)
    if problem is not None:
        assert isinstance(problem, MessageError) and problem.reason in CAMERA_INFO_REASONS, problem
        assert (camera.known, camera.intrinsics(*size)) == before, "a refused CameraInfo changed the model"
        return
    assert camera.known
    fx, fy, cx, cy = camera.intrinsics(*size)
    assert all(math.isfinite(v) for v in (fx, fy, cx, cy)) and fx > 0 and fy > 0
    # The principal point stays within the image (pixel centres at integers).
    assert -0.5 <= cx <= size[0] - 0.5 + 1e-6 and -0.5 <= cy <= size[1] - 0.5 + 1e-6


@scaled(0.6)
@example(lists=(["a", "a"], [math.nan, 1.0]))
@example(lists=(["a", "b"], [1.0]))
@given(lists=joint_lists(("panda_joint1", "panda_finger_joint1")))
def test_joint_state_gives_finite_positions_or_is_refused_with_a_reason(lists):
    names, positions = lists
    try:
        values = joint_positions(JointState(name=names, position=positions))
    except MessageError as exc:
        assert exc.reason in JOINT_STATE_REASONS, exc
        return
    assert list(values) == names and all(math.isfinite(v) for v in values.values())
