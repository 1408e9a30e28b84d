"""sim_bridge: the PyBullet tabletop task as a robot on ROS.

Publishes what a real cell would: ``image`` + ``camera_info`` (the fixed camera), ``joint_states``
(arm and finger joints) and ``ee_pose`` (the tool frame in ``base_frame``), and executes
``cmd_twist`` (geometry_msgs/TwistStamped, integrated into the end-effector target: what MoveIt
Servo would do) and ``gripper_command`` (std_msgs/Float64, the finger joint position). The
simulation advances in real time at ``control_hz``.

Episodes run back to back from ``seed`` on: an episode starts (the simulation steps) once its
instruction went to fovea_node's ``set_instruction`` service, and between episodes it stops publishing for
``reset_pause_s`` so the policy's watchdog stops the commands and the next episode starts from the
new pose. Each finished episode is reported on ``sim/episode`` (std_msgs/String, JSON: seed,
instruction, success, steps, time_to_success_s).
"""

from __future__ import annotations

import json
import math
import sys
import time

import numpy as np
from geometry_msgs.msg import PoseStamped, TwistStamped
from rclpy.node import Node
from sensor_msgs.msg import CameraInfo, Image, JointState
from std_msgs.msg import Float64, Header, String

from fovea_vla.core.policy.spaces import rpy_rates_from_angular_velocity, rpy_to_quaternion
from fovea_vla.nodes import qos
from fovea_vla.nodes.camera_replay import camera_info
from fovea_vla.nodes.messages import image_msg, ns_to_stamp
from fovea_vla.nodes.params import ParamSpec, declare_all
from fovea_vla.nodes.runner import run_node
from fovea_vla_msgs.srv import SetInstruction

PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec("seed", 1000, "Seed of the first episode; each next episode adds 1.", range=(0, 2**31 - 1)),
    ParamSpec("episodes", 0, "Episodes to run; 0 = until stopped.", range=(0, 1_000_000)),
    ParamSpec("control_hz", 10.0, "Simulation steps per second (real time).", range=(1.0, 240.0)),
    ParamSpec("max_steps", 150, "Steps before an episode counts as failed.", range=(1, 100_000)),
    ParamSpec("image_width", 640, "Camera image width [px].", range=(16, 4096)),
    ParamSpec("image_height", 480, "Camera image height [px].", range=(16, 4096)),
    ParamSpec("fov_deg", 60.0, "Camera horizontal field of view [deg].", range=(1.0, 179.0)),
    ParamSpec("base_frame", "panda_link0", "Frame of ee_pose and of incoming twists."),
    ParamSpec("camera_frame", "sim_camera_optical_frame", "frame_id of the camera topics."),
    ParamSpec(
        "reset_pause_s",
        1.0,
        "Silence between episodes [s]: longer than the policy's max_observation_age_ms, so it stops.",
        range=(0.0, 60.0),
    ),
    ParamSpec("twist_timeout_s", 0.25, "A twist older than this counts as zero velocity [s].", range=(0.01, 10.0)),
    ParamSpec("gripper.open_position", 0.04, "Finger joint position when open [m].", range=(0.0, 1.0)),
    ParamSpec("gripper.closed_position", 0.0, "Finger joint position when closed [m].", range=(0.0, 1.0)),
)


class SimBridge(Node):
    """The tabletop simulation behind ROS topics."""

    NODE_NAME = "sim_bridge"

    def __init__(self, **kwargs):
        super().__init__(self.NODE_NAME, **kwargs)
        self.params = p = declare_all(self, PARAMS)
        # Imported here: pybullet is needed only where the simulation runs, not to list parameters.
        from fovea_vla.core.sim.tabletop import TabletopConfig, TabletopEnv

        self.env = TabletopEnv(
            TabletopConfig(
                image_width=p["image_width"],
                image_height=p["image_height"],
                fov_deg=p["fov_deg"],
                control_hz=p["control_hz"],
                max_steps=p["max_steps"],
            )
        )
        sensor = qos.sensor("reliable", 5)
        self.pub_image = self.create_publisher(Image, "image", sensor)
        self.pub_info = self.create_publisher(CameraInfo, "camera_info", sensor)
        self.pub_joints = self.create_publisher(JointState, "joint_states", sensor)
        self.pub_pose = self.create_publisher(PoseStamped, "ee_pose", sensor)
        self.pub_episode = self.create_publisher(String, "sim/episode", qos.outputs(100))
        self.create_subscription(TwistStamped, "cmd_twist", self._on_twist, qos.outputs())
        self.create_subscription(Float64, "gripper_command", self._on_gripper, qos.outputs())
        self.instruction_client = self.create_client(SetInstruction, "set_instruction")
        self.seed = p["seed"]
        self.episodes_done = 0
        self.twist: TwistStamped | None = None
        self.twist_received_s = -math.inf
        self.gripper = 1.0
        self.paused_until_s = 0.0
        self._reset()
        self.create_timer(1.0 / p["control_hz"], self._tick)

    # -- inputs ----------------------------------------------------------------------------
    def _on_twist(self, msg: TwistStamped) -> None:
        if msg.header.frame_id and msg.header.frame_id != self.params["base_frame"]:
            self.get_logger().warning(f"cmd_twist in {msg.header.frame_id!r}: ignored", throttle_duration_sec=5.0)
            return
        self.twist, self.twist_received_s = msg, time.monotonic()

    def _on_gripper(self, msg: Float64) -> None:
        opened, closed = self.params["gripper.open_position"], self.params["gripper.closed_position"]
        if math.isfinite(msg.data) and opened != closed:
            self.gripper = float(np.clip((opened - msg.data) / (opened - closed), 0.0, 1.0))

    # -- episodes --------------------------------------------------------------------------
    def _reset(self) -> None:
        self.observation = self.env.reset(self.seed)
        self.target = self.env.state().copy()
        self.gripper = float(self.target[-1])
        self.twist = None
        self.get_logger().info(f"episode seed {self.seed}: {self.env.instruction!r}")
        self._instruction_sent = False  # sent by the next tick that finds the service

    def _finish(self, success: bool) -> None:
        result = {
            "seed": self.seed,
            "instruction": self.env.instruction,
            "success": success,
            "steps": self.observation.step,
            "time_to_success_s": self.observation.time_s if success else None,
        }
        self.pub_episode.publish(String(data=json.dumps(result)))
        self.get_logger().info(
            f"episode seed {self.seed}: {'success' if success else 'failure'} in {result['steps']} steps"
        )
        self.episodes_done += 1
        self.seed += 1
        self.paused_until_s = time.monotonic() + self.params["reset_pause_s"]
        if self.params["episodes"] and self.episodes_done >= self.params["episodes"]:
            self.get_logger().info("all episodes done")
            self.paused_until_s = math.inf
            return
        self._reset()

    # -- simulation ------------------------------------------------------------------------
    def _tick(self) -> None:
        now = time.monotonic()
        if now < self.paused_until_s:
            return
        if not self._instruction_sent:
            # The episode starts once the graph can hear its instruction (fovea_node is up).
            if not self.instruction_client.service_is_ready():
                return
            self.instruction_client.call_async(SetInstruction.Request(instruction=self.env.instruction))
            self._instruction_sent = True
        dt = 1.0 / self.params["control_hz"]
        if self.twist is not None and now - self.twist_received_s <= self.params["twist_timeout_s"]:
            t = self.twist.twist
            self.target[:3] += dt * np.array([t.linear.x, t.linear.y, t.linear.z])
            omega = np.array([t.angular.x, t.angular.y, t.angular.z])
            self.target[3:6] += dt * rpy_rates_from_angular_velocity(self.target[3:6], omega)
        self.target[6] = self.gripper
        self.observation = self.env.step(self.target)
        self._publish()
        if self.env.success():
            self._finish(True)
        elif self.observation.step >= self.params["max_steps"]:
            self._finish(False)

    def _publish(self) -> None:
        stamp = ns_to_stamp(self.get_clock().now().nanoseconds)
        camera = Header(stamp=stamp, frame_id=self.params["camera_frame"])
        obs = self.observation
        self.pub_image.publish(image_msg(obs.rgb, camera))
        self.pub_info.publish(camera_info(obs.rgb.shape[1], obs.rgb.shape[0], self.params["fov_deg"], camera))
        joints = JointState(
            name=[*self.env.JOINT_NAMES, *self.env.FINGER_JOINTS],
            position=[*map(float, obs.joint_positions), *map(float, obs.finger_positions)],
        )
        joints.header.stamp = stamp
        self.pub_joints.publish(joints)
        pose = PoseStamped()
        pose.header = Header(stamp=stamp, frame_id=self.params["base_frame"])
        pose.pose.position.x, pose.pose.position.y, pose.pose.position.z = (float(v) for v in obs.ee_pose[:3])
        q = pose.pose.orientation
        q.x, q.y, q.z, q.w = (float(v) for v in rpy_to_quaternion(*obs.ee_pose[3:6]))
        self.pub_pose.publish(pose)

    def destroy_node(self):
        self.env.close()
        return super().destroy_node()


def main(args=None) -> int:
    return run_node(SimBridge, args)


if __name__ == "__main__":
    sys.exit(main())
