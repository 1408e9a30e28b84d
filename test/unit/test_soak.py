"""The pure parts of ``fovea-vla soak``: growth and slope, drop classification, the summary, the PNG."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from fovea_vla.soak import (
    classify_drops,
    draw_soak_plot,
    format_table,
    memory_growth,
    parse_gpu_apps,
    summarize_samples,
)


def test_memory_growth_fits_the_slope_after_warmup_only():
    t = np.arange(0, 1800.1, 10.0)
    # Startup ramp to 300 MB in the first 60 s (not judged), then 4 MB/h with +-0.5 MB of noise.
    rss = np.where(t < 60, 5.0 * t, 300.0 + 4.0 * (t - 60) / 3600.0)
    rss = rss + 0.5 * np.sin(t)
    r = memory_growth(t, rss, warmup_end_s=60.0)
    assert r["slope_mb_per_h"] == pytest.approx(4.0, abs=0.5)
    assert r["warmup_end_mb"] == pytest.approx(rss[6])
    assert r["end_mb"] == pytest.approx(rss[-1])
    assert r["growth_mb"] == pytest.approx(rss[-1] - rss[6])


def test_memory_growth_skips_missing_samples_and_reports_nan_when_too_few():
    r = memory_growth([0, 10, 20, 30], [1.0, math.nan, 3.0, 5.0], warmup_end_s=5.0)
    assert r["warmup_end_mb"] == 3.0 and r["growth_mb"] == 2.0
    assert r["slope_mb_per_h"] == pytest.approx(2.0 / 10.0 * 3600.0)
    one = memory_growth([0, 10], [1.0, 2.0], warmup_end_s=10.0)
    assert one["growth_mb"] == 0.0 and math.isnan(one["slope_mb_per_h"])
    none = memory_growth([0, 10], [1.0, 2.0], warmup_end_s=math.inf)
    assert all(math.isnan(v) for v in none.values())


def test_classify_drops():
    explained, unexplained = classify_drops(
        {"superseded": 4, "transport_superseded": 2, "stale": 1, "corrupt_compressed": 1, "node_error": 0}
    )
    assert explained == {"superseded": 4, "transport_superseded": 2, "stale": 1}
    assert unexplained == {"corrupt_compressed": 1}


def test_parse_gpu_apps_sums_per_pid_and_skips_unparsable_lines():
    assert parse_gpu_apps("10, 300\n11, 20\n10, 12\nNo running processes found\n12, [N/A]\n") == {10: 312.0, 11: 20.0}


def _sample(t_s, rss_kb, processed, chunks, drops):
    return {
        "t_s": t_s,
        "rss_kb": rss_kb,
        "cpu_s": {"a": t_s * 0.5},
        "frames": {"published": 2 * processed, "received": processed, "processed": processed},
        "drops": drops,
        "chunks": chunks,
        "interventions": {},
        "captions": 0,
    }


def test_summarize_samples_and_table():
    samples = [
        _sample(0.0, {"a": 1024}, 0, 0, {}),
        _sample(10.0, {"a": 10 * 1024, "b": 2048}, 10, 5, {"superseded": 1}),
        _sample(20.0, {"a": 11 * 1024, "b": 2048}, 30, 15, {"superseded": 2, "pipeline_error": 1}),
    ]
    report = summarize_samples(samples, warmup_end_s=10.0)
    assert report["memory"]["a"]["growth_mb"] == pytest.approx(1.0)
    assert report["memory"]["b"]["growth_mb"] == 0.0
    assert report["memory"]["total"]["end_mb"] == pytest.approx(13.0)
    assert report["rates"]["frames_processed_per_s"] == pytest.approx(2.0)
    assert report["rates"]["chunks_per_s"] == pytest.approx(1.0)
    assert report["cpu_percent"]["a"] == pytest.approx(50.0)
    assert report["drops"] == {"explained": {"superseded": 2}, "unexplained": {"pipeline_error": 1}}
    results = {
        "settings": {
            "minutes": 0.5,
            "sample_s": 10,
            "warmup_min": 0.1,
            "resolution": "320x240",
            "fps": 15.0,
            "transport": "raw",
            "config": "cpu.yaml",
            "policy": False,
            "captions": True,
            "scene_cut_every_s": 20.0,
            "cores": 2,
        },
        "ready_s": 4.0,
        "crashes": [],
        "failure": "",
        "samples": samples,
        "report": report,
    }
    table = format_table(results, "soak_x.png")
    assert "| total |" in table and "pipeline_error 1" in table and "![" in table


def test_draw_soak_plot_writes_a_readable_png(tmp_path):
    cv2 = pytest.importorskip("cv2")
    t = [0.0, 0.5, 1.0, 1.5, 2.0]
    series = {"camera_replay": [50.0, 80.0, 81.0, math.nan, 81.5], "total": [50.0, 80.0, 81.0, 81.0, 81.5]}
    path = draw_soak_plot(t, series, 0.5, tmp_path / "sub" / "soak.png", size=(800, 600))
    image = cv2.imread(str(path))
    assert image.shape == (600, 800, 3)
    assert (image < 250).any(axis=2).mean() > 0.01  # something was drawn


def test_soak_module_imports_without_rclpy():
    code = "import sys; import fovea_vla.soak; assert 'rclpy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_total_leaves_out_samples_where_a_process_is_gone():
    samples = [
        _sample(0.0, {"a": 1024, "b": 1024}, 0, 0, {}),
        _sample(10.0, {"a": 1024, "b": 2048}, 0, 0, {}),
        _sample(20.0, {"a": 1024}, 0, 0, {}),  # b exited
    ]
    total = summarize_samples(samples, warmup_end_s=0.0)["memory"]["total"]
    assert total["end_mb"] == pytest.approx(3.0) and total["growth_mb"] == pytest.approx(1.0)
