"""Real rclpy and DDS between processes: an isolated domain per test run, and waiting helpers."""

from __future__ import annotations

import os
import time

import pytest


def pytest_collection_modifyitems(items):
    for item in items:
        if "test/ros/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.ros)


@pytest.fixture(scope="session")
def ros_probe():
    """An rclpy node in this process on a per-run DDS domain, loopback only."""
    os.environ["ROS_DOMAIN_ID"] = str(101 + os.getpid() % 120)
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    os.environ.pop("ROS_LOCALHOST_ONLY", None)
    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    rclpy.init()
    node = rclpy.create_node("fovea_test_probe")
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    yield Probe(node, executor)
    executor.shutdown()
    node.destroy_node()
    rclpy.try_shutdown()


class Probe:
    """The test's own node plus helpers that spin until a condition holds (never fixed sleeps)."""

    def __init__(self, node, executor):
        self.node = node
        self.executor = executor

    def wait_for(self, condition, timeout_s: float, what: str, processes=None) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
            if processes is not None:
                exited = {n: c for n, c in processes.poll().items() if c is not None}
                if exited:
                    raise AssertionError(f"node(s) exited while waiting for {what}: {exited}")
            self.executor.spin_once(timeout_sec=0.05)
