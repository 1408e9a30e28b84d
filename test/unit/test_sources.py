"""Frame sources: synthetic, video, image folder and rosbag2 bags (written here with rosbags)."""

from __future__ import annotations

import itertools
from pathlib import Path

import cv2
import numpy as np
import pytest

from fovea_vla.core.sources import (
    BagSource,
    FrameSource,
    ImageFolderSource,
    SourceError,
    SyntheticSource,
    VideoSource,
    open_source,
    write_image_bag,
)
from fovea_vla.core.synthetic import SyntheticSceneConfig, make_example

VIDEO = Path("bgslibrary/dataset/video03.avi")
CROSSING = Path("pyECO/sequences/Crossing/img")


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    return [f.rgb for f in SyntheticSource(make_example().cfg, num_frames=5)]


# --- synthetic ---------------------------------------------------------------------------------


def test_synthetic_source_has_its_length_and_restarts():
    cfg = make_example().cfg
    source = SyntheticSource(cfg, num_frames=4)
    assert isinstance(source, FrameSource)
    assert source.num_frames == 4 and source.nominal_fps == cfg.fps
    assert "160x120" in source.name and "4 frames" in source.name
    first, second = list(source), list(source)
    assert [f.index for f in first] == [0, 1, 2, 3]
    assert [f.source_time_s for f in first] == pytest.approx([i / cfg.fps for i in range(4)])
    assert all(f.truth is not None and f.rgb.shape == (120, 160, 3) for f in first)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a.rgb, b.rgb)


def test_endless_synthetic_source_iterators_are_independent():
    source = SyntheticSource(make_example().cfg)
    assert source.num_frames is None and "endless" in source.name
    a, b = iter(source), iter(source)
    first_a = [next(a) for _ in range(3)]
    first_b = next(b)
    np.testing.assert_array_equal(first_b.rgb, first_a[0].rgb)
    assert next(a).index == 3


def test_synthetic_source_rejects_a_bad_length():
    with pytest.raises(ValueError, match="num_frames"):
        SyntheticSource(num_frames=0)


def test_closed_source_refuses_a_new_pass():
    with SyntheticSource(make_example().cfg, num_frames=2) as source:
        assert len(list(source)) == 2
    with pytest.raises(SourceError, match="closed"):
        next(iter(source))


# --- video -------------------------------------------------------------------------------------


def test_video_source_reads_the_real_video(shared_data):
    source = VideoSource(shared_data / VIDEO)
    assert source.nominal_fps == pytest.approx(60.0, abs=0.01)
    assert source.name.startswith("video:") and "320x240 @ 60 fps" in source.name
    head = list(itertools.islice(source, 3))
    assert [f.rgb.shape for f in head] == [(240, 320, 3)] * 3
    assert all(f.rgb.dtype == np.uint8 and f.truth is None for f in head)
    assert [f.source_time_s for f in head] == pytest.approx([0.0, 1 / 60, 2 / 60], abs=1e-4)
    # A full pass replaces the container's frame count with the decoded one; a new pass restarts.
    count = sum(1 for _ in source)
    assert source.num_frames == count > 1000
    np.testing.assert_array_equal(next(iter(source)).rgb, head[0].rgb)


def test_video_source_converts_bgr_to_rgb(tmp_path):
    path = tmp_path / "red.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (64, 48))
    assert writer.isOpened()
    for _ in range(3):
        writer.write(np.full((48, 64, 3), (0, 0, 255), np.uint8))  # BGR red
    writer.release()
    frames = list(VideoSource(path))
    assert len(frames) == 3
    r, g, b = frames[0].rgb.reshape(-1, 3).mean(axis=0)
    assert r > 200 and g < 40 and b < 40


def test_video_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.mp4"):
        VideoSource(tmp_path / "missing.mp4")
    junk = tmp_path / "notes.txt"
    junk.write_text("not a video")
    with pytest.raises(SourceError, match=r"notes\.txt"):
        VideoSource(junk)


# --- image folder ------------------------------------------------------------------------------


def test_image_folder_source_reads_the_real_sequence(shared_data):
    source = ImageFolderSource(shared_data / CROSSING)
    assert source.num_frames == 120 and source.nominal_fps is None
    assert source.name == f"images:{shared_data / CROSSING} (360x240, 120 frames)"
    frames = list(source)
    assert len(frames) == 120
    assert all(f.rgb.shape == (240, 360, 3) and f.source_time_s is None for f in frames)
    expected = cv2.cvtColor(cv2.imread(str(shared_data / CROSSING / "0001.jpg")), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(frames[0].rgb, expected)


def _write_images(folder: Path, names: list[str], size=(40, 30)) -> None:
    folder.mkdir(exist_ok=True)
    for value, name in enumerate(names):
        cv2.imwrite(str(folder / name), np.full((size[1], size[0], 3), value * 10, np.uint8))


def test_image_folder_uses_natural_order_and_fps(tmp_path):
    _write_images(tmp_path, ["img2.png", "img10.png", "img1.bmp"])
    (tmp_path / "readme.txt").write_text("ignored")
    source = ImageFolderSource(tmp_path, fps=5.0)
    assert [p.name for p in source.files] == ["img1.bmp", "img2.png", "img10.png"]
    frames = list(source)
    assert [int(f.rgb[0, 0, 0]) for f in frames] == [20, 0, 10]
    assert [f.source_time_s for f in frames] == pytest.approx([0.0, 0.2, 0.4])
    assert source.nominal_fps == 5.0 and "@ 5 fps" in source.name


def test_image_folder_errors_name_the_file(tmp_path):
    with pytest.raises(SourceError, match=r"no \.png"):
        ImageFolderSource(tmp_path)
    _write_images(tmp_path, ["a1.png", "a2.png"])
    (tmp_path / "a3.png").write_bytes(b"not a png")
    with pytest.raises(SourceError, match=r"a3\.png"):
        list(ImageFolderSource(tmp_path))
    (tmp_path / "a3.png").unlink()
    (tmp_path / "sub.png").mkdir()  # folders are skipped whatever their name
    cv2.imwrite(str(tmp_path / "a4.png"), np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(SourceError, match=r"a4\.png is 10x10 but a1\.png is 40x30"):
        list(ImageFolderSource(tmp_path))


# --- bags --------------------------------------------------------------------------------------


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
@pytest.mark.parametrize("compressed", [False, "png", "jpeg"])
def test_bag_round_trip(tmp_path, frames, storage, compressed):
    bag = write_image_bag(tmp_path / "bag", frames, fps=20.0, compressed=compressed, storage=storage)
    storage_file = next(bag.glob("*.mcap" if storage == "mcap" else "*.db3"))
    for source in (BagSource(bag), open_source(str(bag)), BagSource(storage_file), open_source(str(storage_file))):
        assert isinstance(source, BagSource) and source.topic == "/camera/image_raw"
        assert source.num_frames == 5 and source.nominal_fps == pytest.approx(20.0)
        assert "160x120" in source.name
        read = list(source)
        assert [f.index for f in read] == list(range(5))
        assert [f.source_time_s for f in read] == pytest.approx([i / 20.0 for i in range(5)])
        for got, want in zip(read, frames, strict=True):
            assert got.rgb.shape == want.shape and got.rgb.dtype == np.uint8 and got.rgb.flags.writeable
            if compressed == "jpeg":
                assert np.abs(got.rgb.astype(np.int16) - want).mean() < 4.0
            else:
                np.testing.assert_array_equal(got.rgb, want)


def _write_custom_bag(path: Path, rgb: np.ndarray, stamps_ns: list[int], bag_ns: list[int]):
    """A bag whose header stamps differ from its receive times, plus a non-image topic."""
    from rosbags.rosbag2 import Writer
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_JAZZY)
    types = store.types
    with Writer(path, version=9) as writer:
        image = writer.add_connection("/cam/raw", "sensor_msgs/msg/Image", typestore=store)
        chatter = writer.add_connection("/chatter", "std_msgs/msg/String", typestore=store)
        writer.write(
            chatter, bag_ns[0], store.serialize_cdr(types["std_msgs/msg/String"](data="hi"), "std_msgs/msg/String")
        )
        for stamp, log_time in zip(stamps_ns, bag_ns, strict=True):
            sec, nanosec = divmod(stamp, 1_000_000_000)
            header = types["std_msgs/msg/Header"](
                stamp=types["builtin_interfaces/msg/Time"](sec=sec, nanosec=nanosec), frame_id="cam"
            )
            bgr = np.ascontiguousarray(rgb[..., ::-1])
            msg = types["sensor_msgs/msg/Image"](
                header=header,
                height=rgb.shape[0],
                width=rgb.shape[1],
                encoding="bgr8",
                is_bigendian=0,
                step=rgb.shape[1] * 3,
                data=bgr.reshape(-1),
            )
            writer.write(image, log_time, store.serialize_cdr(msg, "sensor_msgs/msg/Image"))


def test_bag_times_come_from_header_stamps(tmp_path, frames):
    stamps = [5_000_000_000 + i * 40_000_000 for i in range(4)]  # 25 Hz camera clock
    received = [9_000_000_000 + i * 55_000_000 for i in range(4)]  # receive times at another rate
    _write_custom_bag(tmp_path / "bag", frames[0], stamps, received)
    source = BagSource(tmp_path / "bag")
    read = list(source)
    assert [f.source_time_s for f in read] == pytest.approx([0.0, 0.04, 0.08, 0.12])
    assert source.nominal_fps == pytest.approx(25.0)
    np.testing.assert_array_equal(read[0].rgb, frames[0])  # bgr8 decoded to RGB


def test_bag_times_fall_back_to_bag_time_without_stamps(tmp_path, frames):
    received = [9_000_000_000 + i * 50_000_000 for i in range(3)]
    _write_custom_bag(tmp_path / "bag", frames[0], [0, 0, 0], received)
    assert [f.source_time_s for f in BagSource(tmp_path / "bag")] == pytest.approx([0.0, 0.05, 0.1])


def test_bag_topic_errors_list_the_image_topics(tmp_path, frames):
    _write_custom_bag(tmp_path / "bag", frames[0], [1, 2], [1, 2])
    with pytest.raises(SourceError, match=r"'/camera/image_raw' does not exist; image topics: /cam/raw"):
        BagSource(tmp_path / "bag", topic="/camera/image_raw")
    with pytest.raises(SourceError, match=r"'/chatter' is a std_msgs/msg/String topic; image topics: /cam/raw"):
        open_source(str(tmp_path / "bag"), bag_topic="/chatter")
    assert BagSource(tmp_path / "bag").topic == "/cam/raw"


def test_bag_without_image_topics_lists_what_it_has(tmp_path):
    from rosbags.rosbag2 import Writer
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_JAZZY)
    with Writer(tmp_path / "bag", version=9) as writer:
        conn = writer.add_connection("/chatter", "std_msgs/msg/String", typestore=store)
        msg = store.types["std_msgs/msg/String"](data="hi")
        writer.write(conn, 1, store.serialize_cdr(msg, "std_msgs/msg/String"))
    with pytest.raises(SourceError, match=r"no Image or CompressedImage topic; topics: /chatter \(std_msgs"):
        BagSource(tmp_path / "bag")


def test_write_image_bag_errors(tmp_path, frames):
    with pytest.raises(ValueError, match="at least one frame"):
        write_image_bag(tmp_path / "empty", [])
    with pytest.raises(ValueError, match="compressed"):
        write_image_bag(tmp_path / "gif", frames, compressed="gif")
    with pytest.raises(ValueError, match="storage"):
        write_image_bag(tmp_path / "zip", frames, storage="zip")
    bag = write_image_bag(tmp_path / "bag", frames[:1])
    with pytest.raises(FileExistsError, match="exists"):
        write_image_bag(bag, frames)


# --- open_source -------------------------------------------------------------------------------


def test_open_source_synthetic():
    source = open_source("synthetic", synthetic=SyntheticSceneConfig(width=320, height=240))
    assert isinstance(source, SyntheticSource) and source.num_frames is None
    assert next(iter(source)).rgb.shape == (240, 320, 3)


def test_open_source_dispatches_on_the_path(tmp_path, frames, shared_data):
    assert isinstance(open_source(str(shared_data / VIDEO)), VideoSource)
    assert isinstance(open_source(str(shared_data / CROSSING)), ImageFolderSource)
    # A folder holding one storage file but no metadata.yaml is a bag too.
    bag = write_image_bag(tmp_path / "bag", frames, storage="sqlite3")
    (bag / "metadata.yaml").unlink()
    assert isinstance(open_source(str(bag)), BagSource)
    (bag / "bag.db3").rename(bag / "a.db3")
    write_image_bag(tmp_path / "other", frames, storage="sqlite3")
    (tmp_path / "other" / "other.db3").rename(bag / "b.db3")
    with pytest.raises(SourceError, match=r"several bag files \(a.db3, b.db3\)"):
        open_source(str(bag))


def test_open_source_missing_path_is_explained(tmp_path):
    missing = tmp_path / "nowhere.mp4"
    with pytest.raises(FileNotFoundError, match=r"nowhere.mp4.*does not exist.*'synthetic'"):
        open_source(str(missing))
