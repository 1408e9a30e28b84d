"""fovea_vla.core must import without rclpy or any message package."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import fovea_vla.core


def test_every_core_module_imports_without_ros():
    modules = [m.name for m in pkgutil.walk_packages(fovea_vla.core.__path__, "fovea_vla.core.")]
    assert len(modules) > 10
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "leaked = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('rclpy', 'sensor_msgs', 'std_msgs', 'geometry_msgs', 'visualization_msgs', 'fovea_vla_msgs', 'cv_bridge'))\n"
        "assert not leaked, leaked\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
