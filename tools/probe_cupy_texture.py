"""Probe of the ``cupy`` texture backend on a CUDA machine: level-0 format error and timings.

1. Level-0 storage: the same level-0 samples (footprint <= patch size) filtered from the backend's
   ``uchar4`` array and from a ``float4`` copy of it, both against the float64 reference.
2. Timings at 1920x1080 (median/p90 of 200 runs after warm-up): full upload, upload of ~10%
   random 32-px tiles, full and incremental mip rebuilds, 273 patches of 16x16 with footprints
   16..400 px, and the incremental vision stage (upload_rects + rebuild_mips(rects) + sample).
   "device" is GPU time alone (CUDA events; each run is queued behind a GPU sleep, so host work
   does not count), "host" the time until the call returns, "wall" call + synchronize() on an
   idle stream.

3. Full-upload copy variants (pinned buffer with 1, 2, 4 copy threads; pageable direct copy) and
   the plain host memcpy rate into pinned and pageable memory.

Usage: ``PYTHONPATH=$PWD python3 tools/probe_cupy_texture.py [--baseline OLD_cupy_texture.py]``
(needs CuPy, torch with CUDA); ``--baseline`` times an older copy of the backend in the same run.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

from fovea_vla.core.texture import TextureConfig, make_texture
from fovea_vla.core.texture.base import tiles_to_rects
from fovea_vla.core.texture.reference import reference_pyramid, reference_sample

SLEEP_CYCLES = 20_000_000  # ~10 ms: longer than any call's host time, so events time the GPU alone


def level0_format_error(rng) -> None:
    import cupy

    height, width, patch = 197, 333, 16
    rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    texture, _ = make_texture(TextureConfig(backend="cupy"))
    texture.upload(rgb)
    centers = rng.uniform([-20, -20], [width + 20, height + 20], (400, 2))
    sizes = rng.uniform(4.0, 16.0, 400)  # lod 0: level 0 only
    expected = reference_sample(reference_pyramid(rgb), centers, sizes, patch)
    from_uchar4 = texture.sample(centers, sizes, patch).cpu().numpy()

    runtime, tex = cupy.cuda.runtime, cupy.cuda.texture
    channels = tex.ChannelFormatDescriptor(32, 32, 32, 32, runtime.cudaChannelFormatKindFloat)
    array = tex.CUDAarray(channels, width, height)
    rgba = np.concatenate([rgb, np.full((height, width, 1), 255, np.uint8)], axis=2)
    array.copy_from((rgba.astype(np.float32) / 255.0).reshape(height, 4 * width))
    resource = tex.ResourceDescriptor(runtime.cudaResourceTypeArray, cuArr=array)
    sampler = tex.TextureDescriptor(
        (runtime.cudaAddressModeClamp,) * 2, runtime.cudaFilterModeLinear, runtime.cudaReadModeElementType
    )
    float_level0 = tex.TextureObject(resource, sampler)
    uchar_table = texture._texture_table
    texture._texture_table = uchar_table.clone()
    texture._texture_table[0] = float_level0.ptr  # same kernel, level 0 read from the float4 copy
    from_float4 = texture.sample(centers, sizes, patch).cpu().numpy()
    texture._texture_table = uchar_table
    for name, got in (("uchar4 normalised", from_uchar4), ("float4", from_float4)):
        error = np.abs(got - expected)
        print(f"level 0 {name:18s}: max abs {error.max():.3e}  mean abs {error.mean():.3e}")
    print(f"uchar4 vs float4 level 0: max abs difference {np.abs(from_uchar4 - from_float4).max():.3e}")


def timed(fn, sync, runs: int = 200, warmup: int = 20) -> tuple[float, float, float, float]:
    """(device median, device p90, host median, wall median) in ms.

    device: CUDA events around the call, queued behind a GPU sleep (host work does not count);
    host: until the call returns, the stream busy with that sleep; wall: call + synchronize on an
    idle stream (what a caller that waits for the result sees).
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    device, host, wall = [], [], []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(SLEEP_CYCLES)
        t0 = time.perf_counter()
        start.record()
        fn()
        end.record()
        host.append((time.perf_counter() - t0) * 1e3)
        end.synchronize()
        device.append(start.elapsed_time(end))
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync()
        wall.append((time.perf_counter() - t0) * 1e3)
    return (
        float(np.median(device)),
        float(np.percentile(device, 90)),
        float(np.median(host)),
        float(np.median(wall)),
    )


def load_baseline(path: str):
    """The CupyTexture class of an older copy of cupy_texture.py, not registered (for before/after)."""
    import types

    source = Path(path).read_text().replace('@TEXTURE_BACKENDS.register("cupy", is_available=_available)\n', "")
    module = types.ModuleType("baseline_cupy_texture")
    exec(compile(source, path, "exec"), module.__dict__)
    return module.CupyTexture


def timings(rng, baseline: str | None) -> None:
    height, width, tile = 1080, 1920, 32
    frames = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(2)]
    tiles = rng.random((-(-height // tile), -(-width // tile))) < 0.1
    rects = tiles_to_rects(tiles, tile, width, height)
    centers = rng.uniform([0, 0], [width, height], (273, 2))
    sizes = np.exp(rng.uniform(np.log(16.0), np.log(400.0), 273))
    print(f"\n1920x1080: {tiles.sum()} of {tiles.size} tiles dirty -> {len(rects)} rectangles")

    textures = []
    if baseline:
        textures.append(("before", load_baseline(baseline)(TextureConfig(backend="cupy"))))
    textures.append(("after", make_texture(TextureConfig(backend="cupy"))[0]))
    print("| version | operation | device median ms | device p90 ms | host median ms | wall (synced) median ms |")
    print("| --- | --- | --- | --- | --- | --- |")
    for version, texture in textures:
        texture.upload(frames[0])
        sync = getattr(texture, "synchronize", torch.cuda.synchronize)
        flip = [0]

        def upload_rects(texture=texture, flip=flip):
            flip[0] ^= 1
            texture.upload_rects(frames[flip[0]], rects)

        def stage(texture=texture, flip=flip):
            flip[0] ^= 1
            texture.upload_rects(frames[flip[0]], rects)
            texture.rebuild_mips(rects)
            texture.sample(centers, sizes, 16)

        rows = [
            ("upload (level 0 + all mips)", lambda texture=texture: texture.upload(frames[0])),
            ("upload_rects (10% tiles)", upload_rects),
            ("rebuild_mips()", lambda texture=texture: texture.rebuild_mips()),
            ("rebuild_mips(rects)", lambda texture=texture: texture.rebuild_mips(rects)),
            ("sample 273 x 16x16", lambda texture=texture: texture.sample(centers, sizes, 16)),
            ("upload_rects + rebuild_mips(rects) + sample", stage),
        ]
        if version == "after":
            for mode, threads in (("pinned", 2), ("pinned", 4), ("pageable", 1)):

                def variant(texture=texture, mode=mode, threads=threads):
                    texture._full_copy, texture._copy_threads = mode, threads
                    texture.upload(frames[0])

                rows.append((f"upload, {mode} x{threads} thread(s)", variant))
        for name, fn in rows:
            result = timed(fn, sync)
            print(f"| {version} | {name} | " + " | ".join(f"{v:.3f}" for v in result) + " |")
        if version == "after":
            texture._full_copy, texture._copy_threads = "pinned", 1
    pinned = torch.empty(frames[0].size, dtype=torch.uint8, pin_memory=True).numpy().reshape(frames[0].shape)
    plain = np.empty_like(frames[0])
    for name, dst in (("pinned", pinned), ("pageable", plain)):
        times = []
        for _ in range(50):
            t0 = time.perf_counter()
            np.copyto(dst, frames[0])
            times.append((time.perf_counter() - t0) * 1e3)
        print(f"np.copyto 1080p frame into {name} memory: median {np.median(times):.3f} ms")


def main() -> None:
    import cupy

    print(torch.cuda.get_device_name(0), "torch", torch.__version__, "cupy", cupy.__version__)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(SLEEP_CYCLES)
    end.record()
    end.synchronize()
    print(f"GPU sleep ahead of each timed call: {start.elapsed_time(end):.1f} ms (must exceed host times)")
    rng = np.random.default_rng(0)
    level0_format_error(rng)
    baseline = sys.argv[sys.argv.index("--baseline") + 1] if "--baseline" in sys.argv else None
    timings(rng, baseline)


if __name__ == "__main__":
    main()
