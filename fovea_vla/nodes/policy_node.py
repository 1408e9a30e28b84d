"""policy_node: foveated tokens + robot state + instruction in; action chunks and controller commands out.

Runs in the process that owns the tokens (see ``vla_stack``): the action head reads the newest
:class:`TokenFrame` at ``policy.rate_hz``, the chunk executor runs at ``control_rate_hz`` on its
own timer, and every command passes the safety layer. A managed (lifecycle) node: see
:class:`PolicyNode` for what each transition does.

Inputs: ``joint_states`` (sensor_msgs/JointState), ``ee_pose`` (geometry_msgs/PoseStamped, for
``action_space: ee_pose``), ``estop`` (std_msgs/Bool, latches), the instruction from fovea_node
(``instruction`` topic / ``set_instruction`` service). Outputs, each switchable:
``action_chunk`` (fovea_vla_msgs/ActionChunk), ``cmd_twist`` (geometry_msgs/TwistStamped, MoveIt
Servo), ``joint_trajectory`` (trajectory_msgs/JointTrajectory, joint_trajectory_controller),
``command`` (std_msgs/Float64MultiArray, forward command controllers), ``gripper_command``
(std_msgs/Float64), ``policy_stats``. Service ``rearm`` (std_srvs/Trigger) releases the e-stop.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from builtin_interfaces.msg import Duration
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseStamped, TwistStamped
from sensor_msgs.msg import JointState
from std_msgs.msg import Bool, Float64, Float64MultiArray, Header, MultiArrayDimension
from std_srvs.srv import Trigger
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from fovea_vla.bringup import node_values, resolve_package_path
from fovea_vla.core.diagnostics import DiagnosticsMonitor, StageSample
from fovea_vla.core.policy.checkpoint import ACTION_SPACES, CheckpointError, load_policy
from fovea_vla.core.policy.executor import Chunk, ChunkExecutor, Command, ExecutorConfig
from fovea_vla.core.policy.observation import LatestTokens
from fovea_vla.core.policy.runner import ActionHeadRunner, RunnerConfig
from fovea_vla.core.policy.safety import SafetyLimits, SafetyMonitor, WatchdogConfig
from fovea_vla.core.policy.spaces import (
    PANDA_JOINTS,
    angular_velocity_from_rpy_rates,
    quaternion_to_rpy,
    space_names,
    unwrap_angles,
)
from fovea_vla.core.policy.text import TextEncoderConfig, load_text_encoder
from fovea_vla.core.stats import DropCounter, LatencyTracker, RateMeter
from fovea_vla.nodes import qos
from fovea_vla.nodes.diagnostics import (
    diagnostic_array,
    diagnostics_config,
    diagnostics_params,
)
from fovea_vla.nodes.lifecycle import AUTOSTART, ManagedNode, lifecycle_statuses
from fovea_vla.nodes.messages import MessageError, joint_positions, ns_to_stamp, stage_latencies, stamp_to_ns
from fovea_vla.nodes.params import ConfigError, ParamSpec
from fovea_vla_msgs.msg import ActionChunk, DropCount, PolicyStats

# Franka Emika Panda limits (datasheet), the defaults for the default joint names.
PANDA_POSITION_MIN = (-2.8973, -1.7628, -2.8973, -3.0718, -2.8973, -0.0175, -2.8973)
PANDA_POSITION_MAX = (2.8973, 1.7628, 2.8973, -0.0698, 2.8973, 3.7525, 2.8973)
PANDA_VELOCITY_MAX = (2.175, 2.175, 2.175, 2.175, 2.61, 2.61, 2.61)
PANDA_ACCELERATION_MAX = (15.0, 7.5, 10.0, 12.5, 15.0, 20.0, 20.0)

# The stages policy_node reports on /diagnostics.
DIAGNOSED_STAGES = ("policy", "executor")

PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec(
        "policy.checkpoint",
        "",
        "Policy checkpoint folder (config.json + model.safetensors; a path or package://<package>/<path>); required.",
    ),
    ParamSpec(
        "policy.rate_hz",
        10.0,
        "Most action-head runs per second; it runs on each new frame's tokens, at most this often [Hz].",
        range=(0.1, 1000.0),
    ),
    ParamSpec("policy.device", "auto", "Torch device of the action head: auto, cpu or cuda[:N]."),
    ParamSpec(
        "policy.dtype",
        "auto",
        "Action-head precision; auto = float16 on CUDA, float32 on CPU.",
        choices=("auto", "float32", "float16", "bfloat16"),
    ),
    ParamSpec("policy.cuda_graphs", True, "Replay a CUDA graph per token count (CUDA only)."),
    ParamSpec(
        "text_encoder.path",
        "",
        "Sentence-embedding model folder, or a .json table of precomputed instruction embeddings "
        "(`fovea-vla policy embed`); empty = the bundled all-MiniLM-L6-v2.",
    ),
    ParamSpec("text_encoder.device", "cpu", "Torch device of the instruction embedding."),
    AUTOSTART,
    ParamSpec(
        "action_space",
        "joint_position",
        "What the actions are; must match the checkpoint.",
        choices=ACTION_SPACES,
    ),
    ParamSpec(
        "joint_names",
        PANDA_JOINTS,
        "Arm joints, in the checkpoint's order (joint_position state and actions; trajectory joint names).",
        variable_length=True,
    ),
    ParamSpec("base_frame", "panda_link0", "Frame of end-effector poses and twists."),
    ParamSpec("gripper.enabled", True, "The last action/state dim is the gripper (0 open, 1 closed)."),
    ParamSpec("gripper.joint", "panda_finger_joint1", "Gripper joint in joint_states."),
    ParamSpec("gripper.open_position", 0.04, "Gripper joint position when open [m or rad].", range=(-10.0, 10.0)),
    ParamSpec("gripper.closed_position", 0.0, "Gripper joint position when closed [m or rad].", range=(-10.0, 10.0)),
    ParamSpec("control_rate_hz", 50.0, "Chunk executor rate: one command per tick [Hz].", range=(1.0, 1000.0)),
    ParamSpec(
        "executor.max_blend_s",
        0.5,
        "Longest splice from the running command onto a new chunk [s].",
        range=(0.0, 10.0),
    ),
    ParamSpec(
        "executor.min_blend_s",
        0.04,
        "Shortest splice onto a new chunk [s].",
        range=(0.0, 10.0),
    ),
    ParamSpec(
        "enable_actions",
        False,
        "Publish commands to controllers; false = dry run (action_chunk and stats only).",
        read_only=False,
    ),
    ParamSpec(
        "max_observation_age_ms",
        250.0,
        "Stop (zero twist / hold) when the newest frame or state is older than this [ms, capture stamp].",
        range=(1.0, 60000.0),
    ),
    ParamSpec(
        "limits.joint.position_min",
        PANDA_POSITION_MIN,
        "Lowest joint targets, one per joint [rad or m].",
        variable_length=True,
    ),
    ParamSpec(
        "limits.joint.position_max",
        PANDA_POSITION_MAX,
        "Highest joint targets, one per joint [rad or m].",
        variable_length=True,
    ),
    ParamSpec(
        "limits.joint.velocity_max",
        PANDA_VELOCITY_MAX,
        "Joint speed limits, one per joint [rad/s or m/s].",
        variable_length=True,
    ),
    ParamSpec(
        "limits.joint.acceleration_max",
        PANDA_ACCELERATION_MAX,
        "Joint acceleration limits, one per joint [rad/s^2 or m/s^2].",
        variable_length=True,
    ),
    ParamSpec("limits.ee.workspace_min", (0.2, -0.5, 0.02), "Workspace box lower corner x y z [m] in base_frame."),
    ParamSpec("limits.ee.workspace_max", (0.8, 0.5, 0.7), "Workspace box upper corner x y z [m] in base_frame."),
    ParamSpec("limits.ee.linear_velocity_max", 0.25, "End-effector speed limit per axis [m/s].", range=(1e-6, 100.0)),
    ParamSpec("limits.ee.angular_velocity_max", 1.0, "Roll/pitch/yaw rate limit [rad/s].", range=(1e-6, 100.0)),
    ParamSpec(
        "limits.ee.linear_acceleration_max",
        2.0,
        "End-effector acceleration limit per axis [m/s^2].",
        range=(1e-6, 1000.0),
    ),
    ParamSpec(
        "limits.ee.angular_acceleration_max",
        8.0,
        "Roll/pitch/yaw acceleration limit [rad/s^2].",
        range=(1e-6, 1000.0),
    ),
    ParamSpec("limits.gripper.velocity_max", 2.0, "Gripper command rate limit [1/s].", range=(1e-6, 1000.0)),
    ParamSpec(
        "limits.gripper.acceleration_max", 40.0, "Gripper command acceleration limit [1/s^2].", range=(1e-6, 1e6)
    ),
    ParamSpec("outputs.action_chunk", True, "Publish every chunk on `action_chunk`."),
    ParamSpec("outputs.cmd_twist", True, "Publish `cmd_twist` (TwistStamped) when action_space is ee_pose."),
    ParamSpec(
        "outputs.joint_trajectory",
        True,
        "Publish `joint_trajectory` (JointTrajectory) when action_space is joint_position.",
    ),
    ParamSpec(
        "outputs.command",
        False,
        "Publish `command` (Float64MultiArray joint positions) when action_space is joint_position.",
    ),
    ParamSpec("outputs.gripper_command", True, "Publish `gripper_command` (Float64 joint position)."),
    ParamSpec(
        "outputs.trajectory_points",
        5,
        "Points per joint_trajectory message: the next control ticks of the safe command.",
        range=(1, 100),
    ),
    ParamSpec(
        "outputs.trajectory_velocities",
        False,
        "Fill the joint_trajectory points' velocities. joint_trajectory_controller (Jazzy) refuses trajectories "
        "ending with a nonzero velocity unless allow_nonzero_velocity_at_trajectory_end is true; without "
        "velocities it interpolates the closely spaced positions.",
    ),
    ParamSpec(
        "outputs.twist_feedback_gain",
        2.0,
        "cmd_twist adds gain * (commanded - measured ee pose) to the commanded velocity, within the limits, so "
        "the arm tracks the absolute targets a twist alone leaves open loop [1/s]; 0 = off.",
        range=(0.0, 50.0),
    ),
    ParamSpec(
        "outputs.twist_stamp",
        "source",
        "cmd_twist header stamp: the source frame's capture stamp, or the command time (MoveIt Servo "
        "drops twists older than its incoming_command_timeout).",
        choices=("source", "now"),
    ),
    ParamSpec(
        "state_qos.reliability", "best_effort", "Reliability of joint_states and ee_pose.", choices=qos.RELIABILITIES
    ),
)
PARAMS += diagnostics_params(DIAGNOSED_STAGES)


@dataclass(frozen=True)
class _Layout:
    """How the node's robot maps onto the checkpoint's action/state dims."""

    action_space: str
    names: tuple[str, ...]
    joint_names: tuple[str, ...]
    gripper: bool

    @property
    def arm_dims(self) -> int:
        return len(self.names) - int(self.gripper)


def safety_limits(values: dict, layout: _Layout) -> SafetyLimits:
    """Per-dim limits from the parameters, in the layout's dim order.

    Raises:
        ConfigError: arrays whose length does not match the joints (named).
    """
    if layout.action_space == "joint_position":
        n = len(layout.joint_names)
        arrays = {}
        for key in ("position_min", "position_max", "velocity_max", "acceleration_max"):
            name = f"limits.joint.{key}"
            value = tuple(values[name])
            if len(value) != n:
                raise ConfigError(f"{name} has {len(value)} values but joint_names has {n}")
            arrays[key] = value
        lo, hi, vel, acc = (
            arrays["position_min"],
            arrays["position_max"],
            arrays["velocity_max"],
            arrays["acceleration_max"],
        )
    else:
        inf = math.inf
        lo = (*values["limits.ee.workspace_min"], -inf, -inf, -inf)
        hi = (*values["limits.ee.workspace_max"], inf, inf, inf)
        vel = (values["limits.ee.linear_velocity_max"],) * 3 + (values["limits.ee.angular_velocity_max"],) * 3
        acc = (values["limits.ee.linear_acceleration_max"],) * 3 + (values["limits.ee.angular_acceleration_max"],) * 3
    if layout.gripper:
        lo, hi = (*lo, 0.0), (*hi, 1.0)
        vel = (*vel, values["limits.gripper.velocity_max"])
        acc = (*acc, values["limits.gripper.acceleration_max"])
    try:
        return SafetyLimits(position_min=lo, position_max=hi, velocity_max=vel, acceleration_max=acc)
    except ValueError as exc:
        prefix = "limits.joint" if layout.action_space == "joint_position" else "limits.ee"
        raise ConfigError(f"{prefix}: {exc}") from exc


def safety_limits_from_files(config: str, spec) -> SafetyLimits:
    """The limits policy_node would enforce for checkpoint ``spec`` with parameter file ``config``
    (applied on top of fovea_vla.yaml), for in-process evaluation.

    Raises:
        ConfigError: as :func:`safety_limits`.
    """
    values = node_values(config, PARAMS, PolicyNode.NODE_NAME)
    gripper = spec.action_names[-1] == "gripper"
    joints = spec.action_names[:-1] if gripper else spec.action_names
    layout = _Layout(spec.action_space, spec.action_names, tuple(joints), gripper)
    return safety_limits(values, layout)


def policy_rate_from_files(config: str) -> float:
    """``policy.rate_hz`` policy_node would use with parameter file ``config`` [chunks per second]."""
    return float(node_values(config, PARAMS, PolicyNode.NODE_NAME)["policy.rate_hz"])


def executor_config_from_files(config: str) -> ExecutorConfig:
    """The executor settings policy_node would use with parameter file ``config``."""
    values = node_values(config, PARAMS, PolicyNode.NODE_NAME)
    return ExecutorConfig(
        control_rate_hz=values["control_rate_hz"],
        max_blend_s=values["executor.max_blend_s"],
        min_blend_s=values["executor.min_blend_s"],
    )


class EncoderInfo(NamedTuple):
    """What the running encoder produces: policy_node checks its checkpoint against it at configure.

    Attributes:
        architecture: the encoder's architecture (``vit_base_patch16``), None for a custom one.
        token_dim: the token width T.
        num_tokens: the token budget N; the head is warmed up (CUDA graph captured) for it.
    """

    architecture: str | None
    token_dim: int
    num_tokens: int


class PolicyNode(ManagedNode):
    """Action head + chunk executor + safety as a managed (lifecycle) ROS node, fed tokens in-process.

    Lifecycle (see :mod:`fovea_vla.nodes.lifecycle`): **configure** asks ``encoder()`` what the
    tokens are, reads and checks the parameters, loads the checkpoint and the instruction embedding,
    warms the head up (CUDA graph), and creates the publishers (lifecycle publishers), the ``rearm``
    service and the ``joint_states`` / ``ee_pose`` / ``estop`` subscriptions (an e-stop latches in
    every configured state); **activate** starts the policy thread and the control and stats timers
    (the first commands start from the measured state); **deactivate** commands a stop at once
    (zero twist / one-point hold trajectory, as at shutdown), then stops the thread and timers:
    no command follows. The executor, the e-stop latch and the instruction are kept.
    **cleanup** releases the head, its CUDA graphs and the text encoder; the e-stop latch outlives
    it (only ``rearm`` releases it).

    Args:
        tokens: the slot fovea_node publishes its tokens into.
        encoder: called at configure: the running encoder's :class:`EncoderInfo`; raises
            ``ConfigError`` when there is none yet (fovea_node not configured).
        kwargs: passed to ``rclpy.lifecycle.LifecycleNode``.
    """

    NODE_NAME = "policy_node"

    def __init__(self, tokens: LatestTokens, encoder: Callable[[], EncoderInfo], **kwargs):
        super().__init__(PARAMS, DIAGNOSED_STAGES, **kwargs)
        self.tokens = tokens
        self._encoder = encoder
        self.instruction = ""
        self.text = None
        self.runner: ActionHeadRunner | None = None
        self.monitor: SafetyMonitor | None = None
        # The executor and the monitor are touched by the policy thread, the control tick and the
        # input callbacks.
        self._lock = threading.Lock()
        self._active = False  # commands go out only while active
        self._stopping = threading.Event()
        self._policy_thread: threading.Thread | None = None
        self._clock_origin_ns = self.get_clock().now().nanoseconds
        # /diagnostics in every state: a node that is not active says so.
        self.pub_diagnostics = self.create_publisher(DiagnosticArray, "/diagnostics", qos.outputs())
        rate_hz = self.get_parameter("diagnostics.rate_hz").value  # read-only, range-checked when declared
        if isinstance(rate_hz, int | float) and rate_hz > 0:
            self.create_timer(1.0 / rate_hz, self._publish_diagnostics)
        self.add_on_set_parameters_callback(self._on_set_parameters)

    # -- lifecycle -------------------------------------------------------------------------
    def _configure(self) -> None:
        encoder = self._encoder()
        try:
            self.params = p = self.read_parameters()
            self._load(encoder.architecture, encoder.token_dim)
            self.diagnostics = DiagnosticsMonitor(diagnostics_config(p, DIAGNOSED_STAGES))
            # Capture the head's CUDA graph for the encoder's budget now, not in the policy thread.
            self.runner.warm_up(encoder.num_tokens)
        except (ValueError, RuntimeError, OSError) as exc:
            raise ConfigError(f"policy_node: invalid configuration: {exc}") from exc
        self.joint_positions: dict[str, float] = {}
        self.ee_state: np.ndarray | None = None
        self.last_frame_ns = 0
        self.last_chunk_frame_ns = 0
        self.chunks_predicted = 0
        self.commands_published = 0
        self.chunk_latency_ms = float("nan")
        self.latency = LatencyTracker()
        self.policy_rate = RateMeter()
        self.control_rate = RateMeter()
        self._started = False
        self._stop_logged: str | None = None
        self._last_command: Command | None = None
        self._reanchor = False  # set when commands are switched on: start from the measured state
        self.policy_errors = 0
        self.input_drops = DropCounter()  # refused joint_states / ee_pose messages, "<topic>_<reason>"
        self._stats_header = Header()  # the newest chunk's source stamp and camera frame
        self._last_tick_s: float | None = None

        state_qos = qos.sensor(p["state_qos.reliability"], 5)
        self.configured(self.create_subscription(JointState, "joint_states", self._on_joint_states, state_qos))
        if self.layout.action_space == "ee_pose":
            self.configured(self.create_subscription(PoseStamped, "ee_pose", self._on_ee_pose, state_qos))
        self.configured(self.create_subscription(Bool, "estop", self._on_estop, qos.outputs()))
        self.configured(self.create_service(Trigger, "rearm", self._on_rearm))
        out = qos.outputs()
        publisher = self.create_lifecycle_publisher
        self.pub_chunk = self.configured(publisher(ActionChunk, "action_chunk", out))
        self.pub_stats = self.configured(publisher(PolicyStats, "policy_stats", out))
        self.pub_twist = self.pub_trajectory = self.pub_command = self.pub_gripper = None
        joint_space = self.layout.action_space == "joint_position"
        if p["outputs.cmd_twist"] and not joint_space:
            self.pub_twist = self.configured(publisher(TwistStamped, "cmd_twist", out))
        if p["outputs.joint_trajectory"] and joint_space:
            self.pub_trajectory = self.configured(publisher(JointTrajectory, "joint_trajectory", out))
        if p["outputs.command"] and joint_space:
            self.pub_command = self.configured(publisher(Float64MultiArray, "command", out))
        if p["outputs.gripper_command"] and self.layout.gripper:
            self.pub_gripper = self.configured(publisher(Float64, "gripper_command", out))
        self._trajectory_points = p["outputs.trajectory_points"] if self.pub_trajectory is not None else 0
        active = [
            pub.topic_name for pub in (self.pub_twist, self.pub_trajectory, self.pub_command, self.pub_gripper) if pub
        ]
        self.get_logger().info(
            f"commands on {', '.join(active) or 'nothing'}; "
            + ("actions ENABLED" if p["enable_actions"] else "dry run (enable_actions=false): no commands are sent")
        )
        if self.instruction:
            self.set_instruction(self.instruction)  # embedded now, not in the first policy step

    def _activate(self) -> None:
        # A command held or stopped while inactive resumes from where the arm is now.
        self._reanchor = self._started
        self._active = True
        self.activated(self.create_timer(1.0 / self.params["control_rate_hz"], self._control_tick))
        # Health even while no chunk comes (a dead camera): stats at 2 Hz as well as per chunk.
        self.activated(self.create_timer(0.5, self._publish_stats))
        # Inference on its own thread, woken by new tokens: a slow chunk never delays a control tick,
        # and the executor only runs short callbacks (it busy-polls ones still running).
        self._stopping = threading.Event()
        self._policy_thread = threading.Thread(
            target=self._policy_loop, args=(self._stopping,), name="policy", daemon=True
        )
        self._policy_thread.start()

    def _deactivate(self, reason: str) -> None:
        """Stop commanding now: the stop command goes out first (publishers are still on), then the
        policy thread stops (it finishes the step in hand); the timers go with the transition. The
        control tick, the e-stop and the lifecycle services share the node's default (mutually
        exclusive) callback group: no tick runs during a transition."""
        if self._active:
            self._active = False  # no control tick publishes after the stop
            self.stop_commands(reason)
        self._stopping.set()
        if self._policy_thread is not None:
            self._policy_thread.join(timeout=5.0)
            self._policy_thread = None

    def _release(self) -> None:
        self.runner = None
        self.text = None

    # -- configuration ---------------------------------------------------------------------
    def _load(self, encoder_architecture: str | None, token_dim: int) -> None:
        """The checkpoint, the instruction embedding, the runner, the watchdog and the executor from
        the parameters, checked against the running encoder."""
        p = self.params
        if not p["policy.checkpoint"]:
            raise ConfigError("policy.checkpoint is empty: set it to a policy checkpoint folder")
        if p["executor.min_blend_s"] > p["executor.max_blend_s"]:
            raise ConfigError(
                f"executor.min_blend_s={p['executor.min_blend_s']} exceeds "
                f"executor.max_blend_s={p['executor.max_blend_s']}"
            )
        if p["gripper.open_position"] == p["gripper.closed_position"]:
            raise ConfigError("gripper.open_position equals gripper.closed_position")
        self.layout = _Layout(
            action_space=p["action_space"],
            names=space_names(p["action_space"], p["joint_names"], p["gripper.enabled"]),
            joint_names=tuple(p["joint_names"]),
            gripper=p["gripper.enabled"],
        )
        try:
            model, self.spec = load_policy(resolve_package_path(p["policy.checkpoint"]))
            self.text = load_text_encoder(
                TextEncoderConfig(path=p["text_encoder.path"], device=p["text_encoder.device"])
            )
            self.spec.check_compatible(
                encoder_architecture=encoder_architecture,
                token_dim=token_dim,
                text_encoder=self.text.name,
                instruction_dim=self.text.dim,
                action_space=self.layout.action_space,
                action_names=self.layout.names,
                state_names=self.layout.names,
            )
        except CheckpointError as exc:
            raise ConfigError(f"policy.checkpoint={p['policy.checkpoint']!r}: {exc}") from exc
        if not self.spec.trained:
            self.get_logger().warning(
                "policy.checkpoint holds an UNTRAINED (random) action head: use it for wiring tests only"
            )
        self.runner = ActionHeadRunner(
            model, RunnerConfig(device=p["policy.device"], dtype=p["policy.dtype"], cuda_graphs=p["policy.cuda_graphs"])
        )
        watchdog = WatchdogConfig(max_observation_age_s=p["max_observation_age_ms"] * 1e-3)
        if self.monitor is None or self.monitor.cfg != watchdog:
            self.monitor = SafetyMonitor(watchdog)  # else kept: a latched e-stop outlives a cleanup
        self.chunk_executor = ChunkExecutor(
            ExecutorConfig(
                control_rate_hz=p["control_rate_hz"],
                max_blend_s=p["executor.max_blend_s"],
                min_blend_s=p["executor.min_blend_s"],
            ),
            safety_limits(p, self.layout),
            self.monitor,
        )
        self.get_logger().info(
            f"policy {self.policy_name}: {self.spec.head.chunk_size} x {self.spec.head.action_dim} actions every "
            f"{self.spec.step_s:.3f} s on {self.device_label}; "
            f"instruction embedding {self.text.name} ({self.text.dim}-d)"
        )

    @property
    def policy_name(self) -> str:
        return str(self.params["policy.checkpoint"]).rstrip("/").rsplit("/", 1)[-1]

    @property
    def device_label(self) -> str:
        dtype = str(self.runner.dtype).removeprefix("torch.")
        graphs = " (CUDA graphs)" if self.runner.cfg.cuda_graphs and self.runner.device.type == "cuda" else ""
        return f"{self.runner.device} {dtype}{graphs}"

    # -- time ------------------------------------------------------------------------------
    def _seconds(self, ns: int) -> float:
        """ROS time [ns] as seconds since the node started (float64 keeps microseconds)."""
        return (ns - self._clock_origin_ns) * 1e-9

    def _now_s(self) -> float:
        return self._seconds(self.get_clock().now().nanoseconds)

    def _parameters_changed(self, changes: dict[str, object]) -> None:
        if changes.get("enable_actions"):
            self._reanchor = True  # the dry run's command may be far from the arm
        for name, value in changes.items():
            log = self.get_logger().warning if name == "enable_actions" else self.get_logger().info
            log(f"parameter {name} -> {value!r}")

    def _publish_diagnostics(self) -> None:
        state = self.lifecycle_state
        if state != "active":
            hardware = self.device_label if self.runner is not None else ""
            statuses = lifecycle_statuses(state, DIAGNOSED_STAGES)
            stamp = self.get_clock().now().to_msg()
            self.pub_diagnostics.publish(diagnostic_array(statuses, self.get_fully_qualified_name(), hardware, stamp))
            return
        now = time.monotonic()
        now_ns = self.get_clock().now().nanoseconds
        with self._lock:
            counters = dict(self.chunk_executor.counters)
        interventions = sum(v for k, v in counters.items() if k.startswith(("clamped_", "stops_", "rejected_")))
        samples = [
            StageSample(
                name="policy",
                rate_hz=self.policy_rate.rate_hz(),
                latency_p99_ms=self.latency.percentile("head", 99),
                received=self.chunks_predicted,
                drops=self.policy_errors,
                age_s=(now_ns - self.last_frame_ns) * 1e-9 if self.last_frame_ns else None,
                backend=self.device_label,
                details={"policy": self.policy_name, "status": self._status()},
            ),
            StageSample(
                name="executor",
                rate_hz=self.control_rate.rate_hz(),
                latency_p99_ms=self.latency.percentile("executor", 99),
                received=self.commands_published,
                interventions=interventions,
                age_s=None if self._last_tick_s is None else now - self._last_tick_s,
                details={"actions_enabled": self.params["enable_actions"], **counters},
            ),
        ]
        statuses = self.diagnostics.update(samples, now)
        self.pub_diagnostics.publish(
            diagnostic_array(
                statuses, self.get_fully_qualified_name(), self.device_label, self.get_clock().now().to_msg()
            )
        )

    # -- inputs ----------------------------------------------------------------------------
    def set_instruction(self, text: str) -> None:
        """The instruction the policy follows (fovea_node forwards its topic and service), in any state."""
        encoder, latency = self.text, getattr(self, "latency", None)
        if encoder is not None and latency is not None:
            start = time.perf_counter()
            encoder.embed(text)  # embed now (cached), not inside the next policy step
            latency.add("text", (time.perf_counter() - start) * 1e3)
        self.instruction = text

    def _drop_input(self, topic: str, reason: str, detail: str) -> None:
        self.input_drops.add(f"{topic}_{reason}")
        self.get_logger().warning(f"{topic} ignored ({reason}): {detail}", throttle_duration_sec=5.0)

    def _state_stamp(self, topic: str, header: Header) -> int | None:
        """The message's capture stamp [ns] (now if unset), or None (counted) when it lies in the future."""
        now = self.get_clock().now().nanoseconds
        stamp = stamp_to_ns(header.stamp) or now
        limit_ms = self.params["max_observation_age_ms"]
        # The watchdog keeps the newest stamp: one from the future would hold it at "future_state" until then.
        if (stamp - now) * 1e-6 > limit_ms:
            self._drop_input(topic, "future_stamp", f"stamped {(stamp - now) * 1e-6:.0f} ms ahead (max {limit_ms:.0f})")
            return None
        return stamp

    def _on_joint_states(self, msg: JointState) -> None:
        try:
            positions = joint_positions(msg)
        except MessageError as exc:
            self._drop_input("joint_states", exc.reason, str(exc))
            return
        stamp = self._state_stamp("joint_states", msg.header)
        if stamp is None:
            return
        self.joint_positions.update(positions)
        # Only a message with every arm joint refreshes the arm state (a gripper-only one does not).
        if self.layout.action_space == "joint_position" and all(j in positions for j in self.layout.joint_names):
            self._state_observed(stamp)

    def _on_ee_pose(self, msg: PoseStamped) -> None:
        frame = self.params["base_frame"]
        if msg.header.frame_id and msg.header.frame_id != frame:
            self._drop_input("ee_pose", "wrong_frame", f"in {msg.header.frame_id!r}, expected base_frame {frame!r}")
            return
        o, q = msg.pose.position, msg.pose.orientation
        values = np.array([o.x, o.y, o.z, q.x, q.y, q.z, q.w], dtype=np.float64)
        if not np.isfinite(values).all():
            self._drop_input("ee_pose", "not_finite", f"pose {values.tolist()} has NaN or inf")
            return
        norm2 = sum(v * v for v in values[3:].tolist())  # Python floats: inf on overflow, without a warning
        if abs(norm2 - 1.0) > 0.01:  # tf2's tolerance for a denormalised quaternion
            self._drop_input("ee_pose", "bad_quaternion", f"orientation quaternion of squared norm {norm2:g}, not 1")
            return
        stamp = self._state_stamp("ee_pose", msg.header)
        if stamp is None:
            return
        self.ee_state = np.concatenate([values[:3], quaternion_to_rpy(*values[3:])])
        self._state_observed(stamp)

    def _state_observed(self, stamp_ns: int) -> None:
        with self._lock:
            self.monitor.observe("state", self._seconds(stamp_ns))

    def _state(self) -> np.ndarray | None:
        """(S,) the robot state in the checkpoint's order, or None while incomplete."""
        if self.layout.action_space == "joint_position":
            if not all(j in self.joint_positions for j in self.layout.joint_names):
                return None
            arm = np.array([self.joint_positions[j] for j in self.layout.joint_names])
        else:
            if self.ee_state is None:
                return None
            arm = self.ee_state
        if not self.layout.gripper:
            return arm
        joint = self.params["gripper.joint"]
        if joint not in self.joint_positions:
            return None
        opened, closed = self.params["gripper.open_position"], self.params["gripper.closed_position"]
        closure = (opened - self.joint_positions[joint]) / (opened - closed)
        return np.append(arm, np.clip(closure, 0.0, 1.0))

    def _on_estop(self, msg: Bool) -> None:
        with self._lock:
            self.monitor.estop(bool(msg.data), self._now_s())
        if msg.data:
            self.get_logger().error("E-STOP engaged: commands stopped until `rearm` is called")
            if self._active:
                self._control_tick()  # act now, not at the next tick

    def _on_rearm(self, request: Trigger.Request, response: Trigger.Response):
        with self._lock:
            success, still = self.monitor.rearm(self._now_s())
        if not success:
            response.success, response.message = False, f"not re-armed: {still}"
        else:
            response.success = True
            response.message = f"re-armed; still stopped: {still}" if still else "re-armed"
        self.get_logger().warning(f"rearm: {response.message}")
        return response

    # -- policy ----------------------------------------------------------------------------
    def _policy_loop(self, stopping: threading.Event) -> None:
        """Run the head on each new frame's tokens, at most ``policy.rate_hz`` times a second, until ``stopping``."""
        period_s = 1.0 / self.params["policy.rate_hz"]
        seen, next_s = 0, 0.0
        while not stopping.is_set():
            published = self.tokens.wait_for_new(seen, timeout_s=0.1)
            if published == seen:
                continue
            seen = published
            if stopping.wait(max(0.0, next_s - time.monotonic())):
                break
            next_s = time.monotonic() + period_s
            self._policy_step()

    def _policy_step(self) -> None:
        try:
            self._predict()
        except Exception as exc:  # one bad step must not take the process (and fovea_node) down
            self.policy_errors += 1
            self.get_logger().error(
                f"policy step failed ({type(exc).__name__}: {exc}); the executor runs out of chunk and holds",
                throttle_duration_sec=2.0,
            )

    def _predict(self) -> None:
        frame = self.tokens.latest()
        if frame is None or frame.stamp_ns == self.last_chunk_frame_ns:
            return
        if not self.instruction:
            self.get_logger().info("waiting for an instruction (topic `instruction`)", throttle_duration_sec=5.0)
            return
        state = self._state()
        if state is None:
            self.get_logger().info("waiting for the robot state (joint_states / ee_pose)", throttle_duration_sec=5.0)
            return
        if not self._started:
            with self._lock:
                self.chunk_executor.reset(state, self._now_s())
            self._started = True
        self.last_chunk_frame_ns = frame.stamp_ns
        embedding = self.text.embed(self.instruction)
        output = self.runner.predict(frame.tokens, frame.positions, embedding, state)
        actions = output.actions
        now_s = self._now_s()
        capture_s = self._seconds(frame.stamp_ns)
        with self._lock:
            self.monitor.observe("frame", capture_s)
            holding = self._last_command is not None and self._last_command.stopped is not None
            if holding and self.monitor.check(now_s) is None:
                # Resuming from a hold (after a stop, or with no chunk to follow): the arm may have been
                # moved meanwhile (by hand, a reset), so the next chunk starts from where it is. While a
                # stop persists the hold stays where the stop caught the command.
                self.chunk_executor.reset(state, now_s)
            if self.layout.action_space == "ee_pose":
                # Angles continue the running command (no 2 pi turn where roll/yaw cross +-pi).
                actions[:, 3:6] = unwrap_angles(actions[:, 3:6], self.chunk_executor.position[3:6])
            chunk = Chunk(
                actions=actions,
                start_s=capture_s + self.spec.step_s,
                step_s=self.spec.step_s,
                stamp_ns=frame.stamp_ns,
                capture_s=capture_s,
            )
            rejected = self.chunk_executor.add_chunk(chunk, now_s)
        if rejected:
            self.get_logger().warning(f"chunk rejected ({rejected})", throttle_duration_sec=2.0)
        self.chunks_predicted += 1
        self.chunk_latency_ms = (self.get_clock().now().nanoseconds - frame.stamp_ns) * 1e-6
        self.policy_rate.tick(time.monotonic())
        self.latency.add("head", output.timing_ms)
        if output.device_ms is not None:
            self.latency.add("head_gpu", output.device_ms)
        header = Header(stamp=ns_to_stamp(frame.stamp_ns), frame_id=frame.frame_id)
        self._stats_header = header
        if self.params["outputs.action_chunk"]:
            self.pub_chunk.publish(self._chunk_msg(actions, header, output.timing_ms, rejected))
        self._publish_stats()

    def _chunk_msg(self, actions: np.ndarray, header: Header, inference_ms: float, rejected: str | None) -> ActionChunk:
        step_ns = round(self.spec.step_s * 1e9)
        finite = np.isfinite(actions).all(axis=1)
        return ActionChunk(
            header=header,
            base_frame=self.params["base_frame"] if self.layout.action_space == "ee_pose" else "",
            start_offset=Duration(sec=step_ns // 1_000_000_000, nanosec=step_ns % 1_000_000_000),
            step_period=Duration(sec=step_ns // 1_000_000_000, nanosec=step_ns % 1_000_000_000),
            action_space=ActionChunk.SPACE_JOINT_POSITION
            if self.layout.action_space == "joint_position"
            else ActionChunk.SPACE_EE_POSE,
            num_steps=actions.shape[0],
            num_dims=actions.shape[1],
            dim_names=list(self.layout.names),
            actions=actions.astype(np.float32).ravel().tolist(),
            valid=(finite & (rejected is None)).tolist(),
            policy_name=self.policy_name,
            inference_ms=float(inference_ms),
        )

    # -- control ---------------------------------------------------------------------------
    def _control_tick(self) -> None:
        start = time.perf_counter()
        frame = self.tokens.latest()
        if not (self._started and self._active):
            return
        now_s = self._now_s()
        with self._lock:
            if frame is not None and frame.stamp_ns != self.last_frame_ns:
                self.last_frame_ns = frame.stamp_ns
                self.monitor.observe("frame", self._seconds(frame.stamp_ns))
            if self._reanchor and self.params["enable_actions"]:
                state = self._state()
                if state is not None:
                    self.chunk_executor.reset(state, now_s)
                    self._reanchor = False
            command = self.chunk_executor.step(now_s)
            # Points from the next tick on: a point for "now" would already be late on arrival, and
            # joint_trajectory_controller refuses a trajectory that ends in the past.
            points = (
                self.chunk_executor.preview(now_s + self.chunk_executor.cfg.period_s, self._trajectory_points)
                if self._trajectory_points
                else []
            )
            changed, self._stop_logged = command.stopped != self._stop_logged, command.stopped
        self._last_command = command
        self._last_tick_s = time.monotonic()
        self.control_rate.tick(self._last_tick_s)
        if changed and command.stopped == "no_chunk":
            self.get_logger().info("holding position: no chunk to follow")
        elif changed and command.stopped:
            self.get_logger().warning(f"commands stopped: {command.stopped}")
        elif changed:
            self.get_logger().info("following the policy's chunks")
        if command.clamped:
            self.get_logger().warning(
                f"safety limits clamped the command ({', '.join(sorted(command.clamped))}); "
                "counts in policy_stats.interventions",
                throttle_duration_sec=2.0,
            )
        if self.params["enable_actions"] and not self._reanchor:
            self._publish_command(command, points)
        self.latency.add("executor", (time.perf_counter() - start) * 1e3)

    def stop_commands(self, reason: str) -> None:
        """Command a stop now, from the last commanded position: a zero twist, a one-point hold
        trajectory, the same joint positions (deactivate, shutdown; a dry run sends nothing)."""
        if not (self._started and self.params["enable_actions"]):
            return
        with self._lock:
            # The last command sent, not the executor's position: the policy thread may have re-anchored
            # the executor to the measured state since (resuming from a hold), and the arm is where the
            # commands took it.
            last = self._last_command
            position = (last.position if last is not None else self.chunk_executor.position).copy()
            hold_s = self._now_s() + self.chunk_executor.cfg.period_s
        zeros = np.zeros_like(position)
        stamp_ns = self._last_command.stamp_ns if self._last_command is not None else 0
        hold = Command(hold_s, position, zeros, zeros.copy(), stamp_ns, reason, frozenset())
        self._publish_command(hold, [hold] if self._trajectory_points else [])
        self.get_logger().warning(f"{reason}: commanded a stop (hold at the last commanded position)")

    def _publish_command(self, command: Command, points: list[Command]) -> None:
        now_ns = self.get_clock().now().nanoseconds
        stamp_ns = command.stamp_ns or now_ns
        arm = self.layout.arm_dims
        if self.pub_twist is not None:
            twist = TwistStamped()
            twist_stamp = stamp_ns if self.params["outputs.twist_stamp"] == "source" else now_ns
            twist.header = Header(stamp=ns_to_stamp(twist_stamp), frame_id=self.params["base_frame"])
            if not command.stopped:
                v = self._twist_velocity(command)
                omega = angular_velocity_from_rpy_rates(command.position[3:6], v[3:6])
                twist.twist.linear.x, twist.twist.linear.y, twist.twist.linear.z = (float(x) for x in v[:3])
                twist.twist.angular.x, twist.twist.angular.y, twist.twist.angular.z = (float(x) for x in omega)
            self.pub_twist.publish(twist)
        if self.pub_trajectory is not None:
            trajectory = JointTrajectory(
                header=Header(stamp=ns_to_stamp(stamp_ns)), joint_names=list(self.layout.joint_names)
            )
            origin_s = self._seconds(stamp_ns)
            for item in points:
                offset_ns = max(0, round((item.time_s - origin_s) * 1e9))
                trajectory.points.append(
                    JointTrajectoryPoint(
                        positions=[float(x) for x in item.position[:arm]],
                        velocities=(
                            ([0.0] * arm if item.stopped else [float(x) for x in item.velocity[:arm]])
                            if self.params["outputs.trajectory_velocities"]
                            else []
                        ),
                        time_from_start=Duration(sec=offset_ns // 1_000_000_000, nanosec=offset_ns % 1_000_000_000),
                    )
                )
            self.pub_trajectory.publish(trajectory)
        if self.pub_command is not None:
            message = Float64MultiArray(data=[float(x) for x in command.position[:arm]])
            message.layout.dim = [MultiArrayDimension(label="joints", size=arm, stride=arm)]
            self.pub_command.publish(message)
        if self.pub_gripper is not None:
            opened, closed = self.params["gripper.open_position"], self.params["gripper.closed_position"]
            self.pub_gripper.publish(Float64(data=float(opened + command.position[-1] * (closed - opened))))
        self.commands_published += 1

    def _twist_velocity(self, command: Command) -> np.ndarray:
        """(6,) x y z and roll/pitch/yaw rates for the twist: the command's velocity plus a
        proportional pull of the measured pose toward the command, within the velocity limits.

        A twist is open loop (Servo integrates it; a sampled or slowed twist leaves the arm off the
        plan), so without the pull the arm would drift from the absolute targets the chunks hold.
        """
        velocity = command.velocity[:6].copy()
        gain = self.params["outputs.twist_feedback_gain"]
        if gain > 0 and self.ee_state is not None:
            error = command.position[:6] - self.ee_state
            error[3:6] = (error[3:6] + np.pi) % (2 * np.pi) - np.pi
            limit = np.asarray(self.chunk_executor.limits.velocity_max[:6])
            velocity = np.clip(velocity + gain * error, -limit, limit)
        return velocity

    def _publish_stats(self) -> None:
        self.pub_stats.publish(self._stats(self._stats_header))

    def _status(self) -> str:
        """``waiting`` (no command yet), ``stopped: <reason>`` or ``running``."""
        command = self._last_command
        if command is None:
            return "waiting"
        return f"stopped: {command.stopped}" if command.stopped else "running"

    def _stats(self, header: Header) -> PolicyStats:
        status = self._status()
        now_ns = self.get_clock().now().nanoseconds
        counters = dict(self.chunk_executor.counters)
        if self.policy_errors:
            counters["policy_errors"] = self.policy_errors
        counters.update(self.input_drops.as_dict())
        return PolicyStats(
            header=header,
            actions_enabled=bool(self.params["enable_actions"]),
            status=status,
            action_space=self.layout.action_space,
            chunks_predicted=self.chunks_predicted,
            commands_published=self.commands_published,
            policy_rate_hz=float(self.policy_rate.rate_hz()),
            control_rate_hz=float(self.control_rate.rate_hz()),
            chunk_latency_ms=float(self.chunk_latency_ms),
            observation_age_ms=float((now_ns - self.last_frame_ns) * 1e-6) if self.last_frame_ns else float("nan"),
            stages=stage_latencies(self.latency),
            interventions=[DropCount(reason=k, count=int(v)) for k, v in sorted(counters.items())],
            policy_name=self.policy_name,
            device=self.device_label,
        )
