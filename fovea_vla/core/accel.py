"""Probes for accelerated libraries and devices, each returning ``(ok, reason)`` without raising,
and :func:`collector_paused` for CUDA graph captures.

Used by backends' availability checks and by ``fovea-vla doctor``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import importlib
import os
from collections.abc import Iterator

from fovea_vla.core.registry import Availability

__all__ = ["PROBES", "collector_paused", "probe_all"]


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the block (a CUDA graph capture).

    A collection that starts inside a capture finalises whatever unreachable objects it finds on the
    capturing thread, and some release device resources with calls that are illegal while a stream
    captures (CuPy's CUDA arrays and texture objects, GL registrations): the capture is invalidated
    ("operation failed due to a previous error during capture"). Seen intermittently on an H100 in
    the GPU test run, where earlier tests leave such objects behind.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _import(module: str) -> tuple[object | None, str]:
    try:
        return importlib.import_module(module), ""
    except Exception as exc:  # broken installs raise more than ImportError
        return None, f"python module {module!r} not importable ({type(exc).__name__}: {exc})"


def _shared_library(*names: str) -> tuple[bool, str]:
    for name in names:
        try:
            ctypes.CDLL(name)
            return True, name
        except OSError:
            found = ctypes.util.find_library(name.removeprefix("lib").split(".so")[0])
            if found:
                try:
                    ctypes.CDLL(found)
                    return True, found
                except OSError:
                    continue
    return False, f"shared library not found ({', '.join(names)})"


def cuda() -> Availability:
    torch, why = _import("torch")
    if torch is None:
        return False, why
    if not torch.cuda.is_available():
        return False, f"torch {torch.__version__} sees no CUDA device"
    return True, f"{torch.cuda.get_device_name(0)} (torch {torch.__version__}, CUDA {torch.version.cuda})"


def cupy() -> Availability:
    module, why = _import("cupy")
    if module is None:
        return False, why
    try:
        if not module.cuda.is_available():
            return False, f"cupy {module.__version__} imported but sees no CUDA device"
    except Exception as exc:
        return False, f"cupy {module.__version__}: {exc}"
    return True, f"cupy {module.__version__}"


def egl_opengl() -> Availability:
    ok, where = _shared_library("libEGL.so.1", "libEGL.so")
    if not ok:
        return False, f"EGL: {where}"
    if os.environ.get("PYOPENGL_PLATFORM", "egl") != "egl":
        return False, "PYOPENGL_PLATFORM is set to something other than egl"
    module, why = _import("OpenGL")
    if module is None:
        return False, why
    return True, f"{where} with PyOpenGL {getattr(module, '__version__', '?')}"


def nvidia_optical_flow() -> Availability:
    ok, where = _shared_library("libnvidia-opticalflow.so.1", "libnvidia-opticalflow.so")
    return (True, where) if ok else (False, f"NVIDIA Optical Flow API: {where} (needs an NVIDIA driver)")


def vpi() -> Availability:
    module, why = _import("vpi")
    if module is None:
        return False, f"{why} (VPI ships with JetPack on Jetson)"
    return True, f"VPI {getattr(module, '__version__', '?')}"


def nvjpeg() -> Availability:
    ok, why = cuda()
    if not ok:
        return False, f"needs CUDA: {why}"
    torchvision, why = _import("torchvision")
    if torchvision is None:
        return False, why
    return True, f"torchvision {torchvision.__version__} decode_jpeg on CUDA"


def nvdec() -> Availability:
    ok, where = _shared_library("libnvcuvid.so.1", "libnvcuvid.so")
    if not ok:
        return False, f"NVDEC: {where}"
    module, why = _import("PyNvVideoCodec")
    if module is None:
        return False, why
    return True, f"{where} with PyNvVideoCodec"


def tensorrt() -> Availability:
    module, why = _import("tensorrt")
    if module is None:
        return False, why
    return True, f"TensorRT {module.__version__}"


PROBES = {
    "CUDA (torch)": cuda,
    "CuPy": cupy,
    "EGL / OpenGL": egl_opengl,
    "NVIDIA Optical Flow library": nvidia_optical_flow,
    "VPI": vpi,
    "nvJPEG": nvjpeg,
    "NVDEC": nvdec,
    "TensorRT": tensorrt,
}


def probe_all() -> dict[str, Availability]:
    results = {}
    for name, probe in PROBES.items():
        try:
            results[name] = probe()
        except Exception as exc:  # a probe must never take doctor down
            results[name] = (False, f"probe failed: {type(exc).__name__}: {exc}")
    return results
