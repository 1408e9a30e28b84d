"""Shared pytest fixtures: the developer data folder and GPU detection."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

try:
    import rclpy  # noqa: F401

    HAVE_ROS = True
except ImportError:  # e.g. a GPU machine with torch but no ROS 2: run the core tests only
    HAVE_ROS = False

try:
    from hypothesis import HealthCheck, settings

    HAVE_HYPOTHESIS = True
except ImportError:  # the GPU machine's Python has no hypothesis: skip the fuzz suite there
    HAVE_HYPOTHESIS = False

# Modules that import ROS 2 (or hypothesis) at collection time.
collect_ignore_glob = (
    [] if HAVE_ROS else ["ros/*", "unit/test_bringup.py", "fuzz/test_fuzz_messages.py", "fuzz/test_fuzz_nodes.py"]
)
if not HAVE_HYPOTHESIS:
    collect_ignore_glob.append("fuzz/*")

if HAVE_HYPOTHESIS:
    # FOVEA_FUZZ_PROFILE picks the fuzz budget: "ci" (default) runs a fixed, reproducible set of examples
    # within CI's time; "fuzz" (`make fuzz`) runs 25 times as many, freshly random each run. Test runs on
    # a shared 2-core machine vary in speed, hence no deadline.
    settings.register_profile(
        "ci",
        max_examples=1000,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    settings.register_profile("fuzz", settings.get_profile("ci"), max_examples=25_000, derandomize=False)
    settings.load_profile(os.environ.get("FOVEA_FUZZ_PROFILE", "ci"))

REPO_ROOT = Path(__file__).resolve().parents[1]
# ../shared/data beside the checkout; FOVEA_SHARED_DATA points elsewhere (e.g. a copy on a GPU machine).
SHARED_DATA = Path(os.environ.get("FOVEA_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of ../shared/data beside the checkout; skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"developer data not found at {SHARED_DATA}")
    return SHARED_DATA


def _cuda_available() -> tuple[bool, str]:
    try:
        import torch
    except ImportError as exc:
        return False, f"torch not importable: {exc}"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    return True, torch.cuda.get_device_name(0)


def pytest_collection_modifyitems(config, items):
    ok, reason = _cuda_available()
    if ok:
        return
    skip_gpu = pytest.mark.skip(reason=f"gpu test: {reason}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
