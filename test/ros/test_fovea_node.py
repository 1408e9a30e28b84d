"""fovea_node and camera_replay over real DDS, started as separate processes by the dev launcher."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from geometry_msgs.msg import PointStamped
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import Header
from visualization_msgs.msg import Marker, MarkerArray

from fovea_vla.bringup import node_graph
from fovea_vla.core.frames import rgb_to_compressed
from fovea_vla.core.synthetic import SyntheticScene, SyntheticSceneConfig
from fovea_vla.launcher import GraphProcesses, command_for
from fovea_vla.nodes import qos
from fovea_vla.nodes.messages import image_msg, ns_to_stamp, stamp_to_ns
from fovea_vla_msgs.msg import Fixation, PipelineStats
from fovea_vla_msgs.srv import SetFixation

STARTUP_S = 60.0  # node start includes importing torch and OpenCV; discovery can take seconds
FRAME_ID = "test_camera_optical_frame"
TEST_NODE_PARAMS = {
    # Reliable, deep input queue: these tests count every frame they send.
    "sensor_qos.reliability": "reliable",
    "sensor_qos.depth": 20,
    "max_frame_age_ms": 3000.0,
    "markers.rate_hz": 0.0,  # markers for every frame: the tests count them
}


class Outputs:
    """Everything one fovea_node instance publishes, by topic."""

    def __init__(self, probe, namespace: str):
        self.fixations: list[Fixation] = []
        self.stats: list[PipelineStats] = []
        self.markers: list[MarkerArray] = []
        node = probe.node
        self.subscriptions = (
            node.create_subscription(Fixation, f"/{namespace}/fixation", self.fixations.append, qos.outputs(100)),
            node.create_subscription(PipelineStats, f"/{namespace}/stats", self.stats.append, qos.outputs(100)),
            node.create_subscription(MarkerArray, f"/{namespace}/markers", self.markers.append, qos.outputs(100)),
        )

    def matched(self) -> bool:
        """Every output topic is matched with the node's publisher: messages sent before would be lost."""
        return all(subscription.get_publisher_count() > 0 for subscription in self.subscriptions)

    def stats_for(self, stamp_ns: int) -> PipelineStats | None:
        return next((s for s in self.stats if stamp_to_ns(s.header.stamp) == stamp_ns), None)

    def fixation_for(self, stamp_ns: int) -> Fixation | None:
        return next((f for f in self.fixations if stamp_to_ns(f.header.stamp) == stamp_ns), None)


@pytest.fixture(scope="module")
def scene():
    return SyntheticScene(SyntheticSceneConfig(width=320, height=240, seed=3))


def start_fovea_node(probe, namespace, params, message_type, topic, log_dir):
    """fovea_node in its own process and namespace, with a probe-side publisher to its camera topic."""
    graph = node_graph(config="cpu.yaml", use_replay=False, captions=False)
    processes = GraphProcesses(graph, namespace=namespace, parameters={"fovea_node": params}, log_dir=log_dir).start()
    outputs = Outputs(probe, namespace)
    publisher = probe.node.create_publisher(message_type, f"/{namespace}/{topic}", qos.sensor("reliable", 20))
    probe.wait_for(lambda: publisher.get_subscription_count() > 0, STARTUP_S, f"fovea_node on {topic}", processes)
    # Discovery is not symmetric: the node may see the camera publisher before the probe sees its outputs,
    # and the first stats / fixation of a test would then go nowhere (a 20 s timeout in a loaded CI run).
    probe.wait_for(outputs.matched, STARTUP_S, "fovea_node's outputs", processes)
    return processes, publisher, outputs


@pytest.fixture(scope="module")
def raw_node(ros_probe, tmp_path_factory):
    node = start_fovea_node(ros_probe, "raw", TEST_NODE_PARAMS, Image, "image", tmp_path_factory.mktemp("raw"))
    yield node
    codes = node[0].stop()
    assert codes == {"fovea_node": 0}, f"fovea_node did not exit cleanly: {codes} (log in {node[0].log_dir})"


@pytest.fixture(scope="module")
def jpeg_node(ros_probe, tmp_path_factory):
    params = {**TEST_NODE_PARAMS, "image_transport": "compressed"}
    node = start_fovea_node(
        ros_probe, "jpeg", params, CompressedImage, "image/compressed", tmp_path_factory.mktemp("jpeg")
    )
    yield node
    assert node[0].stop() == {"fovea_node": 0}


def header(probe, age_s: float = 0.0) -> Header:
    now = probe.node.get_clock().now().nanoseconds - int(age_s * 1e9)
    return Header(stamp=ns_to_stamp(now), frame_id=FRAME_ID)


def send_and_wait(probe, publisher, outputs, msg, what: str, processes) -> PipelineStats:
    """Publish one frame and wait for the stats stamped with it."""
    stamp = stamp_to_ns(msg.header.stamp)
    publisher.publish(msg)
    probe.wait_for(lambda: outputs.stats_for(stamp) is not None, 20.0, what, processes)
    return outputs.stats_for(stamp)


def drops(stats: PipelineStats) -> dict[str, int]:
    return {d.reason: int(d.count) for d in stats.drops}


def test_frames_in_fixation_markers_stats_out_with_capture_stamps(ros_probe, raw_node, scene):
    processes, publisher, outputs = raw_node
    sent = []
    for index in range(8):
        rgb, _ = scene.render(index)
        msg = image_msg(rgb, header(ros_probe), "bgr8" if index % 2 else "rgb8")
        sent.append(stamp_to_ns(msg.header.stamp))
        send_and_wait(ros_probe, publisher, outputs, msg, f"stats for frame {index}", processes)
    ros_probe.wait_for(lambda: len(outputs.markers) >= 8, 10.0, "markers", processes)

    fixation_stamps = [stamp_to_ns(f.header.stamp) for f in outputs.fixations]
    assert set(sent) <= set(fixation_stamps)
    for fixation in outputs.fixations:
        assert fixation.header.frame_id == FRAME_ID
        assert 0 <= fixation.x <= 319 and 0 <= fixation.y <= 239
        assert fixation.image_width == 320 and fixation.image_height == 240
    for stats in outputs.stats:
        assert stamp_to_ns(stats.header.stamp) in sent
        assert stats.num_tokens == 273
        assert {"coherence", "upload", "sampling", "total"} <= {s.stage for s in stats.stages}
        assert {b.stage: b.backend for b in stats.backends} == {"decode": "opencv", "flow": "dis", "texture": "torch"}
    assert outputs.stats[-1].frames_processed >= 8
    # From the second frame on there is flow and motion analysis; every frame gets a decision.
    assert {"flow", "motion", "fixation"} <= {s.stage for s in outputs.stats[-1].stages}
    assert outputs.stats[0].decision == PipelineStats.DECISION_FIRST
    assert outputs.stats[-1].decision != PipelineStats.DECISION_FIRST
    assert sum(outputs.stats[-1].decision_counts) == outputs.stats[-1].frames_processed

    # Markers: cleared once first, then stable namespaces and ids on every frame, all stamped.
    assert outputs.markers[0].markers[0].action == Marker.DELETEALL
    keys = [{(m.ns, m.id) for m in array.markers} for array in outputs.markers[1:]]
    assert all(k == keys[0] for k in keys)
    assert {"fixation", "fovea", "patches", "flow"} <= {ns for ns, _ in keys[0]}
    for array in outputs.markers[1:]:
        for marker in array.markers:
            assert marker.header.frame_id == FRAME_ID
            assert stamp_to_ns(marker.header.stamp) in sent
    # One outline marker per pyramid level, in that level's colour: four edges, two points each, per patch.
    patches = [m for m in outputs.markers[-1].markers if m.ns == "patches" and m.action == Marker.ADD]
    assert sum(len(m.points) for m in patches) == 273 * 8
    assert len({m.id for m in patches}) == len({(m.color.r, m.color.g, m.color.b) for m in patches}) == len(patches)


def test_stale_frames_are_dropped_and_counted(ros_probe, raw_node, scene):
    processes, publisher, outputs = raw_node
    rgb, _ = scene.render(20)
    before = drops(outputs.stats[-1]).get("stale", 0) if outputs.stats else 0
    stale_stamps = []
    for _ in range(3):
        msg = image_msg(rgb, header(ros_probe, age_s=10.0))
        stale_stamps.append(stamp_to_ns(msg.header.stamp))
        publisher.publish(msg)
    stats = send_and_wait(ros_probe, publisher, outputs, image_msg(rgb, header(ros_probe)), "fresh frame", processes)
    assert drops(stats).get("stale", 0) - before == 3
    assert not any(outputs.fixation_for(s) for s in stale_stamps)


@pytest.mark.parametrize(
    ("reason", "mutate"),
    [
        ("bad_encoding", lambda m: setattr(m, "encoding", "rgb9")),
        ("zero_size", lambda m: (setattr(m, "width", 0), setattr(m, "step", 0))),
        ("truncated", lambda m: setattr(m, "data", bytes(m.data[: m.step * m.height // 2]))),
        ("truncated", lambda m: setattr(m, "step", m.width)),
    ],
)
def test_bad_raw_frames_are_counted_and_the_node_keeps_running(ros_probe, raw_node, scene, reason, mutate):
    processes, publisher, outputs = raw_node
    rgb, _ = scene.render(30)
    before = drops(outputs.stats[-1]).get(reason, 0) if outputs.stats else 0
    bad = image_msg(rgb, header(ros_probe))
    mutate(bad)
    publisher.publish(bad)
    stats = send_and_wait(
        ros_probe, publisher, outputs, image_msg(rgb, header(ros_probe)), "frame after bad", processes
    )
    assert drops(stats).get(reason, 0) == before + 1
    assert outputs.fixation_for(stamp_to_ns(bad.header.stamp)) is None


def test_corrupt_jpeg_is_counted_and_good_jpeg_processed(ros_probe, jpeg_node, scene):
    processes, publisher, outputs = jpeg_node
    rgb, _ = scene.render(5)
    good = rgb_to_compressed(rgb, "jpeg", quality=90)
    corrupt = CompressedImage(header=header(ros_probe), format="jpeg", data=good[: len(good) // 3] + b"\x00" * 64)
    publisher.publish(corrupt)
    publisher.publish(CompressedImage(header=header(ros_probe), format="jpeg", data=b""))
    msg = CompressedImage(header=header(ros_probe), format="rgb8; jpeg compressed bgr8", data=good)
    stats = send_and_wait(ros_probe, publisher, outputs, msg, "good jpeg after corrupt ones", processes)
    counted = drops(stats)
    assert counted.get("corrupt_compressed", 0) + counted.get("zero_size", 0) == 2, counted
    assert outputs.fixation_for(stamp_to_ns(msg.header.stamp)).header.frame_id == FRAME_ID


def test_set_fixation_service_and_clicked_point_move_the_fixation(ros_probe, raw_node, scene):
    processes, publisher, outputs = raw_node
    client = ros_probe.node.create_client(SetFixation, "/raw/set_fixation")
    assert client.wait_for_service(timeout_sec=STARTUP_S)
    future = client.call_async(SetFixation.Request(x=40.0, y=200.0, hold_s=30.0))
    ros_probe.wait_for(future.done, 10.0, "set_fixation response", processes)
    assert future.result().success, future.result().message
    rgb, _ = scene.render(40)
    msg = image_msg(rgb, header(ros_probe))
    send_and_wait(ros_probe, publisher, outputs, msg, "frame after set_fixation", processes)
    fixation = outputs.fixation_for(stamp_to_ns(msg.header.stamp))
    assert fixation.source == Fixation.SOURCE_EXTERNAL and (fixation.x, fixation.y) == (40.0, 200.0)

    # RViz Publish Point: a 3D point in the optical frame, projected with the camera intrinsics.
    info_pub = ros_probe.node.create_publisher(CameraInfo, "/raw/camera_info", qos.sensor("reliable", 5))
    clicked = ros_probe.node.create_publisher(PointStamped, "/raw/clicked_point", qos.outputs())
    ros_probe.wait_for(lambda: clicked.get_subscription_count() > 0, STARTUP_S, "clicked_point subscriber", processes)
    ros_probe.wait_for(lambda: info_pub.get_subscription_count() > 0, STARTUP_S, "camera_info subscriber", processes)
    fx, cx, cy = 200.0, 159.5, 119.5
    expected = (cx + fx * 0.25, cy - fx * 0.1)
    # The point, the camera info and the frames travel on different topics: on a loaded machine a few
    # frames may be handled before the point arrives, and a point that comes before the intrinsics is
    # projected with default_fov_deg; so both are sent again until the fixation lands where they say.
    for _ in range(10):
        info_pub.publish(
            CameraInfo(header=header(ros_probe), width=320, height=240, k=[fx, 0.0, cx, 0.0, fx, cy, 0, 0, 1])
        )
        point = PointStamped(header=header(ros_probe))
        point.point.x, point.point.y, point.point.z = 0.25, -0.1, 1.0  # -> pixel (209.5, 99.5)
        clicked.publish(point)
        msg = image_msg(rgb, header(ros_probe))
        send_and_wait(ros_probe, publisher, outputs, msg, "frame after clicked_point", processes)
        fixation = outputs.fixation_for(stamp_to_ns(msg.header.stamp))
        if (fixation.x, fixation.y) == pytest.approx(expected, abs=1e-3):
            break
    assert fixation.source == Fixation.SOURCE_EXTERNAL
    assert (fixation.x, fixation.y) == pytest.approx(expected, abs=1e-3)
    future = client.call_async(SetFixation.Request(clear=True))
    ros_probe.wait_for(future.done, 10.0, "clear response", processes)
    assert future.result().success


def test_full_graph_with_camera_replay_preserves_capture_stamps(ros_probe, tmp_path):
    graph = node_graph(config="cpu.yaml", use_replay=True, replay_source="synthetic", captions=False)
    params = {"camera_replay": {"rate_hz": 10.0, "synthetic.width": 320, "synthetic.height": 240}}
    infos: list[CameraInfo] = []
    ros_probe.node.create_subscription(CameraInfo, "/full/camera_info", infos.append, qos.sensor("reliable", 50))
    outputs = Outputs(ros_probe, "full")
    with GraphProcesses(graph, namespace="full", parameters=params, log_dir=tmp_path) as processes:
        # The probe's camera_info subscription may be matched later than fovea_node's: wait for both.
        ros_probe.wait_for(
            lambda: len(infos) >= 5 and len(outputs.fixations) >= 10, STARTUP_S, "camera_info and fixations", processes
        )
        first_info = stamp_to_ns(infos[0].header.stamp)
        ros_probe.wait_for(
            lambda: sum(stamp_to_ns(f.header.stamp) >= first_info for f in outputs.fixations) >= 5,
            STARTUP_S,
            "fixations of frames the probe also saw",
            processes,
        )
        codes = processes.stop()
    assert codes == {"camera_replay": 0, "fovea_node": 0}
    info_stamps = {stamp_to_ns(i.header.stamp) for i in infos}
    comparable = [f for f in outputs.fixations if stamp_to_ns(f.header.stamp) >= first_info]
    matched = [f for f in comparable if stamp_to_ns(f.header.stamp) in info_stamps]
    # Every fixation carries the capture stamp of a frame camera_replay published.
    assert len(matched) == len(comparable), (len(matched), len(comparable))
    assert all(f.header.frame_id == "camera_optical_frame" for f in outputs.fixations)
    sources = {f.source for f in outputs.fixations}
    assert sources & {Fixation.SOURCE_PURSUIT, Fixation.SOURCE_SACCADE}, sources


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("flow.grid:=3", "flow.grid"),
        ("flow.scale:='fast'", "flow.scale"),
        ("foveation.num_tokens:=0", "foveation.num_tokens"),
        ("flow.backend:='tourch'", "flow.backend"),
    ],
)
def test_invalid_parameters_are_refused_at_startup_naming_the_parameter(override, needle):
    spec = node_graph(use_replay=False)[0]
    argv = [*command_for(spec, namespace="bad"), "-p", override]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "FATAL" in output and needle in output and "Traceback" not in output, output


def test_integer_for_a_double_parameter_is_accepted(ros_probe, tmp_path):
    """YAML files often say `scale: 1`; a double parameter takes it as 1.0."""
    node = start_fovea_node(ros_probe, "intscale", {"flow.scale": 1}, Image, "image", tmp_path)
    assert node[0].stop() == {"fovea_node": 0}


def test_launcher_module_is_runnable_without_ros_launch():
    """`fovea-vla launch --help` works where launch_ros is absent (PyPI installs)."""
    result = subprocess.run([sys.executable, "-m", "fovea_vla.cli", "launch", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "config:=" in result.stdout


def test_slip_events_over_ros_carry_the_frame_stamp(ros_probe, tmp_path):
    """A generated grasp that slips: fovea_node with slip on publishes ONSET stamped with a sent frame."""
    from std_msgs.msg import Bool

    from fovea_vla.core.slip_sequences import SlipSequenceConfig, make_sequence, synthetic_background
    from fovea_vla_msgs.msg import SlipEvent

    sequence = make_sequence(
        synthetic_background(),
        SlipSequenceConfig(frames=34, arm_speed_px=0.0, shake_px=0.0, slip_speed_px=(0.8, 1.0), seed=5),
    )
    gripper = [round(v) for v in sequence.gripper_regions[0].min(axis=0)[:2]]
    far = sequence.gripper_regions[0][:, :2] + sequence.gripper_regions[0][:, 2:]
    gripper += [round(v) for v in far.max(axis=0) - np.array(gripper)]
    params = {
        **TEST_NODE_PARAMS,
        "slip.enabled": True,
        "slip.gripper_region": gripper,
        "slip.object_region": [round(v) for v in sequence.object_region[0]],
    }
    processes, publisher, outputs = start_fovea_node(ros_probe, "slip", params, Image, "image", tmp_path)
    events: list[SlipEvent] = []
    ros_probe.node.create_subscription(SlipEvent, "/slip/slip", events.append, qos.outputs(50))
    closed = ros_probe.node.create_publisher(Bool, "/slip/gripper_closed", qos.outputs())
    ros_probe.wait_for(lambda: closed.get_subscription_count() > 0, STARTUP_S, "gripper_closed subscriber", processes)
    closed.publish(Bool(data=True))
    stamps = []
    try:
        for gray in sequence.frames:
            msg = image_msg(np.dstack([gray] * 3), header(ros_probe), "mono8")
            stamps.append(stamp_to_ns(msg.header.stamp))
            send_and_wait(ros_probe, publisher, outputs, msg, "frame of the slip sequence", processes)
        ros_probe.wait_for(lambda: any(e.state == SlipEvent.STATE_ONSET for e in events), 10.0, "slip onset", processes)
    finally:
        assert processes.stop() == {"fovea_node": 0}
    onset = next(e for e in events if e.state == SlipEvent.STATE_ONSET)
    index = stamps.index(stamp_to_ns(onset.header.stamp))
    assert sequence.onset <= index <= sequence.onset + 3, (index, sequence.onset)
    assert onset.header.frame_id == FRAME_ID and onset.magnitude > 0.2


def test_video_packets_decode_with_their_capture_stamps_and_bad_packets_are_counted(ros_probe, scene, tmp_path):
    """image_transport video: CompressedVideo H.264 packets (CPU decoder here), a stream joined mid-GOP."""
    pytest.importorskip("av")
    from fovea_vla.core.video_stream import VideoEncoder, VideoEncoderConfig
    from fovea_vla_msgs.msg import CompressedVideo

    params = {**TEST_NODE_PARAMS, "image_transport": "video"}
    processes, publisher, outputs = start_fovea_node(
        ros_probe, "video", params, CompressedVideo, "image/video", tmp_path
    )
    encoder = VideoEncoder(VideoEncoderConfig(format="h264", keyframe_interval=4))
    packets = [encoder.encode(scene.render(index)[0]) for index in range(8)]

    def packet_msg(data: bytes) -> CompressedVideo:
        stamp = header(ros_probe).stamp
        return CompressedVideo(timestamp=stamp, frame_id=FRAME_ID, data=data, format="h264")

    def send(msg: CompressedVideo, what: str) -> PipelineStats:
        stamp = stamp_to_ns(msg.timestamp)
        publisher.publish(msg)
        ros_probe.wait_for(lambda: outputs.stats_for(stamp) is not None, 20.0, what, processes)
        return outputs.stats_for(stamp)

    try:
        joined_late = packet_msg(packets[1])  # a P-frame: nothing to decode it against yet
        publisher.publish(joined_late)
        publisher.publish(packet_msg(b"\x01\x02 no start code"))
        sent = []
        for index in range(4, 8):  # from the keyframe at 4 on
            msg = packet_msg(packets[index])
            sent.append(stamp_to_ns(msg.timestamp))
            stats = send(msg, f"stats for packet {index}")
    finally:
        assert processes.stop() == {"fovea_node": 0}
    counted = drops(stats)
    assert counted.get("no_keyframe", 0) == 1 and counted.get("bad_format", 0) == 1, counted
    assert outputs.fixation_for(stamp_to_ns(joined_late.timestamp)) is None
    assert [stamp_to_ns(f.header.stamp) for f in outputs.fixations] == sent
    assert all(f.header.frame_id == FRAME_ID and f.image_width == 320 for f in outputs.fixations)
    assert {b.stage: b.backend for b in stats.backends}["decode"] == "ffmpeg"
    assert "decode" in {s.stage for s in stats.stages}


def test_camera_replay_video_transport_into_fovea_node(ros_probe, tmp_path):
    """camera_replay encodes H.264 packets; every fixation carries the stamp of a published frame."""
    pytest.importorskip("av")
    graph = node_graph(config="cpu.yaml", use_replay=True, replay_source="synthetic")
    graph = [spec for spec in graph if spec.name in ("camera_replay", "fovea_node")]
    params = {
        "camera_replay": {"rate_hz": 10.0, "synthetic.width": 320, "synthetic.height": 240, "transport": "video"},
        "fovea_node": {"image_transport": "video"},
    }
    infos: list[CameraInfo] = []
    ros_probe.node.create_subscription(CameraInfo, "/replayvideo/camera_info", infos.append, qos.sensor("reliable", 50))
    outputs = Outputs(ros_probe, "replayvideo")
    with GraphProcesses(graph, namespace="replayvideo", parameters=params, log_dir=tmp_path) as processes:
        ros_probe.wait_for(lambda: len(outputs.fixations) >= 5 and infos, STARTUP_S, "fixations from video", processes)
        ros_probe.wait_for(
            lambda: (
                sum(stamp_to_ns(f.header.stamp) >= stamp_to_ns(infos[0].header.stamp) for f in outputs.fixations) >= 3
            ),
            STARTUP_S,
            "fixations of frames the probe also saw",
            processes,
        )
        codes = processes.stop()
    assert codes == {"camera_replay": 0, "fovea_node": 0}
    first = stamp_to_ns(infos[0].header.stamp)
    info_stamps = {stamp_to_ns(i.header.stamp) for i in infos}
    comparable = [f for f in outputs.fixations if stamp_to_ns(f.header.stamp) >= first]
    assert comparable and all(stamp_to_ns(f.header.stamp) in info_stamps for f in comparable)
