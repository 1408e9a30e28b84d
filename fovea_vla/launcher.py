"""Development launcher: runs the graph from :mod:`fovea_vla.bringup` as plain subprocesses.

``launch_ros`` is not installable from PyPI, so where ROS 2 comes from wheels this starts the
same executables with the same parameter files and remappings through ``--ros-args``. On a
robot, prefer ``ros2 launch fovea_vla fovea_vla.launch.py``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from fovea_vla.bringup import NodeSpec, parameter_file_paths

__all__ = ["GraphProcesses", "command_for", "find_executable"]


def find_executable(spec: NodeSpec) -> str | None:
    """Path of a node's executable: beside this Python (venv / pip), in lib/<package> (colcon), or on PATH."""
    prefix = Path(sys.prefix)
    for candidate in (Path(sys.executable).parent / spec.executable, prefix / "lib" / spec.package / spec.executable):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which(spec.executable)


def _param_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        # Quote so YAML keeps it a string ("1.0", "true" or "" stay strings).
        return "'" + value.replace("'", "''") + "'"
    return str(value)


def command_for(
    spec: NodeSpec, namespace: str = "", extra_parameters: dict | None = None, extra_files: Sequence[Path] = ()
) -> list[str]:
    """argv that runs ``spec`` like launch_ros would.

    ``extra_parameters`` apply to every node of the process; ``extra_files`` are parameter files
    applied after the spec's own (node-scoped overrides of a multi-node process).
    """
    executable = find_executable(spec)
    if executable is None:
        raise FileNotFoundError(f"executable {spec.executable!r} of package {spec.package!r} not found")
    argv = [executable, *spec.arguments, "--ros-args"]
    if not spec.node_names:
        argv += ["-r", f"__node:={spec.name}"]
    if namespace:
        argv += ["-r", f"__ns:=/{namespace.strip('/')}"]
    for path in [*parameter_file_paths(spec.parameter_files), *extra_files]:
        argv += ["--params-file", str(path)]
    for name, value in {**spec.parameters, **(extra_parameters or {})}.items():
        argv += ["-p", f"{name}:={_param_value(value)}"]
    for source, target in spec.remappings:
        argv += ["-r", f"{source}:={target}"]
    return argv


def _nested(parameters: dict) -> dict:
    """``{"a.b": 1}`` as ``{"a": {"b": 1}}``: rcl lets a dotted key in a later file lose against
    the nested form of the same parameter in an earlier one, so overrides are written nested.

    >>> _nested({"policy.checkpoint": "/p", "policy.rate_hz": 5.0, "enable_actions": True})
    {'policy': {'checkpoint': '/p', 'rate_hz': 5.0}, 'enable_actions': True}
    """
    tree: dict = {}
    for name, value in parameters.items():
        *groups, leaf = name.split(".")
        node = tree
        for group in groups:
            node = node.setdefault(group, {})
        node[leaf] = list(value) if isinstance(value, tuple) else value
    return tree


class GraphProcesses:
    """Starts every node of a graph as a subprocess and stops them together.

    Args:
        graph: the nodes (from :func:`fovea_vla.bringup.node_graph`).
        namespace: namespace for every node.
        parameters: per-node overrides, ``{node_name: {param: value}}``.
        env: environment for the children (default: this process's).
        log_dir: when given, each node's output goes to ``<log_dir>/<name>.log``; else it is inherited.
    """

    def __init__(
        self,
        graph: Sequence[NodeSpec],
        *,
        namespace: str = "",
        parameters: dict[str, dict] | None = None,
        env: dict[str, str] | None = None,
        log_dir: Path | None = None,
    ):
        self.graph = list(graph)
        self.namespace = namespace
        self.parameters = parameters or {}
        self.env = env
        self.log_dir = log_dir
        self.processes: dict[str, subprocess.Popen] = {}
        self._logs = []
        self._tmp: tempfile.TemporaryDirectory | None = None

    def start(self) -> GraphProcesses:
        for spec in self.graph:
            if find_executable(spec) is None and spec.package != "fovea_vla":
                print(f"[fovea-vla launch] skipping {spec.name}: {spec.executable} is not installed", file=sys.stderr)
                continue
            argv = command_for(spec, self.namespace, self.parameters.get(spec.name), self._node_override_files(spec))
            stdout = None
            if self.log_dir is not None:
                self.log_dir.mkdir(parents=True, exist_ok=True)
                stdout = open(self.log_dir / f"{spec.name}.log", "w")  # noqa: SIM115 (closed in stop())
                self._logs.append(stdout)
            self.processes[spec.name] = subprocess.Popen(
                argv, env=self.env, stdout=stdout, stderr=subprocess.STDOUT if stdout else None
            )
        return self

    def _node_override_files(self, spec: NodeSpec) -> list[Path]:
        """For a multi-node process, its nodes' overrides as one parameter file (``/**/<node>``
        sections): ``-p`` would give every node of the process the same value."""
        sections = {
            f"/**/{node}": {"ros__parameters": _nested(self.parameters[node])}
            for node in spec.node_names
            if node in self.parameters
        }
        if not sections:
            return []
        import yaml

        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="fovea_launch_")
        path = Path(self._tmp.name) / f"{spec.name}_overrides.yaml"
        path.write_text(yaml.safe_dump(sections))
        return [path]

    def poll(self) -> dict[str, int | None]:
        """Exit code per node (None while running)."""
        return {name: proc.poll() for name, proc in self.processes.items()}

    def stop(self, timeout_s: float = 5.0) -> dict[str, int | None]:
        """SIGINT every node, wait, then kill what is left; returns exit codes."""
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + timeout_s
        for proc in self.processes.values():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in self._logs:
            log.close()
        self._logs.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        return {name: proc.returncode for name, proc in self.processes.items()}

    def __enter__(self) -> GraphProcesses:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
