"""Managed (lifecycle) nodes over real DDS: vla_stack (fovea_node + policy_node) started with
autostart:=false and driven through the standard lifecycle services (``<node>/change_state``,
``<node>/get_state``), as a lifecycle manager (nav2_lifecycle_manager, ``ros2 lifecycle set``) would.
camera_replay feeds frames; the test process is the robot (joint_states at 50 Hz, see
test_policy_node.Robot) and listens to everything the stack publishes."""

from __future__ import annotations

import signal
import time

import pytest
from diagnostic_msgs.msg import DiagnosticStatus
from lifecycle_msgs.msg import Transition
from lifecycle_msgs.srv import ChangeState, GetState
from trajectory_msgs.msg import JointTrajectory

from fovea_vla.bringup import node_graph, node_values
from fovea_vla.launcher import GraphProcesses
from fovea_vla.nodes import policy_node, qos
from fovea_vla.nodes.messages import stamp_to_ns
from fovea_vla_msgs.msg import Fixation

from .test_diagnostics import Health
from .test_policy_node import STARTUP_S, moving, start_stack, write_checkpoint

TRANSITION_S = 120.0  # configure loads the encoder, the checkpoint and the sentence model on CI's two cores
# One control period of the stack under test (cpu.yaml on top of fovea_vla.yaml) [ns].
PERIOD_NS = round(1e9 / node_values("cpu.yaml", policy_node.PARAMS, "policy_node")["control_rate_hz"])


class Managed:
    """One managed node's lifecycle services, called from the probe."""

    def __init__(self, probe, namespace: str, name: str, processes):
        self.probe, self.processes = probe, processes
        self.name = f"/{namespace}/{name}"
        self._change = probe.node.create_client(ChangeState, f"{self.name}/change_state")
        self._get = probe.node.create_client(GetState, f"{self.name}/get_state")
        self._answered = False

    def _call(self, client, request, what: str):
        self.probe.wait_for(client.service_is_ready, STARTUP_S, f"{what} service", self.processes)
        if not self._answered:
            self._first_answer()
        future = client.call_async(request)
        self.probe.wait_for(future.done, TRANSITION_S, what, self.processes)
        return future.result()

    def _first_answer(self) -> None:
        """Fast DDS can report a service ready before its reply path to this client is matched, and
        the first reply is then lost ("failed to send response"): ask get_state (idempotent) again
        until one answer comes, so that no transition request is ever sent twice."""
        self.probe.wait_for(self._get.service_is_ready, STARTUP_S, f"{self.name}/get_state service", self.processes)
        deadline = time.monotonic() + STARTUP_S
        while True:
            future = self._get.call_async(GetState.Request())
            try:
                self.probe.wait_for(future.done, 5.0, f"{self.name}/get_state", self.processes)
                break
            except AssertionError:
                self._get.remove_pending_request(future)
                if time.monotonic() > deadline:
                    raise
        self._answered = True

    def state(self) -> str:
        return self._call(self._get, GetState.Request(), f"{self.name}/get_state").current_state.label

    def change(self, transition: str | int) -> bool:
        """Request a transition by label (``configure``) or by id (as ``ros2 lifecycle set`` does)."""
        by_label = isinstance(transition, str)
        request = ChangeState.Request(
            transition=Transition(label=transition) if by_label else Transition(id=transition)
        )
        return self._call(self._change, request, f"{self.name} {transition}").success

    def change_async(self, label: str):
        return self._change.call_async(ChangeState.Request(transition=Transition(label=label)))


def published_ns(trajectory: JointTrajectory) -> int:
    """When policy_node published ``trajectory`` [ns, its ROS clock: system time, as the probe's]. The
    header stamp is the source frame's capture stamp, not the publication time; but the first point is
    timed from it and due one control period after the tick that published it (a hold too)."""
    first = trajectory.points[0].time_from_start
    return stamp_to_ns(trajectory.header.stamp) + first.sec * 1_000_000_000 + first.nanosec - PERIOD_NS


@pytest.mark.timeout(900)
def test_vla_stack_through_its_lifecycle_services(ros_probe, tmp_path_factory):
    """unconfigured -> inactive -> active, then deactivate / activate policy_node, deactivate, cleanup,
    configure, activate fovea_node, and shut both down; each step checked on what the stack publishes.

    No command after deactivate: policy_node publishes its stop (a one-point hold trajectory) inside the
    deactivate transition, before its publishers go off and before the service answers. The check uses
    publication times reconstructed from each trajectory (:func:`published_ns`, the node's clock) against
    the probe's clock when the response arrived (both system time on this machine): no trajectory may
    have been published later than one control period after that. Messages still in flight are allowed
    for (the ones published before the response count, whenever they arrive), and the order is checked
    on arrival (one reliable writer keeps it): the hold is the last trajectory, and nothing more arrives
    while fovea_node (still active) publishes 40 more fixations.
    """
    namespace = "managed"
    processes, robot = start_stack(
        ros_probe, tmp_path_factory, namespace, "joint_position", enable_actions=True, autostart=False
    )
    fixations: list[Fixation] = []
    ros_probe.node.create_subscription(Fixation, f"/{namespace}/fixation", fixations.append, qos.outputs(100))
    health = Health(ros_probe, namespace, node=None)
    fovea = Managed(ros_probe, namespace, "fovea_node", processes)
    policy = Managed(ros_probe, namespace, "policy_node", processes)
    wait = ros_probe.wait_for

    def frames(count: int) -> None:
        """Let ``count`` more camera frames go by (a stretch measured in the stack's input, not in time)."""
        target = len(robot.image_stamps) + count
        wait(lambda: len(robot.image_stamps) >= target, 60.0, f"{count} camera frames", processes)

    try:
        # Unconfigured: frames come in, nothing goes out, and /diagnostics says why.
        assert fovea.state() == "unconfigured" and policy.state() == "unconfigured"
        frames(20)
        assert not fixations and not robot.chunks and not robot.trajectories and not robot.stats
        for status in ("fovea_node: ingest", "policy_node: executor"):
            wait(lambda s=status: health.says(s, "unconfigured"), 30.0, f"{status}: unconfigured", processes)
            assert health.latest[status].level == DiagnosticStatus.OK

        # policy_node needs fovea_node's encoder: refused until fovea_node is configured.
        assert not policy.change("configure")
        assert policy.state() == "unconfigured"
        assert fovea.change("configure") and policy.change("configure")
        assert fovea.state() == "inactive" and policy.state() == "inactive"
        frames(20)
        assert not fixations and not robot.chunks and not robot.trajectories and not robot.stats
        wait(lambda: health.says("fovea_node: ingest", "inactive"), 30.0, "inactive in /diagnostics", processes)

        # Active: fixations, chunks and trajectories, stamped with the source camera frames.
        assert fovea.change("activate") and policy.change("activate")
        assert fovea.state() == "active" and policy.state() == "active"
        wait(lambda: len(robot.chunks) >= 3, STARTUP_S, "three action chunks", processes)
        wait(lambda: sum(moving(t) for t in robot.trajectories) >= 5, 60.0, "5 moving trajectories", processes)
        assert all(stamp_to_ns(f.header.stamp) in robot.image_stamps for f in fixations[:10])
        assert all(stamp_to_ns(c.header.stamp) in robot.image_stamps for c in robot.chunks)
        sources = {stamp_to_ns(c.header.stamp) for c in robot.chunks}
        assert all(stamp_to_ns(t.header.stamp) in sources for t in robot.trajectories if moving(t))

        # Deactivate policy_node: a stop at once, then no command; fovea_node goes on.
        assert policy.change("deactivate")
        answered_ns = ros_probe.node.get_clock().now().nanoseconds
        seen = len(fixations)
        wait(lambda: len(fixations) >= seen + 20, 60.0, "fixations while policy_node is inactive", processes)
        settled = (len(robot.trajectories), len(robot.chunks), len(robot.stats), len(robot.gripper))
        wait(lambda: len(fixations) >= seen + 40, 60.0, "more fixations", processes)
        assert (len(robot.trajectories), len(robot.chunks), len(robot.stats), len(robot.gripper)) == settled
        hold = robot.trajectories[-1]
        assert len(hold.points) == 1, "the last trajectory is not the one-point stop"
        late = [published_ns(t) - answered_ns for t in robot.trajectories if published_ns(t) > answered_ns + PERIOD_NS]
        assert not late, f"trajectories published {late} ns after the deactivate response"
        margin_ms = (answered_ns - published_ns(hold)) * 1e-6
        print(f"\nstop published {margin_ms:.2f} ms before the deactivate response arrived (period {PERIOD_NS} ns)")
        assert policy.state() == "inactive" and fovea.state() == "active"

        # Active again: commands resume, from the arm's measured state.
        count = len(robot.trajectories)
        assert policy.change("activate")
        wait(lambda: any(moving(t) for t in robot.trajectories[count:]), 60.0, "motion after re-activation", processes)

        # fovea_node alone deactivated: policy_node stays active but starves, and its watchdog stops it.
        assert fovea.change("deactivate")
        wait(
            lambda: robot.stats and robot.stats[-1].status == "stopped: stale_frame",
            30.0,
            "the stale-frame stop",
            processes,
        )
        count, seen = len(robot.trajectories), len(fixations)
        wait(lambda: len(robot.trajectories) >= count + 25, 30.0, "trajectories while starved", processes)
        assert not any(moving(t) for t in robot.trajectories[count + 1 :]), "the arm moved without frames"
        assert len(fixations) == seen, "fovea_node published while inactive"

        # cleanup and configure again: frames flow and the policy follows them again.
        assert fovea.change("cleanup") and fovea.state() == "unconfigured"
        assert fovea.change("configure") and fovea.change("activate")
        wait(lambda: len(fixations) >= seen + 5, 60.0, "fixations after re-configuration", processes)
        count = len(robot.trajectories)
        wait(lambda: any(moving(t) for t in robot.trajectories[count:]), 60.0, "motion after the new frames", processes)

        # shutdown: policy_node stops first; once both are finalized the process exits cleanly.
        assert policy.change("shutdown")
        wait(lambda: len(robot.trajectories[-1].points) == 1, 10.0, "the stop at shutdown", processes)
        stack = processes.processes["vla_stack"]
        fovea.change_async("shutdown")
        wait(lambda: stack.poll() is not None, 60.0, "vla_stack to exit after the shutdown transitions")
        assert stack.returncode == 0
        last, target = len(robot.trajectories), len(robot.image_stamps) + 10
        wait(lambda: len(robot.image_stamps) >= target, 60.0, "10 camera frames after the exit")
        assert len(robot.trajectories) == last
        log = (processes.log_dir / "vla_stack.log").read_text()
        assert "configure fovea_node first" in log
        assert "deactivate: commanded a stop" in log and "shutdown: commanded a stop" in log
        assert "Traceback" not in log, log
    finally:
        robot.close()
        codes = processes.stop()
    assert codes == {"camera_replay": 0, "vla_stack": 0}, f"unclean exit {codes} (logs in {processes.log_dir})"


def test_refused_parameter_leaves_the_node_unconfigured_and_the_process_running(ros_probe, tmp_path):
    """autostart:=false: a refused value fails configure (naming the parameter), the node stays
    unconfigured and answers, a transition its state does not offer is refused, and the process keeps
    running until it is stopped. (With autostart the same value ends the process with exit code 2:
    test_fovea_node / test_policy_node.)"""
    namespace = "refused"
    write_checkpoint(tmp_path / "policy", "joint_position")
    graph = node_graph(config="cpu.yaml", use_replay=False, policy=True, captions=False, autostart=False)
    parameters = {
        "fovea_node": {"flow.grid": 9},  # out of its range: rclpy refuses it when declaring
        "policy_node": {"policy.checkpoint": str(tmp_path / "policy")},
    }
    health = Health(ros_probe, namespace, node=None)
    processes = GraphProcesses(graph, namespace=namespace, parameters=parameters, log_dir=tmp_path).start()
    try:
        fovea = Managed(ros_probe, namespace, "fovea_node", processes)
        policy = Managed(ros_probe, namespace, "policy_node", processes)
        assert fovea.state() == "unconfigured"
        assert not policy.change("configure")  # fovea_node first
        assert not fovea.change("configure")
        assert fovea.state() == "unconfigured" and policy.state() == "unconfigured"
        # Not offered while unconfigured: refused, by label and by id (rclpy raised out of its executor on the
        # latter, ending the process).
        assert not fovea.change("activate") and not fovea.change(Transition.TRANSITION_ACTIVATE)
        assert not fovea.change("configure")  # the value is read-only: still refused
        ros_probe.wait_for(
            lambda: health.says("fovea_node: ingest", "unconfigured"), 30.0, "unconfigured in /diagnostics", processes
        )
        assert processes.poll() == {"vla_stack": None}
        stack = processes.processes["vla_stack"]
        stack.send_signal(signal.SIGINT)
        assert stack.wait(timeout=30) == 0
    finally:
        processes.stop()
    log = (tmp_path / "vla_stack.log").read_text()
    refusals = [line for line in log.splitlines() if "ERROR" in line and "configure refused" in line]
    assert any("flow.grid" in line and "fovea_node" in line for line in refusals), log
    assert any("configure fovea_node first" in line for line in refusals), log
    assert "FATAL" not in log and "Traceback" not in log, log
    assert "transition 3 refused in state unconfigured" in log, log
