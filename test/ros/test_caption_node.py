"""caption_node over real DDS: camera_replay, fovea_node and caption_node as separate processes,
with a randomly initialised SmolVLM-family model loaded through the real transformers path."""

from __future__ import annotations

import time

import pytest
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from std_msgs.msg import String
from visualization_msgs.msg import Marker, MarkerArray

from fovea_vla.bringup import NodeSpec, config_files, node_graph
from fovea_vla.core.caption.random_model import build_random_vlm
from fovea_vla.launcher import GraphProcesses
from fovea_vla.nodes import qos
from fovea_vla.nodes.messages import stamp_to_ns
from fovea_vla_msgs.msg import Caption, CaptionView, Fixation

STARTUP_S = 90.0  # three processes import torch / OpenCV and load a model; discovery takes seconds
RATE_HZ = 2.0
LATCHED = QoSProfile(
    history=HistoryPolicy.KEEP_LAST,
    depth=10,
    reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.TRANSIENT_LOCAL,
)
REPLAY = {"rate_hz": 10.0, "synthetic.width": 320, "synthetic.height": 240}


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    return build_random_vlm(tmp_path_factory.mktemp("vlm") / "tiny_smolvlm", "tiny", seed=0)


class Captions:
    """What one namespace's caption and fovea nodes publish."""

    def __init__(self, probe, namespace: str, caption_topic: str = "caption"):
        self.captions: list[tuple[float, Caption]] = []
        self.fixations: list[Fixation] = []
        self.views: list[CaptionView] = []
        self.markers: list[Marker] = []
        node = probe.node
        node.create_subscription(
            Caption, f"/{namespace}/{caption_topic}", lambda m: self.captions.append((time.monotonic(), m)), LATCHED
        )
        node.create_subscription(Fixation, f"/{namespace}/fixation", self.fixations.append, qos.outputs(200))
        node.create_subscription(
            CaptionView, f"/{namespace}/caption_view", self.views.append, qos.sensor("reliable", 5)
        )
        node.create_subscription(
            MarkerArray,
            f"/{namespace}/markers",
            lambda m: self.markers.extend(k for k in m.markers if k.ns == "caption"),
            qos.outputs(100),
        )

    def of_kind(self, kind: int) -> list[Caption]:
        return [c for _, c in self.captions if c.kind == kind]


def caption_graph():
    return node_graph(config="cpu.yaml", use_replay=True, replay_source="synthetic", captions=True)


def test_vlm_captions_arrive_at_the_rate_with_the_described_frames_stamps(ros_probe, tiny_vlm, tmp_path):
    params = {
        "camera_replay": {**REPLAY, "synthetic.num_objects": 3},
        "caption_node": {
            "caption.model_path": str(tiny_vlm),
            "caption.rate_hz": RATE_HZ,
            "caption.max_new_tokens": 4,
            "caption.nice": 0,
        },
    }
    out = Captions(ros_probe, "cap")
    with GraphProcesses(caption_graph(), namespace="cap", parameters=params, log_dir=tmp_path) as processes:
        ros_probe.wait_for(lambda: len(out.of_kind(Caption.KIND_VLM)) >= 6, STARTUP_S, "six VLM captions", processes)
        latched: list[String] = []
        ros_probe.node.create_subscription(String, "/cap/caption_text", latched.append, LATCHED)

        def texts() -> set[str]:
            return {c.text for _, c in out.captions}

        ros_probe.wait_for(
            lambda: latched and latched[-1].data in texts() and any(m.text in texts() for m in out.markers),
            30.0,
            "the latched caption text and the marker of a received caption",
            processes,
        )
        codes = processes.stop(timeout_s=15.0)  # two nodes load models: teardown takes seconds under load
    assert codes == {"camera_replay": 0, "fovea_node": 0, "caption_node": 0}, f"logs in {tmp_path}"

    captions = out.of_kind(Caption.KIND_VLM)
    fixation_stamps = {stamp_to_ns(f.header.stamp) for f in out.fixations}
    stamps = [stamp_to_ns(c.header.stamp) for c in captions]
    assert stamps == sorted(set(stamps))  # one caption per described frame, in order
    for caption in captions:
        if stamp_to_ns(caption.header.stamp) >= min(fixation_stamps):  # the probe saw that frame's fixation
            assert stamp_to_ns(caption.header.stamp) in fixation_stamps  # a frame the pipeline processed
        assert caption.header.frame_id == "camera_optical_frame"
        assert stamp_to_ns(caption.fixation.header.stamp) == stamp_to_ns(caption.header.stamp)
        assert caption.backend == "vlm" and caption.latency_ms > 0
        assert 0 < caption.region.width == caption.region.height <= 240
    # Rate-limited: never more captions than the rate allows over the span they were received in.
    received = [t for t, c in out.captions if c.kind == Caption.KIND_VLM]
    assert len(received) <= RATE_HZ * (received[-1] - received[0]) + 2
    marker = next(m for m in reversed(out.markers) if m.text in {c.text for c in captions})
    assert marker.type == Marker.TEXT_VIEW_FACING and marker.header.frame_id == "camera_optical_frame"


def test_a_still_scene_gets_no_new_vlm_call_and_a_missing_model_falls_back_to_events(ros_probe, tiny_vlm, tmp_path):
    still_gaze = {"fixation.saccade_rate_hz": 0.0, "fixation.saccade_events": ""}
    params = {
        "camera_replay": {**REPLAY, "synthetic.num_objects": 0},
        "fovea_node": still_gaze,
        "caption_node": {
            "caption.model_path": str(tiny_vlm),
            "caption.rate_hz": RATE_HZ,
            "caption.max_new_tokens": 4,
            "caption.nice": 0,
        },
    }
    # A second captioner on the same pipeline, told to use a model folder that does not exist.
    fallback = NodeSpec(
        "fovea_vla",
        "caption_node",
        "caption_fallback",
        config_files("cpu.yaml"),
        {
            "caption.backend": "vlm",
            "caption.model_path": str(tmp_path / "no_such_model"),
            "caption.rate_hz": RATE_HZ,
            "caption.nice": 0,
        },
        (("caption", "caption_fallback"), ("caption_text", "caption_fallback_text"), ("markers", "fallback_markers")),
    )
    out = Captions(ros_probe, "still")
    events = Captions(ros_probe, "still", caption_topic="caption_fallback")
    graph = [*caption_graph(), fallback]
    with GraphProcesses(graph, namespace="still", parameters=params, log_dir=tmp_path) as processes:
        ros_probe.wait_for(lambda: out.of_kind(Caption.KIND_VLM), STARTUP_S, "the first VLM caption", processes)
        views_then = len(out.views)
        ros_probe.wait_for(lambda: len(out.views) >= views_then + 8, 60.0, "eight more caption views", processes)
        ros_probe.wait_for(lambda: events.captions, 30.0, "event captions from the fallback", processes)
        codes = processes.stop(timeout_s=15.0)  # two nodes load models: teardown takes seconds under load
    assert codes == {"camera_replay": 0, "fovea_node": 0, "caption_node": 0, "caption_fallback": 0}
    assert len(out.of_kind(Caption.KIND_VLM)) == 1, [c.text for c in out.of_kind(Caption.KIND_VLM)]

    fallback_captions = [c for _, c in events.captions]
    assert {c.kind for c in fallback_captions} == {Caption.KIND_EVENTS}
    assert {c.backend for c in fallback_captions} == {"events"}
    assert "Scene: the scene is still." in fallback_captions[-1].text
    fixation_stamps = {stamp_to_ns(f.header.stamp) for f in out.fixations}
    # A still scene is narrated once, possibly before the probe saw its first fixation: check what it can.
    for caption in fallback_captions:
        stamp = stamp_to_ns(caption.header.stamp)
        assert 0 < stamp <= max(fixation_stamps)
        assert stamp < min(fixation_stamps) or stamp in fixation_stamps
    log = (tmp_path / "caption_fallback.log").read_text()
    assert "no_such_model" in log and "does not exist" in log and "falling back to event narration" in log
