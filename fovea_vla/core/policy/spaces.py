"""Action and state layouts: names, end-effector orientation maths and gripper scaling.

End-effector orientations are roll, pitch, yaw [rad] with R = Rz(yaw) Ry(pitch) Rx(roll)
(the ROS convention of tf2's ``setRPY``), expressed in the robot's base frame.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "EE_NAMES",
    "GRIPPER_NAME",
    "PANDA_JOINTS",
    "angular_velocity_from_rpy_rates",
    "quaternion_to_rpy",
    "rpy_rates_from_angular_velocity",
    "rpy_to_quaternion",
    "space_names",
    "unwrap_angles",
]

EE_NAMES = ("x", "y", "z", "roll", "pitch", "yaw")
GRIPPER_NAME = "gripper"
# Franka Emika Panda arm joints (the default robot of the configs and the simulation).
PANDA_JOINTS = tuple(f"panda_joint{i}" for i in range(1, 8))


def space_names(action_space: str, joint_names, gripper: bool) -> tuple[str, ...]:
    """Names of the action (= state) dims: joint names or x y z roll pitch yaw, then the gripper.

    >>> space_names("ee_pose", (), True)
    ('x', 'y', 'z', 'roll', 'pitch', 'yaw', 'gripper')
    """
    arm = tuple(joint_names) if action_space == "joint_position" else EE_NAMES
    return (*arm, GRIPPER_NAME) if gripper else arm


def quaternion_to_rpy(x: float, y: float, z: float, w: float) -> np.ndarray:
    """(3,) roll, pitch, yaw [rad] of a unit quaternion (normalised here).

    >>> np.round(quaternion_to_rpy(0.0, 0.0, np.sin(0.25), np.cos(0.25)), 6).tolist()
    [0.0, 0.0, 0.5]
    """
    q = np.array([x, y, z, w], dtype=np.float64)
    q /= np.linalg.norm(q)
    x, y, z, w = q
    roll = np.arctan2(2 * (w * x + y * z), 1 - 2 * (x * x + y * y))
    pitch = np.arcsin(np.clip(2 * (w * y - z * x), -1.0, 1.0))
    yaw = np.arctan2(2 * (w * z + x * y), 1 - 2 * (y * y + z * z))
    return np.array([roll, pitch, yaw])


def rpy_to_quaternion(roll: float, pitch: float, yaw: float) -> np.ndarray:
    """(4,) unit quaternion x, y, z, w of R = Rz(yaw) Ry(pitch) Rx(roll).

    >>> np.round(quaternion_to_rpy(*rpy_to_quaternion(0.1, -0.2, 0.3)), 6).tolist()
    [0.1, -0.2, 0.3]
    """
    cr, sr = np.cos(roll / 2), np.sin(roll / 2)
    cp, sp = np.cos(pitch / 2), np.sin(pitch / 2)
    cy, sy = np.cos(yaw / 2), np.sin(yaw / 2)
    return np.array(
        [
            sr * cp * cy - cr * sp * sy,
            cr * sp * cy + sr * cp * sy,
            cr * cp * sy - sr * sp * cy,
            cr * cp * cy + sr * sp * sy,
        ]
    )


def angular_velocity_from_rpy_rates(rpy: np.ndarray, rpy_rates: np.ndarray) -> np.ndarray:
    """(3,) angular velocity [rad/s] in the base frame from roll/pitch/yaw and their rates.

    omega = yaw' e_z + pitch' Rz(yaw) e_y + roll' Rz(yaw) Ry(pitch) e_x.

    >>> angular_velocity_from_rpy_rates(np.zeros(3), np.array([0.1, 0.2, 0.3])).tolist()
    [0.1, 0.2, 0.3]
    """
    _, pitch, yaw = rpy
    droll, dpitch, dyaw = rpy_rates
    cp, sp, cy, sy = np.cos(pitch), np.sin(pitch), np.cos(yaw), np.sin(yaw)
    return np.array(
        [
            droll * cy * cp - dpitch * sy,
            droll * sy * cp + dpitch * cy,
            dyaw - droll * sp,
        ]
    )


def rpy_rates_from_angular_velocity(rpy: np.ndarray, omega: np.ndarray) -> np.ndarray:
    """(3,) roll/pitch/yaw rates [rad/s] from an angular velocity in the base frame: the inverse of
    :func:`angular_velocity_from_rpy_rates` (singular at pitch = +-90 deg, where it is clamped).

    >>> rpy, rates = np.array([0.3, -0.4, 1.2]), np.array([0.1, 0.2, -0.3])
    >>> np.allclose(rpy_rates_from_angular_velocity(rpy, angular_velocity_from_rpy_rates(rpy, rates)), rates)
    True
    """
    _, pitch, yaw = rpy
    cp, sp, cy, sy = np.cos(pitch), np.sin(pitch), np.cos(yaw), np.sin(yaw)
    cp = np.copysign(max(abs(cp), 1e-6), cp)
    droll = (omega[0] * cy + omega[1] * sy) / cp
    dpitch = -omega[0] * sy + omega[1] * cy
    return np.array([droll, dpitch, omega[2] + droll * sp])


def unwrap_angles(angles: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``angles`` shifted by multiples of 2 pi to lie within pi of ``reference`` (broadcast).

    A chunk of yaw targets near +-pi must not jump by 2 pi against the running command.

    >>> unwrap_angles(np.array([-3.1]), np.array([3.1])).round(4).tolist()
    [3.1832]
    """
    return reference + (angles - reference + np.pi) % (2 * np.pi) - np.pi
