"""Core diagnostic statuses -> diagnostic_msgs/DiagnosticArray (for the ``/diagnostics`` topic)."""

from __future__ import annotations

from collections.abc import Iterable

from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from std_msgs.msg import Header

from fovea_vla.core.diagnostics import Status

__all__ = ["diagnostic_array"]


def diagnostic_array(statuses: Iterable[Status], node_name: str, hardware_id: str, stamp: Time) -> DiagnosticArray:
    """One DiagnosticStatus per core status, named ``"<node_name>: <stage>"`` as diagnostic_updater does.

    Args:
        statuses: from :class:`fovea_vla.core.diagnostics.DiagnosticsMonitor`.
        node_name: prefix of every status name (e.g. ``fovea_node``).
        hardware_id: the machine or device the stages run on (e.g. the GPU's name).
        stamp: the header stamp (the node's clock at the update).
    """
    return DiagnosticArray(
        header=Header(stamp=stamp),
        status=[
            DiagnosticStatus(
                level=bytes([int(status.level)]),
                name=f"{node_name}: {status.name}",
                message=status.message,
                hardware_id=hardware_id,
                values=[KeyValue(key=key, value=value) for key, value in status.values],
            )
            for status in statuses
        ],
    )
