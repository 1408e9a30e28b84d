"""The action path over real DDS: camera_replay and vla_stack (fovea_node + policy_node) in their own
processes, the test process publishing the robot state and listening to the commands."""

from __future__ import annotations

import itertools
import signal
import time

import numpy as np
import pytest
from geometry_msgs.msg import PoseStamped, TwistStamped
from rclpy.parameter import Parameter
from rclpy.parameter_client import AsyncParameterClient
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Bool, Float64
from std_srvs.srv import Trigger
from trajectory_msgs.msg import JointTrajectory

from fovea_vla.bringup import node_graph
from fovea_vla.core.policy.checkpoint import PolicySpec, save_policy
from fovea_vla.core.policy.head import ActionHead, ActionHeadConfig
from fovea_vla.core.policy.spaces import PANDA_JOINTS, space_names
from fovea_vla.launcher import GraphProcesses
from fovea_vla.nodes import qos
from fovea_vla.nodes.messages import stamp_to_ns
from fovea_vla.nodes.policy_node import PANDA_POSITION_MAX, PANDA_POSITION_MIN
from fovea_vla_msgs.msg import ActionChunk, PolicyStats

STARTUP_S = 90.0  # torch, transformers, the sentence model and the encoder load first
HOME = (0.0, -0.5, 0.0, -2.0, 0.0, 1.6, 0.8)
EE_HOME = (0.45, 0.0, 0.35)


def write_checkpoint(folder, action_space: str) -> None:
    """An untrained head small enough for CI's CPU, shaped for ViT-Tiny tokens and the default robot."""
    names = space_names(action_space, PANDA_JOINTS, gripper=True)
    arm = len(names) - 1
    head = ActionHeadConfig(
        token_dim=192,
        instruction_dim=384,
        state_dim=len(names),
        action_dim=len(names),
        chunk_size=10,
        width=64,
        depth=2,
        num_heads=4,
        delta_state_indices=(*range(arm), -1),
    )
    model = ActionHead.from_config(head, seed=1)
    model.set_normalization([0.0] * len(names), [1.0] * len(names), [0.0] * len(names), [0.05] * len(names))
    spec = PolicySpec(
        head=head,
        action_space=action_space,
        action_names=names,
        state_names=names,
        step_s=0.1,
        encoder_architecture="vit_tiny_patch16",
        text_encoder="all-MiniLM-L6-v2",
    )
    save_policy(folder, model, spec)


class Robot:
    """The test's stand-in for the robot: publishes joint_states (and ee_pose) at 50 Hz and
    records what the stack commands and which camera frames camera_replay sent."""

    def __init__(self, probe, namespace: str):
        node = probe.node
        self.image_stamps: set[int] = set()
        self.trajectories: list[JointTrajectory] = []
        self.twists: list[TwistStamped] = []
        self.chunks: list[ActionChunk] = []
        self.stats: list[PolicyStats] = []
        self.gripper: list[Float64] = []
        ns = f"/{namespace}"
        node.create_subscription(
            Image,
            f"{ns}/image",
            lambda m: self.image_stamps.add(stamp_to_ns(m.header.stamp)),
            qos.sensor("best_effort", 50),
        )
        node.create_subscription(JointTrajectory, f"{ns}/joint_trajectory", self.trajectories.append, qos.outputs(500))
        node.create_subscription(TwistStamped, f"{ns}/cmd_twist", self.twists.append, qos.outputs(500))
        node.create_subscription(ActionChunk, f"{ns}/action_chunk", self.chunks.append, qos.outputs(100))
        node.create_subscription(PolicyStats, f"{ns}/policy_stats", self.stats.append, qos.outputs(100))
        node.create_subscription(Float64, f"{ns}/gripper_command", self.gripper.append, qos.outputs(500))
        self.joint_pub = node.create_publisher(JointState, f"{ns}/joint_states", qos.sensor("best_effort", 5))
        self.pose_pub = node.create_publisher(PoseStamped, f"{ns}/ee_pose", qos.sensor("best_effort", 5))
        self.estop_pub = node.create_publisher(Bool, f"{ns}/estop", qos.outputs())
        self.rearm = node.create_client(Trigger, f"{ns}/rearm")
        self.params = AsyncParameterClient(node, f"{ns}/policy_node")
        self.node = node
        self.timer = node.create_timer(0.02, self._publish_state)

    def _publish_state(self) -> None:
        stamp = self.node.get_clock().now().to_msg()
        state = JointState(name=[*PANDA_JOINTS, "panda_finger_joint1"], position=[*HOME, 0.04])
        state.header.stamp = stamp
        self.joint_pub.publish(state)
        pose = PoseStamped()
        pose.header.stamp, pose.header.frame_id = stamp, "panda_link0"
        pose.pose.position.x, pose.pose.position.y, pose.pose.position.z = EE_HOME
        pose.pose.orientation.x, pose.pose.orientation.w = 1.0, 0.0  # gripper pointing down
        self.pose_pub.publish(pose)

    def close(self) -> None:
        self.node.destroy_timer(self.timer)


def start_stack(
    probe, tmp_path_factory, namespace: str, action_space: str, enable_actions: bool, autostart: bool = True
):
    folder = tmp_path_factory.mktemp(namespace)
    write_checkpoint(folder / "policy", action_space)
    graph = node_graph(config="cpu.yaml", use_replay=True, policy=True, captions=False, autostart=autostart)
    parameters = {
        "camera_replay": {"synthetic.width": 320, "synthetic.height": 240, "rate_hz": 10.0},
        "fovea_node": {
            "debug_image.enabled": False,
            "max_frame_age_ms": 5000.0,
            "instruction": "push the red block onto the green square",
        },
        "policy_node": {
            "policy.checkpoint": str(folder / "policy"),
            "action_space": action_space,
            "enable_actions": enable_actions,
            "policy.rate_hz": 5.0,
            "max_observation_age_ms": 3000.0,  # CI's two cores run the ViT-Tiny encoder and the head on the CPU
        },
    }
    robot = Robot(probe, namespace)
    processes = GraphProcesses(graph, namespace=namespace, parameters=parameters, log_dir=folder).start()
    return processes, robot


def stop_stack(processes, robot) -> None:
    robot.close()
    codes = processes.stop()
    assert codes == {"camera_replay": 0, "vla_stack": 0}, f"unclean exit {codes} (logs in {processes.log_dir})"


@pytest.fixture(scope="module")
def joint_stack(ros_probe, tmp_path_factory):
    processes, robot = start_stack(ros_probe, tmp_path_factory, "joints", "joint_position", enable_actions=True)
    yield processes, robot
    stop_stack(processes, robot)


@pytest.fixture(scope="module")
def ee_stack(ros_probe, tmp_path_factory):
    processes, robot = start_stack(ros_probe, tmp_path_factory, "ee", "ee_pose", enable_actions=False)
    yield processes, robot
    stop_stack(processes, robot)


def moving(trajectory: JointTrajectory) -> bool:
    """The points (positions only by default) do not all hold one position."""
    first = np.array(trajectory.points[0].positions)
    return any(np.abs(np.array(point.positions) - first).max() > 1e-9 for point in trajectory.points[1:])


def test_joint_trajectories_carry_the_source_frame_stamp_and_stay_in_limits(ros_probe, joint_stack):
    processes, robot = joint_stack
    ros_probe.wait_for(lambda: len(robot.chunks) >= 3, STARTUP_S, "three action chunks", processes)
    ros_probe.wait_for(
        lambda: sum(moving(t) for t in robot.trajectories) >= 20, 60.0, "20 moving trajectories", processes
    )
    # The probe sees the camera only from when DDS matched it with camera_replay, which can be after
    # vla_stack took its first frame: chunks from frames before the probe's first are not comparable.
    ros_probe.wait_for(
        lambda: any(stamp_to_ns(c.header.stamp) in robot.image_stamps for c in robot.chunks),
        60.0,
        "a chunk from a frame the probe saw",
        processes,
    )
    first_seen = min(robot.image_stamps)
    assert any(stamp_to_ns(chunk.header.stamp) >= first_seen for chunk in robot.chunks)
    for chunk in robot.chunks:
        stamp = stamp_to_ns(chunk.header.stamp)
        assert stamp in robot.image_stamps or stamp < first_seen
        assert chunk.action_space == ActionChunk.SPACE_JOINT_POSITION
        assert (chunk.num_steps, chunk.num_dims) == (10, 8)
        assert list(chunk.dim_names) == [*PANDA_JOINTS, "gripper"]
    sources = {stamp_to_ns(c.header.stamp) for c in robot.chunks}
    moving_trajectories = [t for t in robot.trajectories if moving(t)]
    for trajectory in moving_trajectories:
        assert stamp_to_ns(trajectory.header.stamp) in sources  # the frame the chunk came from
        assert list(trajectory.joint_names) == list(PANDA_JOINTS)
        assert len(trajectory.points) == 5
        times = [p.time_from_start.sec + p.time_from_start.nanosec * 1e-9 for p in trajectory.points]
        assert all(b > a for a, b in itertools.pairwise(times))
        for point in trajectory.points:
            assert np.all(np.array(point.positions) >= np.array(PANDA_POSITION_MIN) - 1e-9)
            assert np.all(np.array(point.positions) <= np.array(PANDA_POSITION_MAX) + 1e-9)
    assert robot.gripper and all(0.0 - 1e-9 <= g.data <= 0.04 + 1e-9 for g in robot.gripper)
    ros_probe.wait_for(lambda: robot.stats[-1].chunks_predicted >= 3, 30.0, "stats of three chunks", processes)
    stats = robot.stats[-1]
    assert stats.actions_enabled and stats.action_space == "joint_position"
    assert stats.commands_published > 0
    # Between chunks on a loaded CI machine the executor may have run out of chunk and hold (no_chunk).
    assert stats.status in ("running", "stopped: no_chunk"), stats.status
    assert {"head", "executor", "text"} <= {s.stage for s in stats.stages}


def test_estop_latches_until_rearm(ros_probe, joint_stack):
    processes, robot = joint_stack
    robot.estop_pub.publish(Bool(data=True))
    robot.estop_pub.publish(Bool(data=False))  # releasing the button does not re-arm
    ros_probe.wait_for(lambda: robot.stats and robot.stats[-1].status == "stopped: estop", 30.0, "estop", processes)
    count = len(robot.trajectories)
    ros_probe.wait_for(lambda: len(robot.trajectories) >= count + 25, 20.0, "trajectories while stopped", processes)
    held = robot.trajectories[count + 1 :]
    assert not any(moving(t) for t in held), "commands moved while the e-stop was latched"
    assert len({tuple(t.points[0].positions) for t in held}) == 1  # one hold position
    assert robot.stats[-1].status == "stopped: estop"

    assert robot.rearm.wait_for_service(timeout_sec=10.0)
    future = robot.rearm.call_async(Trigger.Request())
    ros_probe.wait_for(future.done, 10.0, "rearm response", processes)
    assert future.result().success, future.result().message
    count = len(robot.trajectories)
    ros_probe.wait_for(
        lambda: any(moving(t) for t in robot.trajectories[count:]), 60.0, "motion after rearm", processes
    )
    counters = {d.reason: d.count for d in robot.stats[-1].interventions}
    assert counters.get("stops_estop", 0) >= 1


def test_ee_dry_run_publishes_chunks_but_no_twists_until_enabled(ros_probe, ee_stack):
    processes, robot = ee_stack
    ros_probe.wait_for(lambda: len(robot.chunks) >= 3, STARTUP_S, "three action chunks", processes)
    assert robot.twists == [] and robot.gripper == []
    assert not robot.stats[-1].actions_enabled
    chunk = robot.chunks[-1]
    assert chunk.action_space == ActionChunk.SPACE_EE_POSE and chunk.base_frame == "panda_link0"
    actions = np.array(chunk.actions).reshape(chunk.num_steps, chunk.num_dims)
    # Untrained but normalised around the state: targets stay near the published pose.
    assert np.allclose(actions[:, :3], EE_HOME, atol=0.5)

    assert robot.params.wait_for_services(timeout_sec=10.0)
    future = robot.params.set_parameters([Parameter("enable_actions", value=True)])
    ros_probe.wait_for(future.done, 10.0, "enable_actions set", processes)
    assert future.result().results[0].successful
    ros_probe.wait_for(lambda: len(robot.twists) >= 30, 60.0, "twists after enabling", processes)
    sources = {stamp_to_ns(c.header.stamp) for c in robot.chunks}
    moving_twists = [
        t for t in robot.twists if any(abs(v) > 0 for v in (t.twist.linear.x, t.twist.linear.y, t.twist.linear.z))
    ]
    assert moving_twists
    for twist in moving_twists:
        assert twist.header.frame_id == "panda_link0"
        assert stamp_to_ns(twist.header.stamp) in sources
        assert stamp_to_ns(twist.header.stamp) in robot.image_stamps
        speed = np.abs([twist.twist.linear.x, twist.twist.linear.y, twist.twist.linear.z])
        assert np.all(speed <= 0.25 + 1e-9)  # limits.ee.linear_velocity_max


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({}, "policy.checkpoint is empty"),
        ({"limits.joint.velocity_max": [1.0, 1.0]}, "limits.joint.velocity_max has 2 values but joint_names has 7"),
        ({"action_space": "ee_pose"}, "action_space='joint_position' but this node runs action_space='ee_pose'"),
        ({"policy.dtype": "float8"}, "policy.dtype"),
    ],
)
def test_invalid_policy_parameters_are_refused_at_startup_naming_them(tmp_path, overrides, needle):
    write_checkpoint(tmp_path / "policy", "joint_position")
    params = {} if not overrides else {"policy.checkpoint": str(tmp_path / "policy"), **overrides}
    graph = node_graph(config="cpu.yaml", use_replay=False, policy=True, captions=False)
    processes = GraphProcesses(graph, namespace="badpolicy", parameters={"policy_node": params}, log_dir=tmp_path)
    processes.start()
    try:
        process = processes.processes["vla_stack"]
        process.wait(timeout=120)
    finally:
        processes.stop()
    output = (tmp_path / "vla_stack.log").read_text()
    assert process.returncode == 2, output
    assert "FATAL" in output and needle in output and "Traceback" not in output, output


def test_sigterm_commands_a_stop_first_then_exits_cleanly(ros_probe, tmp_path_factory):
    processes, robot = start_stack(ros_probe, tmp_path_factory, "term", "joint_position", enable_actions=True)
    try:
        ros_probe.wait_for(
            lambda: sum(moving(t) for t in robot.trajectories) >= 5, STARTUP_S, "moving trajectories", processes
        )
        stack = processes.processes["vla_stack"]
        stack.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30.0
        while stack.poll() is None and time.monotonic() < deadline:
            ros_probe.executor.spin_once(timeout_sec=0.05)
        for _ in range(20):  # the last messages may still be in flight
            ros_probe.executor.spin_once(timeout_sec=0.05)
        assert stack.returncode == 0
        last = robot.trajectories[-1]
        assert len(last.points) == 1 and not any(last.points[0].velocities)  # a hold, not a plan
        previous = robot.trajectories[-2]
        assert np.allclose(last.points[0].positions, previous.points[0].positions, atol=0.05)
        log = (processes.log_dir / "vla_stack.log").read_text()
        assert "shutdown: commanded a stop" in log
    finally:
        stop_stack(processes, robot)
