"""QoS profiles used by fovea_vla nodes (kept in one place so they stay consistent)."""

from __future__ import annotations

from rclpy.qos import (
    DurabilityPolicy,
    HistoryPolicy,
    QoSProfile,
    ReliabilityPolicy,
    qos_profile_sensor_data,
)

__all__ = ["RELIABILITIES", "outputs", "sensor"]

RELIABILITIES = ("best_effort", "reliable")


def sensor(reliability: str = "best_effort", depth: int = 1) -> QoSProfile:
    """Camera inputs: best effort and shallow by default so a slow consumer sees the newest frame."""
    if reliability not in RELIABILITIES:
        raise ValueError(f"reliability={reliability!r}: must be one of {RELIABILITIES}")
    profile = QoSProfile(
        history=HistoryPolicy.KEEP_LAST,
        depth=depth,
        reliability=ReliabilityPolicy.BEST_EFFORT if reliability == "best_effort" else ReliabilityPolicy.RELIABLE,
        durability=qos_profile_sensor_data.durability,
    )
    return profile


def outputs(depth: int = 10) -> QoSProfile:
    """Outputs for controllers, visualisation and logging: reliable, volatile."""
    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST,
        depth=depth,
        reliability=ReliabilityPolicy.RELIABLE,
        durability=DurabilityPolicy.VOLATILE,
    )
