"""Tabletop pushing simulation and its scripted expert (PyBullet; skipped without it)."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest

from fovea_vla.core.sim import tabletop as tabletop_module
from fovea_vla.core.sim.expert import ActionNoise, PushExpert, PushExpertConfig, expert_success_rate, run_expert
from fovea_vla.core.sim.tabletop import (
    BLOCK_COLOURS,
    SQUARE_COLOURS,
    TabletopConfig,
    TabletopEnv,
    feasible_goals,
    layout_goals,
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
        ({"start_offset": (0.1, 0.3, 0.0)}, "start_offset"),
        ({"start_offset": (0.1, -0.1, 0.0)}, "start_offset"),
        ({"start_offset": (0.1, 0.1)}, "start_offset"),
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
    with pytest.raises(ValueError, match=r"expert\.max_lead="):
        PushExpertConfig(max_lead=0.0)
    with pytest.raises(ValueError, match=r"expert\.rise_height="):
        PushExpertConfig(rise_height=0.1)
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


def test_goals_of_a_layout_are_distinct_fair_and_deterministic():
    cfg = TabletopConfig()
    sizes = set()
    for seed in range(30):
        goals = feasible_goals(cfg, seed)
        sizes.add(len(goals))
        assert len(set(goals)) == len(goals)
        assert all(block in BLOCK_COLOURS and square in SQUARE_COLOURS for block, square in goals)
        drawn = layout_goals(cfg, seed, 3)
        assert drawn == layout_goals(cfg, seed, 3) and drawn[0] == goals[0]
        assert len(drawn) == min(3, len(goals)) and set(drawn) <= set(goals)
        assert layout_goals(cfg, seed, 1) == goals[:1]
    assert min(sizes) >= 1 and max(sizes) >= 3  # most layouts offer several goals
    with pytest.raises(ValueError, match="count=0"):
        layout_goals(cfg, 0, 0)
    with pytest.raises(ValueError, match="seed=-1"):
        feasible_goals(cfg, -1)


def test_reset_with_a_goal_keeps_the_scene_and_changes_the_task(env):
    own, other, *_ = feasible_goals(env.cfg, 0)
    first = env.reset(0)
    scene = env.privileged()["block_positions"]
    task = env.task
    assert (task.block_colour, task.square_colour) == own
    assert np.array_equal(env.reset(0, goal=own).rgb, first.rgb) and env.task.instruction == task.instruction
    again = env.reset(0, goal=other)
    assert np.array_equal(again.rgb, first.rgb)  # the same image ...
    np.testing.assert_array_equal(env.privileged()["block_positions"], scene)
    assert (env.task.block_colour, env.task.square_colour) == other  # ... with another instruction
    assert env.instruction == f"push the {other[0]} block onto the {other[1]} square"
    assert env.task.block_id == env.task.block_ids[env.task.block_colours.index(other[0])]
    np.testing.assert_array_equal(env.task.square_centre, env.task.square_centres[env.task.square_index])


def test_reset_refuses_a_goal_outside_the_scene_or_unfair(blind_env):
    blind_env.reset(1)
    missing = next(c for c in BLOCK_COLOURS if c not in blind_env.task.block_colours)
    with pytest.raises(ValueError, match=r"goal=.*seed 1 has blocks"):
        blind_env.reset(1, goal=(missing, "green"))
    unfair = next(
        (block, square)
        for block in blind_env.task.block_colours
        for square in SQUARE_COLOURS
        if (block, square) not in feasible_goals(blind_env.cfg, 1)
    )
    with pytest.raises(ValueError, match="not a fair task"):
        blind_env.reset(1, goal=unfair)
    with pytest.raises(ValueError, match="goal="):
        blind_env.reset(1, goal="red")


def test_random_start_follows_the_seed_not_the_goal(pybullet):
    extent = np.array([0.08, 0.15, 0.05])
    with (
        TabletopEnv(TabletopConfig(render=False, start_offset=tuple(extent))) as moved,
        TabletopEnv(TabletopConfig(render=False)) as fixed,
    ):
        home = fixed.reset(1).ee_pose
        starts = []
        for seed in (1, 2, 3):
            goals = feasible_goals(moved.cfg, seed)
            poses = [moved.reset(seed, goal=goal).ee_pose for goal in goals[:2]]
            np.testing.assert_array_equal(poses[0], poses[1])  # every goal of a layout starts alike
            np.testing.assert_array_equal(poses[0], moved.reset(seed).ee_pose)
            assert np.all(np.abs(poses[0][:3] - home[:3]) <= extent + 0.005)  # IK settles within ~mm
            np.testing.assert_allclose(poses[0][3:], 0.0, atol=0.02)  # pointing down
            # The layout is the seed's, whatever the start.
            blocks = moved.privileged()["block_positions"]
            fixed.reset(seed)
            np.testing.assert_allclose(blocks[:, :2], fixed.privileged()["block_positions"][:, :2], atol=1e-3)
            starts.append(poses[0][:3])
        assert np.ptp(np.array(starts), axis=0).min() > 0.005  # seeds start apart
        assert run_expert(moved, 2).success


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
    # Learnable targets: gripper closed, pointing down, each command at most max_lead (2 cm) from the tool.
    assert np.all(result.actions[:, 3:6] == 0.0) and np.all(result.actions[:, 6] == 1.0)
    assert np.linalg.norm(result.actions[:, :3] - result.states[:-1, :3], axis=1).max() <= 0.02 + 1e-9
    # The other blocks are left where they were.
    others = np.delete(np.arange(len(env.task.block_colours)), env.task.block_index)
    moved = env.privileged()["block_positions"][others] - env.task.initial_block_positions[others]
    assert np.abs(moved).max(initial=0.0) < 0.01


def test_expert_is_a_function_of_the_present_state(blind_env):
    """A fresh expert labels every state of an episode as the one that acted did: one state, one label
    (what behaviour cloning and DAgger relabelling need)."""
    obs = blind_env.reset(5)
    acting = PushExpert()
    phases = set()
    for _ in range(60):
        action = acting.act(obs, blind_env.privileged())
        phases.add(acting.phase)
        np.testing.assert_array_equal(PushExpert().act(obs, blind_env.privileged()), action)
        obs = blind_env.step(action)
    assert {"approach", "descend", "push"} <= phases


def test_lookahead_undoes_steps_and_expert_plan_is_the_experts_future(blind_env):
    from fovea_vla.core.sim.expert import expert_plan

    obs = blind_env.reset(2)
    expert = PushExpert()
    for _ in range(5):
        obs = blind_env.step(expert.act(obs, blind_env.privileged()))
    state, blocks, step = blind_env.state(), blind_env.privileged()["block_positions"], obs.step
    plan = expert_plan(blind_env, obs, 12)
    np.testing.assert_array_equal(blind_env.state(), state)
    np.testing.assert_array_equal(blind_env.privileged()["block_positions"], blocks)
    assert plan.shape == (12, 7)
    np.testing.assert_array_equal(plan[0], expert.act(obs, blind_env.privileged()))
    # The plan is what the expert then does: the same actions when it does take over.
    taken = []
    for _ in range(12):
        taken.append(expert.act(obs, blind_env.privileged()))
        obs = blind_env.step(taken[-1])
    assert obs.step == step + 12 and obs.rgb.size == 0
    np.testing.assert_allclose(np.array(taken), plan, atol=1e-5)
    # Steps inside lookahead may render or not; outside, the step count and the physics go on from the restore.
    with blind_env.lookahead():
        assert blind_env.step(plan[-1], render=True).rgb.shape == (480, 640, 3)
    assert blind_env.step(plan[-1]).step == step + 13
    with pytest.raises(ValueError, match="horizon=0"):
        expert_plan(blind_env, obs, 0)


def test_expert_solves_the_other_goals_of_a_layout(blind_env):
    for seed in (1, 3):
        for goal in layout_goals(blind_env.cfg, seed, 3)[1:]:
            result = run_expert(blind_env, seed, goal=goal)
            assert result.success and result.instruction.startswith(f"push the {goal[0]} block"), (seed, goal)


def test_action_noise_is_smooth_seeded_and_leaves_orientation_and_gripper():
    action = np.r_[0.5, 0.0, 0.1, 0.0, 0.0, 0.0, 1.0]
    first, second = ActionNoise(0.02, 10.0, (3, 1, 2)), ActionNoise(0.02, 10.0, (3, 1, 2))
    noisy = np.array([first(action) for _ in range(4000)])
    assert np.array_equal(noisy[:50], [second(action) for _ in range(50)])
    np.testing.assert_array_equal(noisy[0], action)  # the first command is clean
    np.testing.assert_array_equal(noisy[:, 3:], np.tile(action[3:], (len(noisy), 1)))
    offsets = noisy[:, :3] - action[:3]
    np.testing.assert_allclose(offsets[500:].std(axis=0), [0.02, 0.02, 0.01], rtol=0.35)
    # Drifts rather than jitters: a step changes the offset by about 0.02 * sqrt(2 (1 - exp(-0.1))) = 8.7 mm.
    np.testing.assert_allclose(np.diff(offsets[:, 0]).std(), 0.0087, rtol=0.15)
    np.testing.assert_array_equal(ActionNoise(0.0, 10.0, 0)(action), action)
    with pytest.raises(ValueError, match=r"std=-0\.1"):
        ActionNoise(-0.1, 10.0, 0)
    with pytest.raises(ValueError, match="time_constant_s=0"):
        ActionNoise(0.01, 10.0, 0, time_constant_s=0)


def test_rendering_does_not_change_the_physics(env, blind_env):
    seen, blind = run_expert(env, 4, max_steps=25), run_expert(blind_env, 4, max_steps=25)
    assert np.array_equal(seen.states, blind.states) and np.array_equal(seen.actions, blind.actions)


def test_expert_success_rate_and_hold_after_success(blind_env):
    assert expert_success_rate([0, 1]) == 1.0
    result = run_expert(blind_env, 1)
    expert = PushExpert()
    obs = blind_env.step(np.r_[result.states[-1, :6], 1.0])
    action = expert.act(obs, blind_env.privileged())
    assert expert.phase == "done"
    np.testing.assert_allclose(action[:3], obs.ee_pose[:3])
    with pytest.raises(ValueError, match="no seeds"):
        expert_success_rate([])


# ---------------------------------------------------------------------------------- record-sim CLI
def test_record_sim_writes_several_instructions_per_layout(pybullet, tmp_path, capsys):
    pytest.importorskip("pyarrow")
    from fovea_vla.cli import main
    from fovea_vla.core.policy.dataset import LeRobotDataset

    out = tmp_path / "demo"
    argv = ["record-sim", "--out", str(out), "--episodes", "2", "--seed", "1", "--image-size", "64x48"]
    assert main([*argv, "--instructions-per-layout", "2"]) == 0
    assert "expert: 4/4 successes" in capsys.readouterr().out
    dataset = LeRobotDataset(out)
    goals = [goal for seed in (1, 2) for goal in layout_goals(TabletopConfig(), seed, 2)]
    assert [dataset.episode(i).task for i in dataset.episode_indices] == [
        f"push the {block} block onto the {square} square" for block, square in goals
    ]
    assert [dataset.episode_extra(i)["layout"] for i in dataset.episode_indices] == [1, 1, 2, 2]
    assert dataset.recording["instructions_per_layout"] == 2 and dataset.recording["first_seed"] == 1
    first_frames = [next(iter(dataset.episode(i).frames)) for i in (0, 1)]
    assert np.abs(first_frames[0].astype(int) - first_frames[1]).mean() < 1.0  # one scene (lossy video)
    with pytest.raises(SystemExit, match="instructions-per-layout=0"):
        main([*argv[:2], str(tmp_path / "other"), *argv[3:], "--instructions-per-layout", "0"])
    # --append adds episodes (here perturbed by --action-noise; the labels stay the expert's clean commands).
    extra = ["--append", "--action-noise", "0.005", "--start-offset", "0.05,0.05,0"]
    assert main([*argv[:4], "1", "--seed", "3", "--image-size", "64x48", *extra]) == 0
    dataset = LeRobotDataset(out)
    assert dataset.num_episodes == 5 and dataset.episode_extra(4) == {"layout": 3, "actor": "expert"}
    appended = dataset.info["recording_appended"][0]
    assert appended["action_noise_m"] == 0.005 and appended["start_offset_m"] == [0.05, 0.05, 0.0]
    assert np.abs(dataset.episode(4).states[0, :3] - dataset.episode(0).states[0, :3]).max() > 1e-3
    appended_episode = dataset.episode(4)
    labels = appended_episode.actions
    assert np.all(labels[:, 3:6] == 0.0)
    assert np.linalg.norm(labels[:, :3] - appended_episode.states[:, :3], axis=1).max() <= 0.02 + 1e-6
    # Each frame carries the expert's plan from it (16 steps by default); its first step is the label.
    assert dataset.plan_horizon == 16 and dataset.recording["plan_horizon"] == 16
    np.testing.assert_array_equal(appended_episode.plans[:, 0], labels)
    # Every frame records where the named block and square are (an auxiliary training target).
    assert dataset.environment_names == ("block_x", "block_y", "square_x", "square_y")
    env = TabletopEnv(TabletopConfig(image_width=64, image_height=48))
    try:
        env.reset(1, goal=goals[1])
        first = env.privileged()
    finally:
        env.close()
    environment = dataset.episode(1).environment_states
    np.testing.assert_allclose(environment[0, :2], first["target_block_position"][:2], atol=1e-6)
    assert np.all(environment[:, 2:] == environment[0, 2:])
    np.testing.assert_allclose(environment[0, 2:], first["target_square_centre"], atol=1e-6)
    assert np.linalg.norm(environment[-1, :2] - environment[0, :2]) > 0.03  # the block was pushed


def test_record_sim_with_workers_writes_the_same_dataset(pybullet, tmp_path, capsys):
    """Episodes simulated in two processes are written in job order: the same states, actions and tasks."""
    pytest.importorskip("pyarrow")
    from fovea_vla.cli import main
    from fovea_vla.core.policy.dataset import LeRobotDataset

    argv = ["record-sim", "--episodes", "2", "--seed", "4", "--image-size", "64x48", "--instructions-per-layout", "2"]
    assert main([*argv, "--out", str(tmp_path / "one")]) == 0
    assert main([*argv, "--out", str(tmp_path / "two"), "--workers", "2"]) == 0
    one, two = LeRobotDataset(tmp_path / "one"), LeRobotDataset(tmp_path / "two")
    assert one.episode_lengths == two.episode_lengths and one.tasks == two.tasks
    for index in one.episode_indices:
        a, b = one.episode(index), two.episode(index)
        np.testing.assert_array_equal(a.states, b.states)
        np.testing.assert_array_equal(a.actions, b.actions)
        np.testing.assert_array_equal(a.environment_states, b.environment_states)
    with pytest.raises(SystemExit, match="workers=0"):
        main([*argv, "--out", str(tmp_path / "three"), "--workers", "0"])


def test_record_sim_workers_report_a_policy_setup_error(pybullet, tmp_path):
    """A DAgger recording whose policy folder holds no checkpoint ends with the error (a worker that fails
    while setting up must not leave the pool respawning workers forever)."""
    pytest.importorskip("pyarrow")
    from fovea_vla.cli import main
    from fovea_vla.core.policy.checkpoint import CheckpointError

    argv = ["record-sim", "--episodes", "2", "--seed", "4", "--image-size", "64x48", "--workers", "2"]
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        main([*argv, "--out", str(tmp_path / "dagger"), "--policy", str(tmp_path)])


# ------------------------------------------------------------------------------ closed loop (DAgger)
def test_closed_loop_takes_a_goal_and_reports_every_step_for_labelling(env):
    """run_episode with another goal of the layout, an untrained head on a tiny random encoder, and an
    on_step hook that labels the visited states with the expert (what record-sim --policy does)."""
    from fovea_vla.core.encoder import EncoderConfig
    from fovea_vla.core.flow import FlowConfig
    from fovea_vla.core.foveation import FoveationConfig
    from fovea_vla.core.pipeline import FoveaPipeline, PipelineConfig
    from fovea_vla.core.policy.checkpoint import PolicySpec
    from fovea_vla.core.policy.head import ActionHead, ActionHeadConfig
    from fovea_vla.core.policy.runner import ActionHeadRunner, RunnerConfig
    from fovea_vla.core.policy.safety import SafetyLimits
    from fovea_vla.core.sim.closed_loop import run_episode, summarize_episodes
    from fovea_vla.core.texture import TextureConfig

    class ZeroText:
        name, dim = "zero-test", 8

        def embed(self, text: str) -> np.ndarray:
            return np.zeros(self.dim, np.float32)

    pipeline = FoveaPipeline(
        PipelineConfig(
            flow=FlowConfig(backend="dis", grid=4, preset="ultrafast", scale=0.5),
            texture=TextureConfig(backend="torch", device="cpu"),
            foveation=FoveationConfig(num_tokens=16),
            encoder=EncoderConfig(architecture=None, embed_dim=32, depth=1, num_heads=2, device="cpu"),
        )
    )
    head = ActionHeadConfig(
        token_dim=32, instruction_dim=8, state_dim=7, action_dim=7, chunk_size=4, width=16, depth=1, num_heads=2
    )
    names = ("x", "y", "z", "roll", "pitch", "yaw", "gripper")
    spec = PolicySpec(
        head=head,
        action_space="ee_pose",
        action_names=names,
        state_names=names,
        step_s=0.1,
        encoder_architecture="tiny-test",
        text_encoder=ZeroText.name,
    )
    runner = ActionHeadRunner(ActionHead.from_config(head), RunnerConfig(device="cpu"))
    goal = feasible_goals(env.cfg, 3)[1]
    visited, expert = [], PushExpert()

    def label(observation, state, command):
        visited.append((observation.step, state, command, expert.act(observation, env.privileged())))

    report = run_episode(
        env,
        3,
        pipeline,
        runner,
        spec,
        ZeroText(),
        limits=SafetyLimits.unlimited(7),
        max_steps=3,
        goal=goal,
        on_step=label,
    )
    assert report.steps == 3 and report.instruction == f"push the {goal[0]} block onto the {goal[1]} square"
    assert [step for step, *_ in visited] == [0, 1, 2]
    for _, state, command, action in visited:
        assert state.shape == (7,) and command.shape == (7,) and action.shape == (7,) and action[6] == 1.0

    # At policy_node's policy.rate_hz below the simulator's rate a chunk is followed for several steps.
    predictions = []
    predict = runner.predict
    runner.predict = lambda *args: predictions.append(1) or predict(*args)
    report = run_episode(
        env, 3, pipeline, runner, spec, ZeroText(), limits=SafetyLimits.unlimited(7), max_steps=7, policy_rate_hz=2.5
    )
    assert report.steps == 7 and len(predictions) == 2  # steps 0 and 4 at 10 Hz
    summary = summarize_episodes([report])
    assert len(report.encoder_ms) == 7 and summary["encoder_ms_p50"] == pytest.approx(np.median(report.encoder_ms))
