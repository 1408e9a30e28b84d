"""Encoder latency of the tabletop policy's pipelines: foveated (sim.yaml) against full resolution
(sim_full_resolution.yaml), one process, the same frames (an episode of the simulated task).

    python tools/sim_encoder_latency.py --video EPISODE.mp4 --device cuda --frames 300 \
        [--encoders vit_tiny_patch16:12,vit_base_patch16:12]

Each pipeline runs the episode's frames in a loop (each frame differs from the last, so every frame
is encoded); the table gives the encoder's wall time per frame (``timing_ms["encoder"]``) and, on a
GPU, its device time. ``--device`` moves texture and encoder (sim.yaml runs both on the CPU).
``--encoders`` adds rows for other encoders (ARCHITECTURE:DEPTH, random init, same two token
layouts): how the ratio grows once the encoder, not the per-frame floor, takes the time.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform

import cv2
import numpy as np
import torch

from fovea_vla.core.frames import Frame
from fovea_vla.core.pipeline import FoveaPipeline
from fovea_vla.train_cli import pipeline_config_from_files


def frames_of(path: str) -> list[np.ndarray]:
    capture = cv2.VideoCapture(path)
    frames = []
    while True:
        ok, bgr = capture.read()
        if not ok:
            return frames
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


def measure(config: str, device: str, frames: list[np.ndarray], count: int, encoder: str | None = None) -> dict:
    cfg = pipeline_config_from_files(config)
    encoder_cfg = dataclasses.replace(cfg.encoder, device=device)
    if encoder is not None:
        architecture, depth = encoder.split(":")
        encoder_cfg = dataclasses.replace(encoder_cfg, architecture=architecture, depth=int(depth), checkpoint=None)
    cfg = dataclasses.replace(cfg, texture=dataclasses.replace(cfg.texture, device=device), encoder=encoder_cfg)
    pipeline = FoveaPipeline(cfg)
    wall, gpu = [], []
    for i in range(count + 20):
        output = pipeline.process(Frame(rgb=frames[i % len(frames)], stamp_ns=i * 100_000_000, frame_id="camera"))
        if i >= 20 and "encoder" in output.timing_ms:  # 20 warm-up frames
            wall.append(output.timing_ms["encoder"])
            if "encoder_gpu" in output.timing_ms:
                gpu.append(output.timing_ms["encoder_gpu"])
    return {
        "tokens": cfg.foveation.num_tokens,
        "encoded": len(wall),
        "wall_p50": float(np.percentile(wall, 50)),
        "wall_p99": float(np.percentile(wall, 99)),
        "gpu_p50": float(np.percentile(gpu, 50)) if gpu else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video", required=True, help="an episode of the tabletop task (e.g. from record-sim)")
    parser.add_argument("--device", default="cpu", help="texture and encoder device: cpu or cuda")
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument(
        "--encoders", default="", help="comma-separated ARCHITECTURE:DEPTH encoders to compare as well (random init)"
    )
    args = parser.parse_args()
    frames = frames_of(args.video)
    machine = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"machine: {machine}; torch {torch.__version__}; {len(frames)} frames of {args.video} in a loop")
    print("| encoder | pipeline | tokens | frames encoded | encoder wall p50 ms | p99 ms | GPU p50 ms |")
    print("|---|---|---|---|---|---|---|")
    ratios = []
    for encoder in [None, *filter(None, args.encoders.split(","))]:
        rows = {}
        for name in ("sim.yaml", "sim_full_resolution.yaml"):
            rows[name] = row = measure(name, args.device, frames, args.frames, encoder)
            gpu = "-" if row["gpu_p50"] is None else f"{row['gpu_p50']:.3f}"
            print(
                f"| {encoder or 'as configured'} | {name} | {row['tokens']} | {row['encoded']} | {row['wall_p50']:.3f} "
                f"| {row['wall_p99']:.3f} | {gpu} |"
            )
        fov, full = rows["sim.yaml"], rows["sim_full_resolution.yaml"]
        gpu_ratio = "" if fov["gpu_p50"] is None else f", GPU time {full['gpu_p50'] / fov['gpu_p50']:.2f}x"
        ratios.append(f"{encoder or 'as configured'}: wall {full['wall_p50'] / fov['wall_p50']:.2f}x{gpu_ratio}")
    print("full resolution / foveated: " + "; ".join(ratios))


if __name__ == "__main__":
    main()
