"""Process entry point shared by the nodes: init, autostart, spin, a stop-first shutdown, exit codes.

rclpy's own signal handler shuts the context down at once, after which nothing can be published.
Here SIGINT and SIGTERM only end the spin loop; then every node is stopped while the context still
works, in the order given: a managed node (fovea_node, policy_node) takes its ``shutdown``
transition, whose first step is policy_node's stop command (zero twist, hold trajectory); a plain
node gets ``stop_commands()`` where it has one. Only then are the nodes destroyed (threads joined,
GPU / GL resources released) and rclpy shut down. A process whose managed nodes were all shut down
through their ``change_state`` service (a lifecycle manager) exits too, with 0.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Sequence

import rclpy
from rclpy.executors import Executor, ExternalShutdownException, SingleThreadedExecutor
from rclpy.signals import SignalHandlerOptions

from fovea_vla.nodes.lifecycle import ManagedNode, autostart, shutdown

__all__ = ["init", "run_node", "spin_until_signal", "start"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def init(args=None) -> None:
    """``rclpy.init`` without rclpy's signal handlers (see the module docstring)."""
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)


def start(nodes: Sequence) -> bool:
    """Autostart the process's managed nodes (configure all, then activate all, in order).

    Returns:
        False when one was refused: the reason, naming the parameter, is logged as fatal.
    """
    managed = [node for node in nodes if isinstance(node, ManagedNode)]
    refused = autostart(managed) if managed else None
    if refused is not None:
        rclpy.logging.get_logger(managed[0].get_name() if len(managed) == 1 else "vla_stack").fatal(refused)
        return False
    return True


def spin_until_signal(executors: Executor | Sequence[Executor], nodes) -> None:
    """Spin until SIGINT / SIGTERM, an external shutdown, or every node of the process being a
    managed node in ``finalized``; then stop each node stop-first (see the module docstring), in
    the order of ``nodes``.

    Args:
        executors: one executor, or several: the first spins on this thread, each further one on a
            thread of its own (so that one node's slow transition, e.g. loading a model, never
            delays another node's callbacks).
        nodes: every node of the process.
    """
    executors = [executors] if isinstance(executors, Executor) else list(executors)
    stop = threading.Event()
    received: list[int] = []
    failures: list[BaseException] = []
    managed = [node for node in nodes if isinstance(node, ManagedNode)]
    all_managed = bool(nodes) and len(managed) == len(nodes)

    def on_signal(signum, _frame) -> None:
        received.append(signum)
        stop.set()

    def finished() -> bool:
        if stop.is_set() or not rclpy.ok():
            return True
        return all_managed and all(node.lifecycle_state == "finalized" for node in managed)

    def spin_on_thread(executor) -> None:
        try:
            while not finished():
                executor.spin_once(timeout_sec=0.05)
        except ExternalShutdownException:
            pass
        except BaseException as exc:  # re-raised on the main thread
            failures.append(exc)
        finally:
            stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in _SIGNALS}
    threads = [threading.Thread(target=spin_on_thread, args=(ex,), daemon=True) for ex in executors[1:]]
    try:
        for thread in threads:
            thread.start()
        while not finished():
            executors[0].spin_once(timeout_sec=0.05)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if received and nodes:
            # Who stopped a node is otherwise invisible: a signalled exit is a clean exit.
            nodes[0].get_logger().info(f"{signal.Signals(received[0]).name} received: shutting down")
        if rclpy.ok():
            for node in nodes:
                shutdown(node, "shutdown")
    if failures:
        raise failures[0]


def run_node(node_class, args=None) -> int:
    """Create ``node_class()``, start it (a managed node with ``autostart``) and spin it until
    SIGINT / SIGTERM (or, managed, its shutdown transition).

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
        if not start([node]):
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
