"""``fovea-vla doctor``: what this machine can run, and what a configuration would select."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import sys
from pathlib import Path

from fovea_vla.core.accel import probe_all

__all__ = ["doctor_report"]


def _ros_distro() -> str:
    if os.environ.get("ROS_DISTRO"):
        return f"{os.environ['ROS_DISTRO']} (ROS_DISTRO)"
    for dist in importlib.metadata.distributions():
        match = re.fullmatch(r"ros-([a-z]+)-rclpy", (dist.metadata["Name"] or "").lower())
        if match:
            return f"{match.group(1)} (PyPI wheels, {dist.metadata['Name']} {dist.version})"
    return "unknown"


def _versions() -> list[tuple[str, str]]:
    rows = []
    for module in ("numpy", "cv2", "torch", "rclpy"):
        try:
            imported = importlib.import_module(module)
            rows.append((module, getattr(imported, "__version__", "importable")))
        except Exception as exc:
            rows.append((module, f"NOT importable: {type(exc).__name__}: {exc}"))
    try:
        importlib.import_module("fovea_vla_msgs.msg")
        rows.append(("fovea_vla_msgs", "importable"))
    except Exception as exc:
        rows.append(("fovea_vla_msgs", f"NOT importable: {exc} (run `make install` or colcon build)"))
    return rows


def _stage_registries():
    from fovea_vla.core.decode import IMAGE_DECODERS, VIDEO_DECODERS
    from fovea_vla.core.flow import FLOW_BACKENDS
    from fovea_vla.core.texture import TEXTURE_BACKENDS

    return {
        "decode": IMAGE_DECODERS,
        "video_decode": VIDEO_DECODERS,
        "flow": FLOW_BACKENDS,
        "texture": TEXTURE_BACKENDS,
    }


def _selection(config: str) -> list[str]:
    from fovea_vla.bringup import config_files, node_values, parameter_file_paths
    from fovea_vla.nodes.fovea_node import PARAMS, pipeline_config

    paths = parameter_file_paths(config_files(config))
    lines = [f"Selection for {' + '.join(str(p) for p in paths)}:"]
    values = node_values(config, PARAMS, "fovea_node")
    cfg = pipeline_config(values)
    registries = _stage_registries()
    wanted = {"flow": (cfg.flow.backend, "flow.backend"), "texture": (cfg.texture.backend, "texture.backend")}
    if cfg.slip is not None:
        wanted["slip flow"] = (cfg.slip.flow.backend, "slip.flow_backend")
    for stage, (name, field) in wanted.items():
        try:
            choice = registries[stage.removeprefix("slip ")].select(name, field=field)
            lines.append(f"  {stage:<9} {field}={name!r} -> {choice.name} ({choice.reason})")
        except (ValueError, RuntimeError) as exc:
            lines.append(f"  {stage:<9} {field}={name!r} -> FAILS: {exc}")
    device = cfg.texture.resolved_device()
    verdict = device
    if device.startswith("cuda"):
        from fovea_vla.core.accel import cuda

        ok, reason = cuda()
        verdict = device if ok else f"{device}: FAILS at startup: {reason}"
    lines.append(f"  {'device':<9} texture.device={cfg.texture.device!r} -> {verdict}")
    return lines


def doctor_report(config: str | None = "fovea_vla.yaml") -> str:
    """Multi-line report: platform, versions, accelerators, backends per stage, config selection."""
    lines = [
        "fovea-vla doctor",
        f"  python     {platform.python_version()} ({sys.executable})",
        f"  platform   {platform.platform()} {platform.machine()}",
        f"  ROS 2      {_ros_distro()}",
    ]
    lines += [f"  {name:<10} {version}" for name, version in _versions()]
    lines.append("Accelerators:")
    for name, (ok, reason) in probe_all().items():
        lines.append(f"  [{'yes' if ok else ' no'}] {name:<28} {reason}")
    lines.append("Backends per stage (auto preference order):")
    for stage, registry in _stage_registries().items():
        planned = [n for n in registry.auto_order if n not in registry.names()]
        for name, (ok, reason) in registry.report().items():
            lines.append(f"  {stage:<8} [{'yes' if ok else ' no'}] {name:<7} {reason}")
        for name in planned:
            lines.append(f"  {stage:<8} [ no] {name:<7} not part of this release yet")
    if config:
        try:
            lines += _selection(config)
        except Exception as exc:
            lines.append(f"Selection for {config}: cannot evaluate: {type(exc).__name__}: {exc}")
    return "\n".join(lines)


def config_names() -> list[str]:
    from fovea_vla.bringup import config_dir

    return sorted(p.name for p in Path(config_dir()).glob("*.yaml"))
