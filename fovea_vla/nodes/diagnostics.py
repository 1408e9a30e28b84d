"""Core diagnostic statuses -> diagnostic_msgs/DiagnosticArray (for ``/diagnostics``), and the nodes'
``diagnostics.*`` threshold parameters."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from std_msgs.msg import Header

from fovea_vla.core.diagnostics import DiagnosticsConfig, DiagnosticsMonitor, Status
from fovea_vla.nodes.params import ParamSpec, validate_changes

__all__ = ["checked_parameter_changes", "diagnostic_array", "diagnostics_config", "diagnostics_params"]


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


# The thresholds a node exposes as parameters, per stage: the rate and latency limits that have a
# default (the drop, age and GPU-memory limits keep theirs).
_TUNABLE = ("warn_rate_hz", "error_rate_hz", "warn_latency_ms", "error_latency_ms")


def diagnostics_params(stages: tuple[str, ...]) -> tuple[ParamSpec, ...]:
    """``diagnostics.rate_hz`` and ``diagnostics.<stage>.<limit>`` for the stages a node runs, with
    :class:`DiagnosticsConfig`'s defaults; changeable at run time."""
    defaults = DiagnosticsConfig()
    specs = [
        ParamSpec("diagnostics.rate_hz", 1.0, "Rate of /diagnostics; 0 = off [Hz].", range=(0.0, 100.0)),
    ]
    for stage in stages:
        limits = defaults.limits(stage)
        for name in _TUNABLE:
            value = getattr(limits, name)
            if not math.isfinite(value) or value == 0.0:
                continue
            what = "rate below" if name.endswith("rate_hz") else "p99 latency above"
            unit = "Hz" if name.endswith("rate_hz") else "ms"
            level = name.split("_", 1)[0].upper()
            specs.append(
                ParamSpec(
                    f"diagnostics.{stage}.{name}",
                    float(value),
                    f"{stage}: {level} at a {what} this [{unit}].",
                    range=(0.0, 1e9),
                    read_only=False,
                )
            )
    return tuple(specs)


def diagnostics_config(values: dict[str, object], stages: tuple[str, ...]) -> DiagnosticsConfig:
    """The :class:`DiagnosticsConfig` the ``diagnostics.*`` values describe (errors name the parameter)."""
    defaults = DiagnosticsConfig()
    per_stage = {}
    for stage in stages:
        overrides = {
            name: values[f"diagnostics.{stage}.{name}"] for name in _TUNABLE if f"diagnostics.{stage}.{name}" in values
        }
        try:
            per_stage[stage] = dataclasses.replace(defaults.limits(stage), **overrides)
        except ValueError as exc:
            raise ValueError(f"diagnostics.{stage}.{exc}") from exc
    return dataclasses.replace(defaults, **per_stage)


def checked_parameter_changes(
    specs, parameters, current: dict[str, object], stages: tuple[str, ...]
) -> tuple[dict[str, object], DiagnosticsMonitor | None, str | None]:
    """A node's on-set-parameters check: ``(updated values, a new monitor when a threshold changed, None)``
    or ``(current, None, reason)`` naming the refused parameter."""
    changes, refused = validate_changes(specs, parameters)
    if refused:
        return current, None, refused
    updated = {**current, **changes}
    monitor = None
    if any(name.startswith("diagnostics.") for name in changes):
        try:
            monitor = DiagnosticsMonitor(diagnostics_config(updated, stages))
        except ValueError as exc:
            return current, None, str(exc)
    return updated, monitor, None
