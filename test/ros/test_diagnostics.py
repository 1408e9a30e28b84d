"""/diagnostics and run-time parameter checks over real DDS: fovea_node in its own process, fed by the probe."""

from __future__ import annotations

import time

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rclpy.parameter import Parameter
from rclpy.parameter_client import AsyncParameterClient
from sensor_msgs.msg import Image
from std_msgs.msg import Header

from fovea_vla.bringup import node_graph
from fovea_vla.launcher import GraphProcesses
from fovea_vla.nodes import qos
from fovea_vla.nodes.messages import image_msg

STARTUP_S = 60.0
OK, WARN, ERROR, STALE = (bytes([level]) for level in range(4))


class Health:
    """The newest status per name that /diagnostics carried for one namespace's nodes; names are
    kept without ``/<namespace>/`` and ``node``'s ``"<node>: "`` prefix (all nodes' when None)."""

    def __init__(self, probe, namespace: str, node: str | None = "fovea_node"):
        self.prefix = f"/{namespace}/" + (f"{node}: " if node else "")
        self.latest: dict[str, DiagnosticStatus] = {}
        probe.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_array, qos.outputs(50))

    def _on_array(self, msg: DiagnosticArray) -> None:
        for status in msg.status:
            if status.name.startswith(self.prefix):
                self.latest[status.name.removeprefix(self.prefix)] = status

    def level(self, stage: str) -> bytes | None:
        status = self.latest.get(stage)
        return None if status is None else status.level

    def says(self, name: str, words: str) -> bool:
        status = self.latest.get(name)
        return status is not None and words in status.message


def test_stage_levels_follow_starvation_and_thresholds_and_bad_run_time_values_are_refused(ros_probe, tmp_path):
    graph = node_graph(config="cpu.yaml", use_replay=False, captions=False)
    params = {"fovea_node": {"encoder.enabled": False, "diagnostics.rate_hz": 4.0}}
    health = Health(ros_probe, "diag")
    publisher = ros_probe.node.create_publisher(Image, "/diag/image", qos.sensor("best_effort", 1))
    client = AsyncParameterClient(ros_probe.node, "/diag/fovea_node")
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    next_frame = 0.0

    def feed() -> None:
        nonlocal next_frame, frame
        if time.monotonic() >= next_frame:
            frame = np.roll(frame, 2, axis=1)
            publisher.publish(image_msg(frame, Header(stamp=ros_probe.node.get_clock().now().to_msg(), frame_id="cam")))
            next_frame = time.monotonic() + 0.1

    def wait(condition, what: str, timeout_s: float = 30.0, feeding: bool = True) -> None:
        ros_probe.wait_for(lambda: (feed() if feeding else None) or condition(), timeout_s, what, processes)

    def set_parameter(name: str, value):
        future = client.set_parameters([Parameter(name, value=value)])
        ros_probe.wait_for(future.done, 10.0, f"setting {name}", processes)
        return future.result().results[0]

    with GraphProcesses(graph, namespace="diag", parameters=params, log_dir=tmp_path) as processes:
        ros_probe.wait_for(lambda: publisher.get_subscription_count() > 0, STARTUP_S, "fovea_node", processes)
        wait(lambda: health.level("ingest") == OK and health.level("flow") == OK, "ingest and flow OK", STARTUP_S)
        assert {"ingest", "flow", "texture", "fixation"} <= set(health.latest)
        ingest = {kv.key: kv.value for kv in health.latest["ingest"].values}
        assert ingest["backend"] and float(ingest["rate_hz"]) > 5.0

        # Slower than its threshold: the flow stage warns, naming the quantity and the limit.
        assert client.wait_for_services(timeout_sec=10.0)
        assert set_parameter("diagnostics.flow.warn_latency_ms", 0.001).successful
        wait(lambda: health.level("flow") in (WARN, ERROR), "flow WARN after lowering its threshold")
        assert "latency p99" in health.latest["flow"].message and "above 0.001 ms" in health.latest["flow"].message

        # Starved: no frames, the input stages go stale.
        wait(lambda: health.level("ingest") == STALE, "ingest STALE without frames", feeding=False)

        # Run-time changes are checked like startup values, and refused with the parameter named.
        refused = set_parameter("diagnostics.flow.warn_latency_ms", 1000.0)  # above the ERROR threshold
        assert not refused.successful
        assert "diagnostics.flow.warn_latency_ms=1000.0: must not exceed error_latency_ms" in refused.reason
        refused = set_parameter("debug_image.max_rate_hz", 5000.0)
        assert not refused.successful and "debug_image.max_rate_hz" in refused.reason
        read_only = set_parameter("flow.backend", "dis")
        assert not read_only.successful and "flow.backend" in read_only.reason
        assert set_parameter("debug_image.max_rate_hz", 2.0).successful
        codes = processes.stop()
    assert codes == {"fovea_node": 0}
