"""vla_stack: fovea_node and policy_node in one process, so tokens reach the policy on the GPU.

The encoder's output tensor is handed to the action head through a :class:`LatestTokens` slot:
no serialisation, no device-to-host copy, no DDS hop. Both nodes keep their own names,
parameters, topics and lifecycle services (``/**/fovea_node`` and ``/**/policy_node`` sections of
the parameter files; ``fovea_node/change_state``, ``policy_node/change_state``). The heavy work runs
on the nodes' own threads: fovea_node's frame thread (the pipeline, on the newest camera message)
and policy_node's policy thread (the action head, woken by new tokens). Each node's short callbacks
(camera hand-over, control tick, services, lifecycle transitions) run on a single-threaded executor
of its own, each on its own thread: a transition of one node that takes seconds (fovea_node's
configure loads the encoder) never delays the other's control tick or e-stop. A multi-threaded
executor would busy-poll, holding the GIL, whenever a callback is still running.

Lifecycle: policy_node's configure asks fovea_node for its encoder (architecture, token width,
token budget) and fails with "configure fovea_node first" while fovea_node is unconfigured. With
``autostart`` the process configures fovea_node, then policy_node, then activates both; at shutdown
policy_node goes first, so its stop is out before anything is torn down.
"""

from __future__ import annotations

import sys

import rclpy
from rclpy.executors import SingleThreadedExecutor

from fovea_vla.core.policy.observation import LatestTokens
from fovea_vla.nodes.fovea_node import FoveaNode
from fovea_vla.nodes.params import ConfigError
from fovea_vla.nodes.policy_node import EncoderInfo, PolicyNode
from fovea_vla.nodes.runner import init, spin_until_signal, start

__all__ = ["NODE_NAMES", "build", "encoder_info", "main"]

NODE_NAMES = (FoveaNode.NODE_NAME, PolicyNode.NODE_NAME)


def encoder_info(fovea: FoveaNode) -> EncoderInfo:
    """What ``fovea``'s encoder produces, for policy_node's configure.

    Raises:
        ConfigError: fovea_node is not configured, or its encoder is off.
    """
    with fovea.transition_lock:  # not while fovea_node is being configured or cleaned up
        pipeline, params = fovea.pipeline, fovea.params
        if pipeline is None or params is None:
            raise ConfigError(f"policy_node: fovea_node is {fovea.lifecycle_state}: configure fovea_node first")
        if pipeline.encoder is None:
            raise ConfigError("policy_node: fovea_node has encoder.enabled=false, but the policy needs tokens")
        return EncoderInfo(params["encoder.architecture"], pipeline.encoder.embed_dim, params["foveation.num_tokens"])


def build(**node_kwargs) -> tuple[FoveaNode, PolicyNode]:
    """Create both nodes, unconfigured, wired together (rclpy must be initialised).

    Raises:
        ValueError: a parameter rclpy itself refused while declaring (rare: most refusals come at configure).
    """
    tokens = LatestTokens()
    fovea = FoveaNode(token_sink=tokens.publish, **node_kwargs)
    try:
        policy = PolicyNode(tokens, encoder=lambda: encoder_info(fovea), **node_kwargs)
    except Exception:
        fovea.destroy_node()
        raise
    fovea.add_instruction_listener(policy.set_instruction)
    return fovea, policy


def main(args=None) -> int:
    init(args)
    nodes = ()
    executors = []
    try:
        try:
            nodes = build()
        except (ValueError, OSError, RuntimeError) as exc:
            rclpy.logging.get_logger("vla_stack").fatal(str(exc))
            return 2
        # autostart: fovea_node configured first (policy_node's configure reads its encoder), then both activated.
        if not start(nodes):
            return 2
        executors = [SingleThreadedExecutor() for _ in nodes]
        for executor, node in zip(executors, nodes, strict=True):
            executor.add_node(node)
        # policy_node first: its stop goes out before anything is torn down.
        spin_until_signal(executors[::-1], nodes[::-1])
    except KeyboardInterrupt:
        pass  # Ctrl-C while the nodes were still starting
    finally:
        for executor in executors:
            executor.shutdown(timeout_sec=2.0)
        for node in nodes[::-1]:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
