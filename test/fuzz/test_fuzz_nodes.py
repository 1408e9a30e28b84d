"""Fuzzing the node callbacks themselves: real fovea_node and policy_node objects in this process.

Each example hands one random or adversarial message to a subscription callback directly (as the
executor would), then a valid one. Properties: no exception escapes the callback; a refused
message is counted under a known reason; a valid message afterwards is processed (a frame reaches
the pipeline's outputs, a state reaches the safety watchdog as fresh).

The nodes live in their own rclpy context on their own DDS domain and are never spun: no timers
fire and nothing is sent, so the examples are deterministic.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import rclpy
from geometry_msgs.msg import PoseStamped
from hypothesis import event, example, given
from hypothesis import strategies as st
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.parameter import Parameter
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, JointState
from std_msgs.msg import Header

from fovea_vla.core.policy.observation import LatestTokens
from fovea_vla.core.policy.spaces import PANDA_JOINTS, rpy_to_quaternion
from fovea_vla.nodes.fovea_node import FoveaNode
from fovea_vla.nodes.messages import image_msg, ns_to_stamp
from fovea_vla.nodes.policy_node import EncoderInfo, PolicyNode
from test.ros.test_policy_node import write_checkpoint

from .strategies import (
    DIMENSION,
    FLOATS,
    FRAME_REASONS,
    MAX_PIXELS,
    SPECIAL_FLOATS,
    camera_k,
    compressed_fields,
    image_fields,
    joint_lists,
    scaled,
)

GRIPPER = "panda_finger_joint1"
HOME = (0.0, -0.5, 0.0, -2.0, 0.0, 1.6, 0.8)
MAX_AGE_MS = 60_000.0  # stale / future tolerance: far above a slow example, far below the random stamps
FRAME_DROP_REASONS = FRAME_REASONS | {"stale", "future_stamp"}


@pytest.fixture(scope="module")
def context():
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=1 + (os.getpid() + 60) % 100)
    yield context
    rclpy.try_shutdown(context=context)


@pytest.fixture(scope="module")
def fovea(context):
    params = {
        "encoder.enabled": False,
        "flow.backend": "dis",
        "texture.backend": "torch",
        "texture.device": "cpu",
        "decode.backend": "opencv",
        "max_image_pixels": MAX_PIXELS,
        "max_frame_age_ms": MAX_AGE_MS,
        "debug_image.enabled": False,
        "slip.gripper_joint": GRIPPER,
    }
    node = FoveaNode(
        frame_thread=False, context=context, parameter_overrides=[Parameter(k, value=v) for k, v in params.items()]
    )
    assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS, node.configure_error
    assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
    yield node
    node.destroy_node()


def _policy_node(context, folder, action_space: str) -> PolicyNode:
    write_checkpoint(folder, action_space)
    params = {
        "policy.checkpoint": str(folder),
        "policy.device": "cpu",
        "action_space": action_space,
        "max_observation_age_ms": MAX_AGE_MS,
    }
    node = PolicyNode(
        LatestTokens(),
        encoder=lambda: EncoderInfo("vit_tiny_patch16", 192, 64),
        context=context,
        parameter_overrides=[Parameter(k, value=v) for k, v in params.items()],
    )
    assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS, node.configure_error
    return node


@pytest.fixture(scope="module")
def joint_policy(context, tmp_path_factory):
    node = _policy_node(context, tmp_path_factory.mktemp("joint") / "policy", "joint_position")
    yield node
    node.destroy_node()


@pytest.fixture(scope="module")
def ee_policy(context, tmp_path_factory):
    node = _policy_node(context, tmp_path_factory.mktemp("ee") / "policy", "ee_pose")
    yield node
    node.destroy_node()


@st.composite
def stamps(draw) -> tuple:
    """A header stamp: near the node's clock (offset [s]; half of them now), unset (0), or any
    value the fields can hold."""
    kind = draw(st.integers(0, 3))
    if kind < 2:
        return (
            "offset",
            0.0 if kind == 0 else draw(st.sampled_from([-1.0, 1.0, -120.0, 120.0]) | st.floats(-1e4, 1e4)),
        )
    if kind == 2:
        return ("unset",)
    return ("absolute", draw(st.integers(-(2**31), 2**31 - 1)), draw(st.integers(0, 2**32 - 1)))


STAMP = stamps()


def _header(node, stamp, frame_id: str = "") -> Header:
    header = Header(frame_id=frame_id)
    if stamp[0] == "offset":
        header.stamp = ns_to_stamp(node.get_clock().now().nanoseconds + round(stamp[1] * 1e9))
    elif stamp[0] == "absolute":
        header.stamp.sec, header.stamp.nanosec = stamp[1], stamp[2]
    return header


def _counts(node) -> tuple[int, dict[str, int]]:
    return node.frames_processed, node.drops.as_dict()


def _new_drops(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {reason: n - before.get(reason, 0) for reason, n in after.items() if n != before.get(reason, 0)}


def _assert_valid_frame_processed(node) -> None:
    """A well-formed, fresh frame after the adversarial one reaches the pipeline's outputs."""
    processed, drops = _counts(node)
    rgb = np.random.default_rng(processed).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    node._on_image(image_msg(rgb, Header(stamp=node.get_clock().now().to_msg(), frame_id="camera")))
    assert _counts(node) == (processed + 1, drops), (
        f"a valid frame was not processed: {_new_drops(drops, node.drops.as_dict())}"
    )


def _assert_one_outcome(node, before, allowed: frozenset[str]) -> None:
    """The message was processed (one frame) or dropped once under an allowed reason."""
    processed, drops = before
    new = _new_drops(drops, node.drops.as_dict())
    event(f"dropped: {', '.join(new)}" if new else "processed")
    if node.frames_processed == processed + 1:
        assert not new, new
    else:
        assert node.frames_processed == processed, "a message made more than one frame"
        assert len(new) == 1 and set(new.values()) == {1} and set(new) <= allowed, new


@scaled(0.3)
@given(fields=image_fields(), stamp=STAMP, frame_id=st.text(max_size=8))
def test_fovea_node_image_callback(fovea, fields, stamp, frame_id):
    msg = Image(
        header=_header(fovea, stamp, frame_id),
        width=fields["width"],
        height=fields["height"],
        encoding=fields["encoding"],
        step=fields["step"],
        is_bigendian=fields["is_bigendian"],
        data=bytes(fields["data"]),
    )
    before = _counts(fovea)
    fovea._on_image(msg)
    _assert_one_outcome(fovea, before, FRAME_DROP_REASONS)
    _assert_valid_frame_processed(fovea)


@scaled(0.2)
@given(fields=compressed_fields(), stamp=STAMP)
def test_fovea_node_compressed_callback(fovea, fields, stamp):
    data, fmt = fields
    before = _counts(fovea)
    fovea._on_compressed(CompressedImage(header=_header(fovea, stamp), format=fmt, data=data))
    _assert_one_outcome(fovea, before, FRAME_DROP_REASONS)
    _assert_valid_frame_processed(fovea)


@st.composite
def camera_infos(draw) -> CameraInfo:
    width, height = draw(DIMENSION), draw(DIMENSION)
    return CameraInfo(width=width, height=height, k=draw(camera_k(width, height)))


@scaled(0.2)
@given(info=camera_infos())
def test_fovea_node_camera_info_callback(fovea, info):
    before = _counts(fovea)
    fovea._on_camera_info(info)
    new = _new_drops(before[1], fovea.drops.as_dict())
    event(f"dropped: {', '.join(new)}" if new else "adopted")
    assert not new or (len(new) == 1 and next(iter(new)).startswith("camera_info_")), new
    fx, fy, cx, cy = fovea.camera.intrinsics(32, 24)
    assert all(math.isfinite(v) for v in (fx, fy, cx, cy)) and fx > 0 and fy > 0
    _assert_valid_frame_processed(fovea)


@scaled(0.2)
@example(lists=([GRIPPER, GRIPPER], [math.nan, 0.03]))
@given(lists=joint_lists((GRIPPER,)))
def test_fovea_node_gripper_joint_states_callback(fovea, lists):
    names, positions = lists
    before = fovea.drops.as_dict()
    closed_before = fovea.gripper_closed
    fovea._on_joint_states(JointState(name=names, position=positions))
    new = _new_drops(before, fovea.drops.as_dict())
    event(f"dropped: {', '.join(new)}" if new else "taken")
    if new:
        assert len(new) == 1 and next(iter(new)).startswith("gripper_joint_states_"), new
        assert fovea.gripper_closed == closed_before
    assert isinstance(fovea.gripper_closed, bool)
    fovea._on_joint_states(JointState(name=[GRIPPER], position=[0.03]))
    assert fovea.gripper_closed


def _assert_state_fresh(node) -> None:
    """With a fresh frame, the watchdog lets commands move: no message left it stale or in the future."""
    now_s = node._now_s()
    node.monitor.observe("frame", now_s)
    assert node.monitor.check(now_s) is None, node.monitor.check(now_s)


def _assert_one_drop(node, before: dict[str, int], topic: str) -> dict[str, int]:
    new = _new_drops(before, node.input_drops.as_dict())
    event(f"dropped: {', '.join(new)}" if new else "taken")
    assert not new or (len(new) == 1 and next(iter(new)).startswith(f"{topic}_") and set(new.values()) == {1}), new
    return new


@scaled(0.3)
# Regression: a state stamped in 2038 was taken as the newest and held the watchdog at "future_state".
@example(lists=([*PANDA_JOINTS, GRIPPER], [*HOME, 0.04]), stamp=("absolute", 2**31 - 1, 0))
@example(lists=(["panda_joint1", "panda_joint1"], [math.nan, 0.0]), stamp=("unset",))
@given(lists=joint_lists((*PANDA_JOINTS, GRIPPER)), stamp=STAMP)
def test_policy_node_joint_states_callback(joint_policy, lists, stamp):
    names, positions = lists
    before, known = joint_policy.input_drops.as_dict(), dict(joint_policy.joint_positions)
    joint_policy._on_joint_states(JointState(header=_header(joint_policy, stamp), name=names, position=positions))
    if _assert_one_drop(joint_policy, before, "joint_states"):
        assert joint_policy.joint_positions == known, "a refused joint_states changed the state"
    state = joint_policy._state()
    assert state is None or (state.shape == (len(PANDA_JOINTS) + 1,) and np.isfinite(state).all())
    valid = JointState(
        header=_header(joint_policy, ("offset", 0.0)), name=[*PANDA_JOINTS, GRIPPER], position=[*HOME, 0.04]
    )
    joint_policy._on_joint_states(valid)
    np.testing.assert_allclose(joint_policy._state(), [*HOME, 0.0])
    _assert_state_fresh(joint_policy)


POSE_VALUE = st.one_of(SPECIAL_FLOATS, st.floats(-2.0, 2.0), FLOATS)


@st.composite
def poses(draw) -> tuple[list[float], str]:
    """Position x y z, quaternion x y z w (often a unit one) and a frame id."""
    values = [draw(POSE_VALUE) for _ in range(7)]
    if draw(st.booleans()):
        q = np.array([draw(st.floats(-1.0, 1.0)) for _ in range(4)])
        values[3:] = (q / np.linalg.norm(q)).tolist() if np.linalg.norm(q) > 1e-3 else [0.0, 0.0, 0.0, 1.0]
    frame = draw(st.sampled_from(["", "panda_link0", "world", "panda_link0 "]))
    return values, frame


@scaled(0.2)
# Regression: the squared norm of this quaternion overflowed, and it was taken as the identity rotation.
@example(pose=([0.4, 0.0, 0.3, 1e300, 0.0, 0.0, 0.0], "panda_link0"), stamp=("unset",))
@given(pose=poses(), stamp=STAMP)
def test_policy_node_ee_pose_callback(ee_policy, pose, stamp):
    values, frame = pose
    msg = PoseStamped(header=_header(ee_policy, stamp, frame))
    p, q = msg.pose.position, msg.pose.orientation
    p.x, p.y, p.z, q.x, q.y, q.z, q.w = values
    before = ee_policy.input_drops.as_dict()
    ee_policy._on_ee_pose(msg)
    state_before = ee_policy.ee_state
    if _assert_one_drop(ee_policy, before, "ee_pose"):
        assert ee_policy.ee_state is state_before, "a refused ee_pose changed the state"
    elif ee_policy.ee_state is not state_before:
        # Taken: the state holds the message's position and orientation (q and -q are one rotation).
        state = ee_policy.ee_state
        np.testing.assert_array_equal(state[:3], values[:3])
        q = np.asarray(values[3:]) / np.linalg.norm(values[3:])
        r = rpy_to_quaternion(*state[3:])
        assert np.allclose(r, q, atol=1e-6) or np.allclose(r, -q, atol=1e-6), (r, q)
    valid = PoseStamped(header=_header(ee_policy, ("offset", 0.0), "panda_link0"))
    valid.pose.position.x, valid.pose.orientation.w = 0.45, 1.0
    ee_policy._on_ee_pose(valid)
    ee_policy._on_joint_states(JointState(name=[GRIPPER], position=[0.04]))
    np.testing.assert_allclose(ee_policy._state(), [0.45, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], atol=1e-12)
    _assert_state_fresh(ee_policy)
