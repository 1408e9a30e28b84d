"""Frame sources for the ``camera_replay`` node: synthetic scene, video file, image folder, rosbag2.

Every source yields :class:`SourceFrame` (RGB ``uint8`` plus index and time within the source)
and is re-iterable: each ``iter()`` starts again from the first frame, with its own decoder, so
the node can loop a recording. :func:`open_source` picks the source for a user-given spec, and
:func:`write_image_bag` writes frames into a bag (sample data, tests).

Bags are read and written with the pure-Python ``rosbags`` package, imported on first use so the
other sources work without it. Nothing here imports rclpy or ROS message packages.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import cv2
import numpy as np

from fovea_vla.core.frames import (
    FrameError,
    compressed_to_rgb,
    image_to_rgb,
    rgb_to_compressed,
    rgb_to_image_fields,
)
from fovea_vla.core.synthetic import SceneTruth, SyntheticScene, SyntheticSceneConfig

__all__ = [
    "BAG_SUFFIXES",
    "IMAGE_SUFFIXES",
    "BagSource",
    "FrameSource",
    "ImageFolderSource",
    "SourceError",
    "SourceFrame",
    "SyntheticSource",
    "VideoSource",
    "open_source",
    "write_image_bag",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
BAG_SUFFIXES = (".mcap", ".db3")

_IMAGE = "sensor_msgs/msg/Image"
_COMPRESSED = "sensor_msgs/msg/CompressedImage"
_IMAGE_TYPES = (_IMAGE, _COMPRESSED)
# Messages read when a bag is opened, to estimate its frame rate from their stamps.
_RATE_PROBE_MESSAGES = 30


class SourceError(ValueError):
    """A frame source that cannot be opened or read; the message names the file at fault."""


@dataclass(frozen=True, eq=False)
class SourceFrame:
    """One frame of a source.

    Attributes:
        rgb: (H, W, 3) uint8 RGB, C-contiguous, writeable.
        index: position in the source, 0 for the first frame of every pass.
        source_time_s: time within the source in seconds, 0 at the first frame: ``index / fps``
            for synthetic scenes, videos and image folders with a frame rate, the header stamp
            (or bag time) relative to the first message for bags; None when unknown.
        truth: ground truth for synthetic frames, None otherwise.
    """

    rgb: np.ndarray
    index: int
    source_time_s: float | None
    truth: SceneTruth | None = None


@runtime_checkable
class FrameSource(Protocol):
    """What ``camera_replay`` needs from a source.

    Attributes:
        name: human-readable description, e.g.
            ``"video:/data/a.mp4 (320x240 @ 60 fps, 1699 frames)"``.
        nominal_fps: the source's own frame rate in Hz, None when it has none (image folders).
        num_frames: frames per pass, None when endless or unknown.
    """

    name: str
    nominal_fps: float | None
    num_frames: int | None

    def __iter__(self) -> Iterator[SourceFrame]:
        """A new pass from the first frame."""
        ...

    def close(self) -> None:
        """Releases the source; later passes raise :class:`SourceError`."""
        ...


class _Source:
    """Context-manager support and the closed check shared by the sources."""

    _closed = False

    def close(self) -> None:
        """Marks the source closed; a pass in progress keeps its own decoder until it ends."""
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise SourceError(f"{self.name}: source is closed")

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


def _fps_text(fps: float) -> str:
    return f"{fps:.4g} fps"


class SyntheticSource(_Source):
    """Frames of the built-in :class:`SyntheticScene`, with ground truth.

    Args:
        config: scene parameters (defaults when None).
        num_frames: frames per pass; None for an endless source.
    """

    def __init__(self, config: SyntheticSceneConfig | None = None, num_frames: int | None = None):
        if num_frames is not None and (isinstance(num_frames, bool) or int(num_frames) != num_frames or num_frames < 1):
            raise ValueError(f"num_frames must be None or an integer >= 1, got {num_frames!r}")
        self.scene = SyntheticScene(config)
        cfg = self.scene.cfg
        self.nominal_fps: float | None = cfg.fps
        self.num_frames: int | None = None if num_frames is None else int(num_frames)
        details = [f"{cfg.width}x{cfg.height} @ {_fps_text(cfg.fps)}", f"{cfg.num_objects} objects"]
        if cfg.camera_motion:
            details.append("camera motion")
        if cfg.scene_cut_every_s > 0:
            details.append(f"cut every {cfg.scene_cut_every_s:g} s")
        details.append("endless" if num_frames is None else f"{self.num_frames} frames")
        self.name = f"synthetic ({', '.join(details)})"

    def __iter__(self) -> Iterator[SourceFrame]:
        self._check_open()
        indices = itertools.count() if self.num_frames is None else range(self.num_frames)
        fps = self.scene.cfg.fps
        for index in indices:
            rgb, truth = self.scene.render(index)
            yield SourceFrame(rgb, index, index / fps, truth)


def _bgr_to_rgb(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB if image.shape[2] == 4 else cv2.COLOR_BGR2RGB)


class VideoSource(_Source):
    """Frames of a video file decoded by OpenCV (``cv2.VideoCapture``) or a video decoder backend.

    ``source_time_s`` is ``index / nominal_fps``: OpenCV's per-frame positions are unreliable
    for some containers. ``num_frames`` is the container's count (which may be off by a few)
    until a pass has reached the end, then the number of frames actually decoded. The size, rate
    and count always come from OpenCV.

    Args:
        path: video file.
        decoder: ``"opencv"``; a :data:`~fovea_vla.core.decode.VIDEO_DECODERS` backend
            (``"nvdec"``: the GPU's video engine, ``"ffmpeg"``); or ``"auto"``: nvdec where
            available, else OpenCV.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        SourceError: OpenCV cannot open it or decodes no frame.
        ValueError, RuntimeError: an unknown or unavailable ``decoder`` (named).
    """

    def __init__(self, path: str | Path, decoder: str = "opencv"):
        self.path = Path(path)
        self._decoder = None
        if decoder != "opencv":
            from fovea_vla.core.decode import VIDEO_DECODERS, DecodeConfig, make_video_decoder

            if decoder != "auto":
                self._decoder, _ = make_video_decoder(DecodeConfig(video_backend=decoder))
            elif VIDEO_DECODERS.availability("nvdec")[0]:
                self._decoder, _ = make_video_decoder(DecodeConfig(video_backend="nvdec"))
        self.decoder = self._decoder.name if self._decoder is not None else "opencv"
        if not self.path.is_file():
            raise FileNotFoundError(f"video {self.path} does not exist or is not a file")
        capture = self._capture()
        try:
            ok, first = capture.read()
            if not ok or first is None:
                raise SourceError(f"video {self.path}: OpenCV opened it but decoded no frame")
            fps = capture.get(cv2.CAP_PROP_FPS)
            count = capture.get(cv2.CAP_PROP_FRAME_COUNT)
        finally:
            capture.release()
        self.height, self.width = first.shape[:2]
        # Backends report 0, NaN or a timebase such as 90000 when the rate is unknown.
        self.nominal_fps: float | None = fps if math.isfinite(fps) and 0 < fps <= 1000 else None
        self._container_frames = int(count) if math.isfinite(count) and count > 0 else None
        self._decoded_frames: int | None = None

    @property
    def num_frames(self) -> int | None:
        """Frames per pass: exact after one full pass, the container's estimate before."""
        return self._decoded_frames if self._decoded_frames is not None else self._container_frames

    @property
    def name(self) -> str:
        rate = f" @ {_fps_text(self.nominal_fps)}" if self.nominal_fps else ""
        count = f", {self.num_frames} frames" if self.num_frames else ""
        return f"video:{self.path} ({self.width}x{self.height}{rate}{count}, {self.decoder})"

    def _capture(self) -> cv2.VideoCapture:
        capture = cv2.VideoCapture(str(self.path))
        if not capture.isOpened():
            capture.release()
            raise SourceError(f"video {self.path}: OpenCV cannot open it (not a video, or no codec for it)")
        return capture

    def _images(self) -> Iterator[np.ndarray]:
        """RGB frames of one pass."""
        if self._decoder is not None:
            try:
                for image in self._decoder.iter_file(str(self.path)):
                    yield image.rgb.copy()  # GPU decoders reuse their pinned host buffers
            except FrameError as exc:
                raise SourceError(f"video {self.path}: {self.decoder}: {exc}") from exc
            return
        capture = self._capture()
        try:
            while True:
                ok, image = capture.read()
                if not ok or image is None:
                    break
                yield _bgr_to_rgb(image)
        finally:
            capture.release()

    def __iter__(self) -> Iterator[SourceFrame]:
        self._check_open()
        index = 0
        for rgb in self._images():
            time_s = index / self.nominal_fps if self.nominal_fps else None
            yield SourceFrame(rgb, index, time_s)
            index += 1
        if index == 0:
            raise SourceError(f"video {self.path}: decoded no frame")
        self._decoded_frames = index


def _natural_key(path: Path) -> list:
    # "img2" < "img10": digit runs compare as numbers (re.split alternates text, digits, ...).
    return [int(part) if i % 2 else part.lower() for i, part in enumerate(re.split(r"(\d+)", path.name))]


class ImageFolderSource(_Source):
    """The images of a folder (png, jpg, jpeg, bmp, webp), in natural name order.

    Every image must decode and have the size of the first; a pass raises :class:`SourceError`
    naming the first file that does not.

    Args:
        path: folder of images (not searched recursively).
        fps: frame rate to report and to derive ``source_time_s`` from; None: no rate, and
            ``source_time_s`` is None.

    Raises:
        FileNotFoundError: ``path`` is not a folder.
        SourceError: no image in it, or the first one does not decode.
    """

    def __init__(self, path: str | Path, fps: float | None = None):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"image folder {self.path} does not exist or is not a folder")
        if fps is not None and not (math.isfinite(fps) and fps > 0):
            raise ValueError(f"fps must be None or a positive number, got {fps!r}")
        self.files = sorted(
            (p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
            key=_natural_key,
        )
        if not self.files:
            raise SourceError(f"image folder {self.path} holds no {'/'.join(IMAGE_SUFFIXES)} files")
        self.height, self.width = self._read(self.files[0]).shape[:2]
        self.nominal_fps: float | None = None if fps is None else float(fps)
        self.num_frames: int | None = len(self.files)
        rate = f" @ {_fps_text(self.nominal_fps)}" if self.nominal_fps else ""
        self.name = f"images:{self.path} ({self.width}x{self.height}{rate}, {self.num_frames} frames)"

    def _read(self, file: Path) -> np.ndarray:
        try:
            # imdecode of the bytes instead of imread: the same behaviour for any path encoding.
            image = cv2.imdecode(np.fromfile(file, np.uint8), cv2.IMREAD_COLOR)
        except (OSError, cv2.error) as exc:
            raise SourceError(f"image folder {self.path}: cannot read {file.name}: {exc}") from exc
        if image is None:
            raise SourceError(f"image folder {self.path}: {file.name} is not a decodable image")
        return _bgr_to_rgb(image)

    def __iter__(self) -> Iterator[SourceFrame]:
        self._check_open()
        for index, file in enumerate(self.files):
            rgb = self._read(file)
            if rgb.shape[:2] != (self.height, self.width):
                raise SourceError(
                    f"image folder {self.path}: {file.name} is {rgb.shape[1]}x{rgb.shape[0]} but "
                    f"{self.files[0].name} is {self.width}x{self.height}; all images must have one size"
                )
            time_s = index / self.nominal_fps if self.nominal_fps else None
            yield SourceFrame(rgb, index, time_s)


def _typestore():
    """The rosbags typestore of ROS 2 Jazzy (the closest one an older rosbags has)."""
    try:
        from rosbags.typesys import Stores, get_typestore
    except ImportError as exc:
        raise SourceError("rosbag2 bags need the 'rosbags' Python package (pip install rosbags)") from exc
    store = getattr(Stores, "ROS2_JAZZY", None) or Stores.LATEST
    return get_typestore(store)


def _stamp_ns(msg) -> int:
    return int(msg.header.stamp.sec) * 1_000_000_000 + int(msg.header.stamp.nanosec)


class BagSource(_Source):
    """Frames of one ``sensor_msgs/msg/Image`` or ``CompressedImage`` topic of a rosbag2 bag.

    Reads MCAP and sqlite3 bags: a bag folder with ``metadata.yaml`` or a single ``.mcap`` /
    ``.db3`` file. Images are decoded with :mod:`fovea_vla.core.frames`. ``source_time_s`` comes
    from the header stamps relative to the first message; when the first message has a zero
    stamp (a common recorder default), the bag's receive times are used for all messages.
    ``nominal_fps`` is estimated from the times of the first messages.

    Args:
        path: bag folder or storage file.
        topic: image topic; None picks the first image topic in name order.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        SourceError: not a readable bag, no image topic, ``topic`` missing or not an image
            topic (the message lists the bag's image topics), or the first image does not
            decode.
    """

    def __init__(self, path: str | Path, topic: str | None = None):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"bag {self.path} does not exist")
        self._typestore = _typestore()
        with self._reader() as reader:
            types = {name: info.msgtype for name, info in reader.topics.items()}
            images = sorted(name for name, msgtype in types.items() if msgtype in _IMAGE_TYPES)
            if topic is None:
                if not images:
                    listing = ", ".join(f"{n} ({t})" for n, t in sorted(types.items())) or "none"
                    raise SourceError(f"bag {self.path} has no Image or CompressedImage topic; topics: {listing}")
                topic = images[0]
            elif topic not in images:
                what = f"is a {types[topic]} topic" if topic in types else "does not exist"
                raise SourceError(
                    f"bag {self.path}: topic {topic!r} {what}; image topics: {', '.join(images) or 'none'}"
                )
            self.topic = topic
            self.msgtype = types[topic]
            self.num_frames: int | None = reader.topics[topic].msgcount
            probe = list(itertools.islice(self._messages(reader), _RATE_PROBE_MESSAGES))
        if not probe:
            raise SourceError(f"bag {self.path}: topic {topic} has no messages")
        first = self._decode(probe[0][0], 0)
        self.height, self.width = first.shape[:2]
        steps = np.diff([time_ns for _, time_ns in probe])
        period_ns = float(np.median(steps)) if steps.size else 0.0
        self.nominal_fps: float | None = 1e9 / period_ns if period_ns > 0 else None
        rate = f" @ {_fps_text(self.nominal_fps)}" if self.nominal_fps else ""
        self.name = (
            f"bag:{self.path} [{topic} {self.msgtype.rsplit('/', 1)[-1]}] "
            f"({self.width}x{self.height}{rate}, {self.num_frames} frames)"
        )

    @contextmanager
    def _reader(self):
        from rosbags.highlevel import AnyReader, AnyReaderError

        try:
            reader = AnyReader([self.path], default_typestore=self._typestore)
            reader.open()
        except (AnyReaderError, ValueError, KeyError, OSError) as exc:
            raise SourceError(f"bag {self.path}: cannot read it as a rosbag2 bag: {exc}") from exc
        try:
            yield reader
        finally:
            reader.close()

    def _messages(self, reader) -> Iterator[tuple[object, int]]:
        """(message, time in ns) of the topic in bag order; see the class doc for the time."""
        connections = [c for c in reader.connections if c.topic == self.topic]
        use_stamp = None
        for connection, bag_ns, raw in reader.messages(connections=connections):
            msg = reader.deserialize(raw, connection.msgtype)
            if use_stamp is None:
                use_stamp = _stamp_ns(msg) != 0
            yield msg, _stamp_ns(msg) if use_stamp else bag_ns

    def _decode(self, msg, index: int) -> np.ndarray:
        try:
            if self.msgtype == _COMPRESSED:
                rgb = compressed_to_rgb(msg.data, msg.format)
            else:
                rgb = image_to_rgb(msg.data, msg.width, msg.height, msg.encoding, msg.step, bool(msg.is_bigendian))
        except FrameError as exc:
            raise SourceError(f"bag {self.path}: {self.topic} message {index} ({exc.reason}): {exc}") from exc
        # Unpadded rgb8 comes back as a view of the message buffer: give callers their own array.
        return rgb if rgb.flags.writeable and rgb.base is None else rgb.copy()

    def __iter__(self) -> Iterator[SourceFrame]:
        self._check_open()
        with self._reader() as reader:
            first_ns = None
            for index, (msg, time_ns) in enumerate(self._messages(reader)):
                if first_ns is None:
                    first_ns = time_ns
                yield SourceFrame(self._decode(msg, index), index, (time_ns - first_ns) / 1e9)


def open_source(
    spec: str,
    *,
    synthetic: SyntheticSceneConfig | None = None,
    bag_topic: str | None = None,
    video_decoder: str = "opencv",
) -> FrameSource:
    """Opens the frame source a user named.

    Args:
        spec: ``"synthetic"``; a rosbag2 bag (a folder with ``metadata.yaml`` or with one
            ``.mcap`` / ``.db3`` file, or such a file); a folder of images; any other file is
            opened as a video.
        synthetic: scene for ``"synthetic"`` (defaults when None); the source is endless.
        bag_topic: image topic of a bag (None: the first); ignored by other sources.
        video_decoder: decoder of video files (see :class:`VideoSource`); ignored by other sources.

    Raises:
        FileNotFoundError: ``spec`` is neither ``"synthetic"`` nor an existing path.
        SourceError: the source exists but cannot be read (see each source).
    """
    if spec.strip().lower() == "synthetic":
        return SyntheticSource(synthetic)
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"frame source {spec!r} does not exist; expected 'synthetic', a video file, "
            "a folder of images or a rosbag2 bag (folder, .mcap or .db3)"
        )
    if path.is_dir():
        if (path / "metadata.yaml").is_file():
            return BagSource(path, bag_topic)
        storage = sorted(p for p in path.iterdir() if p.suffix.lower() in BAG_SUFFIXES and p.is_file())
        if len(storage) > 1:
            names = ", ".join(p.name for p in storage)
            raise SourceError(f"{path} holds several bag files ({names}) but no metadata.yaml; name one of them")
        if storage:
            return BagSource(storage[0], bag_topic)
        return ImageFolderSource(path)
    if path.suffix.lower() in BAG_SUFFIXES:
        return BagSource(path, bag_topic)
    return VideoSource(path, video_decoder)


def write_image_bag(
    path: str | Path,
    frames: Iterable[np.ndarray],
    topic: str = "/camera/image_raw",
    frame_id: str = "camera",
    fps: float = 30.0,
    compressed: bool | str = False,
    storage: str = "mcap",
    *,
    start_time_ns: int = 1_700_000_000_000_000_000,
    jpeg_quality: int = 90,
) -> Path:
    """Writes RGB frames into a new rosbag2 bag, one message per frame.

    Args:
        path: bag folder to create; it must not exist. The storage file inside is named
            ``<folder name>.mcap`` / ``.db3``.
        frames: (H, W, 3) uint8 RGB arrays; at least one.
        topic: topic name.
        frame_id: ``header.frame_id`` of every message.
        fps: frame rate: frame ``i`` is stamped ``start_time_ns + i / fps`` (header and bag time).
        compressed: False writes ``sensor_msgs/msg/Image`` ``rgb8``; True (= ``"jpeg"``),
            ``"jpeg"`` / ``"jpg"`` or ``"png"`` write ``sensor_msgs/msg/CompressedImage`` with
            image_transport's format string ``"rgb8; <codec> compressed bgr8"``.
        storage: ``"mcap"`` or ``"sqlite3"``.
        start_time_ns: stamp of the first frame in ns since the epoch.
        jpeg_quality: JPEG quality 0..100.

    Returns:
        The bag folder.

    Raises:
        FileExistsError: ``path`` exists.
        ValueError: bad ``fps``, ``compressed``, ``storage`` or no frames.
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; write_image_bag creates a new bag folder")
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    codec = "jpeg" if compressed is True else compressed
    if codec is not False and codec not in ("jpeg", "jpg", "png"):
        raise ValueError(f"compressed must be False, True, 'jpeg', 'jpg' or 'png', got {compressed!r}")
    typestore = _typestore()
    from rosbags.rosbag2 import StoragePlugin, Writer

    plugins = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}
    if storage not in plugins:
        raise ValueError(f"storage must be 'mcap' or 'sqlite3', got {storage!r}")
    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        raise ValueError("write_image_bag needs at least one frame")

    types = typestore.types
    msgtype = _IMAGE if codec is False else _COMPRESSED
    with Writer(path, version=Writer.VERSION_LATEST, storage_plugin=plugins[storage]) as writer:
        connection = writer.add_connection(topic, msgtype, typestore=typestore)
        for index, rgb in enumerate(itertools.chain([first], frames)):
            stamp_ns = start_time_ns + round(index * 1e9 / fps)
            sec, nanosec = divmod(stamp_ns, 1_000_000_000)
            header = types["std_msgs/msg/Header"](
                stamp=types["builtin_interfaces/msg/Time"](sec=sec, nanosec=nanosec), frame_id=frame_id
            )
            if codec is False:
                data, step = rgb_to_image_fields(rgb, "rgb8")
                msg = types[_IMAGE](
                    header=header,
                    height=rgb.shape[0],
                    width=rgb.shape[1],
                    encoding="rgb8",
                    is_bigendian=0,
                    step=step,
                    data=np.frombuffer(data, np.uint8),
                )
            else:
                data = rgb_to_compressed(rgb, codec, jpeg_quality)
                msg = types[_COMPRESSED](
                    header=header, format=f"rgb8; {codec} compressed bgr8", data=np.frombuffer(data, np.uint8)
                )
            writer.write(connection, stamp_ns, typestore.serialize_cdr(msg, msgtype))
    return path
