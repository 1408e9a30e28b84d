"""What ``bench e2e`` and ``soak`` share about the measured graph: the bundled tabletop_push policy
and how its nodes are configured, the robot state the measuring process publishes, CPU time.

ROS modules are imported inside the functions, so this imports without rclpy.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["ENCODER", "POLICY", "STATE_RATE_HZ", "cpu_seconds", "graph_parameters", "resolve_config", "state_publisher"]

POLICY = "package://fovea_vla/policies/tabletop_push"
ENCODER = "package://fovea_vla/policies/tabletop_push/encoder.safetensors"
STATE_RATE_HZ = 100.0


def resolve_config(config: str) -> str:
    """``auto``: desktop_gpu.yaml with a CUDA device, else cpu.yaml; other names unchanged."""
    if config != "auto":
        return config
    import torch

    return "desktop_gpu.yaml" if torch.cuda.is_available() else "cpu.yaml"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time [s] of a process and its finished children (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(v) for v in fields[11:15])  # utime, stime, cutime, cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def graph_parameters(
    *,
    width: int,
    height: int,
    fps: float,
    transport: str,
    policy_rate_hz: float = 200.0,
    sensor_reliability: str = "best_effort",
    text_encoder: str = "",
    caption_model: str = "",
    scene_cut_every_s: float = 0.0,
) -> dict[str, dict]:
    """Per-node overrides (``GraphProcesses(parameters=...)``): camera_replay's synthetic scene with
    camera motion at ``fps``, fovea_node with the policy's ViT-Tiny encoder, policy_node with the
    bundled tabletop_push head in dry run (``enable_actions`` false), caption_node at 1 Hz."""
    jpeg = transport == "jpeg"
    return {
        "camera_replay": {
            "rate_hz": float(fps),
            "synthetic.width": width,
            "synthetic.height": height,
            "synthetic.fps": float(fps),
            "synthetic.camera_motion": True,
            "synthetic.scene_cut_every_s": float(scene_cut_every_s),
            "transport": "compressed" if jpeg else "raw",
        },
        "fovea_node": {
            "image_transport": "compressed" if jpeg else "raw",
            "sensor_qos.reliability": sensor_reliability,
            "encoder.architecture": "vit_tiny_patch16",
            "encoder.checkpoint": ENCODER,
            "instruction": "push the red block to the left",
            "debug_image.enabled": False,
        },
        "policy_node": {
            "policy.checkpoint": POLICY,
            "policy.rate_hz": float(policy_rate_hz),
            "action_space": "ee_pose",
            "max_observation_age_ms": 1000.0,
            "enable_actions": False,
            "text_encoder.path": text_encoder,
        },
        "caption_node": {"caption.model_path": caption_model, "caption.rate_hz": 1.0, "caption.max_new_tokens": 40},
    }


def state_publisher(node):
    """Publishers of a fixed robot state (the policy waits for one) and a function that publishes it."""
    from geometry_msgs.msg import PoseStamped
    from sensor_msgs.msg import JointState

    from fovea_vla.nodes import qos

    pose_pub = node.create_publisher(PoseStamped, "ee_pose", qos.sensor("reliable", 5))
    joints_pub = node.create_publisher(JointState, "joint_states", qos.sensor("reliable", 5))

    def publish() -> None:
        stamp = node.get_clock().now().to_msg()
        pose = PoseStamped()
        pose.header.stamp, pose.header.frame_id = stamp, "panda_link0"
        pose.pose.position.x, pose.pose.position.z = 0.5, 0.3
        pose.pose.orientation.x, pose.pose.orientation.w = 1.0, 0.0  # gripper pointing down
        pose_pub.publish(pose)
        joints = JointState(name=["panda_finger_joint1"], position=[0.04])
        joints.header.stamp = stamp
        joints_pub.publish(joints)

    return publish
