"""Benchmark of the decode stage in one process (no ROS transport), every backend in the same run.

Stage under test: :mod:`fovea_vla.core.decode`. Inputs: frames of the built-in synthetic scene
(textured, moving objects) at each resolution, encoded once up front as JPEG (OpenCV, quality 90,
4:2:0) and as H.264 (libx264 ultrafast / zerolatency, keyframe every 30 frames). Rows:

* ``cv2.imdecode``: OpenCV's JPEG decode alone (BGR out), the CPU baseline;
* ``<backend> jpeg``: the backend's ``compressed()`` as the node calls it (checks, decode to RGB;
  GPU: plus the copy to the host the CPU stages read), and for GPU backends ``jpeg device-only``
  (``download=False``: the frame stays on the device, which is what the texture needs);
* ``<backend> raw``: a raw rgb8 frame (GPU: the pinned host-to-device copy);
* ``<video backend> h264``: one packet in, one RGB frame out.

GPU rows are synchronised (``torch.cuda.synchronize``) before the clock stops. Requirements: none
beyond the package for the CPU rows; torchvision (nvjpeg) and PyNvVideoCodec (nvdec) for the GPU rows.
"""

from __future__ import annotations

import time

import cv2
import numpy as np

from fovea_vla.bench.common import summarize
from fovea_vla.core.decode import IMAGE_DECODERS, VIDEO_DECODERS, DecodeConfig, make_image_decoder, make_video_decoder
from fovea_vla.core.frames import rgb_to_compressed
from fovea_vla.core.synthetic import SyntheticScene, SyntheticSceneConfig

__all__ = ["RESOLUTIONS", "format_table", "run"]

RESOLUTIONS = {"640x480": (640, 480), "1280x720": (1280, 720), "1920x1080": (1920, 1080)}
_DISTINCT_FRAMES = 30  # frames cycled through (decoders must not see one image only)


def _timed(fn, inputs: list, runs: int, warmup: int, sync) -> dict:
    samples = []
    for i in range(warmup + runs):
        start = time.perf_counter()
        fn(inputs[i % len(inputs)])
        sync()
        if i >= warmup:
            samples.append((time.perf_counter() - start) * 1e3)
    return summarize(samples)


def _sync_for(device: str):
    if device.startswith("cuda"):
        import torch

        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def run(resolutions=("1920x1080",), runs: int = 200, warmup: int = 20, quality: int = 90) -> dict:
    """Time every available decoder per resolution; returns ``{resolution: {...}}`` (see :func:`format_table`)."""
    results = {}
    for name in resolutions:
        width, height = RESOLUTIONS[name]
        scene = SyntheticScene(SyntheticSceneConfig(width=width, height=height, camera_motion=True, seed=2))
        frames = [scene.render(i)[0] for i in range(_DISTINCT_FRAMES)]
        jpegs = [rgb_to_compressed(rgb, "jpeg", quality=quality) for rgb in frames]
        rows: dict[str, dict] = {}
        skipped: dict[str, str] = {}
        rows["cv2.imdecode jpeg"] = _timed(
            lambda data: cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR),
            jpegs,
            runs,
            warmup,
            _sync_for("cpu"),
        )
        for backend in IMAGE_DECODERS.names():
            ok, why = IMAGE_DECODERS.availability(backend, named=True)
            if not ok:
                skipped[backend] = why
                continue
            decoder, _ = make_image_decoder(DecodeConfig(backend=backend))
            sync = _sync_for(decoder.device)
            rows[f"{backend} jpeg"] = _timed(
                lambda data, d=decoder: d.compressed(data, "jpeg"), jpegs, runs, warmup, sync
            )
            if decoder.device != "cpu":
                device_only, _ = make_image_decoder(DecodeConfig(backend=backend, download=False))
                rows[f"{backend} jpeg device-only"] = _timed(
                    lambda data, d=device_only: d.compressed(data, "jpeg"), jpegs, runs, warmup, sync
                )
            rows[f"{backend} raw rgb8"] = _timed(
                lambda rgb, d=decoder: d.raw(rgb, rgb.shape[1], rgb.shape[0], "rgb8", 3 * rgb.shape[1]),
                frames,
                runs,
                warmup,
                sync,
            )
        packets = _h264_packets(frames, skipped)
        for backend in VIDEO_DECODERS.names() if packets else ():
            ok, why = VIDEO_DECODERS.availability(backend, named=True)
            if not ok:
                skipped[backend] = why
                continue
            decoder, _ = make_video_decoder(DecodeConfig(video_backend=backend))
            rows[f"{backend} h264"] = _time_video(decoder, packets, runs, warmup)
        baseline = rows["cv2.imdecode jpeg"]["p50_ms"]
        results[name] = {
            "jpeg_kb": round(float(np.mean([len(j) for j in jpegs])) / 1024, 1),
            "rows": rows,
            "speedup_vs_cv2_imdecode": {row: baseline / s["p50_ms"] for row, s in rows.items() if "jpeg" in row},
            "skipped": skipped,
        }
    return results


def _h264_packets(frames: list[np.ndarray], skipped: dict) -> list[bytes]:
    from fovea_vla.core.video_stream import VideoEncoder

    try:
        encoder = VideoEncoder()
        return [encoder.encode(rgb) for rgb in frames]
    except RuntimeError as exc:
        skipped["h264 packets"] = str(exc)
        return []


def _time_video(decoder, packets: list[bytes], runs: int, warmup: int) -> dict:
    """Per packet in stream order (restarting at the first keyframe after each pass)."""
    sync = _sync_for(decoder.device)
    samples = []
    for i in range(warmup + runs):
        index = i % len(packets)
        if index == 0:
            decoder.reset()
        start = time.perf_counter()
        decoder.decode(packets[index], "h264", i)
        sync()
        if i >= warmup:
            samples.append((time.perf_counter() - start) * 1e3)
    return summarize(samples)


def format_table(results: dict) -> str:
    lines = [
        "| resolution | decoder | p50 ms | p90 ms | p99 ms | vs cv2.imdecode (p50) |",
        "|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        for row, s in result["rows"].items():
            ratio = result["speedup_vs_cv2_imdecode"].get(row)
            ratio_text = f"{ratio:.1f}x" if ratio is not None else "-"
            lines.append(
                f"| {name} | {row} | {s['p50_ms']:.2f} | {s['p90_ms']:.2f} | {s['p99_ms']:.2f} | {ratio_text} |"
            )
        for backend, why in result["skipped"].items():
            lines.append(f"| {name} | {backend}: skipped ({why}) | - | - | - | - |")
    lines.append("")
    sizes = ", ".join(f"{name}: {result['jpeg_kb']} KB" for name, result in results.items())
    lines.append(f"JPEG quality 90, mean size {sizes}.")
    return "\n".join(lines)
