"""Benchmark of the per-frame pipeline in one process (no ROS transport).

Stage under test: :class:`fovea_vla.core.pipeline.FoveaPipeline` (flow, fixation, pyramid,
layout, sampling) with the backends a configuration selects. Input: the built-in synthetic scene
with camera motion, at several resolutions. Requirements: none beyond the package (CPU works).
"""

from __future__ import annotations

import time

from fovea_vla.bench.common import summarize
from fovea_vla.core.flow import FlowConfig
from fovea_vla.core.frames import Frame
from fovea_vla.core.pipeline import FoveaPipeline, PipelineConfig
from fovea_vla.core.synthetic import SyntheticScene, SyntheticSceneConfig
from fovea_vla.core.texture import TextureConfig

__all__ = ["run"]

RESOLUTIONS = {"640x480": (640, 480), "1280x720": (1280, 720), "1920x1080": (1920, 1080)}


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def run(frames: int = 100, warmup: int = 10, resolutions=("640x480", "1280x720"), device: str = "auto") -> dict:
    """Time every stage per resolution; returns ``{resolution: {stage: summary}}``."""
    results = {}
    for name in resolutions:
        width, height = RESOLUTIONS[name]
        scene = SyntheticScene(SyntheticSceneConfig(width=width, height=height, camera_motion=True, seed=1))
        rendered = [scene.render(i)[0] for i in range(min(frames + warmup, 60))]
        cfg = PipelineConfig(
            flow=FlowConfig(grid=4, preset="ultrafast", scale=0.5),
            texture=TextureConfig(device=device),
        )
        pipeline = FoveaPipeline(cfg)
        stages: dict[str, list[float]] = {}
        for i in range(frames + warmup):
            frame = Frame(rgb=rendered[i % len(rendered)], stamp_ns=int(i * 1e9 / 30), frame_id="camera")
            start = time.perf_counter()
            out = pipeline.process(frame)
            _synchronize(pipeline.device)
            wall = (time.perf_counter() - start) * 1e3
            if i >= warmup:
                for stage, ms in out.timing_ms.items():
                    stages.setdefault(stage, []).append(ms)
                stages.setdefault("wall (synchronized)", []).append(wall)
        results[name] = {
            "backends": {stage: choice.name for stage, choice in pipeline.backends.items()},
            "device": pipeline.device,
            "stages": {stage: summarize(samples) for stage, samples in stages.items()},
        }
    return results


def format_table(results: dict) -> str:
    lines = ["| resolution | backends | stage | p50 ms | p90 ms | p99 ms |", "|---|---|---|---|---|---|"]
    for name, result in results.items():
        backends = ", ".join(f"{k}={v}" for k, v in result["backends"].items()) + f" ({result['device']})"
        for stage, s in result["stages"].items():
            lines.append(
                f"| {name} | {backends} | {stage} | {s['p50_ms']:.2f} | {s['p90_ms']:.2f} | {s['p99_ms']:.2f} |"
            )
    return "\n".join(lines)
