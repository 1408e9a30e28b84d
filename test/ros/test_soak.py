"""``fovea-vla soak`` end to end, short: camera_replay, fovea_node and caption_node as processes,
sampled by the soak command in its own process; only the report's shape is checked, no numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_short_soak_samples_every_process(tmp_path):
    out = tmp_path / "soak"
    env = dict(os.environ, ROS_DOMAIN_ID=str(101 + (os.getpid() + 60) % 120), ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST")
    env.pop("ROS_LOCALHOST_ONLY", None)
    argv = [sys.executable, "-m", "fovea_vla.cli", "soak", "--minutes", "0.6", "--sample-s", "5"]
    argv += ["--warmup-min", "0.1", "--resolution", "320x240", "--no-policy", "--config", "cpu.yaml"]
    argv += ["--out", str(out), "--json", str(tmp_path / "soak.json"), "--no-append"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    results = json.loads((tmp_path / "soak.json").read_text())
    processes = {"camera_replay", "fovea_node", "caption_node"}
    assert set(results["logs"]) == processes
    assert results["crashes"] == [] and results["failure"] == ""
    assert len(results["samples"]) >= 3
    assert all(processes <= set(s["rss_kb"]) for s in results["samples"])
    report = results["report"]
    for name in [*processes, "total"]:
        assert set(report["memory"][name]) >= {"warmup_end_mb", "end_mb", "growth_mb", "slope_mb_per_h"}
    assert set(report["drops"]) == {"explained", "unexplained"}
    assert set(report["rates"]) == {
        "frames_published_per_s",
        "frames_processed_per_s",
        "chunks_per_s",
        "captions_per_s",
    }
    assert report["frames"]["processed"] > 0
    assert (out / "soak.png").is_file() and (out / "soak.json").is_file()
