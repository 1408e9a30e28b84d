"""Benchmark of the optical-flow stage alone: time per pair and accuracy, per backend and preset.

Stage under test: :func:`fovea_vla.core.flow.make_flow` backends (``vpi``, ``nvof``, ``torch``,
``dis``), each with the presets asked for; by default every available backend with its fastest
(``ultrafast``) and default (``fast``) preset, plus ``dis medium`` as the CPU quality reference.

Inputs: pairs of the built-in synthetic scene with camera motion (:mod:`fovea_vla.core.synthetic`),
pre-rendered at each resolution (640x480, 1280x720, 1920x1080) and used in rotation, so every run
sees a different pair; accuracy: EPE on the ground-truth pairs under ``../shared/data`` (Middlebury
RubberWhale and Grove2, Sintel alley_1; found by :func:`fovea_vla.flow_cli.find_pairs`).

Timing: after warm-up, ``runs`` calls of ``compute`` per configuration and resolution; the wall
time is the backend's ``FlowResult.timing_ms`` (conversion and the copy of the field to the host
included), the device time its ``FlowResult.device_ms`` (CUDA events around the flow kernels) where
the backend reports one. Speed-ups are ratios to ``dis fast`` (or the first configuration) at the
same resolution, measured in the same run.

Requirements: none beyond the package; runs wherever only ``dis`` exists and on GPU machines
without ROS (nothing here imports rclpy).
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from fovea_vla.bench.common import REPO, summarize
from fovea_vla.core.flow.base import FLOW_PRESETS, FlowConfig, make_flow
from fovea_vla.core.synthetic import SyntheticScene, SyntheticSceneConfig
from fovea_vla.flow_cli import available_backends, evaluate, find_pairs, mean_rows

__all__ = ["RESOLUTIONS", "default_configs", "format_table", "run"]

RESOLUTIONS = {"640x480": (640, 480), "1280x720": (1280, 720), "1920x1080": (1920, 1080)}
# ../shared/data beside the checkout, or FOVEA_SHARED_DATA (as in the tests) where it lives elsewhere.
DEFAULT_DATA = Path(os.environ.get("FOVEA_SHARED_DATA", REPO.parent / "shared" / "data"))
# Frame pairs rendered per resolution and used in rotation.
_PAIRS = 6
_BASELINE = ("dis", "fast")


def default_configs(available: list[str]) -> list[tuple[str, str]]:
    """Every available backend with its fastest and default preset, plus ``dis medium``.

    >>> default_configs(["nvof", "dis"])
    [('nvof', 'ultrafast'), ('nvof', 'fast'), ('dis', 'ultrafast'), ('dis', 'fast'), ('dis', 'medium')]
    """
    presets = dict.fromkeys((FLOW_PRESETS[0], FlowConfig().preset))
    configs = [(backend, preset) for backend in available for preset in presets]
    if "dis" in available and ("dis", "medium") not in configs:
        configs.append(("dis", "medium"))
    return configs


def _select(backends: list[str] | None, presets: list[str] | None) -> tuple[list[tuple[str, str]], dict[str, str]]:
    available, skipped = available_backends(backends)
    if presets:
        return [(b, p) for b in available for p in presets], skipped
    return default_configs(available), skipped


def _time_config(cfg: FlowConfig, pairs: list, runs: int, warmup: int) -> dict:
    backend, _ = make_flow(cfg)
    walls, devices = [], []
    for i in range(warmup + runs):
        prev, cur = pairs[i % len(pairs)]
        result = backend.compute(prev, cur)
        if i >= warmup:
            walls.append(result.timing_ms)
            devices.append(result.device_ms)
    device = summarize(devices) if all(d is not None for d in devices) else None
    return {"wall": summarize(walls), "device": device}


def run(
    backends: list[str] | None = None,
    presets: list[str] | None = None,
    resolutions=tuple(RESOLUTIONS),
    runs: int = 50,
    warmup: int = 5,
    scale: float = 0.5,
    grid: int = 4,
    data: str | Path | None = DEFAULT_DATA,
    log=print,
) -> dict:
    """Time each (backend, preset) at each resolution and measure its EPE on the data pairs.

    Args:
        backends: backend names (checked as named, so e.g. ``torch`` runs its CPU path when
            asked for); None = every backend ``auto`` could pick here. Unavailable ones are
            skipped with their reason.
        presets: presets for every backend; None = :func:`default_configs`.
        resolutions: keys of :data:`RESOLUTIONS`.
        runs: timed calls per configuration and resolution (median of at least 50 for records).
        warmup: untimed calls first (allocation, kernel compilation, clocks).
        scale: ``FlowConfig.scale`` for timing and EPE (0.5 = the pipeline's setting).
        grid: ``FlowConfig.grid`` for timing (4 = the pipeline's setting); EPE is always per pixel.
        data: folder with ground-truth pairs, None or missing = no EPE.
        log: progress output.

    Returns:
        ``{"settings", "skipped", "timing", "epe"}``: ``timing`` rows ``{resolution, backend,
        preset, wall, device, speedup}`` (summaries of ms, ``device`` None where the backend has
        no device time, ``speedup`` = baseline p50 / p50); ``epe`` rows as
        :func:`fovea_vla.flow_cli.evaluate` plus per-configuration means.

    Raises:
        ValueError: unknown backend, preset or resolution, or ``runs < 1``.
        RuntimeError: ``auto`` was named and no backend is available.
    """
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs={runs}, warmup={warmup}: need runs >= 1 and warmup >= 0")
    unknown = [r for r in resolutions if r not in RESOLUTIONS]
    if unknown:
        raise ValueError(f"unknown resolutions {unknown}; known: {', '.join(RESOLUTIONS)}")
    configs, skipped = _select(backends, presets)
    # Speed-ups are relative to dis fast, or to the first configuration where it is not measured.
    baseline = _BASELINE if _BASELINE in configs or not configs else configs[0]
    for name, reason in skipped.items():
        log(f"[bench flow] skipped {name}: {reason}")
    timing = []
    for resolution in resolutions:
        width, height = RESOLUTIONS[resolution]
        scene = SyntheticScene(SyntheticSceneConfig(width=width, height=height, camera_motion=True, seed=1))
        frames = [scene.render(i)[0] for i in range(_PAIRS + 1)]
        pairs = list(itertools.pairwise(frames))
        rows = []
        for backend, preset in configs:
            cfg = FlowConfig(backend=backend, preset=preset, scale=scale, grid=grid)
            rows.append(
                {
                    "resolution": resolution,
                    "backend": backend,
                    "preset": preset,
                    **_time_config(cfg, pairs, runs, warmup),
                }
            )
            log(f"[bench flow] {resolution} {backend} {preset}: p50 {rows[-1]['wall']['p50_ms']:.2f} ms")
        base = next((r for r in rows if (r["backend"], r["preset"]) == baseline), None)
        for row in rows:
            row["speedup"] = base["wall"]["p50_ms"] / row["wall"]["p50_ms"]
        timing += rows
    epe = []
    if data is not None and Path(data).is_dir():
        pairs = find_pairs(data)
        for backend, preset in configs:
            rows, _ = evaluate(pairs, [backend], [preset], scale=scale, grid=1, log=log)
            epe += rows + mean_rows(rows)
    else:
        log(f"[bench flow] no EPE: data folder {data} not found")
    settings = {
        "runs": runs,
        "warmup": warmup,
        "scale": scale,
        "grid": grid,
        "resolutions": list(resolutions),
        "baseline": list(baseline),
    }
    return {"settings": settings, "skipped": skipped, "timing": timing, "epe": epe}


def format_table(results: dict) -> str:
    """Markdown tables: time per pair, then EPE per configuration (columns: pairs, mean)."""
    s = results["settings"]
    baseline = " ".join(s["baseline"])
    lines = [
        f"Time per pair (synthetic scene, scale {s['scale']:g}, grid {s['grid']}, median of {s['runs']} runs "
        f"after {s['warmup']} warm-up):",
        "",
        f"| resolution | backend | preset | wall p50 ms | p90 ms | p99 ms | fps | device p50 ms | x {baseline} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["timing"]:
        w, d = row["wall"], row["device"]
        device = f"{d['p50_ms']:.2f}" if d else "-"
        lines.append(
            f"| {row['resolution']} | {row['backend']} | {row['preset']} | {w['p50_ms']:.2f} | {w['p90_ms']:.2f} | "
            f"{w['p99_ms']:.2f} | {w['fps']:.0f} | {device} | {row['speedup']:.2f} |"
        )
    if results["epe"]:
        pairs = list(dict.fromkeys(r["pair"] for r in results["epe"] if not r["pair"].startswith("mean")))
        lines += [
            "",
            f"EPE px / >3 px outliers % (ground-truth pairs, scale {s['scale']:g}, grid 1):",
            "",
            "| backend | preset | " + " | ".join(pairs) + " | mean |",
            "|---|---|" + "---|" * (len(pairs) + 1),
        ]
        by_config: dict[tuple[str, str], dict[str, dict]] = {}
        for row in results["epe"]:
            key = "mean" if row["pair"].startswith("mean") else row["pair"]
            by_config.setdefault((row["backend"], row["preset"]), {})[key] = row
        for (backend, preset), cells in by_config.items():
            values = [cells.get(p) for p in [*pairs, "mean"]]
            text = [f"{c['epe']:.3f} / {100 * c['outlier_3px']:.1f}" if c else "-" for c in values]
            lines.append(f"| {backend} | {preset} | " + " | ".join(text) + " |")
    if results["skipped"]:
        lines += ["", "Skipped: " + "; ".join(f"{k} ({v})" for k, v in results["skipped"].items())]
    return "\n".join(lines)
