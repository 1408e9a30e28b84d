"""Demonstration datasets in the LeRobot v2.1 layout: a writer for our recordings, a reader for ours and yours.

Layout (``E`` episodes, ``T_e`` frames each, chunk ``c = episode_index // chunks_size``)::

    <root>/meta/info.json            codebase_version "v2.1", robot_type, fps, totals, chunks_size 1000,
                                     data_path / video_path templates, features (below)
    <root>/meta/episodes.jsonl       {"episode_index", "tasks": [text], "length", "success"} per line
    <root>/meta/tasks.jsonl          {"task_index", "task"} per line
    <root>/meta/episodes_stats.jsonl {"episode_index", "stats": {feature: {min, max, mean, std, count}}}
    <root>/data/chunk-000/episode_000000.parquet
    <root>/videos/chunk-000/observation.images.front/episode_000000.mp4

The path templates are LeRobot's (``data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet``
and ``videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4``). Each parquet file
has one row per frame with the columns of ``features`` except the video:

========================  ===========================  ================================================
column                    arrow type                   meaning
========================  ===========================  ================================================
``observation.state``     fixed_size_list<float32>[S]  robot state at the frame's capture (names in info)
``observation.environment fixed_size_list<float32>[E]  optional (LeRobot's key): state of the scene at the
_state``                                               frame's capture, e.g. the simulator's positions of
                                                       the objects the instruction names; training can use
                                                       it as an auxiliary target, never as an input
``action``                fixed_size_list<float32>[A]  the command sent after observing the frame: the
                                                       target the arm should reach one step (1 / fps)
                                                       later
``timestamp``             float32                      ``frame_index / fps`` [s] from the episode start
``frame_index``           int64                        0 .. T_e - 1
``episode_index``         int64                        the episode
``index``                 int64                        running frame index over the dataset
``task_index``            int64                        row of tasks.jsonl
========================  ===========================  ================================================

The camera (``observation.images.front``, shape ``[H, W, 3]``, names ``[height, width, channel]``) is an
MP4 per episode, H.264 (libx264 through PyAV, yuv420p, constant quality ``crf`` 23, one keyframe every 2 s),
one video frame per row. Width and height must be even (yuv420p). ``episodes_stats.jsonl`` is what
LeRobot v2.1 reads for normalisation (images in [0, 1] per channel, shape (3, 1, 1)); the reader here
does not need it. ``success`` in episodes.jsonl is our extra (None when unknown), and so are any further
per-episode keys a recorder adds (``end_episode(extra=...)``, e.g. ``layout``: the simulator seed of the
scene, shared by the episodes recorded with several instructions in one layout) and info.json's
``recording`` (how the data was made, e.g. record-sim's seeds and instructions per layout); LeRobot
ignores keys it does not know.

Known differences and limits:

* H.264 at crf 23 is lossy: decoded frames differ from the recorded ones by about one grey level (mean
  absolute difference) on our scenes. Datasets written before 2026-11-26 hold MPEG-4 Part 2 (``mp4v``)
  videos, about twice the size, and read the same way. LeRobot itself stores AV1 (or H.264) and reads
  through PyAV / torchcodec; that LeRobot's own loader accepts these files has not been tested here
  (LeRobot is not installed). Datasets recorded by LeRobot in AV1 are read here through OpenCV's FFmpeg
  build, which may lack an AV1 decoder: the reader then fails with the file named (re-encode to H.264).
* ``fps`` is written as an integer when it is one (LeRobot's type), else as a float.
* Only video cameras are read (not LeRobot's ``image`` dtype, PNG frames in the parquet).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from fovea_vla.core._validation import is_int, is_real

__all__ = [
    "CODEBASE_VERSION",
    "DATA_PATH",
    "ENVIRONMENT_KEY",
    "IMAGE_KEY",
    "PLAN_KEY",
    "VIDEO_PATH",
    "DatasetError",
    "Episode",
    "LeRobotDataset",
    "LeRobotWriter",
    "VideoFrames",
]

CODEBASE_VERSION = "v2.1"
CHUNKS_SIZE = 1000
DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
VIDEO_PATH = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
IMAGE_KEY = "observation.images.front"
STATE_KEY = "observation.state"
ENVIRONMENT_KEY = "observation.environment_state"
PLAN_KEY = "action.plan"
ACTION_KEY = "action"
INFO_FILE = "meta/info.json"
EPISODES_FILE = "meta/episodes.jsonl"
TASKS_FILE = "meta/tasks.jsonl"
EPISODES_STATS_FILE = "meta/episodes_stats.jsonl"
_SCALARS = {
    "timestamp": "float32",
    "frame_index": "int64",
    "episode_index": "int64",
    "index": "int64",
    "task_index": "int64",
}
_EPISODE_KEYS = ("episode_index", "tasks", "length", "success")  # episodes.jsonl's standard keys
_STATS_IMAGE_SAMPLES = 100  # frames per episode for the image statistics (LeRobot samples too)
_VIDEO_CRF = "23"
_VIDEO_GOP = 20  # frames between keyframes (2 s at 10 Hz): seeking stays cheap, files stay small


class DatasetError(ValueError):
    """A dataset that cannot be read; the message names the file and what is wrong."""


def _fps_value(fps: float) -> int | float:
    return int(fps) if float(fps).is_integer() else float(fps)


def _hf_features(features: dict) -> dict:
    """The Hugging Face ``datasets`` feature description stored in each parquet file's metadata."""
    out = {}
    for key, ft in features.items():
        if ft["dtype"] == "video":
            continue
        value = {"dtype": ft["dtype"], "_type": "Value"}
        out[key] = value if ft["shape"] == [1] else {"feature": value, "length": ft["shape"][0], "_type": "Sequence"}
    return out


def _stats(values: np.ndarray, axis: int) -> dict:
    """min / max / mean / std / count (rows) over ``axis`` as lists (LeRobot's episodes_stats entry)."""
    values = values.astype(np.float64)
    return {
        "min": values.min(axis=axis).tolist(),
        "max": values.max(axis=axis).tolist(),
        "mean": values.mean(axis=axis).tolist(),
        "std": values.std(axis=axis).tolist(),
        "count": [int(values.shape[0])],
    }


class _H264Writer:
    """One episode's MP4: H.264 frames through PyAV (LeRobot writes its videos through PyAV too)."""

    def __init__(self, path: Path, fps: float, size: tuple[int, int]):
        import fractions

        import av

        self.path = path
        self._container = av.open(str(path), mode="w")
        rate = fractions.Fraction(fps).limit_denominator(1000)
        self._stream = self._container.add_stream("libx264", rate=rate)
        self._stream.width, self._stream.height = size
        self._stream.pix_fmt = "yuv420p"
        self._stream.options = {"crf": _VIDEO_CRF, "preset": "fast", "g": str(_VIDEO_GOP)}
        self._frame_from = av.VideoFrame.from_ndarray

    def write(self, rgb: np.ndarray) -> None:
        for packet in self._stream.encode(self._frame_from(rgb, format="rgb24")):
            self._container.mux(packet)

    def close(self) -> None:
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()


def _write_json_atomic(path: Path, document) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(document if isinstance(document, str) else json.dumps(document, indent=4) + "\n")
    os.replace(tmp, path)


class LeRobotWriter:
    """Record demonstrations frame by frame into a new LeRobot v2.1 folder.

    Use as a context manager (or call :meth:`close`); the meta files are rewritten after every
    episode, so a crash loses at most the episode in progress.

    Args:
        root: the dataset folder; must not hold a dataset yet (no ``meta/info.json``) unless ``append``.
        fps: frame rate [Hz]; frame t has timestamp ``t / fps`` and its action is due ``1 / fps`` later.
        state_names: S names of the state dims.
        action_names: A names of the action dims.
        image_size: (W, H) of the camera frames [px], both even.
        environment_names: E names of ``observation.environment_state`` (every frame then gives
            one), or None to record none.
        plan_horizon: K > 0: every frame also gives ``action.plan``, the (K, A) actions the
            labeller would send from this frame on (DAgger: the expert taking over in a copy of the
            simulation), used as the frame's training chunk; None: record none.
        robot_type: free text (LeRobot's ``robot_type``).
        recording: JSON-serialisable description of how the data was made, written as
            ``recording`` in info.json (None: not written). When appending, it is added to the
            list ``recording_appended`` instead.
        append: continue a dataset this writer's format wrote (same fps, names, environment
            names and image size):
            new episodes get the next indices (e.g. DAgger rounds added to the demonstrations).

    Raises:
        ValueError: a refused argument (named), or an ``append`` target that does not match.
        FileExistsError: ``root`` already holds a dataset and ``append`` is false.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        fps: float,
        state_names: Sequence[str],
        action_names: Sequence[str],
        image_size: tuple[int, int],
        environment_names: Sequence[str] | None = None,
        plan_horizon: int | None = None,
        robot_type: str = "panda",
        recording: Mapping | None = None,
        append: bool = False,
    ):
        if not is_real(fps) or not (0 < fps <= 1000 and math.isfinite(fps)):
            raise ValueError(f"fps={fps!r}: must be a number in (0, 1000]")
        named = [("state_names", state_names), ("action_names", action_names)]
        if environment_names is not None:
            named.append(("environment_names", environment_names))
        for name, names in named:
            if isinstance(names, str) or not names or not all(isinstance(n, str) and n for n in names):
                raise ValueError(f"{name}={names!r}: must be a non-empty sequence of non-empty strings")
            if len(set(names)) != len(names):
                raise ValueError(f"{name}={list(names)!r}: names must be unique")
        if plan_horizon is not None and not (is_int(plan_horizon) and 1 <= plan_horizon <= 1024):
            raise ValueError(f"plan_horizon={plan_horizon!r}: must be an integer in [1, 1024] or None")
        if len(image_size) != 2 or not all(is_int(v) and v >= 2 and v % 2 == 0 for v in image_size):
            raise ValueError(f"image_size={image_size!r}: must be (W, H) with even integers >= 2 (yuv420p needs them)")
        self.root = Path(root)
        if (self.root / INFO_FILE).exists() and not append:
            raise FileExistsError(
                f"{self.root / INFO_FILE}: a dataset is already there (choose a new folder, or append)"
            )
        self.fps = float(fps)
        self.state_names = tuple(state_names)
        self.action_names = tuple(action_names)
        self.environment_names = None if environment_names is None else tuple(environment_names)
        self.plan_horizon = None if plan_horizon is None else int(plan_horizon)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.robot_type = str(robot_type)
        if recording is not None and not isinstance(recording, Mapping):
            raise ValueError(f"recording={recording!r}: must be a mapping or None")
        self.recording = None if recording is None else json.loads(json.dumps(dict(recording)))
        self._episodes: list[dict] = []
        self._episode_stats: list[dict] = []
        self._tasks: dict[str, int] = {}
        self._total_frames = 0
        self._video: _H264Writer | None = None
        self._states: list[np.ndarray] = []
        self._actions: list[np.ndarray] = []
        self._environment: list[np.ndarray] = []
        self._plans: list[np.ndarray] = []
        self._image_sums: list[np.ndarray] = []
        self._closed = False
        self._appended: list = []
        if append and (self.root / INFO_FILE).exists():
            self._continue()
        (self.root / "meta").mkdir(parents=True, exist_ok=True)

    def _continue(self) -> None:
        """Load the meta files of the dataset at ``root`` to append to it."""
        existing = LeRobotDataset(self.root)
        found = (existing.fps, existing.state_names, existing.action_names, existing.environment_names)
        found += (existing.plan_horizon, existing.image_size)
        wanted = (self.fps, self.state_names, self.action_names, self.environment_names, self.plan_horizon)
        wanted += (self.image_size,)
        if found != wanted or existing.image_key != IMAGE_KEY:
            raise ValueError(
                f"append: {self.root} has (fps, state_names, action_names, environment_names, plan_horizon, "
                "image_size) = "
                f"{found}, this writer {wanted}"
            )
        self._episodes = _read_jsonl(self.root / EPISODES_FILE)
        if [e["episode_index"] for e in self._episodes] != list(range(existing.num_episodes)):
            raise ValueError(f"append: {self.root / EPISODES_FILE} does not number its episodes 0..E-1")
        self._episode_stats = _read_jsonl(self.root / EPISODES_STATS_FILE)
        self._tasks = {task: index for index, task in existing.tasks.items()}
        self._total_frames = existing.num_frames
        self._appended = list(existing.info.get("recording_appended", []))
        if self.recording is not None:
            self._appended.append(self.recording)
        self.recording = existing.recording

    def __enter__(self) -> LeRobotWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def num_episodes(self) -> int:
        return len(self._episodes)

    def _paths(self, index: int) -> tuple[Path, Path]:
        chunk = index // CHUNKS_SIZE
        data = self.root / DATA_PATH.format(episode_chunk=chunk, episode_index=index)
        video = self.root / VIDEO_PATH.format(episode_chunk=chunk, video_key=IMAGE_KEY, episode_index=index)
        return data, video

    def add_frame(self, rgb: np.ndarray, state, action, environment_state=None, plan=None) -> None:
        """Append one frame of the current episode.

        Args:
            rgb: (H, W, 3) uint8 RGB camera frame, row 0 at the top, of ``image_size``.
            state: (S,) robot state at the frame's capture, finite.
            action: (A,) the command sent after observing this frame (the target one step later).
            environment_state: (E,) the scene's state at the capture; required exactly when the
                writer has ``environment_names``.
            plan: (K, A) the actions from this frame on (``plan_horizon`` K); required exactly when
                the writer has a plan horizon.

        Raises:
            ValueError: a wrong shape or dtype, non-finite values, or an environment state or plan
                given to a writer without environment names or plan horizon (or missing with them).
            RuntimeError: the writer is closed.
        """
        if self._closed:
            raise RuntimeError("LeRobotWriter.add_frame after close()")
        width, height = self.image_size
        if not (isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8 and rgb.shape == (height, width, 3)):
            desc = f"{rgb.dtype} {rgb.shape}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
            raise ValueError(
                f"rgb must be a ({height}, {width}, 3) uint8 array (image_size {width}x{height}), got {desc}"
            )
        state = np.asarray(state, dtype=np.float64).reshape(-1)
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        checks = [("state", state, self.state_names), ("action", action, self.action_names)]
        if (environment_state is None) != (self.environment_names is None):
            raise ValueError(
                f"environment_state={environment_state!r}: give one exactly when the writer has environment_names "
                f"({self.environment_names!r})"
            )
        if environment_state is not None:
            environment_state = np.asarray(environment_state, dtype=np.float64).reshape(-1)
            checks.append(("environment_state", environment_state, self.environment_names))
        if (plan is None) != (self.plan_horizon is None):
            raise ValueError(f"plan: give one exactly when the writer has a plan_horizon ({self.plan_horizon!r})")
        for name, value, names in checks:
            if value.shape != (len(names),):
                raise ValueError(f"{name} must have {len(names)} values ({', '.join(names)}), got {value.shape[0]}")
            if not np.isfinite(value).all():
                raise ValueError(f"{name} holds NaN or inf: {value.tolist()}")
        if plan is not None:
            plan = np.asarray(plan, dtype=np.float64)
            if plan.shape != (self.plan_horizon, len(self.action_names)):
                raise ValueError(f"plan must be ({self.plan_horizon}, {len(self.action_names)}), got {plan.shape}")
            if not np.isfinite(plan).all():
                raise ValueError("plan holds NaN or inf")
        if self._video is None:
            _, video_path = self._paths(len(self._episodes))
            video_path.parent.mkdir(parents=True, exist_ok=True)
            self._video = _H264Writer(video_path, self.fps, (width, height))
        self._video.write(rgb)
        self._states.append(state.astype(np.float32))
        self._actions.append(action.astype(np.float32))
        if environment_state is not None:
            self._environment.append(environment_state.astype(np.float32))
        if plan is not None:
            self._plans.append(plan.astype(np.float32))
        if len(self._states) <= _STATS_IMAGE_SAMPLES:
            self._image_sums.append(rgb[::4, ::4].reshape(-1, 3).astype(np.float32) / 255.0)

    def end_episode(self, task: str, success: bool | None = None, *, extra: Mapping | None = None) -> int:
        """Finish the current episode: close its video, write its parquet file and the meta files.

        Args:
            task: the instruction given for this episode.
            success: whether the episode reached its goal (None = unknown).
            extra: further JSON-serialisable keys for the episode's line in episodes.jsonl (read
                back as :attr:`Episode.extra`); must not shadow ``episode_index``, ``tasks``,
                ``length`` or ``success``.

        Returns:
            The episode's index.

        Raises:
            ValueError: no frames since the last episode, an empty task, or ``extra`` shadowing a
                standard key.
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not isinstance(task, str) or not task.strip():
            raise ValueError(f"task={task!r}: must be a non-empty string")
        extra = {} if extra is None else json.loads(json.dumps(dict(extra)))
        if shadowed := sorted(set(extra) & set(_EPISODE_KEYS)):
            raise ValueError(f"extra={extra!r}: {', '.join(shadowed)} are episodes.jsonl's own keys")
        if success is not None and not isinstance(success, bool | np.bool_):
            raise ValueError(f"success={success!r}: must be True, False or None")
        if not self._states:
            raise ValueError("end_episode without frames: call add_frame first")
        index = len(self._episodes)
        self._video.close()
        self._video = None
        length = len(self._states)
        task_index = self._tasks.setdefault(task, len(self._tasks))
        states = np.stack(self._states)
        actions = np.stack(self._actions)
        frame_index = np.arange(length, dtype=np.int64)
        columns = {
            STATE_KEY: pa.FixedSizeListArray.from_arrays(pa.array(states.reshape(-1), pa.float32()), states.shape[1]),
            ACTION_KEY: pa.FixedSizeListArray.from_arrays(
                pa.array(actions.reshape(-1), pa.float32()), actions.shape[1]
            ),
            "timestamp": pa.array((frame_index / self.fps).astype(np.float32)),
            "frame_index": pa.array(frame_index),
            "episode_index": pa.array(np.full(length, index, dtype=np.int64)),
            "index": pa.array(self._total_frames + frame_index),
            "task_index": pa.array(np.full(length, task_index, dtype=np.int64)),
        }
        if self._environment:
            environment = np.stack(self._environment)
            columns[ENVIRONMENT_KEY] = pa.FixedSizeListArray.from_arrays(
                pa.array(environment.reshape(-1), pa.float32()), environment.shape[1]
            )
        if self._plans:
            # A list of K rows of A values: LeRobot's layout for a multi-dimensional feature.
            plans = np.stack(self._plans)
            rows = pa.FixedSizeListArray.from_arrays(pa.array(plans.reshape(-1), pa.float32()), plans.shape[2])
            columns[PLAN_KEY] = pa.FixedSizeListArray.from_arrays(rows, plans.shape[1])
        features = self._features()
        table = pa.table(columns).replace_schema_metadata(
            {"huggingface": json.dumps({"info": {"features": _hf_features(features)}})}
        )
        data_path, _ = self._paths(index)
        data_path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, data_path)

        pixels = np.concatenate(self._image_sums)
        image_stats = _stats(pixels, 0)
        for name in ("min", "max", "mean", "std"):
            image_stats[name] = [[[v]] for v in image_stats[name]]  # (3, 1, 1) as LeRobot stores it
        image_stats["count"] = [len(self._image_sums)]
        stats = {IMAGE_KEY: image_stats, STATE_KEY: _stats(states, 0), ACTION_KEY: _stats(actions, 0)}
        if self._environment:
            stats[ENVIRONMENT_KEY] = _stats(environment, 0)
        for name in _SCALARS:
            stats[name] = _stats(np.asarray(columns[name]).reshape(-1, 1), 0)
        self._episode_stats.append({"episode_index": index, "stats": stats})
        self._episodes.append({"episode_index": index, "tasks": [task], "length": length, "success": success} | extra)
        self._total_frames += length
        self._states, self._actions, self._environment, self._plans, self._image_sums = [], [], [], [], []
        self._write_meta()
        return index

    def _features(self) -> dict:
        width, height = self.image_size
        features = {
            IMAGE_KEY: {
                "dtype": "video",
                "shape": [height, width, 3],
                "names": ["height", "width", "channel"],
                "info": {
                    "video.fps": self.fps,
                    "video.height": height,
                    "video.width": width,
                    "video.channels": 3,
                    "video.codec": "h264",
                    "video.pix_fmt": "yuv420p",
                    "video.is_depth_map": False,
                    "has_audio": False,
                },
            },
            STATE_KEY: {"dtype": "float32", "shape": [len(self.state_names)], "names": list(self.state_names)},
            ACTION_KEY: {"dtype": "float32", "shape": [len(self.action_names)], "names": list(self.action_names)},
        }
        if self.environment_names is not None:
            features[ENVIRONMENT_KEY] = {
                "dtype": "float32",
                "shape": [len(self.environment_names)],
                "names": list(self.environment_names),
            }
        if self.plan_horizon is not None:
            features[PLAN_KEY] = {
                "dtype": "float32",
                "shape": [self.plan_horizon, len(self.action_names)],
                "names": ["step", list(self.action_names)],
            }
        for name, dtype in _SCALARS.items():
            features[name] = {"dtype": dtype, "shape": [1], "names": None}
        return features

    def _write_meta(self) -> None:
        meta = self.root / "meta"
        episodes = len(self._episodes)
        info = {
            "codebase_version": CODEBASE_VERSION,
            "robot_type": self.robot_type,
            "total_episodes": episodes,
            "total_frames": self._total_frames,
            "total_tasks": len(self._tasks),
            "total_videos": episodes,
            "total_chunks": (episodes - 1) // CHUNKS_SIZE + 1 if episodes else 0,
            "chunks_size": CHUNKS_SIZE,
            "fps": _fps_value(self.fps),
            "splits": {"train": f"0:{episodes}"},
            "data_path": DATA_PATH,
            "video_path": VIDEO_PATH,
            "features": self._features(),
        }
        if self.recording is not None:
            info["recording"] = self.recording
        if self._appended:
            info["recording_appended"] = self._appended
        lines = {
            "episodes.jsonl": self._episodes,
            "tasks.jsonl": [{"task_index": i, "task": t} for t, i in self._tasks.items()],
            "episodes_stats.jsonl": self._episode_stats,
        }
        for name, records in lines.items():
            _write_json_atomic(meta / name, "".join(json.dumps(r) + "\n" for r in records))
        _write_json_atomic(meta / "info.json", info)  # last: a dataset exists once info.json does

    def close(self) -> None:
        """Write the meta files; an unfinished episode (frames without :meth:`end_episode`) is dropped."""
        if self._closed:
            return
        self._closed = True
        if self._video is not None:
            self._video.close()
            self._video.path.unlink(missing_ok=True)
            self._video = None
        self._states, self._actions, self._environment, self._plans, self._image_sums = [], [], [], [], []
        self._write_meta()


@dataclass
class Episode:
    """One demonstration.

    Attributes:
        index: the episode index.
        task: the instruction (the task of its first frame).
        frames: T camera frames, (H, W, 3) uint8 RGB each, decoded lazily on iteration (None when
            read with ``with_frames=False``).
        states: (T, S) float32 robot state per frame.
        actions: (T, A) float32 action per frame (the target one step after the frame).
        environment_states: (T, E) float32 ``observation.environment_state`` per frame, None when
            the dataset has none.
        plans: (T, K, A) float32 ``action.plan`` per frame, None when the dataset has none.
        timestamps: (T,) float64 time of each frame from the episode start [s].
        success: whether the episode reached its goal, None when unknown.
        extra: the episode's further keys in episodes.jsonl (e.g. ``layout``), empty when none.
    """

    index: int
    task: str
    frames: VideoFrames | None
    states: np.ndarray
    actions: np.ndarray
    timestamps: np.ndarray
    success: bool | None
    extra: dict = field(default_factory=dict)
    environment_states: np.ndarray | None = None
    plans: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.states)


class VideoFrames:
    """The frames of one episode's video: ``len()`` and re-iterable, decoded on each iteration.

    Iteration yields (H, W, 3) uint8 RGB arrays (OpenCV decodes BGR; converted here).

    Raises:
        DatasetError: (on iteration) the video cannot be opened or holds another number of frames
            than the episode.
    """

    def __init__(self, path: Path, length: int, size: tuple[int, int]):
        self.path = path
        self.length = length
        self.size = size  # (W, H)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[np.ndarray]:
        capture = cv2.VideoCapture(str(self.path))
        if not capture.isOpened():
            raise DatasetError(f"{self.path}: OpenCV cannot open the video (missing file or codec)")
        try:
            count = 0
            while True:
                ok, bgr = capture.read()
                if not ok:
                    break
                if count == self.length:
                    raise DatasetError(f"{self.path}: more than the episode's {self.length} frames")
                if (bgr.shape[1], bgr.shape[0]) != self.size:
                    raise DatasetError(
                        f"{self.path}: frame of {bgr.shape[1]}x{bgr.shape[0]}, info.json says {self.size[0]}x"
                        f"{self.size[1]}"
                    )
                count += 1
                yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        finally:
            capture.release()
        if count != self.length:
            raise DatasetError(f"{self.path}: decoded {count} frames, the episode has {self.length}")


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise DatasetError(f"{path}: missing")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}:{number}: not JSON ({exc})") from exc
    return records


def _feature_names(feature: dict, key: str, where: Path) -> tuple[str, ...]:
    """Names of a 1-D feature: a list, or LeRobot v2.0's ``{"motors": [...]}``; generated when absent."""
    shape = feature.get("shape")
    if not (isinstance(shape, list | tuple) and len(shape) == 1 and isinstance(shape[0], int) and shape[0] >= 1):
        raise DatasetError(f"{where}: features.{key}.shape={shape!r}, expected [n] with n >= 1")
    names = feature.get("names")
    if isinstance(names, dict) and len(names) == 1:
        names = next(iter(names.values()))
    if names is None:
        names = [f"{key}_{i}" for i in range(shape[0])]
    if not isinstance(names, list) or len(names) != shape[0]:
        raise DatasetError(f"{where}: features.{key}.names={names!r} does not list {shape[0]} names")
    return tuple(str(n) for n in names)


def _column_matrix(table, name: str, width: int, where: Path) -> np.ndarray:
    """(T, width) float32 from a fixed-size or variable list column (lists of lists flattened, row-major)."""
    import pyarrow as pa

    if name not in table.column_names:
        raise DatasetError(f"{where}: no column {name!r} (columns: {', '.join(table.column_names)})")
    column = table.column(name).combine_chunks()

    def is_list(kind) -> bool:
        return pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind) or pa.types.is_large_list(kind)

    if not is_list(column.type):
        raise DatasetError(f"{where}: column {name!r} is {column.type}, expected a list of floats")
    while is_list(column.type):
        column = column.flatten()
    values = np.array(column.to_numpy(zero_copy_only=False), dtype=np.float32)  # writable
    if values.size != len(table) * width:
        raise DatasetError(f"{where}: column {name!r} holds {values.size} values, expected {len(table)} x {width}")
    return values.reshape(len(table), width)


class LeRobotDataset:
    """Read a LeRobot v2.1 dataset folder (written by :class:`LeRobotWriter` or by LeRobot).

    Args:
        root: the dataset folder.
        image_key: the camera feature; None = ``observation.images.front`` when present, else the
            only video feature.

    Attributes:
        root: the folder.
        fps: frame rate [Hz].
        state_names: S names of ``observation.state``.
        action_names: A names of ``action``.
        environment_names: E names of ``observation.environment_state``, None when the dataset has none.
        plan_horizon: K of ``action.plan`` (K, A), None when the dataset has none.
        image_key: the camera read into :attr:`Episode.frames`.
        image_size: (W, H) of its frames [px].
        tasks: the task texts by task index.
        recording: info.json's ``recording`` (how the data was made), None when absent.
        episode_lengths: frames per episode, in episodes.jsonl order.

    Raises:
        DatasetError: a missing meta file, another codebase version, or missing / malformed
            features; the message names the file.
    """

    def __init__(self, root: str | os.PathLike, *, image_key: str | None = None):
        self.root = Path(root)
        info_path = self.root / INFO_FILE
        if not info_path.is_file():
            raise DatasetError(f"{info_path}: missing (not a LeRobot dataset folder?)")
        try:
            info = json.loads(info_path.read_text())
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{info_path}: not JSON ({exc})") from exc
        version = info.get("codebase_version")
        if version != CODEBASE_VERSION:
            raise DatasetError(
                f"{info_path}: codebase_version={version!r}, this reader supports {CODEBASE_VERSION!r} "
                "(convert with LeRobot's conversion scripts)"
            )
        for name in ("fps", "features", "data_path", "video_path"):
            if info.get(name) is None:
                raise DatasetError(f"{info_path}: missing field {name!r}")
        fps = info["fps"]
        if not is_real(fps) or not fps > 0:
            raise DatasetError(f"{info_path}: fps={fps!r}, expected a number > 0")
        features = info["features"]
        for key in (STATE_KEY, ACTION_KEY):
            if key not in features:
                raise DatasetError(f"{info_path}: no feature {key!r} (features: {', '.join(features)})")
        videos = [k for k, ft in features.items() if isinstance(ft, dict) and ft.get("dtype") == "video"]
        if image_key is None:
            image_key = videos[0] if len(videos) == 1 and IMAGE_KEY not in videos else IMAGE_KEY
        if image_key not in videos:
            raise DatasetError(
                f"{info_path}: no video feature {image_key!r} (video features: {', '.join(videos) or 'none'})"
            )
        shape = features[image_key].get("shape")
        names = features[image_key].get("names") or ["height", "width", "channel"]
        if not (isinstance(shape, list) and len(shape) == 3 and 3 in shape):
            raise DatasetError(f"{info_path}: features.{image_key}.shape={shape!r}, expected [H, W, 3]")
        dims = dict(zip(names, shape, strict=False))
        self.image_size = (int(dims.get("width", shape[1])), int(dims.get("height", shape[0])))
        self.info = info
        self.recording = info.get("recording")
        self.fps = float(fps)
        self.image_key = image_key
        self.state_names = _feature_names(features[STATE_KEY], STATE_KEY, info_path)
        self.action_names = _feature_names(features[ACTION_KEY], ACTION_KEY, info_path)
        self.environment_names = None
        if ENVIRONMENT_KEY in features:
            self.environment_names = _feature_names(features[ENVIRONMENT_KEY], ENVIRONMENT_KEY, info_path)
        self.plan_horizon = None
        if PLAN_KEY in features:
            shape = features[PLAN_KEY].get("shape")
            if not (
                isinstance(shape, list) and len(shape) == 2 and shape[1] == len(self.action_names) and shape[0] > 0
            ):
                raise DatasetError(
                    f"{info_path}: features.{PLAN_KEY}.shape={shape!r}, expected [K, {len(self.action_names)}]"
                )
            self.plan_horizon = int(shape[0])
        self.chunks_size = int(info.get("chunks_size", CHUNKS_SIZE))
        tasks = _read_jsonl(self.root / TASKS_FILE)
        try:
            self.tasks = {int(t["task_index"]): str(t["task"]) for t in tasks}
        except (KeyError, TypeError, ValueError) as exc:
            raise DatasetError(f"{self.root / TASKS_FILE}: each line needs task_index and task ({exc})") from exc
        episodes = _read_jsonl(self.root / EPISODES_FILE)
        try:
            self._episodes = {int(e["episode_index"]): e for e in episodes}
            lengths = [int(e["length"]) for e in episodes]
        except (KeyError, TypeError, ValueError) as exc:
            raise DatasetError(
                f"{self.root / EPISODES_FILE}: each line needs episode_index and length ({exc})"
            ) from exc
        self.episode_indices = tuple(self._episodes)
        self.episode_lengths = tuple(lengths)
        total = info.get("total_episodes")
        if total is not None and total != len(self._episodes):
            raise DatasetError(
                f"{info_path}: total_episodes={total} but {self.root / EPISODES_FILE} lists {len(self._episodes)}"
            )

    @property
    def num_episodes(self) -> int:
        return len(self._episodes)

    @property
    def num_frames(self) -> int:
        return sum(self.episode_lengths)

    def episode_extra(self, index: int) -> dict:
        """Episode ``index``'s further keys in episodes.jsonl (as :attr:`Episode.extra`), without reading its data."""
        if index not in self._episodes:
            raise KeyError(f"episode {index} is not in {self.root / EPISODES_FILE} ({self.num_episodes} episodes)")
        return {k: v for k, v in self._episodes[index].items() if k not in _EPISODE_KEYS}

    def data_path(self, index: int) -> Path:
        """The parquet file of episode ``index``."""
        chunk = index // self.chunks_size
        return self.root / self.info["data_path"].format(episode_chunk=chunk, episode_index=index)

    def video_path(self, index: int) -> Path:
        """The video of episode ``index`` for :attr:`image_key`."""
        chunk = index // self.chunks_size
        return self.root / self.info["video_path"].format(
            episode_chunk=chunk, video_key=self.image_key, episode_index=index
        )

    def episode(self, index: int, *, with_frames: bool = True) -> Episode:
        """Episode ``index`` (an ``episode_index`` of episodes.jsonl); frames decode on iteration.

        Args:
            index: the episode.
            with_frames: False reads the table alone (``frames`` None; the video need not exist,
                e.g. when its tokens are cached).

        Raises:
            KeyError: no such episode.
            DatasetError: a missing or malformed parquet file or video (named).
        """
        import pyarrow.parquet as pq

        if index not in self._episodes:
            raise KeyError(f"episode {index} is not in {self.root / EPISODES_FILE} ({self.num_episodes} episodes)")
        record = self._episodes[index]
        path = self.data_path(index)
        if not path.is_file():
            raise DatasetError(f"{path}: missing (episode {index})")
        video = self.video_path(index)
        if with_frames and not video.is_file():
            raise DatasetError(f"{video}: missing (episode {index})")
        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises several types for corrupt files
            raise DatasetError(f"{path}: unreadable ({exc})") from exc
        length = int(record["length"])
        if len(table) != length:
            raise DatasetError(f"{path}: {len(table)} rows, {self.root / EPISODES_FILE} says length {length}")
        states = _column_matrix(table, STATE_KEY, len(self.state_names), path)
        actions = _column_matrix(table, ACTION_KEY, len(self.action_names), path)
        environment = None
        if self.environment_names is not None:
            environment = _column_matrix(table, ENVIRONMENT_KEY, len(self.environment_names), path)
        plans = None
        if self.plan_horizon is not None:
            width = self.plan_horizon * len(self.action_names)
            plans = _column_matrix(table, PLAN_KEY, width, path).reshape(length, self.plan_horizon, -1)
        if "timestamp" in table.column_names:
            timestamps = np.array(table.column("timestamp").to_numpy(), dtype=np.float64)
        else:
            timestamps = np.arange(length) / self.fps
        task = None
        if "task_index" in table.column_names and length:
            task = self.tasks.get(int(table.column("task_index")[0].as_py()))
        if task is None:
            tasks = record.get("tasks") or []
            if not tasks:
                raise DatasetError(f"{path}: no task for episode {index} (task_index or episodes.jsonl tasks)")
            task = str(tasks[0])
        success = record.get("success")
        return Episode(
            index=index,
            task=task,
            frames=VideoFrames(video, length, self.image_size) if with_frames else None,
            states=states,
            actions=actions,
            timestamps=timestamps,
            success=None if success is None else bool(success),
            extra=self.episode_extra(index),
            environment_states=environment,
            plans=plans,
        )

    def __len__(self) -> int:
        return self.num_episodes

    def __iter__(self) -> Iterator[Episode]:
        for index in self.episode_indices:
            yield self.episode(index)
