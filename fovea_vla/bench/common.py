"""Shared benchmark plumbing: percentiles, machine description, appending results."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

import numpy as np

__all__ = ["append_results", "machine", "summarize"]

REPO = Path(__file__).resolve().parents[2]


def summarize(samples_ms) -> dict[str, float]:
    """Median / p90 / p99 [ms] and the rate the median allows [fps]."""
    values = np.asarray(list(samples_ms), dtype=np.float64)
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {
        "p50_ms": float(p50),
        "p90_ms": float(p90),
        "p99_ms": float(p99),
        "fps": float(1e3 / p50),
        "n": int(values.size),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    info = {
        "cpu": f"{_cpu_model()} ({os.cpu_count()} logical cores)",
        "python": platform.python_version(),
        "gpu": "none",
    }
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def _git_sha() -> str:
    # A copy without .git (e.g. on a GPU machine) can be told its revision.
    if os.environ.get("FOVEA_GIT_SHA"):
        return os.environ["FOVEA_GIT_SHA"]
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def append_results(title: str, command: str, table: str, results: dict, path: Path | None = None) -> Path:
    """Append a dated section (machine, command, table, JSON) to docs/BENCHMARKS.md."""
    if path is None:
        # From a source checkout, the project's record; from an installed copy, the working directory.
        path = REPO / "docs" / "BENCHMARKS.md" if (REPO / "docs").is_dir() else Path.cwd() / "BENCHMARKS.md"
    info = machine()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = [
        f"\n## {title} — {stamp}, {_git_sha()}",
        "",
        f"Machine: {info['cpu']}; GPU: {info['gpu']}; Python {info['python']}; torch {info.get('torch', '-')}.",
        f"Command: `{command}`",
        "",
        table,
        "",
        "<details><summary>JSON</summary>",
        "",
        "```json",
        json.dumps({"machine": info, **results}, indent=1),
        "```",
        "</details>",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_text("# Benchmarks\n\nAppended by `fovea-vla bench ...`; every section names its machine.\n")
    with path.open("a") as stream:
        stream.write("\n".join(section))
    return path
