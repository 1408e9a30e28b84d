"""Managed (lifecycle) nodes: what fovea_node and policy_node share.

Both are ``rclpy.lifecycle.LifecycleNode`` s with the standard ``<node>/change_state``,
``<node>/get_state``, ``<node>/get_available_transitions`` services and the
``<node>/transition_event`` topic. :class:`ManagedNode` maps the transitions onto four methods a
node implements, each safe to call when there is nothing to do:

* ``_configure()``: read and check the parameters, create backends, load models, create
  publishers (lifecycle publishers: nothing goes out while inactive), services and the
  subscriptions that steer the node. Raises ``ValueError`` / ``RuntimeError`` / ``OSError`` naming
  the parameter: the transition fails, the reason is logged as an error and kept in
  ``configure_error``, and the node stays unconfigured.
* ``_activate()``: start taking inputs and working (threads, timers), after the publishers are on.
* ``_deactivate(reason)``: stop working, before the publishers go off (policy_node commands its stop
  here; ``reason`` is ``deactivate``, ``shutdown`` or ``error``).
* ``_release()``: undo ``_configure`` (backends, GPU / GL resources, entities): back to unconfigured.

``shutdown`` from any state deactivates (stop first) and releases; an unexpected exception in a
transition is logged with its traceback and leads through ``on_error`` back to unconfigured.
With ``autostart`` (default) :func:`autostart` drives the nodes of a process to active at startup.
"""

from __future__ import annotations

import threading
import traceback
from collections.abc import Callable, Sequence

from rcl_interfaces.msg import SetParametersResult
from rclpy.impl.implementation_singleton import rclpy_implementation as _rclpy
from rclpy.lifecycle import LifecycleNode, LifecyclePublisher, LifecycleState, TransitionCallbackReturn
from rclpy.publisher import Publisher
from rclpy.service import Service
from rclpy.subscription import Subscription
from rclpy.timer import Timer

from fovea_vla.core.diagnostics import Level, Status
from fovea_vla.nodes.diagnostics import checked_parameter_changes
from fovea_vla.nodes.params import ParamSpec, declare_parameters, read_parameters, validate_changes

__all__ = ["AUTOSTART", "ManagedNode", "autostart", "lifecycle_statuses"]

AUTOSTART = ParamSpec(
    "autostart",
    True,
    "Configure and activate the node at startup; false = start unconfigured and wait for a lifecycle "
    "manager (`<node>/change_state`).",
)

SUCCESS = TransitionCallbackReturn.SUCCESS
FAILURE = TransitionCallbackReturn.FAILURE
ERROR = TransitionCallbackReturn.ERROR


class ManagedNode(LifecycleNode):
    """A lifecycle node whose parameters are declared (not yet checked) at construction.

    Args:
        specs: the node's parameter table.
        kwargs: passed to ``rclpy.lifecycle.LifecycleNode``.

    Attributes:
        params: the checked parameter values while configured, else None.
        configure_error: why the last configure failed (names the parameter), else None.
    """

    NODE_NAME = ""

    def __init__(self, specs: Sequence[ParamSpec], diagnosed_stages: Sequence[str] = (), **kwargs):
        super().__init__(self.NODE_NAME, **kwargs)
        self._specs = tuple(specs)
        self._threshold_stages = tuple(diagnosed_stages)
        self._refused = declare_parameters(self, self._specs)
        self.params: dict[str, object] | None = None
        self.configure_error: str | None = None
        # Held through every transition: another node of the process (policy_node asking fovea_node for
        # its encoder) reads a consistent configuration.
        self.transition_lock = threading.RLock()
        self._configured_entities: list = []  # destroyed by cleanup
        self._active_entities: list = []  # destroyed by deactivate
        self._guard_change_state()

    # -- state ------------------------------------------------------------------------------
    @property
    def lifecycle_state(self) -> str:
        """``unconfigured``, ``inactive``, ``active``, ``finalized`` or a transition state (``configuring`` ...)."""
        return self._state_machine.current_state[1]

    @property
    def is_active(self) -> bool:
        return self.lifecycle_state == "active"

    @property
    def autostart(self) -> bool:
        value = self.get_parameter(AUTOSTART.name).value
        return value if isinstance(value, bool) else AUTOSTART.default

    def read_parameters(self) -> dict[str, object]:
        """The parameter values as they are now, checked (raises ValueError naming a refused one)."""
        return read_parameters(self, self._specs, self._refused)

    # -- run-time parameter changes -----------------------------------------------------------
    def _on_set_parameters(self, parameters) -> SetParametersResult:
        """The on-set callback: a refused value is refused with the reason; while configured, the
        checked values replace ``params`` (and the diagnostics thresholds) and the changes go to
        :meth:`_parameters_changed`."""
        if self.params is None:  # unconfigured: every value is checked again by configure
            refused = validate_changes(self._specs, parameters)[1]
            return SetParametersResult(successful=refused is None, reason=refused or "")
        updated, monitor, refused = checked_parameter_changes(
            self._specs, parameters, self.params, self._threshold_stages
        )
        if refused:
            return SetParametersResult(successful=False, reason=refused)
        if monitor is not None:
            self.diagnostics = monitor
        changes = {name: value for name, value in updated.items() if value != self.params[name]}
        self.params = updated
        self._parameters_changed(changes)
        return SetParametersResult(successful=True)

    def _parameters_changed(self, changes: dict[str, object]) -> None:
        for name, value in changes.items():
            self.get_logger().info(f"parameter {name} -> {value!r}")

    # -- entities scoped to a state ---------------------------------------------------------
    def configured(self, entity):
        """``entity`` (publisher, subscription, service, timer), destroyed by cleanup."""
        self._configured_entities.append(entity)
        return entity

    def activated(self, entity):
        """``entity``, destroyed by deactivate."""
        self._active_entities.append(entity)
        return entity

    def _destroy(self, entities: list) -> None:
        while entities:
            entity = entities.pop()
            if isinstance(entity, LifecyclePublisher):
                self.destroy_lifecycle_publisher(entity)
            elif isinstance(entity, Publisher):
                self.destroy_publisher(entity)
            elif isinstance(entity, Subscription):
                self.destroy_subscription(entity)
            elif isinstance(entity, Service):
                self.destroy_service(entity)
            elif isinstance(entity, Timer):
                entity.cancel()
                self.destroy_timer(entity)

    # -- what a node implements -------------------------------------------------------------
    def _configure(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} must define _configure")

    def _activate(self) -> None:
        pass

    def _deactivate(self, reason: str) -> None:
        pass

    def _release(self) -> None:
        pass

    # -- transitions ------------------------------------------------------------------------
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        with self.transition_lock:
            self.configure_error = None
            try:
                self._configure()
            except (ValueError, RuntimeError, OSError) as exc:
                self.configure_error = str(exc)
                self._teardown(active=False)
                self.get_logger().error(f"configure refused: {exc}")
                return FAILURE
            except Exception as exc:  # a bug, not a parameter: keep the traceback
                self.configure_error = f"{type(exc).__name__}: {exc}"
                self.get_logger().error(f"configure failed:\n{traceback.format_exc()}")
                return ERROR  # on_error releases what was made
            self.get_logger().info("configured (inactive)")
            return super().on_configure(state)

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        with self.transition_lock:
            result = super().on_activate(state)  # publishers on first: the node may publish at once
            try:
                self._activate()
            except Exception:
                self.get_logger().error(f"activate failed:\n{traceback.format_exc()}")
                return ERROR
            self.get_logger().info("active")
            return result

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        with self.transition_lock:
            try:
                self._stop_activity("deactivate")
            except Exception:
                self.get_logger().error(f"deactivate failed:\n{traceback.format_exc()}")
                return ERROR
            self.get_logger().info("deactivated (inactive)")
            return super().on_deactivate(state)  # publishers off last: the stop went out

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        with self.transition_lock:
            self._teardown(active=False)
            self.get_logger().info("cleaned up (unconfigured)")
            return super().on_cleanup(state)

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        # ``state`` is the state the shutdown started from.
        with self.transition_lock:
            self._teardown(active=state.label == "active", reason="shutdown")
            self.get_logger().info(f"shut down from {state.label}")
            return super().on_shutdown(state)

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        with self.transition_lock:
            try:
                self._teardown(active=True, reason="error")
            except Exception:
                self.get_logger().error(f"releasing after an error failed:\n{traceback.format_exc()}")
                return FAILURE  # -> finalized
            return SUCCESS  # -> unconfigured

    def _stop_activity(self, reason: str) -> None:
        self._deactivate(reason)
        self._destroy(self._active_entities)

    def _teardown(self, active: bool, reason: str = "cleanup") -> None:
        """Stop (``active``: the node's stop first) and release everything the configure made."""
        if active:
            self._stop_activity(reason)
            super().on_deactivate(LifecycleState("active", 3))
        self._destroy(self._active_entities)
        self._release()
        self._destroy(self._configured_entities)
        self.params = None

    def destroy_node(self):
        """Stop and release what the node still holds (threads, GPU / GL resources), then destroy it."""
        if self.lifecycle_state in ("inactive", "active"):
            self._teardown(active=self.is_active, reason="shutdown")
        return super().destroy_node()

    # -- the change_state service -----------------------------------------------------------
    def _guard_change_state(self) -> None:
        """rclpy raises out of the executor on a transition the current state does not offer
        (``activate`` while unconfigured), ending the process: answer ``success: false`` instead."""
        service = getattr(self, "_service_change_state", None)
        if service is None:
            return
        callback = service.callback

        def change_state(request, response):
            try:
                return callback(request, response)
            except _rclpy.RCLError as exc:
                self.get_logger().warning(
                    f"transition {request.transition.label or request.transition.id} refused in state "
                    f"{self.lifecycle_state}: {exc}"
                )
                response.success = False
                return response

        service.callback = change_state


def autostart(nodes: Sequence[ManagedNode]) -> str | None:
    """Configure, then activate, every node whose ``autostart`` is true, in the order given.

    Returns:
        None, or why a node could not be configured or activated (names the parameter).
    """
    starting = [node for node in nodes if node.autostart]
    for node in starting:
        if node.trigger_configure() != SUCCESS:
            return node.configure_error or f"{node.get_name()}: configure failed"
    for node in starting:
        if node.trigger_activate() != SUCCESS:
            return f"{node.get_name()}: activate failed (see the error above)"
    return None


def lifecycle_statuses(state: str, stages: Sequence[str]) -> list[Status]:
    """What a node that is not active reports for each of its stages: OK, the lifecycle state as
    the message (no input is expected, so starvation is not an error).

    >>> [status] = lifecycle_statuses("inactive", ["flow"])
    >>> status.level.name, status.message
    ('OK', 'inactive (lifecycle): not running')
    """
    return [
        Status(name=stage, level=Level.OK, message=f"{state} (lifecycle): not running", values=(("lifecycle", state),))
        for stage in stages
    ]


def shutdown(node, reason: str = "shutdown") -> None:
    """Stop a node of the process stop-first: a managed node takes its shutdown transition (from
    any state), a plain one gets ``stop_commands(reason)`` where it has one."""
    if isinstance(node, ManagedNode):
        if node.lifecycle_state in ("unconfigured", "inactive", "active"):
            node.trigger_shutdown()
        return
    stop_commands: Callable[[str], None] | None = getattr(node, "stop_commands", None)
    if stop_commands is not None:
        stop_commands(reason)
