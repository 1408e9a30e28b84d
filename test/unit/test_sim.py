"""Tabletop pushing simulation and its scripted expert (PyBullet; skipped without it)."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest

from fovea_vla.core.sim import tabletop as tabletop_module
from fovea_vla.core.sim.expert import PushExpert, PushExpertConfig, expert_success_rate, run_expert
from fovea_vla.core.sim.tabletop import (
    BLOCK_COLOURS,
    SQUARE_COLOURS,
    TabletopConfig,
    TabletopEnv,
    matrix_to_rpy,
    rpy_to_matrix,
)

SMALL = {"image_width": 160, "image_height": 120}


@pytest.fixture(scope="module")
def pybullet():
    return pytest.importorskip("pybullet")


@pytest.fixture
def env(pybullet):
    with TabletopEnv(TabletopConfig(**SMALL)) as environment:
        yield environment


@pytest.fixture(scope="module")
def blind_env(pybullet):
    """No rendering: for tests that need only the physics and the layout."""
    with TabletopEnv(TabletopConfig(render=False)) as environment:
        yield environment


# ------------------------------------------------------------------------------------ pure helpers
def test_doctests():
    assert doctest.testmod(tabletop_module).failed == 0


def test_rpy_round_trip_and_convention():
    rng = np.random.default_rng(0)
    for roll, pitch, yaw in rng.uniform([-3, -1.5, -3], [3, 1.5, 3], (20, 3)):
        rotation = rpy_to_matrix([roll, pitch, yaw])
        np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-12)
        np.testing.assert_allclose(matrix_to_rpy(rotation), [roll, pitch, yaw], atol=1e-9)
    # R = Rz(yaw) Ry(pitch) Rx(roll): roll acts first.
    np.testing.assert_allclose(rpy_to_matrix([np.pi / 2, 0, np.pi / 2]) @ [0, 1, 0], [0, 0, 1], atol=1e-12)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"control_hz": 25.0}, "control_hz"),
        ({"control_hz": 60.0}, "control_hz"),
        ({"image_width": 10}, "image_width"),
        ({"image_height": 64.0}, "image_height"),
        ({"num_blocks": (1, 4)}, "num_blocks"),
        ({"num_blocks": (3, 2)}, "num_blocks"),
        ({"fov_deg": math.nan}, "fov_deg"),
        ({"camera_target": (0.95, 0.0, 0.5), "camera_eye": (0.95, 0.0, 0.95)}, "camera_target"),
        ({"workspace_high": (0.2, 0.4, 0.45)}, "workspace_high"),
        ({"render": 1}, "render"),
    ],
)
def test_config_rejects_bad_values(changes, field):
    with pytest.raises(ValueError, match=rf"sim\.{field}="):
        TabletopConfig(**changes)


def test_config_normalises_and_accepts_valid_rates():
    cfg = TabletopConfig(num_blocks=[3, 3], layout_low=np.array([0.4, -0.2]), control_hz=20)
    assert cfg.num_blocks == (3, 3) and cfg.layout_low == (0.4, -0.2)
    assert [TabletopConfig(control_hz=hz).substeps for hz in (10, 12, 15, 16, 20, 24, 30)] == [
        24,
        20,
        16,
        15,
        12,
        10,
        8,
    ]
    with pytest.raises(ValueError, match=r"expert\.max_speed="):
        PushExpertConfig(max_speed=0.0)
    with pytest.raises(ValueError, match=r"expert\.safe_height="):
        PushExpertConfig(safe_height=0.05, push_height=0.03)


# ----------------------------------------------------------------------------- environment: reset
def test_reset_is_deterministic_across_envs(pybullet):
    with TabletopEnv(TabletopConfig(**SMALL)) as first, TabletopEnv(TabletopConfig(**SMALL)) as second:
        assert first.client_id != second.client_id
        obs_a, obs_b = first.reset(3), second.reset(3)
        assert obs_a.rgb.shape == (120, 160, 3) and obs_a.rgb.dtype == np.uint8
        assert np.array_equal(obs_a.rgb, obs_b.rgb)
        assert np.array_equal(first.state(), second.state())
        assert first.instruction == second.instruction
        # Interleaved stepping of two live clients stays identical.
        action = np.r_[0.5, 0.1, 0.1, 0.0, 0.0, 0.0, 1.0]
        for _ in range(3):
            obs_a, obs_b = first.step(action), second.step(action)
        assert np.array_equal(obs_a.rgb, obs_b.rgb) and np.array_equal(first.state(), second.state())
        # A reset after stepping rebuilds the same scene.
        again = first.reset(3)
        assert np.array_equal(again.rgb, second.reset(3).rgb)
        assert again.step == 0 and again.time_s == 0.0
        other = second.reset(4)
        assert not np.array_equal(again.rgb, other.rgb)
        assert not np.array_equal(first.privileged()["block_positions"][:2], second.privileged()["block_positions"][:2])


def test_tasks_follow_the_spec(blind_env):
    counts, squares, blocks = set(), set(), set()
    for seed in range(20):
        obs = blind_env.reset(seed)
        task, info = blind_env.task, blind_env.privileged()
        assert obs.rgb.shape == (0, 0, 3)  # render=False
        assert blind_env.instruction == f"push the {task.block_colour} block onto the {task.square_colour} square"
        assert task.block_colour == task.block_colours[task.block_index] and task.block_colour in BLOCK_COLOURS
        assert task.square_colour == task.square_colours[task.square_index]
        assert sorted(task.square_colours) == sorted(SQUARE_COLOURS)
        assert len(set(task.block_colours)) == len(task.block_colours)
        counts.add(len(task.block_colours))
        squares.add(task.square_colour)
        blocks.add(task.block_colour)
        positions, centres = info["block_positions"], info["square_centres"]
        assert 2 <= len(positions) <= 4
        # Squares do not overlap; blocks rest on the table, off the squares, apart from each other.
        assert np.max(np.abs(centres[0] - centres[1])) >= task.square_size
        np.testing.assert_allclose(positions[:, 2], 0.02, atol=1e-3)
        assert np.all(np.max(np.abs(positions[:, None, :2] - centres[None]), axis=2) > task.square_size / 2)
        gaps = np.linalg.norm(positions[:, None, :2] - positions[None, :, :2], axis=2) + np.eye(len(positions))
        assert gaps.min() > 0.04
        assert np.linalg.norm(positions[task.block_index, :2] - task.square_centre) >= 0.12
        assert np.all((positions[:, :2] >= (0.40, -0.20)) & (positions[:, :2] <= (0.65, 0.20)))
        assert not blind_env.success()
    # The seed varies the number of blocks and the chosen block and square.
    assert counts == {2, 3, 4} and squares == set(SQUARE_COLOURS) and len(blocks) >= 3


def test_home_pose_points_down_in_tool_frame(env):
    obs = env.reset(0)
    assert obs.ee_pose.shape == (6,) and obs.joint_positions.shape == (7,) and obs.finger_positions.shape == (2,)
    np.testing.assert_allclose(obs.ee_pose[3:], 0.0, atol=0.01)  # gripper down is rpy 0, not roll = pi
    np.testing.assert_allclose(obs.ee_pose[:3], (0.40, 0.0, 0.25), atol=0.01)
    assert obs.gripper < 0.05  # starts open
    np.testing.assert_array_equal(env.state(), np.r_[obs.ee_pose, obs.gripper])
    assert tuple(f"panda_joint{i}" for i in range(1, 8)) == env.JOINT_NAMES


# ------------------------------------------------------------------------------ environment: step
@pytest.mark.parametrize(
    "target",
    [
        (0.55, 0.15, 0.10, 0.0, 0.0, 0.0),
        (0.62, -0.18, 0.03, 0.0, 0.0, 0.0),
        (0.45, 0.0, 0.20, 0.2, -0.15, 0.5),
    ],
)
def test_end_effector_reaches_target(blind_env, target):
    blind_env.reset(1)
    action = np.r_[target, 1.0]
    for _ in range(8):
        obs = blind_env.step(action)
    assert np.linalg.norm(obs.ee_pose[:3] - target[:3]) < 0.01
    np.testing.assert_allclose(obs.ee_pose[3:], target[3:], atol=0.03)
    assert obs.gripper > 0.95 and obs.step == 8
    assert obs.time_s == pytest.approx(0.8)


def test_target_is_clipped_to_the_workspace(blind_env):
    blind_env.reset(2)
    for _ in range(10):
        obs = blind_env.step(np.r_[0.5, 0.3, -1.0, 0.0, 0.0, 0.0, 0.0])
    assert obs.ee_pose[2] > 0.01  # never driven into the table
    for _ in range(6):
        obs = blind_env.step(np.r_[0.5, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0])
    assert obs.ee_pose[2] < 0.46 and obs.gripper < 0.05


def test_invalid_actions_are_refused(env):
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(7))
    env.reset(0)
    for bad in (np.r_[0.5, 0.0, np.nan, 0.0, 0.0, 0.0, 1.0], np.r_[np.inf, 0.0, 0.2, 0.0, 0.0, 0.0, 1.0]):
        with pytest.raises(ValueError, match="finite"):
            env.step(bad)
    with pytest.raises(ValueError, match=r"\(7,\)"):
        env.step(np.zeros(6))
    with pytest.raises(ValueError, match="seed"):
        env.reset(-1)


def test_success_is_block_centre_inside_square_on_table(env, pybullet):
    env.reset(5)
    task, client = env.task, env.client_id
    half = task.square_size / 2

    def place(dx, dy, z=0.02):
        pybullet.resetBasePositionAndOrientation(
            task.block_id, [*(task.square_centre + np.array([dx, dy])), z], (0, 0, 0, 1), physicsClientId=client
        )
        return env.success()

    assert place(0.0, 0.0)
    assert place(half - 0.002, -(half - 0.002))
    assert not place(half + 0.002, 0.0)
    assert not place(0.0, 0.0, z=0.08)  # lifted above the square


# ------------------------------------------------------------------------------------------ camera
def test_camera_intrinsics_match_the_rendered_image(env):
    obs = env.reset(7)
    info, privileged = env.camera_info(), env.privileged()
    assert (info.width, info.height) == (160, 120)
    assert info.fx == pytest.approx(80.0 / math.tan(math.radians(30.0))) and info.fy == info.fx
    assert (info.cx, info.cy) == (79.5, 59.5)
    np.testing.assert_allclose(info.rotation.T @ info.rotation, np.eye(3), atol=1e-12)
    palette = {**BLOCK_COLOURS, **SQUARE_COLOURS}
    names = list(palette)
    chroma = np.array([np.array(palette[n][:3]) / np.linalg.norm(palette[n][:3]) for n in names])
    points = np.r_[privileged["block_positions"], np.c_[privileged["square_centres"], np.zeros(2)]]
    expected = [*privileged["block_colours"], *privileged["square_colours"]]
    for (u, v), name in zip(info.project(points), expected, strict=True):
        assert 0 <= u < info.width and 0 <= v < info.height
        pixel = obs.rgb[round(v), round(u)].astype(np.float64)
        assert names[int(np.argmax(chroma @ (pixel / np.linalg.norm(pixel))))] == name


# ------------------------------------------------------------------------------------------ expert
@pytest.mark.parametrize("seed", [0, 11, 23])
def test_expert_pushes_the_block_onto_the_square(env, seed):
    result = run_expert(env, seed)
    assert result.success, (seed, result.instruction, result.final_distance)
    assert env.success() and result.final_distance <= env.task.square_size / 2 * math.sqrt(2)
    assert 5 < result.steps < env.cfg.max_steps
    assert result.actions.shape == (result.steps, 7) and result.states.shape == (result.steps + 1, 7)
    assert "push" in result.phases
    # Smooth, learnable targets: gripper closed, pointing down, at most 1.5 cm between commands.
    assert np.all(result.actions[:, 3:6] == 0.0) and np.all(result.actions[:, 6] == 1.0)
    assert np.linalg.norm(np.diff(result.actions[:, :3], axis=0), axis=1).max() <= 0.015 + 1e-9
    # The other blocks are left where they were.
    others = np.delete(np.arange(len(env.task.block_colours)), env.task.block_index)
    moved = env.privileged()["block_positions"][others] - env.task.initial_block_positions[others]
    assert np.abs(moved).max(initial=0.0) < 0.01


def test_rendering_does_not_change_the_physics(env, blind_env):
    seen, blind = run_expert(env, 4, max_steps=25), run_expert(blind_env, 4, max_steps=25)
    assert np.array_equal(seen.states, blind.states) and np.array_equal(seen.actions, blind.actions)


def test_expert_success_rate_and_hold_after_success(blind_env):
    assert expert_success_rate([0, 1]) == 1.0
    result = run_expert(blind_env, 1)
    expert = PushExpert(blind_env.task)
    obs = blind_env.step(np.r_[result.states[-1, :6], 1.0])
    action = expert.act(obs, blind_env.privileged())
    assert expert.phase == "done"
    np.testing.assert_allclose(action[:3], obs.ee_pose[:3])
    with pytest.raises(ValueError, match="no seeds"):
        expert_success_rate([])
