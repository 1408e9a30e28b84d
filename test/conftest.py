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

# Modules that import ROS 2 at collection time.
collect_ignore_glob = [] if HAVE_ROS else ["ros/*", "unit/test_bringup.py"]

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
