"""``fovea-vla demo``: run the graph and record what it shows.

Two scenes. ``sim`` (the default): the closed loop over ROS, sim_bridge (the simulated tabletop
task as robot and camera) and vla_stack (fovea_node + policy_node with the bundled tabletop_push
policy) in separate processes, episodes back to back. ``camera``: camera_replay's synthetic scene
into fovea_node (no policy). The demo subscribes to their outputs from this process and writes to
the output folder: ``demo.mp4`` (the debug image in real time), ``contact_sheet.png`` and
``summary.json`` (frames in / processed / dropped by reason, per-stage latency percentiles,
backends; for ``sim`` also every episode's result and the policy's stats).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np

from fovea_vla.bringup import node_graph
from fovea_vla.core.fixation import FixationSource
from fovea_vla.launcher import GraphProcesses

__all__ = ["ros_environment", "run_demo"]

# Why a frame can be missing between camera_replay and fovea_node, for the summary.
DROP_EXPLANATIONS = {
    "transport_superseded": "published but replaced in fovea_node's depth-1 best-effort queue by a newer frame "
    "while it was busy (sensor-data QoS: always process the newest frame)",
    "stale": "older than max_frame_age_ms when it arrived",
    "superseded": "received, but a newer frame arrived before fovea_node's frame thread took it (its queue is "
    "sensor_qos.depth deep: the newest frames win)",
    "future_stamp": "stamped further in the future than max_frame_age_ms (a wrong camera clock)",
}


def ros_environment(domain_id: int | None) -> dict[str, str]:
    env = dict(os.environ)
    if "ROS_LOCALHOST_ONLY" not in env:
        env.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    if domain_id is not None:
        env["ROS_DOMAIN_ID"] = str(domain_id)
    elif "ROS_DOMAIN_ID" not in env:
        env["ROS_DOMAIN_ID"] = str(random.randint(30, 99))
    return env


class _Recorder:
    """Subscribes to the graph's outputs and writes the video as frames arrive."""

    def __init__(self, node, out_dir: Path, fps: float):
        from sensor_msgs.msg import CameraInfo, Image
        from visualization_msgs.msg import MarkerArray

        from fovea_vla.nodes import qos
        from fovea_vla_msgs.msg import Fixation, PipelineStats

        self.node = node
        self.fps = fps
        self.video_path = out_dir / "demo.mp4"
        self.writer = None
        self.video_frames = 0
        self.debug_frames = 0
        self.first_stamp_ns: int | None = None
        self.snapshots: list[tuple[float, np.ndarray]] = []
        self.camera_infos = 0
        self.fixations = 0
        self.marker_arrays = 0
        self.sources: Counter[str] = Counter()
        self.latency_ms: list[float] = []
        self.last_stats = None
        node.create_subscription(Image, "debug_image", self._on_debug, qos.sensor("reliable", 30))
        node.create_subscription(CameraInfo, "camera_info", self._on_info, qos.sensor("reliable", 30))
        node.create_subscription(Fixation, "fixation", self._on_fixation, qos.outputs(30))
        node.create_subscription(MarkerArray, "markers", self._on_markers, qos.outputs(30))
        node.create_subscription(PipelineStats, "stats", self._on_stats, qos.outputs(30))
        from std_msgs.msg import String

        from fovea_vla_msgs.msg import PolicyStats

        self.episodes: list[dict] = []
        self.policy_stats = None
        self.chunk_latency_ms: list[float] = []
        node.create_subscription(String, "sim/episode", lambda m: self.episodes.append(json.loads(m.data)), 30)
        node.create_subscription(PolicyStats, "policy_stats", self._on_policy_stats, qos.outputs(30))

    def _on_info(self, _msg) -> None:
        self.camera_infos += 1

    def _on_markers(self, _msg) -> None:
        self.marker_arrays += 1

    def _on_fixation(self, msg) -> None:
        from fovea_vla.nodes.messages import stamp_to_ns

        self.fixations += 1
        self.sources[FixationSource(msg.source).name.lower()] += 1
        self.latency_ms.append((self.node.get_clock().now().nanoseconds - stamp_to_ns(msg.header.stamp)) * 1e-6)

    def _on_stats(self, msg) -> None:
        self.last_stats = msg

    def _on_policy_stats(self, msg) -> None:
        self.policy_stats = msg
        if math.isfinite(msg.chunk_latency_ms):
            self.chunk_latency_ms.append(float(msg.chunk_latency_ms))

    def _on_debug(self, msg) -> None:
        from fovea_vla.core.frames import image_to_rgb
        from fovea_vla.nodes.messages import stamp_to_ns

        rgb = image_to_rgb(msg.data, msg.width, msg.height, msg.encoding, msg.step, bool(msg.is_bigendian))
        stamp = stamp_to_ns(msg.header.stamp)
        if self.first_stamp_ns is None:
            self.first_stamp_ns = stamp
            fourcc = cv2.VideoWriter_fourcc(*"mp4v")
            self.writer = cv2.VideoWriter(str(self.video_path), fourcc, self.fps, (msg.width, msg.height))
            if not self.writer.isOpened():
                raise RuntimeError(f"cannot open a video writer for {self.video_path}")
        self.debug_frames += 1
        t = (stamp - self.first_stamp_ns) * 1e-9
        # Repeat frames to keep real time when the node processed fewer frames than the camera sent.
        target = round(t * self.fps) + 1
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        while self.video_frames < target:
            self.writer.write(bgr)
            self.video_frames += 1
        self.snapshots.append((t, rgb))
        if len(self.snapshots) > 400:
            # Keep memory bounded: thin out evenly (401 entries: the first and the newest stay).
            self.snapshots = self.snapshots[::2]

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()


def _contact_sheet(snapshots: list[tuple[float, np.ndarray]], path: Path, count: int = 6) -> None:
    picks = [snapshots[int(i)] for i in np.linspace(0, len(snapshots) - 1, min(count, len(snapshots)))]
    tiles = []
    for t, rgb in picks:
        tile = cv2.resize(rgb, (480, round(480 * rgb.shape[0] / rgb.shape[1])), interpolation=cv2.INTER_AREA)
        cv2.putText(tile, f"t = {t:5.1f} s", (8, tile.shape[0] - 10), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 3)
        cv2.putText(tile, f"t = {t:5.1f} s", (8, tile.shape[0] - 10), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 1)
        tiles.append(tile)
    while len(tiles) % 3:
        tiles.append(np.zeros_like(tiles[0]))
    rows = [np.concatenate(tiles[i : i + 3], axis=1) for i in range(0, len(tiles), 3)]
    sheet = np.concatenate(rows, axis=0)
    cv2.imwrite(str(path), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    p50, p90, p99 = np.percentile(np.asarray(values), [50, 90, 99])
    return {"p50": round(float(p50), 2), "p90": round(float(p90), 2), "p99": round(float(p99), 2), "count": len(values)}


def run_demo(
    duration_s: float = 20.0,
    out_dir: Path = Path("out/demo"),
    *,
    config: str | None = None,
    domain_id: int | None = None,
    discovery_timeout_s: float = 90.0,
    scene: str = "sim",
) -> dict:
    """Run the demo graph for ``duration_s`` seconds and write its outputs; returns the summary.

    Args:
        duration_s: recording time once the first debug image arrived [s].
        out_dir: output folder.
        config: parameter file; None: ``sim.yaml`` for the ``sim`` scene, else ``fovea_vla.yaml``.
        domain_id: ROS_DOMAIN_ID (default: the environment's, else random).
        discovery_timeout_s: longest wait for the first debug image [s].
        scene: "sim" (closed loop with the bundled policy) or "camera" (synthetic camera only).
    """
    if scene not in ("sim", "camera"):
        raise ValueError(f"scene={scene!r}: must be sim or camera")
    config = config or ("sim.yaml" if scene == "sim" else "fovea_vla.yaml")
    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = ros_environment(domain_id)
    os.environ.update({k: v for k, v in env.items() if k.startswith("ROS_")})
    if scene == "sim":
        fps = 10.0  # sim_bridge's control rate
        graph = node_graph(config=config, use_replay=False, policy=True, sim=True)
        overrides = {"sim_bridge": {"seed": 30_000}, "fovea_node": {"debug_image.max_rate_hz": 0.0}}
    else:
        fps = 30.0
        graph = node_graph(config=config, use_replay=True, replay_source="synthetic")
        overrides = {
            "camera_replay": {"rate_hz": fps, "synthetic.camera_motion": True, "synthetic.scene_cut_every_s": 8.0},
            "fovea_node": {"debug_image.max_rate_hz": 0.0},
        }
    print(
        f"[demo] ROS_DOMAIN_ID={env['ROS_DOMAIN_ID']}: starting {', '.join(s.name for s in graph)} "
        f"(logs in {out_dir / 'logs'})",
        flush=True,
    )

    rclpy.init()
    node = rclpy.create_node("fovea_demo_recorder")
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    recorder = _Recorder(node, out_dir, fps)
    processes = GraphProcesses(graph, parameters=overrides, env=env, log_dir=out_dir / "logs").start()
    exit_codes: dict[str, int | None] = {}
    try:
        deadline = time.monotonic() + discovery_timeout_s
        while recorder.debug_frames == 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no debug image within {discovery_timeout_s:.0f} s; see {out_dir / 'logs'}")
            failed = {n: c for n, c in processes.poll().items() if c is not None}
            if failed:
                raise RuntimeError(f"node(s) exited early {failed}; see {out_dir / 'logs'}")
            executor.spin_once(timeout_sec=0.1)
        start = time.monotonic()
        infos_at_start = recorder.camera_infos
        stats_at_start = recorder.last_stats
        print(f"[demo] graph running; recording {duration_s:.0f} s", flush=True)
        while time.monotonic() - start < duration_s:
            executor.spin_once(timeout_sec=0.1)
            failed = {n: c for n, c in processes.poll().items() if c is not None}
            if failed:
                raise RuntimeError(f"node(s) exited during the recording {failed}; see {out_dir / 'logs'}")
        wall_s = time.monotonic() - start
        # The window's counts end here, before stopping the graph adds frames nobody processes.
        infos_at_end, stats_at_end = recorder.camera_infos, recorder.last_stats
    finally:
        exit_codes = processes.stop()
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            executor.spin_once(timeout_sec=0.05)
        recorder.close()
        node.destroy_node()
        rclpy.try_shutdown()

    stats = stats_at_end
    if stats is None:
        raise RuntimeError("fovea_node published no stats")
    # Count over the recording window only: the recorder joined after camera_replay started.
    before = stats_at_start
    drops = {d.reason: int(d.count) for d in stats.drops}
    if before is not None:
        for d in before.drops:
            drops[d.reason] = drops.get(d.reason, 0) - int(d.count)
    drops = {reason: count for reason, count in drops.items() if count > 0}
    published = infos_at_end - infos_at_start
    received = int(stats.frames_received) - (int(before.frames_received) if before else 0)
    processed = int(stats.frames_processed) - (int(before.frames_processed) if before else 0)
    if published > received:
        drops["transport_superseded"] = published - received
    summary = {
        "duration_s": round(wall_s, 2),
        "domain_id": int(env["ROS_DOMAIN_ID"]),
        "config": config,
        "frames": {
            "published": published,
            "received": received,
            "processed": processed,
            "dropped": drops,
            "drop_explanations": {reason: DROP_EXPLANATIONS.get(reason, "see fovea_node log") for reason in drops},
            "processed_since_start": int(stats.frames_processed),
        },
        "stage_latency_ms": {
            s.stage: {"last": round(s.last_ms, 3), "p50": round(s.p50_ms, 3), "p99": round(s.p99_ms, 3)}
            for s in stats.stages
        },
        "capture_to_fixation_ms": _percentiles(recorder.latency_ms),
        "fixation_sources": dict(recorder.sources),
        "backends": {b.stage: {"backend": b.backend, "reason": b.reason} for b in stats.backends},
        "num_tokens": int(stats.num_tokens),
        "outputs_received": {
            "fixation": recorder.fixations,
            "markers": recorder.marker_arrays,
            "debug_image": recorder.debug_frames,
        },
        "node_exit_codes": exit_codes,
        "files": {},
    }
    if scene == "sim":
        policy = recorder.policy_stats
        summary["scene"] = "sim"
        summary["episodes"] = recorder.episodes
        summary["successes"] = sum(e["success"] for e in recorder.episodes)
        summary["policy"] = {
            "chunks_predicted": int(policy.chunks_predicted) if policy else 0,
            "status": policy.status if policy else "no stats",
            "capture_to_chunk_ms": _percentiles(recorder.chunk_latency_ms),
            "interventions": {d.reason: int(d.count) for d in policy.interventions} if policy else {},
            "device": policy.device if policy else "",
        }
    if recorder.snapshots:
        _contact_sheet(recorder.snapshots, out_dir / "contact_sheet.png")
        summary["files"]["contact_sheet"] = str(out_dir / "contact_sheet.png")
    if recorder.video_frames:
        summary["files"]["video"] = str(recorder.video_path)
    summary["files"]["summary"] = str(out_dir / "summary.json")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
