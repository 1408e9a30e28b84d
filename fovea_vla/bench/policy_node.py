"""Benchmark of the action path: the action head alone, and camera frame to first command in process.

Stages under test:

- the action head at batch 1 on the foveated token count (273 tokens of the chosen encoder's
  width), two head sizes, CUDA graphs and eager: wall time of ``ActionHeadRunner.predict``
  (input copies, replay and the chunk's copy back to the host) and GPU time from CUDA events;
- camera frame to first command through the whole in-process pipeline: a synthetic frame is
  handed to :class:`FoveaPipeline` (flow, coherence, texture, sampling, encoder), its tokens to
  the head, the chunk to the :class:`ChunkExecutor`, which computes the first command from it
  at once. The latency is from the moment the frame is handed over (its capture) to that
  command. A node running the executor on a timer adds the wait for the next tick (uniform in
  one control period: 0-20 ms at 50 Hz, 10 ms on average); the table states it.

Requirements: torch (CPU works; CUDA for the graph rows). The sentence model is not timed here
(one embedding per instruction change, cached); a fixed random embedding stands in for it.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from fovea_vla.bench.common import summarize
from fovea_vla.core.encoder import ARCHITECTURES, EncoderConfig
from fovea_vla.core.flow import FlowConfig
from fovea_vla.core.frames import Frame
from fovea_vla.core.pipeline import FoveaPipeline, PipelineConfig
from fovea_vla.core.policy.executor import Chunk, ChunkExecutor, ExecutorConfig
from fovea_vla.core.policy.head import ActionHead, ActionHeadConfig
from fovea_vla.core.policy.observation import token_positions
from fovea_vla.core.policy.runner import ActionHeadRunner, RunnerConfig
from fovea_vla.core.policy.safety import SafetyLimits
from fovea_vla.core.synthetic import SyntheticScene, SyntheticSceneConfig
from fovea_vla.core.texture import TextureConfig

__all__ = ["HEADS", "format_table", "run"]

# name -> (width, depth, heads)
HEADS = {"head-256x4": (256, 4, 8), "head-512x8": (512, 8, 8)}
RESOLUTIONS = {"640x480": (640, 480), "1280x720": (1280, 720), "1920x1080": (1920, 1080)}
STATE_DIM = ACTION_DIM = 8
CHUNK = 16
STEP_S = 0.1


def _head(token_dim: int, name: str) -> ActionHead:
    width, depth, heads = HEADS[name]
    cfg = ActionHeadConfig(
        token_dim=token_dim,
        instruction_dim=384,
        state_dim=STATE_DIM,
        action_dim=ACTION_DIM,
        chunk_size=CHUNK,
        width=width,
        depth=depth,
        num_heads=heads,
        delta_state_indices=(*range(ACTION_DIM - 1), -1),
    )
    head = ActionHead.from_config(cfg, seed=0)
    head.set_normalization(np.zeros(STATE_DIM), np.ones(STATE_DIM), np.zeros(ACTION_DIM), np.full(ACTION_DIM, 0.02))
    return head


def _head_latency(device: str, token_dim: int, runs: int, warmup: int) -> dict:
    rng = np.random.default_rng(0)
    instruction = rng.normal(size=384).astype(np.float32)
    state = rng.normal(size=STATE_DIM)
    tokens = torch.randn(273, token_dim, device=device)
    positions = rng.uniform(0.0, 1.0, size=(273, 3)).astype(np.float32)
    rows = {}
    modes = [("graphs", True), ("eager", False)] if device.startswith("cuda") else [("eager", False)]
    for name in HEADS:
        for mode, graphs in modes:
            runner = ActionHeadRunner(_head(token_dim, name), RunnerConfig(device=device, cuda_graphs=graphs))
            wall, gpu = [], []
            for i in range(runs + warmup):
                out = runner.predict(tokens, positions, instruction, state)
                if i >= warmup:
                    wall.append(out.timing_ms)
                    if out.device_ms is not None:
                        gpu.append(out.device_ms)
            rows[f"{name} {mode}"] = {
                "dtype": str(runner.dtype).removeprefix("torch."),
                "wall": summarize(wall),
                "gpu": summarize(gpu) if gpu else None,
            }
    return rows


def _frame_to_command(device: str, architecture: str, resolution: str, frames: int, warmup: int) -> dict:
    width, height = RESOLUTIONS[resolution]
    scene = SyntheticScene(SyntheticSceneConfig(width=width, height=height, camera_motion=True, seed=2))
    rendered = [scene.render(i)[0] for i in range(min(frames + warmup, 90))]
    pipeline = FoveaPipeline(
        PipelineConfig(
            flow=FlowConfig(grid=4, preset="ultrafast", scale=0.5),
            texture=TextureConfig(device=device),
            encoder=EncoderConfig(architecture=architecture, device=device),
        )
    )
    runner = ActionHeadRunner(_head(pipeline.encoder.embed_dim, "head-256x4"), RunnerConfig(device=device))
    executor = ChunkExecutor(ExecutorConfig(control_rate_hz=50.0), SafetyLimits.unlimited(ACTION_DIM))
    instruction = np.random.default_rng(1).normal(size=384).astype(np.float32)
    state = np.zeros(STATE_DIM)
    origin = time.perf_counter()
    executor.reset(state, 0.0)
    samples: dict[str, list[float]] = {}
    for i in range(frames + warmup):
        # The frame is captured now; a 30 FPS camera's frames are 33 ms apart.
        target = origin + i / 30.0
        while time.perf_counter() < target:
            time.sleep(0.0005)
        capture = time.perf_counter()
        frame = Frame(rgb=rendered[i % len(rendered)], stamp_ns=int((capture - origin) * 1e9), frame_id="camera")
        output = pipeline.process(frame)
        tokens_ready = time.perf_counter()
        positions = token_positions(output.layout.centers, output.layout.levels, width, height)
        head = runner.predict(output.tokens, positions, instruction, state)
        chunk_ready = time.perf_counter()
        now_s = chunk_ready - origin
        # Action i of a chunk is the target for one step after the observation, plus i steps.
        chunk = Chunk(head.actions, start_s=capture - origin + STEP_S, step_s=STEP_S, stamp_ns=frame.stamp_ns)
        executor.add_chunk(chunk, now_s)
        command = executor.step(now_s)
        done = time.perf_counter()
        if i >= warmup:
            assert command.stamp_ns == frame.stamp_ns
            for name, ms in (
                ("pipeline (frame -> tokens)", (tokens_ready - capture) * 1e3),
                ("action head", (chunk_ready - tokens_ready) * 1e3),
                ("executor (chunk -> command)", (done - chunk_ready) * 1e3),
                ("frame -> first command", (done - capture) * 1e3),
            ):
                samples.setdefault(name, []).append(ms)
            for stage, ms in output.timing_ms.items():
                samples.setdefault(f"  pipeline: {stage}", []).append(ms)
    return {
        "resolution": resolution,
        "architecture": architecture,
        "backends": {stage: choice.name for stage, choice in pipeline.backends.items()},
        "stages": {name: summarize(values) for name, values in samples.items()},
    }


def run(
    device: str = "auto",
    architecture: str = "vit_base_patch16",
    runs: int = 1000,
    frames: int = 300,
    resolution: str = "1920x1080",
) -> dict:
    """Both measurements; ``{"head": {...}, "frame_to_command": {...}}``."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        runs, frames = min(runs, 50), min(frames, 30)
    token_dim = ARCHITECTURES[architecture][0]
    return {
        "device": device,
        "head": _head_latency(device, token_dim, runs, warmup=20),
        "frame_to_command": _frame_to_command(device, architecture, resolution, frames, warmup=20),
    }


def format_table(results: dict) -> str:
    lines = [
        f"Action head, batch 1, 273 tokens ({results['device']}):",
        "",
        "| head | dtype | wall p50 ms | wall p99 ms | GPU p50 ms | GPU p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in results["head"].items():
        gpu = row["gpu"]
        gpu_text = f"{gpu['p50_ms']:.3f} | {gpu['p99_ms']:.3f}" if gpu else "- | -"
        lines.append(
            f"| {name} | {row['dtype']} | {row['wall']['p50_ms']:.3f} | {row['wall']['p99_ms']:.3f} | {gpu_text} |"
        )
    f2c = results["frame_to_command"]
    backends = ", ".join(f"{k}={v}" for k, v in f2c["backends"].items())
    lines += [
        "",
        f"Camera frame to first command in process, {f2c['resolution']}, {f2c['architecture']}, {backends}, "
        "head-256x4 (a 50 Hz control timer adds 0-20 ms, 10 ms on average):",
        "",
        "| stage | p50 ms | p90 ms | p99 ms |",
        "|---|---|---|---|",
    ]
    for name, s in f2c["stages"].items():
        lines.append(f"| {name} | {s['p50_ms']:.2f} | {s['p90_ms']:.2f} | {s['p99_ms']:.2f} |")
    return "\n".join(lines)
