"""``fovea-vla soak``: the full graph in separate processes for N minutes, memory sampled throughout.

Graph under test: ``camera_replay`` (the synthetic scene with moving objects and camera motion, a
scene cut every 20 s so the cut path runs too), ``vla_stack`` (fovea_node + policy_node with the
bundled tabletop_push policy in dry run, configured as ``bench e2e`` configures it) and
``caption_node`` (event narration), each its own process started by the dev launcher, plus this
process, which publishes the robot state and samples. Every ``--sample-s`` seconds:

* RSS of every process (``VmRSS`` of /proc/<pid>/status) and their sum;
* GPU memory per process from ``nvidia-smi --query-compute-apps`` where nvidia-smi exists;
* fovea_node's frame and drop counters (``stats``), policy_node's chunks and interventions
  (``policy_stats``), captions received, CPU time per process.

The report gives, per process and in total, RSS at the end of the warm-up and at the end, the growth
between them and the least-squares slope after the warm-up [MB/h]; crashes (a process that exits
before the end stops the soak); drops split into explained (``superseded``, ``transport_superseded``
= published - received, ``stale`` under load) and unexplained (anything else); rates after the
warm-up. The warm-up and the N minutes count from the graph's first output (first action chunk, or
first processed frame with ``--no-policy``); the curve starts at launch. MB = 2^20 bytes, as /proc
and nvidia-smi count. Requirements: ROS 2 (rclpy) and the built fovea_vla_msgs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

__all__ = [
    "EXPLAINED_DROPS",
    "add_soak_parser",
    "classify_drops",
    "cmd_soak",
    "draw_soak_plot",
    "format_table",
    "memory_growth",
    "parse_gpu_apps",
    "run",
    "summarize_samples",
]

EXPLAINED_DROPS = ("superseded", "transport_superseded", "stale")
SCENE_CUT_EVERY_S = 20.0
THIS_PROCESS = "soak (this process)"
_KB_PER_MB = 1024.0


def memory_growth(times_s, values_mb, warmup_end_s: float) -> dict[str, float]:
    """Memory at the end of the warm-up and at the end, their difference and the slope after warm-up.

    Args:
        times_s: (S,) sample times [s], increasing.
        values_mb: (S,) memory at those times [MB]; NaN where not measured.
        warmup_end_s: end of the warm-up [s]; its value is the first finite sample at or after it.

    Returns:
        ``warmup_end_mb``, ``end_mb`` (last finite sample), ``growth_mb`` (end - warm-up end) and
        ``slope_mb_per_h`` (least squares over the finite samples from the warm-up end on); NaN
        where there are too few samples (one for the values, two for the slope).

    >>> r = memory_growth([0, 60, 120, 180], [10.0, 50.0, 51.0, 52.0], warmup_end_s=60)
    >>> r["growth_mb"], round(r["slope_mb_per_h"], 1)
    (2.0, 60.0)
    """
    t = np.asarray(times_s, np.float64)
    v = np.asarray(values_mb, np.float64)
    after = (t >= warmup_end_s) & np.isfinite(v)
    if not after.any():
        return {"warmup_end_mb": math.nan, "end_mb": math.nan, "growth_mb": math.nan, "slope_mb_per_h": math.nan}
    first, last = float(v[after][0]), float(v[after][-1])
    slope = math.nan
    if after.sum() >= 2 and np.ptp(t[after]) > 0:
        slope = float(np.polyfit(t[after] / 3600.0, v[after], 1)[0])
    return {"warmup_end_mb": first, "end_mb": last, "growth_mb": last - first, "slope_mb_per_h": slope}


def classify_drops(drops: dict[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    """Split drop counts into explained ones (:data:`EXPLAINED_DROPS`: a newer frame replaced the
    frame, or it was too old under load) and unexplained ones (decode errors, ``pipeline_error``,
    ``node_error``, bad camera_info, ...); zero counts are left out.

    >>> classify_drops({"superseded": 3, "pipeline_error": 1, "stale": 0})
    ({'superseded': 3}, {'pipeline_error': 1})
    """
    explained = {k: v for k, v in drops.items() if k in EXPLAINED_DROPS and v > 0}
    unexplained = {k: v for k, v in drops.items() if k not in EXPLAINED_DROPS and v > 0}
    return explained, unexplained


def parse_gpu_apps(text: str) -> dict[int, float]:
    """``{pid: used memory [MB]}`` from ``nvidia-smi --query-compute-apps=pid,used_memory
    --format=csv,noheader,nounits`` (one ``pid, MiB`` line per process and GPU, summed per pid).

    >>> parse_gpu_apps("1234, 512\\n1234, 100\\n99, [N/A]\\n")
    {1234: 612.0}
    """
    used: dict[int, float] = {}
    for line in text.splitlines():
        pid, _, memory = (part.strip() for part in line.partition(","))
        if pid.isdigit() and re.fullmatch(r"\d+(\.\d+)?", memory):
            used[int(pid)] = used.get(int(pid), 0.0) + float(memory)
    return used


def _rss_kb(pid: int) -> int | None:
    """VmRSS [kB] of a running process, None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _gpu_apps() -> dict[int, float] | None:
    """GPU memory per pid, or None without a working nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_gpu_apps(out)


def _series(samples: list[dict], key: str, name: str) -> list[float]:
    """One process's memory [MB] per sample (``key``: rss_kb or gpu_mb); NaN where missing."""
    values = []
    for s in samples:
        value = s.get(key, {}).get(name)
        values.append(math.nan if value is None else value / _KB_PER_MB if key == "rss_kb" else value)
    return values


def _total(samples: list[dict], names: list[str]) -> list[float]:
    """Summed RSS [MB] per sample; NaN where a process is missing (exited), so totals stay comparable."""
    return [
        sum(s["rss_kb"][n] for n in names) / _KB_PER_MB if set(names) <= set(s["rss_kb"]) else math.nan for s in samples
    ]


def summarize_samples(samples: list[dict], warmup_end_s: float) -> dict:
    """Memory, drops, rates and CPU from the samples of one soak (see :func:`run` for their layout).

    Returns:
        ``memory`` (per process and ``total``: :func:`memory_growth` of RSS, plus ``gpu_*`` of GPU
        memory where sampled; the total's GPU memory includes processes outside the graph),
        ``drops`` (``explained`` / ``unexplained``, whole run), ``rates`` (per second between the
        warm-up sample and the last), ``cpu_percent`` (same window, % of one core), ``captions``,
        ``interventions``.
    """
    times = [s["t_s"] for s in samples]
    names = list(dict.fromkeys(name for s in samples for name in s["rss_kb"]))
    memory = {}
    for name in names:
        memory[name] = memory_growth(times, _series(samples, "rss_kb", name), warmup_end_s)
        if any("gpu_mb" in s for s in samples):
            gpu = memory_growth(times, _series(samples, "gpu_mb", name), warmup_end_s)
            memory[name].update({f"gpu_{k}": v for k, v in gpu.items()})
    memory["total"] = memory_growth(times, _total(samples, names), warmup_end_s)
    if any("gpu_mb" in s for s in samples):  # all compute processes on the GPUs, ours or not
        gpu_total = [sum(s["gpu_mb"].values()) if "gpu_mb" in s else math.nan for s in samples]
        memory["total"].update({f"gpu_{k}": v for k, v in memory_growth(times, gpu_total, warmup_end_s).items()})
    last = samples[-1]
    warm = next((s for s in samples if s["t_s"] >= warmup_end_s), last)
    span = last["t_s"] - warm["t_s"]

    def rate(get) -> float:
        return (get(last) - get(warm)) / span if span > 0 else math.nan

    explained, unexplained = classify_drops(last["drops"])
    return {
        "memory": memory,
        "drops": {"explained": explained, "unexplained": unexplained},
        "rates": {
            "frames_published_per_s": rate(lambda s: s["frames"]["published"]),
            "frames_processed_per_s": rate(lambda s: s["frames"]["processed"]),
            "chunks_per_s": rate(lambda s: s["chunks"]),
            "captions_per_s": rate(lambda s: s["captions"]),
        },
        "cpu_percent": {name: 100.0 * rate(lambda s, n=name: s["cpu_s"].get(n, math.nan)) for name in last["cpu_s"]},
        "frames": last["frames"],
        "chunks": last["chunks"],
        "captions": last["captions"],
        "interventions": last["interventions"],
    }


_COLOURS = ((200, 90, 30), (30, 120, 230), (40, 150, 40), (150, 60, 170), (20, 170, 210), (90, 90, 90))


def _nice_step(span: float, ticks: int = 5) -> float:
    raw = max(span, 1e-9) / ticks
    magnitude = 10.0 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)


def _panel(image, box, xs, series: dict[str, list[float]], title: str, warmup_x: float, include_zero: bool) -> None:
    """One line chart in ``box`` (x0, y0, x1, y1) of ``image``: y grid and labels, x in minutes,
    a vertical line at the warm-up end, a legend with each series' last value on the right."""
    import cv2

    x0, y0, x1, y1 = box
    left, right, top, bottom = x0 + 75, x1 - 230, y0 + 35, y1 - 45
    font, black, grey, red = cv2.FONT_HERSHEY_SIMPLEX, (0, 0, 0), (215, 215, 215), (40, 40, 200)
    values = [v for ys in series.values() for v in ys if math.isfinite(v)] or [0.0, 1.0]
    lo, hi = min(values), max(values)
    if include_zero:
        lo = min(lo, 0.0)
    pad = 0.05 * (hi - lo) if hi > lo else 1.0
    lo, hi = (lo if include_zero else lo - pad), hi + pad
    x_hi = max([*xs, warmup_x, 1e-3])

    def point(x: float, y: float) -> tuple[int, int]:
        return round(left + x / x_hi * (right - left)), round(bottom - (y - lo) / (hi - lo) * (bottom - top))

    step = _nice_step(hi - lo)
    for k in range(math.ceil(lo / step), math.floor(hi / step) + 1):
        _, py = point(0.0, k * step)
        cv2.line(image, (left, py), (right, py), grey, 1)
        cv2.putText(image, f"{k * step:.6g}", (x0 + 5, py + 4), font, 0.4, black, 1, cv2.LINE_AA)
    step = _nice_step(x_hi)
    for k in range(math.floor(x_hi / step) + 1):
        px, _ = point(k * step, lo)
        cv2.putText(image, f"{k * step:g}", (px - 8, bottom + 18), font, 0.4, black, 1, cv2.LINE_AA)
    cv2.rectangle(image, (left, top), (right, bottom), black, 1)
    wx, _ = point(warmup_x, lo)
    cv2.line(image, (wx, top), (wx, bottom), red, 1)
    cv2.putText(image, "end of warm-up", (wx + 4, bottom - 6), font, 0.4, red, 1, cv2.LINE_AA)
    cv2.putText(image, title, (left, top - 10), font, 0.5, black, 1, cv2.LINE_AA)
    cv2.putText(image, "time since launch [min]", ((left + right) // 2 - 80, bottom + 36), font, 0.45, black, 1)
    for row, (name, ys) in enumerate(series.items()):
        colour = (0, 0, 0) if name == "total" else _COLOURS[row % len(_COLOURS)]
        run: list[tuple[int, int]] = []
        for x, y in [*zip(xs, ys, strict=True), (math.nan, math.nan)]:  # NaN ends a segment
            if math.isfinite(y):
                run.append(point(x, y))
                continue
            if len(run) > 1:
                cv2.polylines(image, [np.array(run, np.int32)], False, colour, 2, cv2.LINE_AA)
            run = []
        legend_y = top + 12 + 20 * row
        cv2.line(image, (right + 10, legend_y), (right + 35, legend_y), colour, 2)
        last = next((f" {y:.1f}" for y in reversed(ys) if math.isfinite(y)), "")
        cv2.putText(image, f"{name}{last}", (right + 40, legend_y + 4), font, 0.42, black, 1, cv2.LINE_AA)


def draw_soak_plot(
    times_min,
    rss_mb: dict[str, list[float]],
    warmup_end_min: float,
    path: str | os.PathLike,
    title: str = "memory soak",
    size: tuple[int, int] = (960, 720),
) -> Path:
    """Draw RSS per process against time into a PNG with OpenCV (no matplotlib).

    The top panel shows RSS [MB] from launch; the bottom one, from the warm-up end on, the change
    since the first sample at or after it [MB], where growth is visible at any scale.

    Args:
        times_min: (S,) sample times since launch [min].
        rss_mb: per series name (processes, total) its (S,) values [MB]; NaN where not measured.
        warmup_end_min: end of the warm-up [min].
        path: the PNG to write.
        title: line above the panels.
        size: (W, H) of the image [px].

    Returns:
        ``path``.
    """
    import cv2

    width, height = size
    image = np.full((height, width, 3), 255, np.uint8)
    cv2.putText(image, title, (10, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    xs = [float(x) for x in times_min]
    change = {}
    for name, ys in rss_mb.items():
        base = next((y for x, y in zip(xs, ys, strict=True) if x >= warmup_end_min and math.isfinite(y)), math.nan)
        change[name] = [y - base if x >= warmup_end_min else math.nan for x, y in zip(xs, ys, strict=True)]
    half = 30 + (height - 30) // 2
    _panel(image, (0, 30, width, half), xs, rss_mb, "RSS [MB]", warmup_end_min, include_zero=True)
    _panel(image, (0, half, width, height), xs, change, "RSS minus RSS at end of warm-up [MB]", warmup_end_min, False)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out), image):
        raise OSError(f"{out}: cv2.imwrite failed")
    return out


class _Counters:
    """This process's subscriptions: the newest stats / policy_stats, frames published, captions."""

    def __init__(self, node):
        from sensor_msgs.msg import CameraInfo

        from fovea_vla.nodes import qos
        from fovea_vla_msgs.msg import Caption, PipelineStats, PolicyStats

        self.stats = self.first_stats = self.policy_stats = None
        self.published = 0  # camera_info messages (one per frame) since fovea_node's first stats
        self.captions = 0
        node.create_subscription(PipelineStats, "stats", self._on_stats, qos.outputs(100))
        node.create_subscription(PolicyStats, "policy_stats", self._on_policy_stats, qos.outputs(100))
        node.create_subscription(CameraInfo, "camera_info", self._on_info, qos.sensor("reliable", 100))
        node.create_subscription(Caption, "caption", self._on_caption, qos.outputs(10))

    def _on_stats(self, msg) -> None:
        self.first_stats = self.first_stats or msg
        self.stats = msg

    def _on_policy_stats(self, msg) -> None:
        self.policy_stats = msg

    def _on_info(self, _msg) -> None:
        # Counting from fovea_node's first stats leaves out the frames published while it loaded.
        self.published += self.first_stats is not None

    def _on_caption(self, _msg) -> None:
        self.captions += 1

    def ready(self, policy: bool) -> bool:
        if policy:
            return self.policy_stats is not None and self.policy_stats.chunks_predicted > 0
        return self.stats is not None and self.stats.frames_processed > 0

    def snapshot(self) -> dict:
        """Counters: frames (``published`` since fovea_node's first stats, ``received`` / ``processed``
        its totals), fovea_node's drops plus ``transport_superseded``, chunks, interventions, captions."""
        frames, drops = {"published": 0, "received": 0, "processed": 0}, {}
        if self.stats is not None:
            received = int(self.stats.frames_received) - int(self.first_stats.frames_received)
            frames = {
                "published": self.published,
                "received": int(self.stats.frames_received),
                "processed": int(self.stats.frames_processed),
            }
            drops = {d.reason: int(d.count) for d in self.stats.drops}
            drops["transport_superseded"] = max(0, self.published - received)
        policy = self.policy_stats
        return {
            "frames": frames,
            "drops": drops,
            "chunks": int(policy.chunks_predicted) if policy else 0,
            "interventions": {d.reason: int(d.count) for d in policy.interventions} if policy else {},
            "captions": self.captions,
        }


def run(
    *,
    minutes: float = 30.0,
    sample_s: float = 10.0,
    warmup_min: float = 3.0,
    resolution: tuple[int, int] = (640, 480),
    fps: float = 15.0,
    transport: str = "raw",
    config: str = "auto",
    policy: bool = True,
    captions: bool = True,
    out_dir: Path = Path("out/soak"),
    text_encoder: str = "",
    startup_timeout_s: float = 300.0,
    progress=print,
) -> dict:
    """One soak; returns the settings, ``samples``, :func:`summarize_samples`'s report, ``crashes``,
    ``failure`` (why it stopped early, else empty) and the processes' ``logs`` and ``exit_codes``.

    A sample is ``{"t_s": since launch, "rss_kb": {process: kB}, "gpu_mb": {process: MB} (with
    nvidia-smi; ``other`` = pids not in the graph), "cpu_s": {process: s}, "frames", "drops",
    "chunks", "interventions", "captions"}`` (counters since start).
    """
    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    from fovea_vla.bench.ros_graph import STATE_RATE_HZ, cpu_seconds, graph_parameters, resolve_config, state_publisher
    from fovea_vla.bringup import node_graph
    from fovea_vla.demo import ros_environment
    from fovea_vla.launcher import GraphProcesses

    if not 0.0 <= warmup_min < minutes:
        raise ValueError(f"warmup_min must be in [0, minutes={minutes}), got {warmup_min}")
    config = resolve_config(config)
    os.environ.update({k: v for k, v in ros_environment(None).items() if k.startswith("ROS_")})
    width, height = resolution
    graph = node_graph(config=config, use_replay=True, policy=policy, replay_source="synthetic", captions=captions)
    overrides = graph_parameters(
        width=width,
        height=height,
        fps=fps,
        transport=transport,
        text_encoder=text_encoder,
        scene_cut_every_s=SCENE_CUT_EVERY_S,
    )
    log_dir = Path(out_dir) / "logs"
    rclpy.init()
    node = rclpy.create_node("fovea_soak")
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    counters = _Counters(node)
    publish_state = state_publisher(node)
    processes = GraphProcesses(graph, parameters=overrides, log_dir=log_dir).start()
    pids = {name: proc.pid for name, proc in processes.processes.items()} | {THIS_PROCESS: os.getpid()}
    logs = {name: str(log_dir / f"{name}.log") for name in processes.processes}
    start = time.monotonic()
    samples: list[dict] = []
    crashes: list[dict] = []
    failure = ""
    ready_s = warmup_end_s = end_s = None

    def sample(t_s: float) -> None:
        rss = {name: _rss_kb(pid) for name, pid in pids.items()}
        cpu = {}
        for name, pid in pids.items():
            with contextlib.suppress(OSError):  # exited since
                cpu[name] = cpu_seconds(pid)
        record = {"t_s": round(t_s, 2), "rss_kb": {k: v for k, v in rss.items() if v is not None}, "cpu_s": cpu}
        gpu = _gpu_apps()
        if gpu is not None:
            by_pid = {pid: name for name, pid in pids.items()}
            record["gpu_mb"] = {name: gpu.get(pid, 0.0) for name, pid in pids.items()}
            record["gpu_mb"]["other"] = sum(mb for pid, mb in gpu.items() if pid not in by_pid)
        samples.append(record | counters.snapshot())

    next_sample = next_state = start
    try:
        while True:
            now = time.monotonic()
            t_s = now - start
            exited = {n: c for n, c in processes.poll().items() if c is not None}
            if exited:
                crashes = [
                    {"process": n, "exit_code": c, "t_s": round(t_s, 1), "log": logs[n]} for n, c in exited.items()
                ]
                failure = f"{', '.join(exited)} exited before the end"
                sample(t_s)
                break
            if ready_s is None and counters.ready(policy):
                ready_s = t_s
                warmup_end_s, end_s = ready_s + 60.0 * warmup_min, ready_s + 60.0 * minutes
                progress(f"[soak] first output after {ready_s:.0f} s; soaking {minutes:g} min (logs in {log_dir})")
            if ready_s is None and t_s > startup_timeout_s:
                failure = f"no first output within {startup_timeout_s:.0f} s; see {log_dir}"
                sample(t_s)
                break
            if now >= next_state:
                publish_state()
                next_state = max(next_state + 1.0 / STATE_RATE_HZ, now)  # no catch-up burst after a stall
            warm_due = (
                warmup_end_s is not None and t_s >= warmup_end_s and samples and samples[-1]["t_s"] < warmup_end_s
            )
            finished = end_s is not None and t_s >= end_s
            if now >= next_sample or warm_due or finished:
                sample(t_s)
                next_sample = now + sample_s
                if finished:
                    break
            executor.spin_once(timeout_sec=0.005)
    finally:
        exit_codes = processes.stop()
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    return {
        "settings": {
            "minutes": minutes,
            "sample_s": sample_s,
            "warmup_min": warmup_min,
            "resolution": f"{width}x{height}",
            "fps": fps,
            "transport": transport,
            "config": config,
            "policy": policy,
            "captions": captions,
            "scene_cut_every_s": SCENE_CUT_EVERY_S,
            "cores": os.cpu_count(),
        },
        "ready_s": ready_s,
        "warmup_end_s": warmup_end_s,
        "duration_s": samples[-1]["t_s"] - (ready_s or 0.0),
        "crashes": crashes,
        "failure": failure,
        "logs": logs,
        "exit_codes": exit_codes,
        "report": summarize_samples(samples, math.inf if warmup_end_s is None else warmup_end_s),
        "samples": samples,
    }


def _mb(value: float, sign: bool = False) -> str:
    if not math.isfinite(value):
        return "-"
    return f"{value:+.1f}" if sign else f"{value:.1f}"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"


def format_table(results: dict, png_name: str = "") -> str:
    """Markdown: per-process memory table, then one paragraph of crashes, drops and rates."""
    settings, report = results["settings"], results["report"]
    memory = report["memory"]
    gpu = any("gpu_end_mb" in m for m in memory.values())
    head = "| process | RSS at warm-up end MB | RSS at end MB | growth MB | slope after warm-up MB/h "
    head += "| GPU at warm-up end / end MB " if gpu else ""
    lines = [head + "| CPU % |", "|---" * (6 + gpu) + "|"]
    for name, m in memory.items():
        row = f"| {name} | {_mb(m['warmup_end_mb'])} | {_mb(m['end_mb'])} | {_mb(m['growth_mb'], True)} "
        row += f"| {_mb(m['slope_mb_per_h'], True)} "
        if gpu:
            row += f"| {_mb(m.get('gpu_warmup_end_mb', math.nan))} / {_mb(m.get('gpu_end_mb', math.nan))} "
        cpu = report["cpu_percent"].get(name, math.nan)
        row += f"| {cpu:.0f} |" if math.isfinite(cpu) else "| - |"
        lines.append(row)
    rates, drops = report["rates"], report["drops"]
    crashes = "; ".join(
        f"{c['process']} exit {c['exit_code']} at {c['t_s']:.0f} s ({c['log']})" for c in results["crashes"]
    )
    graph = "camera_replay, " + ("vla_stack (fovea_node + policy_node)" if settings["policy"] else "fovea_node")
    graph += ", caption_node (events)" if settings["captions"] else ""
    lines += [
        "",
        f"{settings['minutes']:g} min from the first output ({settings['warmup_min']:g} min warm-up; first output "
        f"{results['ready_s'] or math.nan:.0f} s after launch), {len(results['samples'])} samples every "
        f"{settings['sample_s']:g} s; {graph}; {settings['resolution']} {settings['transport']} at "
        f"{settings['fps']:g} fps, scene cut every {settings['scene_cut_every_s']:g} s; {settings['config']}; "
        f"{settings['cores']} cores. Growth = end - warm-up end; slope = least squares after the warm-up.",
        "",
        f"Crashes: {crashes or 'none'}{'; ' + results['failure'] if results['failure'] and not crashes else ''}. "
        f"Drops over the whole run: explained {_counts(drops['explained'])}; unexplained "
        f"{_counts(drops['unexplained'])} ({report['frames']['published']} frames published after fovea_node's "
        f"first stats). After the warm-up: {rates['frames_processed_per_s']:.1f} frames processed/s of "
        f"{rates['frames_published_per_s']:.1f} published, {rates['chunks_per_s']:.1f} chunks/s, "
        f"{report['captions']} captions in all ({rates['captions_per_s']:.2f}/s); policy interventions: "
        f"{_counts(report['interventions'])}.",
    ]
    if png_name:
        lines += ["", f"![RSS per process during the soak]({png_name})"]
    return "\n".join(lines)


def _machine_tag() -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", socket.gethostname()).strip("-") or "machine"


def cmd_soak(args) -> int:
    from fovea_vla.bench import common

    out = Path(args.out)
    try:
        results = run(
            minutes=args.minutes,
            sample_s=args.sample_s,
            warmup_min=args.warmup_min,
            resolution=args.resolution,
            fps=args.fps,
            transport=args.transport,
            config=args.config,
            policy=not args.no_policy,
            captions=args.captions,
            out_dir=out,
            text_encoder=args.text_encoder,
        )
    except ValueError as exc:
        print(f"[soak] error: {exc}", file=sys.stderr)
        return 2
    samples = results["samples"]
    names = [name for name in results["report"]["memory"] if name != "total"]
    rss = {name: _series(samples, "rss_kb", name) for name in names}
    rss["total"] = _total(samples, names)
    settings = results["settings"]
    title = (
        f"memory soak {settings['resolution']} {settings['transport']} {settings['fps']:g} fps, "
        f"{settings['config']}, {_machine_tag()}"
    )
    png = draw_soak_plot(
        [s["t_s"] / 60.0 for s in samples],
        rss,
        min(results["warmup_end_s"] or math.inf, samples[-1]["t_s"]) / 60.0,
        out / "soak.png",
        title,
    )
    results["png"] = str(png)
    docs_png = "" if args.no_append else f"soak_{_machine_tag()}.png"
    table = format_table(results, docs_png)
    print(table)
    for path in {out / "soak.json", *([Path(args.json)] if args.json else [])}:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"machine": common.machine(), **results}, indent=1))
        print(f"[soak] wrote {path}")
    print(f"[soak] wrote {png}")
    if not args.no_append:
        summary = {k: v for k, v in results.items() if k != "samples"} | {"samples": len(samples)}
        command = ("fovea-vla soak " + " ".join(sys.argv[2:])).strip()
        path = common.append_results("Memory soak: full graph in separate processes", command, table, summary)
        shutil.copyfile(png, path.parent / docs_png)
        print(f"[soak] appended to {path}; curve in {path.parent / docs_png}")
    if results["failure"]:
        print(f"[soak] FAILED: {results['failure']}", file=sys.stderr)
    return 1 if results["failure"] else 0


def add_soak_parser(sub) -> None:
    """``soak``: registered by :mod:`fovea_vla.cli`."""
    from fovea_vla.sim_cli import parse_image_size

    soak = sub.add_parser(
        "soak",
        help="run the full graph for N minutes as processes, sample RSS / GPU memory, report growth after warm-up",
        description="camera_replay (synthetic scene, camera motion, scene cuts), vla_stack with the bundled "
        "tabletop_push policy and caption_node, each its own process; this process publishes the robot state and "
        "samples RSS (and GPU memory with nvidia-smi) of every process. Exit code 1 when a process crashed.",
    )
    soak.add_argument("--minutes", type=float, default=30.0, help="soak length from the graph's first output [min]")
    soak.add_argument("--sample-s", type=float, default=10.0, help="seconds between samples")
    soak.add_argument("--warmup-min", type=float, default=3.0, help="minutes after the first output not judged")
    soak.add_argument("--resolution", type=parse_image_size, default=(640, 480), help="WxH of the camera")
    soak.add_argument("--fps", type=float, default=15.0, help="camera rate [Hz]")
    soak.add_argument("--transport", default="raw", choices=["raw", "jpeg"], help="camera transport")
    soak.add_argument(
        "--config", default="auto", help="parameter file; auto: desktop_gpu.yaml with a CUDA device, else cpu.yaml"
    )
    soak.add_argument("--no-policy", action="store_true", help="camera_replay + fovea_node only (no vla_stack)")
    soak.add_argument(
        "--captions", action=argparse.BooleanOptionalAction, default=True, help="caption_node with event narration"
    )
    soak.add_argument("--out", default="out/soak", help="folder for soak.png, soak.json and the node logs")
    soak.add_argument("--json", default=None, help="also write the results (with every sample) as JSON here")
    soak.add_argument("--no-append", action="store_true", help="do not append to docs/BENCHMARKS.md")
    soak.add_argument(
        "--text-encoder",
        default="",
        help="policy_node text_encoder.path (a model folder, or a .json table from `fovea-vla policy embed`)",
    )
    soak.set_defaults(func=cmd_soak)
