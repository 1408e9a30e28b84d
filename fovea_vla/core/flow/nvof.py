"""``nvof`` flow backend: the NVIDIA Optical Flow API (CUDA interface) through ctypes.

Uses the optical-flow engine of Turing and newer desktop / data-centre GPUs (the H100's OFA too)
via ``libnvidia-opticalflow.so.1``, which ships with the NVIDIA driver. No SDK headers or
compiled extension: the API's function list and structures are declared below with ctypes, after
the Optical Flow SDK 5.0 headers (``nvOpticalFlowCommon.h``, ``nvOpticalFlowCuda.h``).

Buffers are allocated by the API as CUDA device pointers and exposed to torch as zero-copy tensor
views (``__cuda_array_interface__``), so frames are written into them by torch copy kernels and
the S10.5 fixed-point output is converted on the GPU. Execution is ordered on torch's current
CUDA stream (``nvOFSetIOCudaStreams``): no host synchronisation except for the host copy of the
result that :class:`FlowResult` carries.

API facts relied on (SDK 5.0):

- ``NvOFAPICreateInstanceCuda(version, NV_OF_CUDA_API_FUNCTION_LIST*)`` fills a table of 12
  function pointers; version = ``(major << 4) | minor`` (0x50 for 5.0).
- ``FORWARD`` prediction: each vector is the position change of the content from ``inputFrame``
  to ``referenceFrame``, so input = prev and reference = cur gives the prev -> cur flow of
  :mod:`fovea_vla.core.flow.base`. Vectors are ``int16 (x, y)`` in S10.5 fixed point (/32 px).
- Output grid sizes 1, 2 and 4 px (``NV_OF_CAPS_SUPPORTED_OUTPUT_GRID_SIZES``); the output and
  cost buffers are sized in grid units. Perf levels SLOW=5, MEDIUM=10, FAST=20.
- The cost buffer holds one matching cost per vector (lower is better); it is mapped to a
  confidence in [0, 1] as ``1 - cost / max_cost`` with ``max_cost`` from the buffer format.

Sub-pixel refinement: the engine's vectors are block matches good to about a quarter pixel
(0.3-0.45 px mean error on exact translations of real images, 1.6-1.9x the endpoint error of OpenCV
DIS ``medium`` on the Middlebury pairs, measured on an H100). Except for ``ultrafast``, the field is
therefore upsampled to the working resolution and refined with a few dense Lucas–Kanade steps and
5 x 5 medians (the finest level of the ``torch`` backend's algorithm, from
:mod:`fovea_vla.core.flow._lk`), whose confidence then replaces the engine's cost.

===========  ==========  ==========================================
``preset``   engine      refinement (LK steps / median passes)
===========  ==========  ==========================================
ultrafast    FAST        none (the engine's field as it is)
fast         MEDIUM      2 / 4
medium       MEDIUM      4 / 8
slow         SLOW        4 / 8
===========  ==========  ==========================================

The engine's FAST level was too coarse to refine on Grove2 (EPE 0.97 px after 2 steps against
0.30 from MEDIUM), so every refined preset starts from MEDIUM or SLOW.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import time
from functools import lru_cache

import numpy as np

from fovea_vla.core.flow._lk import DenseLK, LKParams, to_output_grid
from fovea_vla.core.flow.base import FLOW_BACKENDS, FlowConfig, FlowResult, grid_shape
from fovea_vla.core.registry import Availability

__all__ = ["NvofError", "NvofFlow", "s10_5_to_pixels"]

_U32 = ctypes.c_uint32
_PTR = ctypes.c_void_p

STATUS_NAMES = (
    "SUCCESS",
    "OF_NOT_AVAILABLE",
    "UNSUPPORTED_DEVICE",
    "DEVICE_DOES_NOT_EXIST",
    "INVALID_PTR",
    "INVALID_PARAM",
    "INVALID_CALL",
    "INVALID_VERSION",
    "OUT_OF_MEMORY",
    "NOT_INITIALIZED",
    "UNSUPPORTED_FEATURE",
    "GENERIC",
)
_CAPS_OUTPUT_GRID_SIZES = 0
_PERF_LEVELS = {"ultrafast": 20, "fast": 10, "medium": 10, "slow": 5}
REFINEMENT: dict[str, LKParams | None] = {
    "ultrafast": None,
    "fast": LKParams(levels=1, iterations=2, window=3, median_passes=4),
    "medium": LKParams(levels=1, iterations=4, window=3, median_passes=8),
    "slow": LKParams(levels=1, iterations=4, window=3, median_passes=8),
}
_MODE_OPTICAL_FLOW = 1
_FORMAT_GRAY8, _FORMAT_SHORT2, _FORMAT_UINT8 = 1, 5, 7
_USAGE_INPUT, _USAGE_OUTPUT, _USAGE_COST = 1, 2, 4
_CUDA_DEVICE_POINTER = 2
_API_VERSIONS = (0x50, 0x40, 0x30, 0x20, 0x11, 0x10)


class NvofError(RuntimeError):
    """An NVIDIA Optical Flow API call failed; the message names the call and the status."""


class _InitParams(ctypes.Structure):
    _fields_ = [
        ("width", _U32),
        ("height", _U32),
        ("outGridSize", _U32),
        ("hintGridSize", _U32),
        ("mode", _U32),
        ("perfLevel", _U32),
        ("enableExternalHints", _U32),
        ("enableOutputCost", _U32),
        ("hPrivData", _PTR),
        ("disparityRange", _U32),
        ("enableRoi", _U32),
        ("predDirection", _U32),
        ("enableGlobalFlow", _U32),
        ("inputBufferFormat", _U32),
    ]


class _BufferDescriptor(ctypes.Structure):
    _fields_ = [("width", _U32), ("height", _U32), ("bufferUsage", _U32), ("bufferFormat", _U32)]


class _ExecuteInput(ctypes.Structure):
    _fields_ = [
        ("inputFrame", _PTR),
        ("referenceFrame", _PTR),
        ("externalHints", _PTR),
        ("disableTemporalHints", _U32),
        ("padding", _U32),
        ("hPrivData", _PTR),
        ("padding2", _U32),
        ("numRois", _U32),
        ("roiData", _PTR),
    ]


class _ExecuteOutput(ctypes.Structure):
    _fields_ = [
        ("outputBuffer", _PTR),
        ("outputCostBuffer", _PTR),
        ("hPrivData", _PTR),
        ("bwdOutputBuffer", _PTR),
        ("bwdOutputCostBuffer", _PTR),
        ("globalFlowBuffer", _PTR),
    ]


class _Stride(ctypes.Structure):
    _fields_ = [("strideXInBytes", _U32), ("strideYInBytes", _U32)]


class _StrideInfo(ctypes.Structure):
    _fields_ = [("strideInfo", _Stride * 3), ("numPlanes", _U32)]


_FUNCTIONS = (
    ("create", ctypes.CFUNCTYPE(ctypes.c_int, _PTR, ctypes.POINTER(_PTR))),
    ("init", ctypes.CFUNCTYPE(ctypes.c_int, _PTR, ctypes.POINTER(_InitParams))),
    (
        "create_buffer",
        ctypes.CFUNCTYPE(ctypes.c_int, _PTR, ctypes.POINTER(_BufferDescriptor), ctypes.c_int, ctypes.POINTER(_PTR)),
    ),
    ("buffer_cuarray", ctypes.CFUNCTYPE(_PTR, _PTR)),
    ("buffer_devptr", ctypes.CFUNCTYPE(ctypes.c_uint64, _PTR)),
    ("buffer_stride", ctypes.CFUNCTYPE(ctypes.c_int, _PTR, ctypes.POINTER(_StrideInfo))),
    ("set_streams", ctypes.CFUNCTYPE(ctypes.c_int, _PTR, _PTR, _PTR)),
    ("execute", ctypes.CFUNCTYPE(ctypes.c_int, _PTR, ctypes.POINTER(_ExecuteInput), ctypes.POINTER(_ExecuteOutput))),
    ("destroy_buffer", ctypes.CFUNCTYPE(ctypes.c_int, _PTR)),
    ("destroy", ctypes.CFUNCTYPE(ctypes.c_int, _PTR)),
    ("last_error", ctypes.CFUNCTYPE(ctypes.c_int, _PTR, ctypes.c_char_p, ctypes.POINTER(_U32))),
    ("get_caps", ctypes.CFUNCTYPE(ctypes.c_int, _PTR, ctypes.c_int, ctypes.POINTER(_U32), ctypes.POINTER(_U32))),
)


class _FunctionList(ctypes.Structure):
    _fields_ = [(name, _PTR) for name, _ in _FUNCTIONS]


def s10_5_to_pixels(raw):
    """S10.5 fixed-point vectors (int16, 5 fractional bits) to float32 pixels.

    Works on NumPy arrays and torch tensors alike.

    Example:
        >>> s10_5_to_pixels(np.array([32, -48, 1, 32767], dtype=np.int16))
        array([ 1.0000000e+00, -1.5000000e+00,  3.1250000e-02,  1.0239969e+03], dtype=float32)
    """
    if isinstance(raw, np.ndarray):
        return raw.astype(np.float32) / np.float32(32.0)
    return raw.float() / 32.0


def _status_name(code: int) -> str:
    return STATUS_NAMES[code] if 0 <= code < len(STATUS_NAMES) else f"UNKNOWN({code})"


@lru_cache(maxsize=1)
def _api() -> tuple[dict, int]:
    """Load the library and fill the function table once per process."""
    names = [os.environ.get("FOVEA_NVOF_LIBRARY"), "libnvidia-opticalflow.so.1", "libnvidia-opticalflow.so"]
    errors = []
    library = None
    for name in filter(None, names):
        try:
            library = ctypes.CDLL(name)
            break
        except OSError as exc:
            errors.append(f"{name}: {exc}")
    if library is None:
        raise NvofError("libnvidia-opticalflow not found (" + "; ".join(errors) + ")")
    create_instance = library.NvOFAPICreateInstanceCuda
    create_instance.argtypes = [_U32, ctypes.POINTER(_FunctionList)]
    create_instance.restype = ctypes.c_int
    for version in _API_VERSIONS:
        table = _FunctionList()
        status = create_instance(version, ctypes.byref(table))
        if status == 0:
            functions = {}
            for name, prototype in _FUNCTIONS:
                address = getattr(table, name)
                if not address:
                    raise NvofError(f"API 0x{version:x}: function {name} missing from the function list")
                functions[name] = prototype(address)
            return functions, version
    raise NvofError(f"NvOFAPICreateInstanceCuda failed for every API version: {_status_name(status)}")


def _current_cuda_context() -> int:
    """The CUDA context torch uses on this thread (its primary context), as an integer handle."""
    import torch

    torch.cuda.init()
    torch.zeros(1, device="cuda")  # makes the primary context current on this thread
    libcuda = ctypes.CDLL("libcuda.so.1")
    context = _PTR()
    status = libcuda.cuCtxGetCurrent(ctypes.byref(context))
    if status != 0 or not context.value:
        raise NvofError(f"cuCtxGetCurrent failed (CUresult {status})")
    return context.value


def is_available() -> Availability:
    try:
        import torch
    except ImportError as exc:
        return False, f"torch not importable: {exc}"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    try:
        _, version = _api()
    except NvofError as exc:
        return False, str(exc)
    return True, f"NVIDIA Optical Flow API {version >> 4}.{version & 0xF} on {torch.cuda.get_device_name(0)}"


class _DeviceView:
    """A device buffer described for ``torch.as_tensor`` (``__cuda_array_interface__`` v3)."""

    def __init__(self, pointer: int, shape: tuple, strides: tuple, typestr: str):
        self.__cuda_array_interface__ = {
            "shape": shape,
            "strides": strides,
            "typestr": typestr,
            "data": (pointer, False),
            "version": 3,
            "stream": None,  # ordering is by torch's current stream, which NVOF also uses
        }


@FLOW_BACKENDS.register("nvof", is_available=is_available)
class NvofFlow:
    """Hardware optical flow on NVIDIA desktop and data-centre GPUs.

    Args:
        cfg: flow configuration (preset, grid, scale).
        refine: True = the preset's refinement from :data:`REFINEMENT`, False = the engine's field
            as it is, or explicit Lucas–Kanade settings.
    """

    name = "nvof"

    def __init__(self, cfg: FlowConfig | None = None, *, refine: bool | LKParams = True):
        import torch

        self._torch = torch
        self.cfg = cfg or FlowConfig(backend="nvof", grid=4)
        if isinstance(refine, LKParams):
            self.refinement = refine
        else:
            self.refinement = REFINEMENT[self.cfg.preset] if refine else None
        # The engine's cost is the confidence only without refinement.
        self.output_cost = self.refinement is None
        self._lk = None if self.refinement is None else DenseLK(self.refinement, "cuda")
        self._functions, self.api_version = _api()
        self._context = _current_cuda_context()
        self._session = None
        self._stream_handle = None
        self._hints_valid = False
        self._luma = torch.tensor([0.299, 0.587, 0.114], device="cuda")
        self._host_buffers: dict = {}
        self._start = torch.cuda.Event(enable_timing=True)
        self._end = torch.cuda.Event(enable_timing=True)

    # -- API plumbing -----------------------------------------------------------------------
    def _check(self, status: int, call: str, handle=None) -> None:
        if status == 0:
            return
        detail = ""
        if handle is not None:
            buffer, size = ctypes.create_string_buffer(512), _U32(512)
            self._functions["last_error"](handle, buffer, ctypes.byref(size))
            detail = buffer.value.decode(errors="replace")
        raise NvofError(f"{call} failed: {_status_name(status)}" + (f" ({detail})" if detail else ""))

    def _supported_grids(self, handle) -> list[int]:
        count = _U32(0)
        get_caps = self._functions["get_caps"]
        self._check(get_caps(handle, _CAPS_OUTPUT_GRID_SIZES, None, ctypes.byref(count)), "nvOFGetCaps", handle)
        values = (_U32 * max(count.value, 1))()
        self._check(get_caps(handle, _CAPS_OUTPUT_GRID_SIZES, values, ctypes.byref(count)), "nvOFGetCaps", handle)
        return list(values)[: count.value]

    def _buffer(self, session: dict, width: int, height: int, usage: int, fmt: int, typestr: str, channels: int):
        handle = session["handle"]
        buffer = _PTR()
        descriptor = _BufferDescriptor(width, height, usage, fmt)
        self._check(
            self._functions["create_buffer"](
                handle, ctypes.byref(descriptor), _CUDA_DEVICE_POINTER, ctypes.byref(buffer)
            ),
            "nvOFCreateGPUBufferCuda",
            handle,
        )
        session["buffers"].append(buffer)
        pointer = self._functions["buffer_devptr"](buffer)
        stride = _StrideInfo()
        self._check(
            self._functions["buffer_stride"](buffer, ctypes.byref(stride)), "nvOFGPUBufferGetStrideInfo", handle
        )
        if not pointer:
            raise NvofError("nvOFGPUBufferGetCUdeviceptr returned 0")
        itemsize = int(typestr[-1])
        row = stride.strideInfo[0].strideXInBytes
        if channels == 1:
            shape, strides = (height, width), (row, itemsize)
        else:
            shape, strides = (height, width, channels), (row, itemsize * channels, itemsize)
        view = self._torch.as_tensor(_DeviceView(pointer, shape, strides, typestr), device="cuda")
        return buffer, view

    def _open(self, width: int, height: int) -> dict:
        self.close()
        session = {"handle": _PTR(), "buffers": [], "size": (width, height)}
        self._check(
            self._functions["create"](_PTR(self._context), ctypes.byref(session["handle"])), "nvCreateOpticalFlowCuda"
        )
        handle = session["handle"]
        try:
            grids = self._supported_grids(handle)
            # Refinement works on a dense field anyway, so the engine runs on its coarsest (fastest)
            # grid; unrefined, on the configured grid when the engine offers it.
            if self.refinement is not None:
                hardware_grid = max(grids)
            else:
                hardware_grid = self.cfg.grid if self.cfg.grid in grids else min(grids)
            params = _InitParams(
                width=width,
                height=height,
                outGridSize=hardware_grid,
                hintGridSize=0,
                mode=_MODE_OPTICAL_FLOW,
                perfLevel=_PERF_LEVELS[self.cfg.preset],
                enableExternalHints=0,
                enableOutputCost=int(self.output_cost),
                hPrivData=None,
                disparityRange=0,
                enableRoi=0,
                predDirection=0,
                enableGlobalFlow=0,
                inputBufferFormat=_FORMAT_GRAY8,
            )
            self._check(self._functions["init"](handle, ctypes.byref(params)), "nvOFInit", handle)
            out_h, out_w = grid_shape(height, width, hardware_grid)
            session["grid"] = hardware_grid
            session["input"], session["input_view"] = self._buffer(
                session, width, height, _USAGE_INPUT, _FORMAT_GRAY8, "|u1", 1
            )
            session["reference"], session["reference_view"] = self._buffer(
                session, width, height, _USAGE_INPUT, _FORMAT_GRAY8, "|u1", 1
            )
            session["output"], session["output_view"] = self._buffer(
                session, out_w, out_h, _USAGE_OUTPUT, _FORMAT_SHORT2, "<i2", 2
            )
            session["cost"] = session["cost_view"] = None
            if self.output_cost:
                session["cost"], session["cost_view"] = self._buffer(
                    session, out_w, out_h, _USAGE_COST, _FORMAT_UINT8, "|u1", 1
                )
        except Exception:
            self._session = session
            self.close()
            raise
        self._session = session
        self._stream_handle = None
        self._hints_valid = False
        if self._lk is not None:
            self._lk.prepare(height, width)
        return session

    # -- FlowBackend --------------------------------------------------------------------------
    def _pinned(self, key: str, shape: tuple, dtype):
        """A page-locked host buffer kept across calls, so transfers run asynchronously at full speed."""
        buffer = self._host_buffers.get(key)
        if buffer is None or tuple(buffer.shape) != tuple(shape) or buffer.dtype != dtype:
            buffer = self._torch.empty(shape, dtype=dtype, pin_memory=True)
            self._host_buffers[key] = buffer
        return buffer

    def _to_gray(self, frame, key: str):
        """uint8 (H, W) on the GPU from a numpy array or torch tensor, gray or RGB."""
        torch = self._torch
        if isinstance(frame, np.ndarray):
            if frame.dtype != np.uint8:
                raise ValueError(f"nvof expects uint8 frames, got {frame.dtype}")
            staging = self._pinned(key, frame.shape, torch.uint8)
            staging.numpy()[...] = frame
            tensor = staging.to("cuda", non_blocking=True)
        elif isinstance(frame, torch.Tensor):
            tensor = frame.to("cuda", non_blocking=True)
        else:
            raise ValueError(f"nvof expects numpy arrays or torch tensors, got {type(frame).__name__}")
        if tensor.dtype != torch.uint8:
            raise ValueError(f"nvof expects uint8 frames, got {tensor.dtype}")
        if tensor.ndim == 3 and tensor.shape[2] == 3:
            tensor = (tensor.float() @ self._luma).round_().clamp_(0, 255).to(torch.uint8)
        elif tensor.ndim != 2:
            raise ValueError(f"nvof expects (H, W) or (H, W, 3) frames, got {tuple(tensor.shape)}")
        return tensor

    def _resize(self, gray, height: int, width: int):
        torch = self._torch
        if gray.shape == (height, width):
            return gray
        resized = torch.nn.functional.interpolate(gray[None, None].float(), size=(height, width), mode="area")
        return resized[0, 0].round_().clamp_(0, 255).to(torch.uint8)

    def compute(self, prev, cur) -> FlowResult:
        torch = self._torch
        start = time.perf_counter()
        prev_gray, cur_gray = self._to_gray(prev, "prev"), self._to_gray(cur, "cur")
        if prev_gray.shape != cur_gray.shape:
            raise ValueError(f"prev {tuple(prev_gray.shape)} and cur {tuple(cur_gray.shape)} differ in size")
        height, width = prev_gray.shape
        work_h, work_w = max(32, round(height * self.cfg.scale)), max(32, round(width * self.cfg.scale))
        session = self._session
        if session is None or session["size"] != (work_w, work_h):
            session = self._open(work_w, work_h)
        stream = torch.cuda.current_stream()
        if self._stream_handle != stream.cuda_stream:
            handle = _PTR(stream.cuda_stream)
            self._check(
                self._functions["set_streams"](session["handle"], handle, handle),
                "nvOFSetIOCudaStreams",
                session["handle"],
            )
            self._stream_handle = stream.cuda_stream
        session["input_view"].copy_(self._resize(prev_gray, work_h, work_w))
        session["reference_view"].copy_(self._resize(cur_gray, work_h, work_w))
        execute_in = _ExecuteInput(
            inputFrame=session["input"],
            referenceFrame=session["reference"],
            externalHints=None,
            disableTemporalHints=0 if self._hints_valid else 1,
        )
        execute_out = _ExecuteOutput(outputBuffer=session["output"], outputCostBuffer=session["cost"])
        self._start.record(stream)
        self._check(
            self._functions["execute"](session["handle"], ctypes.byref(execute_in), ctypes.byref(execute_out)),
            "nvOFExecute",
            session["handle"],
        )
        self._hints_valid = True
        flow, confidence = self._to_output_grid(session, height, width)
        self._end.record(stream)
        packed = torch.cat((flow.reshape(-1), confidence.reshape(-1)))
        host = self._pinned("result", packed.shape, torch.float32)
        host.copy_(packed, non_blocking=True)
        stream.synchronize()
        flow_host = host.numpy()[: flow.numel()].reshape(flow.shape).copy()
        confidence_host = host.numpy()[flow.numel() :].reshape(confidence.shape).copy()
        device_ms = self._start.elapsed_time(self._end)
        return FlowResult(
            flow=flow_host,
            confidence=confidence_host,
            backend=self.name,
            timing_ms=(time.perf_counter() - start) * 1e3,
            device_flow=flow,
            device_ms=device_ms,
        )

    def _to_output_grid(self, session: dict, height: int, width: int):
        """Engine output -> float32 (Hg, Wg, 2) flow and (Hg, Wg) confidence at the configured grid."""
        torch = self._torch
        work_w, work_h = session["size"]
        engine = s10_5_to_pixels(session["output_view"]).permute(2, 0, 1)[None]  # (1, 2, h/g, w/g)
        if self._lk is not None:
            # Block centres line up with bilinear upsampling at align_corners=False; the vectors are
            # already in working pixels, so they are not scaled.
            dense = torch.nn.functional.interpolate(
                engine, scale_factor=session["grid"], mode="bilinear", align_corners=False
            )[..., :work_h, :work_w]
            gray = torch.stack((session["input_view"], session["reference_view"]))[:, None].float() / 255.0
            field = self._lk.refine_from(gray, dense)
            field = to_output_grid(field, height, width, self.cfg.grid)[0]
            return field[:2].permute(1, 2, 0).contiguous(), field[2].contiguous()
        confidence = 1.0 - session["cost_view"].float() / 255.0
        field = torch.cat((engine, confidence[None, None]), dim=1)
        if (work_w, work_h) != (width, height) or session["grid"] != self.cfg.grid:
            # The engine's grid at the working size, resampled (bilinear) onto the requested grid of
            # the input; vectors scale with the resolution change.
            target = grid_shape(height, width, self.cfg.grid)
            field = torch.nn.functional.interpolate(field, size=target, mode="bilinear", align_corners=False)
            field[:, 0] *= width / work_w
            field[:, 1] *= height / work_h
        return field[0, :2].permute(1, 2, 0).contiguous(), field[0, 2].contiguous()

    def reset(self) -> None:
        """Forget the previous pair: the next execute uses no temporal hints."""
        self._hints_valid = False

    def close(self) -> None:
        """Release the API's buffers and handle (also done on size change and deletion)."""
        session, self._session = self._session, None
        if not session:
            return
        for buffer in session["buffers"]:
            self._functions["destroy_buffer"](buffer)
        if session["handle"].value:
            self._functions["destroy"](session["handle"])

    def __del__(self):
        # At interpreter shutdown the library may already be gone.
        with contextlib.suppress(Exception):
            self.close()
