"""Process entry point shared by the nodes: init, spin, a stop-first shutdown, exit codes.

rclpy's own signal handler shuts the context down at once, after which nothing can be published.
Here SIGINT and SIGTERM only end the spin loop; then every node gets ``stop_commands()`` (policy_node
commands a stop: zero twist, hold trajectory) while the context still works, and only then are the
nodes destroyed (threads joined, GPU / GL resources released) and rclpy shut down.
"""

from __future__ import annotations

import signal
import threading

import rclpy
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.signals import SignalHandlerOptions

__all__ = ["init", "run_node", "spin_until_signal"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def init(args=None) -> None:
    """``rclpy.init`` without rclpy's signal handlers (see the module docstring)."""
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)


def spin_until_signal(executor, nodes) -> None:
    """Spin ``executor`` until SIGINT / SIGTERM (or an external shutdown), then call each node's
    ``stop_commands()`` (where it has one) before returning."""
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum, _frame) -> None:
        received.append(signum)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in _SIGNALS}
    try:
        while not stop.is_set() and rclpy.ok():
            executor.spin_once(timeout_sec=0.05)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if received and nodes:
            # Who stopped a node is otherwise invisible: a signalled exit is a clean exit.
            nodes[0].get_logger().info(f"{signal.Signals(received[0]).name} received: shutting down")
        if rclpy.ok():
            for node in nodes:
                stop_commands = getattr(node, "stop_commands", None)
                if stop_commands is not None:
                    stop_commands("shutdown")


def run_node(node_class, args=None) -> int:
    """Create ``node_class()`` and spin it until SIGINT / SIGTERM.

    Returns:
        0 after a normal shutdown; 2 when the node refused its configuration (the reason, naming
        the parameter, is logged as fatal).
    """
    init(args)
    node = None
    try:
        try:
            node = node_class()
        except (ValueError, OSError, RuntimeError) as exc:
            rclpy.logging.get_logger(getattr(node_class, "NODE_NAME", node_class.__name__)).fatal(str(exc))
            return 2
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        spin_until_signal(executor, [node])
        executor.shutdown(timeout_sec=2.0)
    except KeyboardInterrupt:
        pass  # Ctrl-C while the node was still starting
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0
