"""The LeRobot v2.1 writer and reader (fovea_vla.core.policy.dataset) on small generated episodes."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fovea_vla.core.policy.dataset import (
    DATA_PATH,
    IMAGE_KEY,
    VIDEO_PATH,
    DatasetError,
    LeRobotDataset,
    LeRobotWriter,
)

NAMES = ("x", "y", "z", "roll", "pitch", "yaw", "gripper")
SIZE = (64, 48)  # W, H
LENGTHS = (6, 9, 7)
TASKS = ("push the red block left", "push the blue block right", "push the red block left")
SUCCESS = (True, False, None)


def make_frame(t: int, episode: int, rng: np.random.Generator) -> np.ndarray:
    """(48, 64, 3) a smooth background with a coloured square moving right (compresses well)."""
    width, height = SIZE
    ys, xs = np.mgrid[0:height, 0:width]
    rgb = np.stack([xs * 3, ys * 4, np.full_like(xs, 80 + 20 * episode)], axis=-1).astype(np.uint8)
    x0 = 4 + 3 * t
    rgb[16:32, x0 : x0 + 16] = (230, 40, 40)
    return rgb


def write_dataset(root, rng: np.random.Generator | None = None):
    """Write LENGTHS episodes; returns (frames, states, actions) per episode as recorded."""
    rng = rng or np.random.default_rng(0)
    recorded = []
    with LeRobotWriter(root, fps=10, state_names=NAMES, action_names=NAMES, image_size=SIZE) as writer:
        for episode, length in enumerate(LENGTHS):
            frames = [make_frame(t, episode, rng) for t in range(length)]
            states = rng.normal(size=(length, len(NAMES)))
            actions = rng.normal(size=(length, len(NAMES)))
            for rgb, state, action in zip(frames, states, actions, strict=True):
                writer.add_frame(rgb, state, action)
            assert writer.end_episode(TASKS[episode], success=SUCCESS[episode]) == episode
            recorded.append((frames, states, actions))
    return recorded


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    root = tmp_path_factory.mktemp("lerobot") / "demo"
    return root, write_dataset(root)


def copy_of(recorded, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(recorded[0], root)
    return root


def test_round_trip_keeps_states_and_actions_exactly_and_frames_closely(recorded):
    root, episodes = recorded
    dataset = LeRobotDataset(root)
    assert dataset.num_episodes == 3 and dataset.fps == 10.0
    assert dataset.state_names == NAMES and dataset.action_names == NAMES
    assert dataset.tasks == {0: TASKS[0], 1: TASKS[1]}
    assert dataset.episode_lengths == LENGTHS and dataset.image_size == SIZE
    for index, (frames, states, actions) in enumerate(episodes):
        episode = dataset.episode(index)
        assert episode.index == index and episode.task == TASKS[index] and episode.success is SUCCESS[index]
        np.testing.assert_array_equal(episode.states, states.astype(np.float32))
        np.testing.assert_array_equal(episode.actions, actions.astype(np.float32))
        np.testing.assert_allclose(episode.timestamps, np.arange(len(frames)) / 10.0, atol=1e-6)
        decoded = list(episode.frames)
        assert len(decoded) == len(frames) == len(episode.frames)
        for t, (original, frame) in enumerate(zip(frames, decoded, strict=True)):
            assert frame.shape == (48, 64, 3) and frame.dtype == np.uint8
            # mp4v is lossy: close on average, closer than the neighbouring frame (order kept), and
            # RGB order kept (the square stays red, not blue).
            error = np.abs(frame.astype(int) - original).mean()
            assert error < 6.0
            assert error < np.abs(frame.astype(int) - frames[t - 1 if t else 1]).mean()
            assert frame[24, :, 0].max() > 180 and frame[24, :, 2].max() < 160
    assert [e.index for e in dataset] == [0, 1, 2]


def test_meta_files_follow_lerobot_v21(recorded):
    root, _ = recorded
    info = json.loads((root / "meta/info.json").read_text())
    assert info["codebase_version"] == "v2.1" and info["robot_type"] == "panda"
    assert (info["total_episodes"], info["total_frames"], info["total_tasks"]) == (3, sum(LENGTHS), 2)
    assert info["chunks_size"] == 1000 and info["fps"] == 10 and isinstance(info["fps"], int)
    assert info["data_path"] == "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
    assert info["video_path"] == "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
    assert info["splits"] == {"train": "0:3"}
    features = info["features"]
    image = features[IMAGE_KEY]
    assert image["dtype"] == "video" and image["shape"] == [48, 64, 3]
    assert image["names"] == ["height", "width", "channel"]
    assert image["info"]["video.fps"] == 10.0 and image["info"]["video.codec"] == "h264"
    for key in ("observation.state", "action"):
        assert features[key] == {"dtype": "float32", "shape": [7], "names": list(NAMES)}
    for key, dtype in (("timestamp", "float32"), ("frame_index", "int64"), ("index", "int64")):
        assert features[key]["dtype"] == dtype and features[key]["shape"] == [1]
    assert features["episode_index"]["dtype"] == features["task_index"]["dtype"] == "int64"

    episodes = [json.loads(line) for line in (root / "meta/episodes.jsonl").read_text().splitlines()]
    assert episodes == [
        {"episode_index": i, "tasks": [TASKS[i]], "length": LENGTHS[i], "success": SUCCESS[i]} for i in range(3)
    ]
    tasks = [json.loads(line) for line in (root / "meta/tasks.jsonl").read_text().splitlines()]
    assert tasks == [{"task_index": 0, "task": TASKS[0]}, {"task_index": 1, "task": TASKS[1]}]
    stats = [json.loads(line) for line in (root / "meta/episodes_stats.jsonl").read_text().splitlines()]
    assert [s["episode_index"] for s in stats] == [0, 1, 2]
    assert stats[1]["stats"]["action"]["count"] == [LENGTHS[1]]
    assert np.array(stats[1]["stats"][IMAGE_KEY]["mean"]).shape == (3, 1, 1)

    for index in range(3):
        assert (root / VIDEO_PATH.format(episode_chunk=0, video_key=IMAGE_KEY, episode_index=index)).is_file()
    table = pq.read_table(root / DATA_PATH.format(episode_chunk=0, episode_index=1))
    assert table.schema.field("observation.state").type == pa.list_(pa.float32(), 7)
    assert table.schema.field("action").type == pa.list_(pa.float32(), 7)
    assert table.schema.field("timestamp").type == pa.float32()
    assert table.column("index").to_pylist() == list(range(LENGTHS[0], LENGTHS[0] + LENGTHS[1]))
    assert table.column("episode_index").to_pylist() == [1] * LENGTHS[1]
    assert table.column("task_index").to_pylist() == [1] * LENGTHS[1]
    assert table.column("frame_index").to_pylist() == list(range(LENGTHS[1]))


def test_reader_refuses_another_codebase_version(recorded, tmp_path):
    root = copy_of(recorded, tmp_path)
    info = json.loads((root / "meta/info.json").read_text())
    info["codebase_version"] = "v2.0"
    (root / "meta/info.json").write_text(json.dumps(info))
    with pytest.raises(DatasetError, match=r"meta/info\.json: codebase_version='v2\.0'.*'v2\.1'"):
        LeRobotDataset(root)


def test_reader_names_missing_files(recorded, tmp_path):
    with pytest.raises(DatasetError, match=r"absent/meta/info\.json: missing"):
        LeRobotDataset(tmp_path / "absent")
    root = copy_of(recorded, tmp_path)
    (root / "data/chunk-000/episode_000001.parquet").unlink()
    dataset = LeRobotDataset(root)
    with pytest.raises(DatasetError, match=r"episode_000001\.parquet: missing"):
        dataset.episode(1)
    with pytest.raises(KeyError, match="episode 7"):
        dataset.episode(7)
    (root / "meta/tasks.jsonl").unlink()
    with pytest.raises(DatasetError, match=r"meta/tasks\.jsonl: missing"):
        LeRobotDataset(root)


def test_tables_read_without_the_video(recorded, tmp_path):
    root = copy_of(recorded, tmp_path)
    dataset = LeRobotDataset(root)
    dataset.video_path(1).unlink()
    with pytest.raises(DatasetError, match="missing"):
        dataset.episode(1)
    episode = dataset.episode(1, with_frames=False)
    assert episode.frames is None
    np.testing.assert_array_equal(episode.actions, recorded[1][1][2].astype(np.float32))


def test_reader_refuses_missing_features_and_a_wrong_frame_count(recorded, tmp_path):
    root = copy_of(recorded, tmp_path)
    info_path = root / "meta/info.json"
    info = json.loads(info_path.read_text())
    del info["features"]["action"]
    info_path.write_text(json.dumps(info))
    with pytest.raises(DatasetError, match=r"info\.json: no feature 'action'"):
        LeRobotDataset(root)

    root = copy_of(recorded, tmp_path / "second")
    videos = root / "videos/chunk-000" / IMAGE_KEY
    shutil.copy(videos / "episode_000001.mp4", videos / "episode_000000.mp4")  # 9 frames for a 6-frame episode
    with pytest.raises(DatasetError, match=r"episode_000000\.mp4: more than the episode's 6 frames"):
        list(LeRobotDataset(root).episode(0).frames)


def test_reader_accepts_lerobot_variants(recorded, tmp_path):
    """Names as LeRobot v2.0's {"motors": [...]}, variable-length list columns, another camera key."""
    root = copy_of(recorded, tmp_path)
    info_path = root / "meta/info.json"
    info = json.loads(info_path.read_text())
    info["features"]["observation.state"]["names"] = {"motors": list(NAMES)}
    info["features"]["observation.images.top"] = info["features"].pop(IMAGE_KEY)
    info_path.write_text(json.dumps(info))
    (root / "videos/chunk-000" / IMAGE_KEY).rename(root / "videos/chunk-000/observation.images.top")
    path = root / "data/chunk-000/episode_000002.parquet"
    table = pq.read_table(path)
    states = np.asarray(table.column("observation.state").combine_chunks().flatten()).reshape(-1, 7)
    variable = pa.array(states.tolist(), type=pa.list_(pa.float32()))
    pq.write_table(table.set_column(0, "observation.state", variable), path)

    dataset = LeRobotDataset(root)
    assert dataset.image_key == "observation.images.top" and dataset.state_names == NAMES
    episode = dataset.episode(2)
    np.testing.assert_array_equal(episode.states, states)
    assert len(list(episode.frames)) == LENGTHS[2]


def test_writer_checks_its_input(tmp_path):
    with pytest.raises(ValueError, match=r"image_size=\(65, 48\)"):
        LeRobotWriter(tmp_path / "a", fps=10, state_names=NAMES, action_names=NAMES, image_size=(65, 48))
    with pytest.raises(ValueError, match="fps=0"):
        LeRobotWriter(tmp_path / "a", fps=0, state_names=NAMES, action_names=NAMES, image_size=SIZE)
    with LeRobotWriter(tmp_path / "a", fps=10, state_names=NAMES, action_names=NAMES, image_size=SIZE) as writer:
        rng = np.random.default_rng(1)
        with pytest.raises(ValueError, match=r"rgb must be a \(48, 64, 3\) uint8"):
            writer.add_frame(np.zeros((48, 64, 3), np.float32), np.zeros(7), np.zeros(7))
        with pytest.raises(ValueError, match="state must have 7 values"):
            writer.add_frame(make_frame(0, 0, rng), np.zeros(6), np.zeros(7))
        with pytest.raises(ValueError, match="action holds NaN"):
            writer.add_frame(make_frame(0, 0, rng), np.zeros(7), np.full(7, np.nan))
        with pytest.raises(ValueError, match="end_episode without frames"):
            writer.end_episode("task")
        writer.add_frame(make_frame(0, 0, rng), np.zeros(7), np.zeros(7))
        writer.end_episode("task")
        writer.add_frame(make_frame(1, 0, rng), np.zeros(7), np.zeros(7))  # never ended: dropped by close()
    dataset = LeRobotDataset(tmp_path / "a")
    assert dataset.num_episodes == 1 and dataset.episode_lengths == (1,)
    assert not (tmp_path / "a/videos/chunk-000" / IMAGE_KEY / "episode_000001.mp4").exists()
    with pytest.raises(FileExistsError, match=r"meta/info\.json: a dataset is already there"):
        LeRobotWriter(tmp_path / "a", fps=10, state_names=NAMES, action_names=NAMES, image_size=SIZE)


def test_recording_and_episode_extras_round_trip(tmp_path):
    recording = {"tool": "test", "instructions_per_layout": 2, "image_size": [64, 48]}
    rng = np.random.default_rng(2)
    with LeRobotWriter(
        tmp_path / "a", fps=10, state_names=NAMES, action_names=NAMES, image_size=SIZE, recording=recording
    ) as writer:
        for episode, layout in enumerate((5, 5, 6)):
            writer.add_frame(make_frame(0, episode, rng), np.zeros(7), np.zeros(7))
            writer.end_episode(TASKS[episode], success=True, extra={"layout": layout})
        writer.add_frame(make_frame(0, 3, rng), np.zeros(7), np.zeros(7))
        with pytest.raises(ValueError, match=r"length are episodes\.jsonl's own keys"):
            writer.end_episode("task", extra={"length": 3})
        writer.end_episode("task")
    dataset = LeRobotDataset(tmp_path / "a")
    assert dataset.recording == recording
    assert json.loads((tmp_path / "a/meta/info.json").read_text())["recording"] == recording
    assert [dataset.episode_extra(i) for i in range(4)] == [{"layout": 5}, {"layout": 5}, {"layout": 6}, {}]
    assert dataset.episode(1).extra == {"layout": 5} and dataset.episode(3).extra == {}
    with pytest.raises(KeyError, match="episode 9"):
        dataset.episode_extra(9)
    with pytest.raises(ValueError, match="recording="):
        LeRobotWriter(tmp_path / "b", fps=10, state_names=NAMES, action_names=NAMES, image_size=SIZE, recording=[1])


def test_datasets_without_extras_read_as_before(recorded):
    dataset = LeRobotDataset(recorded[0])
    assert dataset.recording is None and "recording" not in dataset.info
    assert all(dataset.episode(i).extra == {} for i in dataset.episode_indices)


def test_append_continues_indices_tasks_and_recording(recorded, tmp_path):
    root = copy_of(recorded, tmp_path)
    rng = np.random.default_rng(3)
    kwargs = dict(fps=10, state_names=NAMES, action_names=NAMES, image_size=SIZE)
    with LeRobotWriter(root, **kwargs, recording={"round": 1}, append=True) as writer:
        assert writer.num_episodes == 3
        writer.add_frame(make_frame(0, 3, rng), np.ones(7), np.ones(7))
        writer.add_frame(make_frame(1, 3, rng), np.ones(7), np.ones(7))
        assert writer.end_episode(TASKS[1], success=False, extra={"layout": 9}) == 3
        writer.add_frame(make_frame(0, 4, rng), np.ones(7), np.ones(7))
        assert writer.end_episode("a new task") == 4
    dataset = LeRobotDataset(root)
    info = dataset.info
    assert (info["total_episodes"], info["total_frames"], info["total_tasks"]) == (5, sum(LENGTHS) + 3, 3)
    assert dataset.tasks == {0: TASKS[0], 1: TASKS[1], 2: "a new task"}
    assert info["recording_appended"] == [{"round": 1}] and dataset.recording is None
    episode = dataset.episode(3)
    assert episode.task == TASKS[1] and episode.extra == {"layout": 9} and len(episode) == 2
    table = pq.read_table(root / DATA_PATH.format(episode_chunk=0, episode_index=3))
    assert table.column("index").to_pylist() == [sum(LENGTHS), sum(LENGTHS) + 1]
    assert table.column("task_index").to_pylist() == [1, 1]
    np.testing.assert_array_equal(dataset.episode(0).states, recorded[1][0][1].astype(np.float32))
    stats = [json.loads(line) for line in (root / "meta/episodes_stats.jsonl").read_text().splitlines()]
    assert [s["episode_index"] for s in stats] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"append: .* has"):
        LeRobotWriter(root, **(kwargs | {"fps": 20}), append=True)


def test_environment_state_round_trips_and_is_checked(tmp_path):
    """observation.environment_state (LeRobot's key) is written when the writer names its values, read back
    per frame, described in info.json and episodes_stats; it must come with every frame or with none."""
    environment_names = ("block_x", "block_y", "square_x", "square_y")
    kwargs = dict(fps=10, state_names=NAMES, action_names=NAMES, image_size=SIZE)
    rng = np.random.default_rng(4)
    written = rng.normal(size=(5, 4))
    with LeRobotWriter(tmp_path / "env", **kwargs, environment_names=environment_names) as writer:
        for t, environment in enumerate(written):
            writer.add_frame(make_frame(t, 0, rng), np.zeros(7), np.zeros(7), environment)
        with pytest.raises(ValueError, match="environment_state=None"):
            writer.add_frame(make_frame(5, 0, rng), np.zeros(7), np.zeros(7))
        with pytest.raises(ValueError, match="environment_state must have 4 values"):
            writer.add_frame(make_frame(5, 0, rng), np.zeros(7), np.zeros(7), np.zeros(3))
        writer.end_episode(TASKS[0])
    dataset = LeRobotDataset(tmp_path / "env")
    assert dataset.environment_names == environment_names
    np.testing.assert_array_equal(dataset.episode(0).environment_states, written.astype(np.float32))
    feature = dataset.info["features"]["observation.environment_state"]
    assert feature == {"dtype": "float32", "shape": [4], "names": list(environment_names)}
    stats = json.loads((tmp_path / "env/meta/episodes_stats.jsonl").read_text())["stats"]
    np.testing.assert_allclose(stats["observation.environment_state"]["mean"], written.mean(0), rtol=1e-5)
    with pytest.raises(ValueError, match=r"append: .* has"):
        LeRobotWriter(tmp_path / "env", **kwargs, append=True)
    with LeRobotWriter(tmp_path / "plain", **kwargs) as writer, pytest.raises(ValueError, match="environment_state="):
        writer.add_frame(make_frame(0, 0, rng), np.zeros(7), np.zeros(7), np.zeros(4))


def test_action_plan_round_trips_and_is_checked(tmp_path):
    """action.plan: a (K, A) chunk per frame, stored as a list of K lists (LeRobot's multi-dimensional
    feature), read back per frame; with every frame or with none, and appends must agree on K."""
    kwargs = dict(fps=10, state_names=NAMES, action_names=NAMES, image_size=SIZE)
    rng = np.random.default_rng(5)
    written = rng.normal(size=(4, 3, 7))
    with LeRobotWriter(tmp_path / "plan", **kwargs, plan_horizon=3) as writer:
        for t, plan in enumerate(written):
            writer.add_frame(make_frame(t, 0, rng), np.zeros(7), plan[0], plan=plan)
        with pytest.raises(ValueError, match="plan: give one exactly when the writer has a plan_horizon"):
            writer.add_frame(make_frame(4, 0, rng), np.zeros(7), np.zeros(7))
        with pytest.raises(ValueError, match=r"plan must be \(3, 7\)"):
            writer.add_frame(make_frame(4, 0, rng), np.zeros(7), np.zeros(7), plan=np.zeros((2, 7)))
        with pytest.raises(ValueError, match="plan holds NaN"):
            writer.add_frame(make_frame(4, 0, rng), np.zeros(7), np.zeros(7), plan=np.full((3, 7), np.nan))
        writer.end_episode(TASKS[0])
    dataset = LeRobotDataset(tmp_path / "plan")
    assert dataset.plan_horizon == 3
    assert dataset.info["features"]["action.plan"] == {
        "dtype": "float32",
        "shape": [3, 7],
        "names": ["step", list(NAMES)],
    }
    episode = dataset.episode(0)
    np.testing.assert_array_equal(episode.plans, written.astype(np.float32))
    np.testing.assert_array_equal(episode.actions, written[:, 0].astype(np.float32))
    assert LeRobotDataset(tmp_path / "plan").episode(0, with_frames=False).plans.shape == (4, 3, 7)
    with pytest.raises(ValueError, match=r"append: .* plan_horizon"):
        LeRobotWriter(tmp_path / "plan", **kwargs, plan_horizon=4, append=True)
    with pytest.raises(ValueError, match="plan_horizon=0"):
        LeRobotWriter(tmp_path / "other", **kwargs, plan_horizon=0)
    with LeRobotWriter(tmp_path / "plain", **kwargs) as writer, pytest.raises(ValueError, match="plan: give one"):
        writer.add_frame(make_frame(0, 0, rng), np.zeros(7), np.zeros(7), plan=written[0])
    assert LeRobotDataset(tmp_path / "plain").plan_horizon is None


def test_videos_are_h264_and_close_to_the_frames(recorded):
    """The writer's H.264 (crf 23) decodes within a few grey levels of what was recorded."""
    import av

    dataset = LeRobotDataset(recorded[0])
    with av.open(str(dataset.video_path(1))) as container:
        assert container.streams.video[0].codec_context.name == "h264"
    decoded = np.stack(list(dataset.episode(1).frames)).astype(np.float64)
    assert np.abs(decoded - np.stack(recorded[1][1][0])).mean() < 3.0
