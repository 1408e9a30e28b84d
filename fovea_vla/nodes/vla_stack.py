"""vla_stack: fovea_node and policy_node in one process, so tokens reach the policy on the GPU.

The encoder's output tensor is handed to the action head through a :class:`LatestTokens` slot:
no serialisation, no device-to-host copy, no DDS hop. Both nodes keep their own names,
parameters and topics (``/**/fovea_node`` and ``/**/policy_node`` sections of the parameter
files). The heavy work runs on the nodes' own threads: fovea_node's frame thread (the pipeline, on
the newest camera message) and policy_node's policy thread (the action head, woken by new tokens);
one single-threaded executor runs the short callbacks (camera hand-over, control tick, services).
A multi-threaded executor would busy-poll, holding the GIL, whenever a callback is still running.
"""

from __future__ import annotations

import sys

import rclpy
from rclpy.executors import SingleThreadedExecutor

from fovea_vla.core.policy.observation import LatestTokens
from fovea_vla.nodes.fovea_node import FoveaNode
from fovea_vla.nodes.policy_node import PolicyNode
from fovea_vla.nodes.runner import init, spin_until_signal

__all__ = ["NODE_NAMES", "build", "main"]

NODE_NAMES = (FoveaNode.NODE_NAME, PolicyNode.NODE_NAME)


def build(**node_kwargs) -> tuple[FoveaNode, PolicyNode]:
    """Create both nodes wired together (rclpy must be initialised).

    Raises:
        ValueError: a refused parameter of either node, naming it; or an encoder that is off.
    """
    tokens = LatestTokens()
    fovea = FoveaNode(token_sink=tokens.publish, **node_kwargs)
    try:
        encoder = fovea.pipeline.encoder
        if encoder is None:
            raise ValueError("vla_stack: fovea_node encoder.enabled=false, but the policy needs tokens")
        policy = PolicyNode(
            tokens,
            encoder_architecture=fovea.params["encoder.architecture"],
            token_dim=encoder.embed_dim,
            **node_kwargs,
        )
    except Exception:
        fovea.destroy_node()
        raise
    fovea.add_instruction_listener(policy.set_instruction)
    # Capture the head's CUDA graph for the configured budget now, before both nodes run in threads.
    policy.runner.warm_up(fovea.params["foveation.num_tokens"])
    return fovea, policy


def main(args=None) -> int:
    init(args)
    nodes = ()
    executor = None
    try:
        try:
            nodes = build()
        except (ValueError, OSError, RuntimeError) as exc:
            rclpy.logging.get_logger("vla_stack").fatal(str(exc))
            return 2
        executor = SingleThreadedExecutor()
        for node in nodes:
            executor.add_node(node)
        # policy_node first: its stop goes out before anything is torn down.
        spin_until_signal(executor, nodes[::-1])
    except KeyboardInterrupt:
        pass  # Ctrl-C while the nodes were still starting
    finally:
        if executor is not None:
            executor.shutdown(timeout_sec=2.0)
        for node in nodes[::-1]:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
