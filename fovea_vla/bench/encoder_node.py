"""Benchmark of the vision stage: texture updates, sampling, the foveated ViT, token reuse.

Stages under test, each timed with the device synchronised before and after (wall time a caller
waits for, host work included), median over ``runs`` after ``warmup``:

- every available texture backend at each resolution: full upload (level 0 and every mip),
  partial upload of ``dirty_fraction`` of the 32-px tiles (random tiles), full mip rebuild,
  incremental mip rebuild over those tiles, sampling the foveated layout (273 patches of 16x16);
- the whole vision stage per backend: partial upload + mips + sampling + encoder, with the frame
  on the host and (backends that take them) on the device, the mips incremental and (where
  ``incremental_mips_max_fraction`` picks it) whole;
- the encoder alone: the foveated tokens against the full-resolution grid of 1024x1024 (4,096
  tokens of 16x16) through the same weights, CUDA graphs on the GPU, batch 1; eager too;
- token reuse on a static-camera video through the whole pipeline (flow, fixation, coherence,
  encoder) for each ``coherence.reencode`` mode, with the controller's own gaze and with the gaze
  held: frames that reused all or some tokens, tokens encoded, error against a full encode.

Requirements: torch (CPU works; the GPU rows need CUDA, CuPy or EGL + cuda-python as each
backend says). The video comes from ../shared/data (skipped when absent).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fovea_vla.bench.common import summarize
from fovea_vla.core.encoder import EncoderConfig, FoveatedEncoder, full_resolution_layout
from fovea_vla.core.foveation import FoveationConfig, foveated_layout
from fovea_vla.core.frames import Frame
from fovea_vla.core.texture import TEXTURE_BACKENDS, TextureConfig, make_texture
from fovea_vla.core.texture.base import mip_rebuild_rects, tiles_to_rects

__all__ = ["DEFAULT_VIDEO", "format_table", "run"]

RESOLUTIONS = {"640x480": (640, 480), "1280x720": (1280, 720), "1920x1080": (1920, 1080)}
# ../shared/data beside the checkout, or FOVEA_SHARED_DATA (as the tests use it).
DEFAULT_VIDEO = (
    Path(os.environ.get("FOVEA_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
    / "bgslibrary"
    / "dataset"
    / "video03.avi"
)
TILE = 32


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _time(body: Callable[[], object], device: str, runs: int, warmup: int, sync: Callable[[], None]) -> dict:
    samples = []
    for i in range(runs + warmup):
        sync()
        start = time.perf_counter()
        body()
        sync()
        if i >= warmup:
            samples.append((time.perf_counter() - start) * 1e3)
    return summarize(samples)


def _frames(width: int, height: int, dirty_fraction: float, seed: int):
    """Two frames that differ in a random ``dirty_fraction`` of the tiles, and those tiles' rectangles."""
    rng = np.random.default_rng(seed)
    first = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    tiles = rng.random((-(-height // TILE), -(-width // TILE))) < dirty_fraction
    rects = tiles_to_rects(tiles, TILE, width, height)
    second = first.copy()
    for x0, y0, x1, y1 in rects:
        second[y0:y1, x0:x1] = rng.integers(0, 256, (y1 - y0, x1 - x0, 3))
    return first, second, rects, float(tiles.mean())


def _texture_rows(backend: str, device: str, width: int, height: int, args: dict, encoder) -> dict:
    texture, _ = make_texture(TextureConfig(backend=backend, device=device))
    sync = texture.synchronize
    first, second, rects, dirty = _frames(width, height, args["dirty_fraction"], seed=width)
    layout = foveated_layout(FoveationConfig(), width, height, (0.45 * width, 0.55 * height))
    runs, warmup = args["runs"], args["warmup"]
    texture.upload(first)
    frames = (first, second)
    counter = iter(range(10**9))

    def partial_upload():
        texture.upload_rects(frames[next(counter) % 2], rects)

    def vision(sources, mip_rects):
        def body():
            texture.upload_rects(sources[next(counter) % 2], rects)
            texture.rebuild_mips(mip_rects)
            patches = texture.sample(layout.centers, layout.sizes, layout.patch_size)
            encoder.encode(patches, layout.centers, layout.levels, (width, height))

        return body

    stages = {
        "full upload + mips": _time(lambda: texture.upload(first), device, runs, warmup, sync),
        f"partial upload ({dirty:.0%} tiles)": _time(partial_upload, device, runs, warmup, sync),
        "full mips": _time(lambda: texture.rebuild_mips(None), device, runs, warmup, sync),
        "incremental mips": _time(lambda: texture.rebuild_mips(rects), device, runs, warmup, sync),
        f"sampling ({layout.num_tokens} patches)": _time(
            lambda: texture.sample(layout.centers, layout.sizes, layout.patch_size), device, runs, warmup, sync
        ),
    }
    if encoder is not None:
        # The frame on the host (raw images, a CPU decoder) and, where the backend takes them, already
        # on the device (nvJPEG / NVDEC decode there); the mips incremental, and whole where
        # texture.incremental_mips_max_fraction picks that at this dirty share (same texels).
        sources = {"host frame": frames}
        if getattr(texture, "accepts_device_frames", False):
            import torch

            sources["device frame"] = tuple(torch.from_numpy(f).to(texture.device) for f in frames)
        mip_choices = {"incremental mips": rects}
        if mip_rebuild_rects(rects, width, height, args["mips_fraction"]) is None:
            mip_choices["whole mips"] = None
        for source, images in sources.items():
            for mips, mip_rects in mip_choices.items():
                stages[f"vision stage ({source}, partial upload + {mips} + sampling + encoder)"] = _time(
                    vision(images, mip_rects), device, runs, warmup, sync
                )
    close = getattr(texture, "close", None)
    if close is not None:
        close()
    return {"backend": backend, "device": texture.device, "dirty_tile_fraction": dirty, "stages": stages}


def _encoder_rows(encoder: FoveatedEncoder, args: dict) -> dict:
    import torch

    device = str(encoder.device)
    runs, warmup = args["encoder_runs"], args["encoder_warmup"]
    # Default: the foveated layout of a 1080p frame against the 1024x1024 grid (4,096 tokens);
    # with an encoder image size, both from that one image (e.g. the simulator's camera).
    width, height = args["encoder_image"] or RESOLUTIONS["1920x1080"]
    grid_w, grid_h = args["encoder_image"] or (1024, 1024)
    layout = foveated_layout(FoveationConfig(), width, height, (0.45 * width, 0.55 * height))
    grid_centers, _, grid_levels = full_resolution_layout(grid_w, grid_h, 16)
    cases = {
        f"foveated {layout.num_tokens} tokens ({width}x{height})": (layout.centers, layout.levels, (width, height)),
        f"full resolution {len(grid_centers)} tokens ({grid_w}x{grid_h})": (
            grid_centers,
            grid_levels,
            (grid_w, grid_h),
        ),
    }
    rows = {}
    for name, (centers, levels, size) in cases.items():
        patches = torch.rand((len(centers), 3, 16, 16), device=device)
        device_ms = []

        def body(patches=patches, centers=centers, levels=levels, size=size, device_ms=device_ms):
            out = encoder.encode(patches, centers, levels, size)
            if out.device_ms is not None:
                device_ms.append(out.device_ms)

        rows[name] = _time(body, device, runs, warmup, lambda: _synchronize(device))
        if device_ms:
            rows[name]["device_p50_ms"] = float(np.median(device_ms[warmup:]))
    return rows


REUSE_CASES = (("changed", "pursuit"), ("changed", "held"), ("all", "pursuit"), ("all", "held"))


def _reuse_rows(video: Path, max_frames: int, device: str, architecture: str) -> dict:
    """Token reuse through the whole pipeline (flow, fixation, coherence, texture, encoder) on a
    static-camera video, for each re-encoding mode with the fixation controller's own gaze
    (pursuit and saccades) and with the gaze held at the image centre. Every 10th frame the
    tokens are compared with a full encode of the same patches (relative L2 error per token)."""
    import torch

    from fovea_vla.core.coherence import CoherenceConfig
    from fovea_vla.core.pipeline import FoveaPipeline, PipelineConfig
    from fovea_vla.core.sources import open_source

    with open_source(str(video)) as source:
        frames = [item.rgb for _, item in zip(range(max_frames), source, strict=False)]
    height, width = frames[0].shape[:2]
    rows = {}
    for reencode, gaze in REUSE_CASES:
        pipeline = FoveaPipeline(
            PipelineConfig(
                texture=TextureConfig(backend="torch", device=device),
                coherence=CoherenceConfig(reencode=reencode),
                encoder=EncoderConfig(architecture=architecture, device=device),
            )
        )
        if gaze == "held":
            pipeline.set_external_fixation(width / 2, height / 2, hold_s=1e9)
        updated, errors = [], []
        for index, rgb in enumerate(frames):
            out = pipeline.process(Frame(rgb=rgb, stamp_ns=round(index * 1e9 / 30), frame_id="camera"))
            updated.append(out.tokens_updated)
            if index % 10 == 0:
                full = pipeline.encoder.encode(out.patches, out.layout.centers, out.layout.levels, (width, height))
                reference = full.tokens.float()
                error = (out.tokens.float() - reference).norm(dim=1) / reference.norm(dim=1).clamp_min(1e-12)
                errors.append(float(error.mean()))
        pipeline.close()
        updated = np.asarray(updated)
        count = len(updated)
        tokens = pipeline.tokens_total / count
        rows[f"{reencode} / {gaze}"] = {
            "frames": count,
            "decisions": {kind: n / count for kind, n in sorted(pipeline.decision_counts.items())},
            "frames_reusing_all_tokens": pipeline.frames_reused / count,
            "frames_reusing_some_tokens": pipeline.frames_partly_reused / count,
            "frames_reusing_tokens": (pipeline.frames_reused + pipeline.frames_partly_reused) / count,
            "tokens_encoded_share": pipeline.tokens_updated / pipeline.tokens_total,
            "tokens_per_frame": tokens,
            "token_error_mean": float(np.mean(errors)),
            "token_error_max": float(np.max(errors)),
        }
        del pipeline
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return {"video": video.name, "size": f"{width}x{height}", "architecture": architecture, "cases": rows}


def run(
    resolutions=("1280x720", "1920x1080"),
    backends=None,
    device: str = "auto",
    architecture: str = "vit_base_patch16",
    runs: int = 100,
    warmup: int = 10,
    encoder_runs: int | None = None,
    dirty_fraction: float = 0.1,
    video: Path | None = DEFAULT_VIDEO,
    video_frames: int = 2000,
    encoder_image: tuple[int, int] | None = None,
    incremental_mips_max_fraction: float | None = None,
) -> dict:
    """Time every stage; returns a JSON-able dict (see :func:`format_table`)."""
    texture_device = TextureConfig(device=device).resolved_device()
    on_gpu = texture_device.startswith("cuda")
    encoder = FoveatedEncoder(EncoderConfig(architecture=architecture, device=texture_device))
    args = {
        "runs": runs,
        "warmup": warmup,
        "dirty_fraction": dirty_fraction,
        "encoder_runs": encoder_runs or (runs if on_gpu else 3),
        "encoder_warmup": warmup if on_gpu else 1,
        "encoder_image": encoder_image,
        # config/desktop_gpu.yaml's value on a GPU, the parameter's default (always incremental) on the CPU.
        "mips_fraction": incremental_mips_max_fraction
        if incremental_mips_max_fraction is not None
        else (0.02 if on_gpu else 1.0),
    }
    results: dict = {"architecture": architecture, "device": texture_device, "texture": {}, "skipped": {}}
    for backend in backends or TEXTURE_BACKENDS.names():
        ok, reason = TEXTURE_BACKENDS.availability(backend, named=True)
        if not ok:
            results["skipped"][backend] = reason
            continue
        for name in resolutions:
            width, height = RESOLUTIONS[name]
            # The whole vision stage runs with the encoder only on the GPU: on the CPU it is the
            # encoder's time, measured on its own below.
            results["texture"][f"{backend} {name}"] = _texture_rows(
                backend, texture_device, width, height, args, encoder if on_gpu else None
            )
    results["encoder"] = _encoder_rows(encoder, args)
    if video is not None and Path(video).is_file():
        # On the CPU a ViT-Tiny keeps the whole video within minutes; the reuse counts do not depend on it.
        reuse_architecture = architecture if on_gpu else "vit_tiny_patch16"
        results["reuse"] = _reuse_rows(Path(video), video_frames, texture_device, reuse_architecture)
    else:
        results["skipped"]["reuse"] = f"video not found: {video}"
    return results


def format_table(results: dict) -> str:
    lines = ["| backend / case | stage | p50 ms | p99 ms |", "|---|---|---|---|"]
    for name, row in results["texture"].items():
        for stage, s in row["stages"].items():
            lines.append(f"| {name} ({row['device']}) | {stage} | {s['p50_ms']:.3f} | {s['p99_ms']:.3f} |")
    encoder_rows = results["encoder"]
    for case, s in encoder_rows.items():
        device = f", GPU {s['device_p50_ms']:.3f}" if "device_p50_ms" in s else ""
        lines.append(
            f"| {results['architecture']} ({results['device']}) | {case}{device} | {s['p50_ms']:.3f} | "
            f"{s['p99_ms']:.3f} |"
        )
    foveated, full = (s["p50_ms"] for s in encoder_rows.values())
    lines.append(f"| {results['architecture']} | full-resolution / foveated time | {full / foveated:.1f}x | |")
    reuse = results.get("reuse")
    if reuse:
        lines.append(
            f"\nToken reuse on {reuse['video']} ({reuse['size']}, {reuse['architecture']}): re-encoding mode / gaze; "
            "frames that reused all / some of their tokens; tokens encoded of all; token error vs a full encode "
            "(relative L2, mean of every 10th frame, mean / max)\n"
        )
        lines.append("| mode / gaze | frames | reuse all | reuse some | reuse any | tokens encoded | error mean/max |")
        lines.append("|---|---|---|---|---|---|---|")
        for case, row in reuse["cases"].items():
            lines.append(
                f"| {case} | {row['frames']} | {row['frames_reusing_all_tokens']:.1%} | "
                f"{row['frames_reusing_some_tokens']:.1%} | {row['frames_reusing_tokens']:.1%} | "
                f"{row['tokens_encoded_share']:.1%} | {row['token_error_mean']:.2e} / {row['token_error_max']:.2e} |"
            )
        decisions = next(iter(reuse["cases"].values()))["decisions"]
        lines.append("\nDecisions: " + ", ".join(f"{kind} {share:.1%}" for kind, share in decisions.items()) + ".")
    for backend, reason in results["skipped"].items():
        lines.append(f"\nSkipped {backend}: {reason}")
    return "\n".join(lines)
