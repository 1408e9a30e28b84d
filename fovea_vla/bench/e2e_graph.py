"""End-to-end latency over ROS: camera_replay -> vla_stack (fovea_node + policy_node), separate processes.

Graph under test: ``camera_replay`` (synthetic scene with camera motion, published raw rgb8 or
JPEG at a fixed rate, stamped at publication: the capture stamp) and ``vla_stack`` (decode, flow,
motion, fixation, texture, sampling, ViT-Tiny encoder, action head of the bundled tabletop_push
policy), each its own process started by the dev launcher, plus this process, which publishes the
robot state (``ee_pose``, ``joint_states`` at 100 Hz) and measures. Per configuration
(resolution x transport x rate):

* capture stamp -> arrival here of ``fixation`` and of ``action_chunk`` (both carry the capture
  stamp of their frame): p50 / p90 / p99 [ms];
* throughput: frames published, received and processed by fovea_node per second, chunks per second;
* drops: frames published but never received (``transport_superseded``: replaced in the
  depth-1 best-effort camera queue, or lost) and fovea_node's own drop counters;
* per-stage breakdown, per frame from fovea_node's ``stats`` (``frame_age`` = capture stamp to
  arrival at fovea_node, the transport), and the action head from ``policy_stats``;
* CPU use of each process (user + system time over the window, in % of one core).

The action head runs on a timer (``--policy-rate``, default 200 Hz) and only on new tokens, so
capture -> action_chunk includes up to one timer period of waiting. Requirements: ROS 2 (rclpy)
and the built fovea_vla_msgs; the GPU backends where a GPU is present (``--config auto``).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

from fovea_vla.bench.common import summarize
from fovea_vla.bench.ros_graph import STATE_RATE_HZ, cpu_seconds, graph_parameters, resolve_config, state_publisher

__all__ = ["format_table", "run"]


class _Meter:
    """This process's subscriptions: latencies per output, stats per frame, counts."""

    def __init__(self, node):
        from sensor_msgs.msg import CameraInfo

        from fovea_vla.nodes import qos
        from fovea_vla_msgs.msg import ActionChunk, Caption, Fixation, PipelineStats, PolicyStats

        self.node = node
        self.recording = False
        self.fixation_ms: list[float] = []
        self.chunk_ms: list[float] = []
        self.stage_ms: dict[str, list[float]] = {}
        self.infos = 0
        self.stats = None
        self.policy_stats = None
        self.captions: list[tuple[float, float]] = []  # (compute-inclusive latency [ms], arrival [s])
        node.create_subscription(Fixation, "fixation", self._on_fixation, qos.outputs(100))
        node.create_subscription(ActionChunk, "action_chunk", self._on_chunk, qos.outputs(100))
        node.create_subscription(PipelineStats, "stats", self._on_stats, qos.outputs(100))
        node.create_subscription(PolicyStats, "policy_stats", self._on_policy_stats, qos.outputs(100))
        node.create_subscription(CameraInfo, "camera_info", self._on_info, qos.sensor("reliable", 100))
        node.create_subscription(Caption, "caption", self._on_caption, qos.outputs(10))

    def _age_ms(self, stamp) -> float:
        from fovea_vla.nodes.messages import stamp_to_ns

        return (self.node.get_clock().now().nanoseconds - stamp_to_ns(stamp)) * 1e-6

    def _on_fixation(self, msg) -> None:
        if self.recording:
            self.fixation_ms.append(self._age_ms(msg.header.stamp))

    def _on_chunk(self, msg) -> None:
        if self.recording:
            self.chunk_ms.append(self._age_ms(msg.header.stamp))

    def _on_info(self, _msg) -> None:
        self.infos += 1

    def _on_caption(self, msg) -> None:
        self.captions.append((self._age_ms(msg.header.stamp), time.monotonic()))

    def _on_stats(self, msg) -> None:
        self.stats = msg
        if self.recording:
            self.stage_ms.setdefault("frame_age (transport)", []).append(float(msg.frame_age_ms))
            for stage in msg.stages:
                self.stage_ms.setdefault(stage.stage, []).append(float(stage.last_ms))

    def _on_policy_stats(self, msg) -> None:
        self.policy_stats = msg


def _drops(stats, before) -> dict[str, int]:
    counts = {d.reason: int(d.count) for d in stats.drops}
    if before is not None:
        for d in before.drops:
            counts[d.reason] = counts.get(d.reason, 0) - int(d.count)
    return {reason: count for reason, count in counts.items() if count > 0}


def run_one(
    *,
    width: int,
    height: int,
    fps: float,
    transport: str,
    duration_s: float,
    config: str,
    policy_rate_hz: float,
    sensor_reliability: str,
    warmup_s: float,
    log_dir: Path,
    text_encoder: str = "",
    startup_timeout_s: float = 180.0,
    caption_model: str = "",
) -> dict:
    """One graph run; see the module docstring for what is measured.

    With ``caption_model`` (a SmolVLM-class model folder) the measured window is four phases of
    ``duration_s``: captions off, on, off, on (caption_node started and stopped between them, its
    model loaded and its first caption out before an "on" phase counts), and the result gains a
    ``captions`` entry comparing the action path's latency with and without them.
    """
    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    from fovea_vla.bringup import node_graph
    from fovea_vla.launcher import GraphProcesses

    # The camera and the action path; caption_node only in the "on" phases of a caption comparison.
    full_graph = node_graph(config=config, use_replay=True, policy=True, replay_source="synthetic", captions=True)
    graph = [spec for spec in full_graph if spec.name in ("camera_replay", "vla_stack")]
    caption_spec = next(spec for spec in full_graph if spec.name == "caption_node")
    overrides = graph_parameters(
        width=width,
        height=height,
        fps=fps,
        transport=transport,
        policy_rate_hz=policy_rate_hz,
        sensor_reliability=sensor_reliability,
        text_encoder=text_encoder,
        caption_model=caption_model,
    )
    rclpy.init()
    node = rclpy.create_node("fovea_bench_e2e")
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    meter = _Meter(node)
    publish_state = state_publisher(node)
    processes = GraphProcesses(graph, parameters=overrides, log_dir=log_dir).start()
    next_state = time.monotonic()

    def spin_until(deadline: float, condition=lambda: False) -> None:
        nonlocal next_state
        while time.monotonic() < deadline and not condition():
            failed = {n: c for n, c in processes.poll().items() if c is not None}
            if failed:
                raise RuntimeError(f"node(s) exited {failed}; see {log_dir}")
            if time.monotonic() >= next_state:
                publish_state()
                next_state += 1.0 / STATE_RATE_HZ
            executor.spin_once(timeout_sec=0.002)

    try:
        meter.recording = True
        spin_until(time.monotonic() + startup_timeout_s, lambda: len(meter.chunk_ms) > 0)
        if not meter.chunk_ms:
            raise RuntimeError(f"no action_chunk within {startup_timeout_s:.0f} s; see {log_dir}")
        meter.recording = False
        spin_until(time.monotonic() + warmup_s)
        meter.stage_ms.clear()
        pids = {name: proc.pid for name, proc in processes.processes.items()} | {"bench (this process)": os.getpid()}
        cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        infos_before, stats_before, policy_before = meter.infos, meter.stats, meter.policy_stats
        phases: dict[str, dict[str, list[float]]] = {}
        start = time.monotonic()
        for phase in ("off", "on", "off", "on") if caption_model else ("off",):
            captioner = None
            if phase == "on":
                captioner = GraphProcesses([caption_spec], parameters=overrides, log_dir=log_dir).start()
                first = len(meter.captions)
                spin_until(time.monotonic() + startup_timeout_s, lambda: len(meter.captions) > first)  # noqa: B023
                if len(meter.captions) == first:
                    captioner.stop()
                    raise RuntimeError(f"no caption within {startup_timeout_s:.0f} s; see {log_dir}")
            meter.fixation_ms, meter.chunk_ms = [], []
            phase_start = time.monotonic()
            meter.recording = True
            spin_until(phase_start + duration_s)
            meter.recording = False
            recorded = phases.setdefault(phase, {"fixation": [], "chunk": [], "captions": [], "seconds": 0.0})
            recorded["fixation"] += meter.fixation_ms
            recorded["chunk"] += meter.chunk_ms
            recorded["captions"] += [ms for ms, at in meter.captions if at >= phase_start]
            recorded["seconds"] += time.monotonic() - phase_start
            if captioner is not None:
                captioner.stop()
                # This process did not spin while caption_node stopped: let what queued up meanwhile
                # arrive unrecorded, or the next phase would time this process's pause.
                spin_until(time.monotonic() + max(2.0, warmup_s))
        meter.fixation_ms, meter.chunk_ms = phases["off"]["fixation"], phases["off"]["chunk"]
        wall_s = time.monotonic() - start
        cpu = {name: 100.0 * (cpu_seconds(pid) - cpu_before[name]) / wall_s for name, pid in pids.items()}
        infos_after, stats_after, policy_after = meter.infos, meter.stats, meter.policy_stats
    finally:
        exit_codes = processes.stop()
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()

    published = infos_after - infos_before
    received = int(stats_after.frames_received) - int(stats_before.frames_received)
    processed = int(stats_after.frames_processed) - int(stats_before.frames_processed)
    drops = _drops(stats_after, stats_before)
    if published > received:
        drops["transport_superseded"] = published - received
    chunks = int(policy_after.chunks_predicted) - int(policy_before.chunks_predicted)
    head = {s.stage: {"p50_ms": float(s.p50_ms), "p99_ms": float(s.p99_ms)} for s in policy_after.stages}
    return {
        "resolution": f"{width}x{height}",
        "transport": transport,
        "fps": fps,
        "duration_s": round(wall_s, 2),
        "config": config,
        "capture_to_fixation": summarize(meter.fixation_ms) if meter.fixation_ms else {},
        "capture_to_action_chunk": summarize(meter.chunk_ms) if meter.chunk_ms else {},
        "throughput_hz": {
            "published": published / wall_s,
            "received": received / wall_s,
            "processed": processed / wall_s,
            "action_chunks": chunks / wall_s,
        },
        "frames": {"published": published, "received": received, "processed": processed, "dropped": drops},
        "stages": {stage: summarize(values) for stage, values in meter.stage_ms.items()},
        "policy_stages": head,
        "backends": {b.stage: b.backend for b in stats_after.backends},
        "cpu_percent": {name: round(value, 1) for name, value in cpu.items()},
        "cores": os.cpu_count(),
        "exit_codes": exit_codes,
        **({"captions": _caption_comparison(phases, caption_model)} if caption_model else {}),
    }


def _caption_comparison(phases: dict, caption_model: str) -> dict:
    """The action path with captions off vs on (pooled over both phases of each)."""
    off, on = phases["off"], phases["on"]
    result = {"model": Path(caption_model).name}
    for name, recorded in (("off", off), ("on", on)):
        result[name] = {
            "capture_to_fixation": summarize(recorded["fixation"]) if recorded["fixation"] else {},
            "capture_to_action_chunk": summarize(recorded["chunk"]) if recorded["chunk"] else {},
            "seconds": round(recorded["seconds"], 1),
        }
    result["captions_per_s"] = len(on["captions"]) / on["seconds"] if on["seconds"] else 0.0
    result["capture_to_caption"] = summarize(on["captions"]) if on["captions"] else {}
    p99_off = result["off"]["capture_to_action_chunk"].get("p99_ms", math.nan)
    p99_on = result["on"]["capture_to_action_chunk"].get("p99_ms", math.nan)
    result["action_p99_ratio_on_off"] = p99_on / p99_off if p99_off else math.nan
    return result


def run(
    resolution: tuple[int, int] = (640, 480),
    fps_list=(15.0,),
    transports=("raw",),
    duration_s: float = 60.0,
    config: str = "auto",
    policy_rate_hz: float = 200.0,
    sensor_reliability: str = "best_effort",
    warmup_s: float = 5.0,
    log_dir: Path = Path("out/bench_e2e"),
    domain_id: int | None = None,
    text_encoder: str = "",
    caption_model: str = "",
) -> dict:
    """Every (transport, rate) combination, one fresh graph each; ``{"runs": [...]}``."""
    from fovea_vla.demo import ros_environment

    config = resolve_config(config)
    os.environ.update({k: v for k, v in ros_environment(domain_id).items() if k.startswith("ROS_")})
    runs = []
    for transport in transports:
        for fps in fps_list:
            name = f"{resolution[0]}x{resolution[1]}_{transport}_{fps:g}fps"
            print(f"[bench e2e] {name}: {duration_s:.0f} s (logs in {log_dir / name})", flush=True)
            runs.append(
                run_one(
                    width=resolution[0],
                    height=resolution[1],
                    fps=float(fps),
                    transport=transport,
                    duration_s=duration_s,
                    config=config,
                    policy_rate_hz=policy_rate_hz,
                    sensor_reliability=sensor_reliability,
                    warmup_s=warmup_s,
                    log_dir=log_dir / name,
                    text_encoder=text_encoder,
                    caption_model=caption_model,
                )
            )
    return {"runs": runs}


def _ms(summary: dict, key: str) -> str:
    value = summary.get(key)
    return "-" if value is None or not math.isfinite(value) else f"{value:.1f}"


def format_table(results: dict) -> str:
    lines = [
        "| resolution | transport | fps | capture->fixation p50 / p99 ms | capture->action_chunk p50 / p99 ms "
        "| processed / published Hz | chunks Hz | drops | CPU % (per process) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        fix, chunk, rate = r["capture_to_fixation"], r["capture_to_action_chunk"], r["throughput_hz"]
        drops = ", ".join(f"{k} {v}" for k, v in r["frames"]["dropped"].items()) or "none"
        cpu = ", ".join(f"{k} {v:.0f}" for k, v in r["cpu_percent"].items())
        lines.append(
            f"| {r['resolution']} | {r['transport']} | {r['fps']:g} | {_ms(fix, 'p50_ms')} / {_ms(fix, 'p99_ms')} "
            f"| {_ms(chunk, 'p50_ms')} / {_ms(chunk, 'p99_ms')} | {rate['processed']:.1f} / {rate['published']:.1f} "
            f"| {rate['action_chunks']:.1f} | {drops} ({r['frames']['published']} published) | {cpu} |"
        )
    for r in results["runs"]:
        backends = ", ".join(f"{k}={v}" for k, v in r["backends"].items())
        lines += [
            "",
            f"Per stage, {r['resolution']} {r['transport']} {r['fps']:g} fps ({backends}; {r['config']}; "
            f"{r['duration_s']:.0f} s; {r['cores']} cores):",
            "",
            "| stage | p50 ms | p90 ms | p99 ms |",
            "|---|---|---|---|",
        ]
        for stage, s in r["stages"].items():
            lines.append(f"| {stage} | {s['p50_ms']:.2f} | {s['p90_ms']:.2f} | {s['p99_ms']:.2f} |")
        for stage, s in r["policy_stages"].items():
            lines.append(f"| policy {stage} | {s['p50_ms']:.2f} | - | {s['p99_ms']:.2f} |")
    compared = [r for r in results["runs"] if "captions" in r]
    if compared:
        lines += [
            "",
            "Captions off vs on (caption_node with the model below at 1 Hz; phases off, on, off, on; the on "
            "phases start after the model's first caption):",
            "",
            "| run | captions | capture->action_chunk p50 / p99 ms | capture->fixation p50 / p99 ms | captions/s "
            "| capture->caption p50 ms | action p99 on/off |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in compared:
            c = r["captions"]
            for phase in ("off", "on"):
                chunk, fix = c[phase]["capture_to_action_chunk"], c[phase]["capture_to_fixation"]
                rate = f"{c['captions_per_s']:.2f}" if phase == "on" else "-"
                caption_ms = _ms(c["capture_to_caption"], "p50_ms") if phase == "on" else "-"
                ratio = f"{c['action_p99_ratio_on_off']:.3f}" if phase == "on" else "-"
                lines.append(
                    f"| {r['resolution']} {r['transport']} {r['fps']:g} fps | {phase} ({c['model']}) "
                    f"| {_ms(chunk, 'p50_ms')} / {_ms(chunk, 'p99_ms')} | {_ms(fix, 'p50_ms')} / {_ms(fix, 'p99_ms')} "
                    f"| {rate} | {caption_ms} | {ratio} |"
                )
    return "\n".join(lines)
