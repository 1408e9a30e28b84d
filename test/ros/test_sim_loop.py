"""The closed loop over ROS: sim_bridge (robot + camera) and vla_stack (fovea_node + policy_node with the
bundled tabletop_push policy) in separate processes, two short episodes.

This shows the loop runs end to end: frames reach the policy, its commands move the simulated arm, episodes
finish and are reported. Success rates (and whether the arm reaches the named block) come from
``fovea-vla eval-sim``, not from this test.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from geometry_msgs.msg import PoseStamped
from std_msgs.msg import String

from fovea_vla.bringup import config_dir, node_graph
from fovea_vla.launcher import GraphProcesses
from fovea_vla.nodes import qos
from fovea_vla_msgs.msg import PolicyStats

tabletop = pytest.importorskip("fovea_vla.core.sim.tabletop")
pytest.importorskip("pybullet")

POLICY = config_dir().parent / "policies" / "tabletop_push"
FIRST_SEED = 20_000
MAX_STEPS = 80
HOME_XY = np.array([0.40, 0.0])  # where the tool starts (tabletop HOME_JOINTS)
STARTUP_S = 120.0


@pytest.fixture(scope="module")
def episodes():
    """Two consecutive seeds whose named block starts >= 0.15 m from the tool, and those blocks' (x, y),
    from the deterministic simulator: moving next to the block is then clearly a movement toward it."""
    env = tabletop.TabletopEnv(tabletop.TabletopConfig(render=False))
    try:
        blocks = {}
        for seed in range(FIRST_SEED, FIRST_SEED + 200):
            env.reset(seed)
            task = env.task
            blocks[seed] = np.asarray(task.initial_block_positions[task.block_index][:2])
            far = [np.linalg.norm(blocks[s] - HOME_XY) >= 0.15 for s in (seed - 1, seed) if s in blocks]
            if len(far) == 2 and all(far):
                return {seed - 1: blocks[seed - 1], seed: blocks[seed]}
        raise AssertionError("no two consecutive seeds with a distant block")
    finally:
        env.close()


@pytest.mark.skipif(not (POLICY / "config.json").is_file(), reason="bundled policy not present")
def test_two_episodes_over_ros_move_the_arm(ros_probe, tmp_path, episodes):
    seeds = sorted(episodes)
    graph = node_graph(config="sim.yaml", use_replay=False, policy=True, sim=True, captions=False)
    parameters = {"sim_bridge": {"seed": seeds[0], "episodes": len(seeds), "max_steps": MAX_STEPS}}
    results: list[dict] = []
    poses: list[tuple[int, np.ndarray]] = []
    stats: list[PolicyStats] = []
    node = ros_probe.node
    namespace = "/simloop"
    node.create_subscription(String, f"{namespace}/sim/episode", lambda m: results.append(json.loads(m.data)), 10)
    node.create_subscription(
        PoseStamped,
        f"{namespace}/ee_pose",
        lambda m: poses.append((len(results), np.array([m.pose.position.x, m.pose.position.y]))),
        qos.sensor("best_effort", 50),
    )
    node.create_subscription(PolicyStats, f"{namespace}/policy_stats", stats.append, qos.outputs(100))
    processes = GraphProcesses(graph, namespace="simloop", parameters=parameters, log_dir=tmp_path).start()
    try:
        ros_probe.wait_for(lambda: stats, STARTUP_S, "the first chunk", processes)
        ros_probe.wait_for(lambda: len(results) >= len(seeds), 2 * MAX_STEPS / 10 + 60, "two episodes", processes)
    finally:
        codes = processes.stop()
    assert codes == {"sim_bridge": 0, "vla_stack": 0}, f"unclean exit {codes} (logs in {tmp_path})"
    assert [r["seed"] for r in results] == seeds
    assert stats[-1].actions_enabled and stats[-1].chunks_predicted > 10
    for episode, seed in enumerate(seeds):
        track = np.array([xy for index, xy in poses if index == episode])
        assert len(track) > 10, f"episode {episode}: {len(track)} poses"
        # The policy's commands move the arm: over 5 cm of tool path in the episode.
        travelled = np.linalg.norm(np.diff(track, axis=0), axis=1).sum()
        assert travelled > 0.05, (seed, travelled)
        # Whether it gets to the named block is not asserted: the bundled first-run policy does on some seeds
        # and not on others (docs/BENCHMARKS.md, "Tabletop push policy"); eval-sim reports success rates.
        distances = np.linalg.norm(track - episodes[seed], axis=1)
        print(f"seed {seed}: tool {distances[0]:.3f} m from the block at the start, {distances.min():.3f} m closest")
