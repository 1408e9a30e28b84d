"""Process entry point shared by the nodes: init, spin, clean shutdown, exit codes."""

from __future__ import annotations

import rclpy
from rclpy.executors import ExternalShutdownException

__all__ = ["run_node"]


def run_node(node_class, args=None) -> int:
    """Create ``node_class()`` and spin it until Ctrl-C or shutdown.

    Returns:
        0 after a normal shutdown; 2 when the node refused its configuration (the reason, naming
        the parameter, is logged as fatal).
    """
    rclpy.init(args=args)
    node = None
    try:
        try:
            node = node_class()
        except (ValueError, OSError, RuntimeError) as exc:
            rclpy.logging.get_logger(getattr(node_class, "NODE_NAME", node_class.__name__)).fatal(str(exc))
            return 2
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass  # Ctrl-C or SIGINT from a launcher, possibly while the node was still starting
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0
