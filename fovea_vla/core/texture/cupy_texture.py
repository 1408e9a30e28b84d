"""``cupy`` texture backend: the pyramid in CUDA arrays, sampled by the texture units' bilinear filter.

Storage. One 2D CUDA array per level, written by kernels through surface objects and read through
texture objects (linear filtering, clamp addressing, unnormalised coordinates):

- level 0 is ``uchar4`` (R, G, B, opaque alpha) read as normalised float: it holds the 8-bit input
  exactly, in a quarter of the bytes of a ``float4`` level, and the texture unit returns v / 255;
- levels >= 1 are ``float4``: a 2x2 average of 8-bit values needs 10 bits at level 1 and two more
  per level, so 8-bit mips would add up to 1/510 of error per level, while float32 mips stay within
  float32 rounding (~1e-7) of :func:`~fovea_vla.core.texture.reference.reference_pyramid`.

CUDA arrays rather than pitched linear buffers: their block-linear (tiled) layout keeps vertical
neighbours as close as horizontal ones, which the texture cache and the 2x2 reads of the filter and
of the box average rely on, and surface stores write them directly, with no device-to-device copy.

Transfers and kernels. ``upload`` copies the frame into a pinned host buffer (a ring of two reused
across frames), makes one host-to-device copy and converts RGB8 to level 0 in one kernel.
``upload_rects`` packs only the rectangles' pixels, together with the rectangle table, into such a
buffer with one ``np.take`` over runs of pixels (no per-rectangle Python loop): again one copy and
one kernel. ``rebuild_mips`` runs one kernel per level over all rectangles of that level (threads
index the concatenated rectangles and find their own by binary search over the start offsets); the
tables of all levels come from a few array ops on the (M, 4) rectangles. A full rebuild is the same
kernel with one whole-level rectangle per level, so every texel goes through identical arithmetic
and an incremental rebuild equals a full one bit for bit. Kernels launch through ``cuLaunchKernel``
with preallocated argument blocks and copies through ``cudaMemcpyAsync``, to keep host time per call
low (at 1080p on an H100 host, call + synchronize: upload_rects of 10% tiles 0.33 ms, incremental
rebuild 0.19 ms, 273 patches 0.06 ms).

Streams. Copies and kernels are queued on torch's current stream of the texture's device (CuPy
kernels through a CuPy view of that stream) and the patches are allocated by torch on that stream,
so the caller orders them like any torch op. The host never waits on the device, except:
refilling a pinned buffer waits for its previous copy (queued two calls earlier, normally long done),
a new frame size synchronises the stream before the old arrays are freed, and
:meth:`CupyTexture.download_level` (a read-back for tests and diagnostics).

Accuracy. Texture units interpolate with 8-bit fixed-point weights (CUDA C++ Programming Guide,
appendix "Texture Fetching": alpha and beta are stored in 9-bit fixed point with 8 fractional
bits). Each weight is off by less than 1/256, so a bilinear sample differs from the exact one by
less than 2/256 of the range of the 2x2 texels it mixes, whatever the storage format (a float4 copy
of level 0 gave the uchar4 level's errors to within 8e-6). Measured against the float64 reference
on an H100 (CuPy 14.2, torch 2.11+cu130): max |error| / local range 0.0064 (1.63/256); on uniform
noise max abs error 4.7e-3 and mean 1.4e-4 to 2.1e-4; on a 1024x436 Sintel frame max 1.9e-3 and
mean 4.2e-5. Levels match the reference to float32 rounding (level 0 exactly), and samples on
level-0 texel centres are exact.
"""

from __future__ import annotations

import ctypes
import itertools

import numpy as np

from fovea_vla.core import accel
from fovea_vla.core.registry import Availability
from fovea_vla.core.texture.base import TEXTURE_BACKENDS, TextureConfig, check_rects, level_sizes

__all__ = ["CupyTexture"]

_BLOCK = 256
_HOST_TO_DEVICE = 1  # cudaMemcpyHostToDevice
_FULL_COPY = "pinned"  # full uploads: "pinned" or "pageable" (see CupyTexture._write_frame)

_KERNELS = r"""
// Rectangle tables: (count, 4) int32 (x0, y0, x1, y1), half-open, then (count,) int32 starts: the
// number of texels in the rectangles before each one. Thread i handles the i-th texel of the
// concatenated rectangles, each row-major.
__device__ __forceinline__ bool locate(const int* table, int count, int total, int i, int& x, int& y) {
    if (i >= total) return false;
    const int* starts = table + 4 * count;
    int lo = 0, hi = count - 1;
    while (lo < hi) {  // last rectangle starting at or before i
        int mid = (lo + hi + 1) >> 1;
        if (starts[mid] <= i) lo = mid; else hi = mid - 1;
    }
    const int x0 = table[4 * lo], y0 = table[4 * lo + 1], w = table[4 * lo + 2] - x0;
    const int j = i - starts[lo];
    x = x0 + j % w;
    y = y0 + j / w;
    return true;
}

extern "C" __global__ void write_rgb8(const unsigned char* __restrict__ pixels, const int* __restrict__ table,
                                      int count, int total, cudaSurfaceObject_t level0) {
    int x, y;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (!locate(table, count, total, i, x, y)) return;
    const unsigned char* p = pixels + 3 * (size_t)i;
    surf2Dwrite(make_uchar4(p[0], p[1], p[2], 255), level0, x * 4, y);
}

// The same from a whole (H, width, 3) RGB8 frame already on the device (a GPU decoder's output).
extern "C" __global__ void write_rgb8_frame(const unsigned char* __restrict__ frame, int width,
                                            const int* __restrict__ table, int count, int total,
                                            cudaSurfaceObject_t level0) {
    int x, y;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (!locate(table, count, total, i, x, y)) return;
    const unsigned char* p = frame + 3 * ((size_t)y * width + x);
    surf2Dwrite(make_uchar4(p[0], p[1], p[2], 255), level0, x * 4, y);
}

// Level k from level k - 1 (src_w x src_h): 2x2 box average, the last row/column replicated on odd
// sizes, summed in the reference's order.
extern "C" __global__ void mip_from_rgb8(cudaSurfaceObject_t src, int src_w, int src_h, cudaSurfaceObject_t dst,
                                         const int* __restrict__ table, int count, int total) {
    int x, y;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (!locate(table, count, total, i, x, y)) return;
    const int xa = 2 * x, ya = 2 * y, xb = min(xa + 1, src_w - 1), yb = min(ya + 1, src_h - 1);
    const uchar4 a = surf2Dread<uchar4>(src, xa * 4, ya), b = surf2Dread<uchar4>(src, xa * 4, yb);
    const uchar4 c = surf2Dread<uchar4>(src, xb * 4, ya), d = surf2Dread<uchar4>(src, xb * 4, yb);
    // Integer sums are exact; one division gives the correctly rounded float.
    const float4 v = make_float4((a.x + b.x + c.x + d.x) / 1020.0f, (a.y + b.y + c.y + d.y) / 1020.0f,
                                 (a.z + b.z + c.z + d.z) / 1020.0f, 1.0f);
    surf2Dwrite(v, dst, x * 16, y);
}

extern "C" __global__ void mip_from_float(cudaSurfaceObject_t src, int src_w, int src_h, cudaSurfaceObject_t dst,
                                          const int* __restrict__ table, int count, int total) {
    int x, y;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (!locate(table, count, total, i, x, y)) return;
    const int xa = 2 * x, ya = 2 * y, xb = min(xa + 1, src_w - 1), yb = min(ya + 1, src_h - 1);
    const float4 a = surf2Dread<float4>(src, xa * 16, ya), b = surf2Dread<float4>(src, xa * 16, yb);
    const float4 c = surf2Dread<float4>(src, xb * 16, ya), d = surf2Dread<float4>(src, xb * 16, yb);
    const float4 v = make_float4(0.25f * (((a.x + b.x) + c.x) + d.x), 0.25f * (((a.y + b.y) + c.y) + d.y),
                                 0.25f * (((a.z + b.z) + c.z) + d.z), 1.0f);
    surf2Dwrite(v, dst, x * 16, y);
}

// One thread per output sample. params[n] = (x + 0.5 of column 0, y + 0.5 of row 0, sample step, lod)
// in full-resolution pixels; a full-resolution x is (x + 0.5) / 2**k in level k's unnormalised
// texture coordinates (texel centres at i + 0.5).
extern "C" __global__ void sample_patches(const unsigned long long* __restrict__ textures,
                                          const float4* __restrict__ params, int count, int patch, int top,
                                          float* __restrict__ out) {
    const int area = patch * patch;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= count * area) return;
    const int n = i / area, r = i - n * area, row = r / patch, col = r - row * patch;
    const float4 q = params[n];
    const float x = q.x + col * q.z, y = q.y + row * q.z;
    const int low = min((int)floorf(q.w), top);
    const int high = min(low + 1, top);
    const float t = q.w - (float)low;
    const float s_low = ldexpf(1.0f, -low), s_high = ldexpf(1.0f, -high);
    const float4 a = tex2D<float4>(textures[low], x * s_low, y * s_low);
    const float4 b = tex2D<float4>(textures[high], x * s_high, y * s_high);
    float* o = out + (size_t)n * 3 * area + r;
    o[0] = a.x * (1.0f - t) + b.x * t;
    o[area] = a.y * (1.0f - t) + b.y * t;
    o[2 * area] = a.z * (1.0f - t) + b.z * t;
}
"""


def _available() -> Availability:
    ok, why = accel.cupy()
    if not ok:
        return False, why
    ok, cuda_why = accel.cuda()
    if not ok:
        return False, f"{why}, but {cuda_why}"
    return True, f"{why} on {cuda_why}"


class _StreamHandle:
    """A raw ``cudaStream_t`` exposed through the CUDA stream protocol, for ``cupy.cuda.Stream.from_external``."""

    def __init__(self, ptr: int):
        self._ptr = ptr

    def __cuda_stream__(self) -> tuple[int, int]:
        return 0, self._ptr


def _level_rects(rects: np.ndarray, level: int, width: int, height: int) -> np.ndarray:
    """:func:`~fovea_vla.core.texture.base.level_rect` for many rectangles at once.

    Args:
        rects: (M, 4) int level-0 rectangles (x0, y0, x1, y1) [px], half-open.
        level: pyramid level k.
        width, height: level-0 size [px].

    Returns:
        (M, 4) int64 level-k rectangles, clipped to that level's size.

    Example:
        >>> _level_rects(np.array([[5, 0, 9, 3]]), 1, 10, 6).tolist()
        [[2, 0, 5, 2]]
    """
    scale = 1 << level
    rects = np.asarray(rects, dtype=np.int64).reshape(-1, 4)
    out = np.empty_like(rects)
    out[:, :2] = rects[:, :2] // scale
    out[:, 2] = np.minimum(-(-rects[:, 2] // scale), -(-width // scale))
    out[:, 3] = np.minimum(-(-rects[:, 3] // scale), -(-height // scale))
    return out


def _table(rects: np.ndarray) -> tuple[np.ndarray, int]:
    """The kernels' rectangle table: (5 M,) int32 (rectangles, then starts) and the texel total."""
    areas = (rects[:, 2] - rects[:, 0]) * (rects[:, 3] - rects[:, 1])
    total = int(areas.sum())
    if total >= 2**31:
        raise ValueError(f"rectangles cover {total} texels, more than the kernels' int32 index allows")
    starts = np.cumsum(areas) - areas
    return np.concatenate([rects.reshape(-1), starts]).astype(np.int32), total


def _mip_tables(rects: np.ndarray, sizes: list[tuple[int, int]], out: np.ndarray | None = None):
    """The rectangle tables of levels 1.. for level-0 ``rects``, all levels in one array op per step.

    Equals ``concatenate([_table(_level_rects(rects, k, *sizes[0]))[0] for k in 1..])``: level k's
    rectangle is [floor(x0 / 2**k), min(ceil(x1 / 2**k), w_k)) (shifts, as the coordinates are >= 0).

    Args:
        rects: (M, 4) int64 level-0 rectangles inside the frame, M >= 1.
        sizes: (width, height) of every level, level 0 first (:func:`level_sizes`).
        out: (5 M (L - 1),) int32 destination (a pinned buffer), or None for a new array.

    Returns:
        (the int32 tables, level after level, each 5 M long; list of each level's texel total).

    Raises:
        ValueError: a level's total does not fit the kernels' int32 index.
    """
    levels = len(sizes) - 1
    count = len(rects)
    shifts = np.arange(1, levels + 1, dtype=np.int64)[:, None, None]  # (L, 1, 1)
    lo = rects[None, :, :2] >> shifts  # (L, M, 2)
    hi = (rects[None, :, 2:] + ((1 << shifts) - 1)) >> shifts
    np.minimum(hi, np.asarray(sizes[1:], dtype=np.int64)[:, None, :], out=hi)
    extent = hi - lo
    areas = extent[..., 0] * extent[..., 1]  # (L, M)
    starts = np.cumsum(areas, axis=1)
    totals = starts[:, -1].tolist() if count else [0] * levels
    if levels and max(totals) >= 2**31:
        raise ValueError(f"rectangles cover {max(totals)} texels, more than the kernels' int32 index allows")
    starts -= areas
    if out is None:
        out = np.empty(5 * count * levels, dtype=np.int32)
    blocks = out.reshape(levels, 5 * count)
    corners = blocks[:, : 4 * count].reshape(levels, count, 4)
    corners[..., :2] = lo
    corners[..., 2:] = hi
    blocks[:, 4 * count :] = starts
    return out, totals


def _chunk_indices(rects: np.ndarray, chunk: int, row_chunks: int) -> np.ndarray:
    """Indices of the ``chunk``-pixel runs making up ``rects``, in packing order (rectangle by rectangle, row-major).

    The frame is seen as a (H, row_chunks) grid of runs of ``chunk`` pixels; every x0 and x1 of
    ``rects`` is a multiple of ``chunk``. Run j of rectangle row y starting at x0 has flat index
    ``y * row_chunks + x0 / chunk + j``.

    Example:
        >>> _chunk_indices(np.array([[2, 0, 6, 2], [0, 3, 2, 4]]), 2, 4).tolist()
        [1, 2, 5, 6, 12]
    """
    x0 = rects[:, 0] // chunk
    widths = (rects[:, 2] - rects[:, 0]) // chunk
    heights = rects[:, 3] - rects[:, 1]
    areas = widths * heights
    rect_start = np.cumsum(areas) - areas  # position of each rectangle's first run in the packing
    first_row = np.cumsum(heights) - heights  # index of each rectangle's first row among all rows
    rows = int(first_row[-1] + heights[-1])
    # Global row i = first_row + t of a rectangle: its first run (y0 + t) * row_chunks + x0 lands at
    # rect_start + t * width; their difference, affine in i, is the offset every run of the row adds.
    row_widths = np.repeat(widths, heights)
    offsets = np.repeat((rects[:, 1] - first_row) * row_chunks + x0 - rect_start + first_row * widths, heights)
    offsets += np.arange(rows, dtype=np.int64) * (row_chunks - row_widths)
    indices = np.repeat(offsets, row_widths)
    indices += np.arange(indices.size, dtype=np.int64)
    return indices


def _pack_rects(rgb: np.ndarray, rects: np.ndarray, out: np.ndarray) -> None:
    """Copy the pixels of ``rects`` of ``rgb``, each rectangle row-major, one after another into ``out``.

    One gather: the frame is viewed as runs of ``chunk`` pixels (the largest power of two dividing
    every rectangle edge and the frame width: 32 for 32-px tiles on a 1920-px frame) and ``np.take``
    copies whole runs, so a 10% tile mask moves ~6 k runs of 96 bytes with no Python loop.

    Args:
        rgb: (H, W, 3) uint8 frame.
        rects: (M, 4) int64 rectangles inside the frame, M >= 1.
        out: (3 * total,) uint8, total the rectangles' pixel count.
    """
    if not rgb.flags.c_contiguous:
        rgb = np.ascontiguousarray(rgb)
    width = rgb.shape[1]
    edges = int(np.bitwise_or.reduce(rects[:, ::2], axis=None)) | width
    chunk = edges & -edges  # the largest power of two dividing every x0, x1 and the width
    run = np.dtype((np.void, 3 * chunk))
    indices = _chunk_indices(rects, chunk, width // chunk)
    np.take(rgb.reshape(-1).view(run), indices, out=out.view(run), mode="clip")


class _Kernel:
    """A kernel launched straight through ``cuLaunchKernel``, its arguments in one reusable ctypes block.

    CuPy's ``Function.__call__`` converts every argument to a new pointer object per launch (~5-10 us
    for a handful of arguments); here the arguments' storage is allocated once and each launch only
    stores the values (the driver copies them at launch, so the block is free again on return).
    """

    def __init__(self, launch, function, arg_types: tuple):
        self._launch = launch
        self._function = function  # keeps its module loaded
        self._ptr = function.ptr
        self._args = [arg_type() for arg_type in arg_types]
        self._pointers = (ctypes.c_void_p * len(arg_types))(*(ctypes.addressof(arg) for arg in self._args))
        self._params = ctypes.addressof(self._pointers)

    def __call__(self, threads: int, stream: int, *values) -> None:
        for arg, value in zip(self._args, values, strict=True):
            arg.value = value
        self._launch(self._ptr, -(-threads // _BLOCK), 1, 1, _BLOCK, 1, 1, 0, stream, self._params, 0)


class _PinnedStaging:
    """Pinned host buffers (a ring of ``slots``) reused across calls, and their copies to the device.

    A buffer is refilled only after its previous copy has finished (an event recorded after that
    copy, two calls back, normally long done); the copy (one ``cudaMemcpyAsync``) lands in a fresh
    torch allocation on the given stream, which torch's caching allocator recycles in stream order.
    """

    def __init__(self, torch, memcpy_async, device, slots: int = 2):
        self._torch = torch
        self._memcpy_async = memcpy_async
        self._device = device
        self._buffers: list = [None] * slots
        self._views: list = [None] * slots
        self._events: list = [None] * slots
        self._slot = 0

    def host(self, nbytes: int) -> np.ndarray:
        """A writable (nbytes,) uint8 NumPy view of the next pinned buffer."""
        slot = self._slot
        if self._events[slot] is not None:
            self._events[slot].synchronize()
        if self._buffers[slot] is None or self._buffers[slot].numel() < nbytes:
            self._buffers[slot] = self._torch.empty(max(nbytes, 64), dtype=self._torch.uint8, pin_memory=True)
            self._views[slot] = self._buffers[slot].numpy()
        return self._views[slot][:nbytes]

    def to_device(self, nbytes: int, stream):
        """Queue the copy of that buffer's first ``nbytes`` on ``stream`` (torch); returns the device tensor."""
        torch = self._torch
        slot = self._slot
        self._slot = (slot + 1) % len(self._buffers)
        dev = torch.empty(nbytes, dtype=torch.uint8, device=self._device)
        self._memcpy_async(dev.data_ptr(), self._buffers[slot].data_ptr(), nbytes, _HOST_TO_DEVICE, stream.cuda_stream)
        if self._events[slot] is None:
            self._events[slot] = torch.cuda.Event()
        self._events[slot].record(stream)
        return dev


@TEXTURE_BACKENDS.register("cupy", is_available=_available)
class CupyTexture:
    """Mip pyramid in CUDA arrays (level 0 ``uchar4``, levels >= 1 ``float4``), sampled by the texture units.

    Args:
        cfg: texture configuration; ``device`` must resolve to CUDA, ``max_levels`` bounds the
            pyramid.

    Raises:
        ValueError: ``cfg.device`` is the CPU.
    """

    name = "cupy"
    # upload / upload_rects also take the frame as a CUDA tensor on this texture's device.
    accepts_device_frames = True

    def __init__(self, cfg: TextureConfig | None = None):
        import cupy
        import torch

        cfg = cfg or TextureConfig()
        device = cfg.resolved_device()
        if not device.startswith("cuda"):
            raise ValueError(f"texture.device={cfg.device!r}: the cupy backend runs on CUDA; use backend 'torch'")
        self._cp = cupy
        self._torch = torch
        self._runtime = cupy.cuda.runtime
        self._driver = cupy.cuda.driver
        requested = torch.device(device)
        self._index = requested.index if requested.index is not None else torch.cuda.current_device()
        self._torch_device = torch.device("cuda", self._index)
        self._cupy_device = cupy.cuda.Device(self._index)
        self.device = str(self._torch_device)
        self._max_levels = cfg.max_levels
        self.width = 0
        self.height = 0
        self._sizes: list[tuple[int, int]] = []
        self._arrays: list = []
        self._surfaces: list = []
        self._textures: list = []
        self._texture_table = None
        self._full_tables = None
        self._full_level0_table = None
        self._mip_steps: list = []
        self._stream = None
        self._stream_ptr = None
        # Full uploads: "pinned" copies the frame into a pinned buffer, then one async copy;
        # "pageable" copies straight from the caller's array (see _write_frame).
        self._full_copy = _FULL_COPY
        self._copy_threads = 1
        self._copy_pool = None
        memcpy_async = self._runtime.memcpyAsync
        self._frames = _PinnedStaging(torch, memcpy_async, self._torch_device)
        self._bytes = _PinnedStaging(torch, memcpy_async, self._torch_device)
        self._tables = _PinnedStaging(torch, memcpy_async, self._torch_device)
        self._params = _PinnedStaging(torch, memcpy_async, self._torch_device)
        with self._cupy_device:
            # Compile (or load from CuPy's cache) now, not on the first frame.
            module = cupy.RawModule(code=_KERNELS)
            launch = self._driver.launchKernel
            p, i, s = ctypes.c_void_p, ctypes.c_int32, ctypes.c_uint64
            self._write_rgb8 = _Kernel(launch, module.get_function("write_rgb8").kernel, (p, p, i, i, s))
            self._write_rgb8_frame = _Kernel(launch, module.get_function("write_rgb8_frame").kernel, (p, i, p, i, i, s))
            mip_args = (s, i, i, s, p, i, i)
            self._mip_from_rgb8 = _Kernel(launch, module.get_function("mip_from_rgb8").kernel, mip_args)
            self._mip_from_float = _Kernel(launch, module.get_function("mip_from_float").kernel, mip_args)
            self._sample_patches = _Kernel(launch, module.get_function("sample_patches").kernel, (p, p, i, i, i, p))
            self._module = module

    @property
    def num_levels(self) -> int:
        return len(self._sizes)

    def upload(self, rgb: np.ndarray) -> None:
        """Replace the texture with ``rgb`` and rebuild every mip level.

        Args:
            rgb: (H, W, 3) uint8 RGB frame: a NumPy array (one pinned host-to-device copy), or a
                C-contiguous torch tensor on this texture's device (read in place, written on
                torch's current stream: no copy). A new size reallocates the pyramid.

        Raises:
            ValueError: not an (H, W, 3) uint8 array or such a tensor.
        """
        on_device = self._check_frame(rgb, "upload")
        height, width = rgb.shape[:2]
        if (width, height) != (self.width, self.height):
            self._allocate(width, height)
        with self._cupy_device:
            stream = self._enter()
            if on_device:
                total = width * height
                self._write_rgb8_frame(
                    total,
                    stream.cuda_stream,
                    rgb.data_ptr(),
                    width,
                    self._full_level0_table.data_ptr(),
                    1,
                    total,
                    self._surfaces[0].ptr,
                )
            else:
                self._write_frame(rgb, stream)
            self._rebuild(None, stream)

    def upload_rects(self, rgb: np.ndarray, rects: np.ndarray) -> None:
        """Replace the given rectangles of level 0 with the same rectangles of ``rgb``.

        Only the rectangles' pixels cross to the device. Coarser levels are left as they were until
        :meth:`rebuild_mips`.

        Args:
            rgb: (H, W, 3) uint8 RGB frame of the size uploaded last, on the host or on this
                texture's device (as :meth:`upload`; then only the rectangle table is copied).
            rects: (M, 4) int rectangles (x0, y0, x1, y1) [px], half-open, inside the frame.

        Raises:
            RuntimeError: no full upload yet.
            ValueError: wrong frame type or size, or rectangles outside the frame.
        """
        if not self._sizes:
            raise RuntimeError("upload_rects() before upload()")
        on_device = self._check_frame(rgb, "upload_rects")
        if rgb.shape[:2] != (self.height, self.width):
            raise ValueError(
                f"upload_rects expects a {self.width}x{self.height} frame (the size uploaded last), "
                f"got {rgb.shape[1]}x{rgb.shape[0]}"
            )
        rects = self._checked_rects(rects)
        if not len(rects):
            return
        if on_device:
            self._write_device_rects(rgb, rects)
            return
        # One pinned buffer: the rectangle table (5 M int32), padded to 16 bytes, then the pixels.
        areas = (rects[:, 2] - rects[:, 0]) * (rects[:, 3] - rects[:, 1])
        starts = np.cumsum(areas)
        total = int(starts[-1])
        if total >= 2**31:
            raise ValueError(f"rectangles cover {total} texels, more than the kernels' int32 index allows")
        count = len(rects)
        pixel_offset = -(-20 * count // 16) * 16
        nbytes = pixel_offset + 3 * total
        with self._cupy_device:
            stream = self._enter()
            staged = self._bytes.host(nbytes)
            table = staged[: 20 * count].view(np.int32)
            table[: 4 * count].reshape(count, 4)[...] = rects
            np.subtract(starts, areas, out=table[4 * count :], casting="unsafe")
            _pack_rects(rgb, rects, staged[pixel_offset:])
            dev = self._bytes.to_device(nbytes, stream)
            base = dev.data_ptr()
            self._write_rgb8(total, stream.cuda_stream, base + pixel_offset, base, count, total, self._surfaces[0].ptr)

    def rebuild_mips(self, rects: np.ndarray | None = None) -> None:
        """Recompute levels 1.. from level 0: everywhere (None) or only over level-0 ``rects``.

        Args:
            rects: (M, 4) int level-0 rectangles (x0, y0, x1, y1) [px], half-open, or None.

        Raises:
            RuntimeError: no upload yet.
            ValueError: rectangles outside the frame.
        """
        if not self._sizes:
            raise RuntimeError("rebuild_mips() before upload()")
        if rects is not None:
            rects = self._checked_rects(rects)
            if not len(rects):
                return
        if self.num_levels == 1:
            return
        with self._cupy_device:
            self._rebuild(rects, self._enter())

    def synchronize(self) -> None:
        """Block until the device work queued so far on this texture's device is done (for timing)."""
        self._torch.cuda.synchronize(self._torch_device)

    def sample(self, centers: np.ndarray, sizes: np.ndarray, patch_size: int):
        """Sample square patches with trilinear filtering.

        Args:
            centers: (N, 2) float patch centres [px] (x, y) in the full-resolution image.
            sizes: (N,) float patch footprints [px]: the side of the image square each covers.
            patch_size: P, samples per side.

        Returns:
            torch.Tensor (N, 3, P, P) float32 in [0, 1] on this texture's CUDA device, written on
            torch's current stream.

        Raises:
            RuntimeError: no upload yet.
            ValueError: ``patch_size`` < 1 or ``centers``/``sizes`` of different lengths.
        """
        torch = self._torch
        if not self._sizes:
            raise RuntimeError("sample() before upload()")
        if patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}")
        centers = np.asarray(centers, dtype=np.float64).reshape(-1, 2)
        sizes = np.asarray(sizes, dtype=np.float64).reshape(-1)
        count = centers.shape[0]
        if sizes.shape[0] != count:
            raise ValueError(f"sample expects one size per centre, got {count} centres and {sizes.shape[0]} sizes")
        out = torch.empty((count, 3, patch_size, patch_size), dtype=torch.float32, device=self._torch_device)
        if count == 0:
            return out
        top = self.num_levels - 1
        with self._cupy_device:
            stream = self._enter()
            params = self._params.host(16 * count).view(np.float32).reshape(count, 4)
            # Sample (row, col) sits at centre + ((index + 0.5) / P - 0.5) * size; +0.5 moves to texture
            # coordinates. Evaluated in float64 as (centre + 0.5) + offset, then rounded once to float32.
            corner = centers + 0.5
            corner += ((0.5 / patch_size - 0.5) * sizes)[:, None]
            params[:, :2] = corner
            params[:, 2] = sizes / patch_size
            params[:, 3] = np.clip(np.log2(np.maximum(sizes, 1e-6) / patch_size), 0.0, top)
            params_dev = self._params.to_device(16 * count, stream)
            self._sample_patches(
                count * patch_size * patch_size,
                stream.cuda_stream,
                self._texture_table.data_ptr(),
                params_dev.data_ptr(),
                count,
                patch_size,
                top,
                out.data_ptr(),
            )
        return out

    def download_level(self, level: int) -> np.ndarray:
        """Copy one pyramid level back to the host (tests and diagnostics; waits for the device).

        Args:
            level: pyramid level k in [0, num_levels).

        Returns:
            Level 0 as (H, W, 3) uint8; level k >= 1 as (H_k, W_k, 3) float32 in [0, 1].
        """
        cp = self._cp
        width, height = self._sizes[level]
        dtype = np.uint8 if level == 0 else np.float32
        with cp.cuda.Device(self._index):
            stream = self._cupy_stream()
            with stream:
                buffer = cp.empty((height, 4 * width), dtype=dtype)
                self._arrays[level].copy_to(buffer, stream)
                host = buffer.get(stream=stream)  # blocking
        return host.reshape(height, width, 4)[..., :3].copy()

    def _check_frame(self, rgb, what: str) -> bool:
        """Refuses anything but an (H, W, 3) uint8 array or such a tensor here; returns whether it is on the device."""
        if isinstance(rgb, self._torch.Tensor):
            if (
                rgb.ndim == 3
                and rgb.shape[2] == 3
                and rgb.dtype == self._torch.uint8
                and rgb.is_contiguous()
                and rgb.device == self._torch_device
            ):
                return True
            got = f"tensor {tuple(rgb.shape)} {rgb.dtype} on {rgb.device}"
        elif isinstance(rgb, np.ndarray) and rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.dtype == np.uint8:
            return False
        else:
            got = f"{rgb.shape} {rgb.dtype}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
        raise ValueError(
            f"{what} expects an (H, W, 3) uint8 RGB frame (NumPy, or a contiguous tensor on {self.device}), got {got}"
        )

    def _write_device_rects(self, frame, rects: np.ndarray) -> None:
        """Level-0 rectangles from a frame on the device: only the rectangle table crosses (one copy, one kernel)."""
        table, total = _table(rects)
        with self._cupy_device:
            stream = self._enter()
            self._tables.host(table.nbytes).view(np.int32)[...] = table
            dev = self._tables.to_device(table.nbytes, stream)
            self._write_rgb8_frame(
                total,
                stream.cuda_stream,
                frame.data_ptr(),
                self.width,
                dev.data_ptr(),
                len(rects),
                total,
                self._surfaces[0].ptr,
            )

    def _checked_rects(self, rects) -> np.ndarray:
        """``rects`` as (M, 4) int64: a few reductions for the usual valid table, else ``check_rects`` (raises)."""
        array = np.asarray(rects)
        if array.ndim == 2 and array.shape[1] == 4 and array.shape[0] and array.dtype.kind in "iu":
            array = array.astype(np.int64, copy=False)
            lo, hi = array[:, :2], array[:, 2:]
            if lo.min() >= 0 and (hi - lo).min() > 0 and hi[:, 0].max() <= self.width and hi[:, 1].max() <= self.height:
                return array
        return check_rects(rects, self.width, self.height)

    def _enter(self):
        """torch's current stream on this device, after making sure this thread has a current CUDA context.

        Call inside ``with self._cupy_device``. Kernels launch through the driver API, which, unlike
        the runtime API, does not create the context a fresh thread lacks.
        """
        if not self._driver.ctxGetCurrent():
            self._runtime.setDevice(self._index)  # initialises the primary context (CUDA >= 12)
        return self._torch.cuda.current_stream(self._torch_device)

    def _cupy_stream(self):
        """torch's current stream on this device, as a CuPy stream (cached while it stays the same)."""
        ptr = self._torch.cuda.current_stream(self._torch_device).cuda_stream
        if ptr != self._stream_ptr:
            stream_class = self._cp.cuda.Stream
            if hasattr(stream_class, "from_external"):
                self._stream = stream_class.from_external(_StreamHandle(ptr))
            else:  # CuPy < 14, where ExternalStream is not yet deprecated
                self._stream = self._cp.cuda.ExternalStream(ptr)
            self._stream_ptr = ptr
        return self._stream

    def _write_frame(self, rgb: np.ndarray, stream) -> None:
        """Copy the whole frame to the device and convert it into level 0 (one copy, one kernel)."""
        height, width = rgb.shape[:2]
        nbytes = 3 * width * height
        # Pinned by default. Measured on an H100 host at 1080p (tools/probe_cupy_texture.py): a pageable
        # cudaMemcpyAsync straight from ``rgb`` gave 0.72 ms call + synchronize on an idle stream against
        # 0.82 ms for np.copyto into pinned memory (0.60 ms) + async copy, but the driver returns only
        # once the copy has run, so behind 10 ms of queued GPU work the call blocked for 11.2 ms (pinned:
        # 1.4 ms, never waiting for the GPU), and its GPU time was 1.10 ms against 0.17 ms. Two copy
        # threads saved ~0.09 ms, four cost 0.17 ms more, so one thread (``_copy_threads``) is the default.
        if self._full_copy == "pageable" and rgb.flags.c_contiguous:
            # Straight from the caller's (pageable) array: the driver stages it through its own
            # pinned buffers and returns once the data has left the array, i.e. after the copy has
            # run on the stream, so the host waits for all work queued ahead of it.
            dev = self._torch.empty(nbytes, dtype=self._torch.uint8, device=self._torch_device)
            self._runtime.memcpyAsync(dev.data_ptr(), rgb.ctypes.data, nbytes, _HOST_TO_DEVICE, stream.cuda_stream)
        else:
            self._copy_rows(self._frames.host(nbytes).reshape(height, width, 3), rgb)
            dev = self._frames.to_device(nbytes, stream)
        total = width * height
        table = self._full_level0_table.data_ptr()
        self._write_rgb8(total, stream.cuda_stream, dev.data_ptr(), table, 1, total, self._surfaces[0].ptr)

    def _copy_rows(self, dst: np.ndarray, src: np.ndarray) -> None:
        """``dst[...] = src``, split into row bands over ``_copy_threads`` threads (NumPy copies without the GIL)."""
        threads = self._copy_threads
        if threads <= 1 or src.shape[0] < 2 * threads:
            np.copyto(dst, src)
            return
        if self._copy_pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._copy_pool = ThreadPoolExecutor(threads - 1, thread_name_prefix="cupy-texture-copy")
        bounds = [src.shape[0] * t // threads for t in range(threads + 1)]
        futures = [self._copy_pool.submit(np.copyto, dst[a:b], src[a:b]) for a, b in itertools.pairwise(bounds[1:])]
        np.copyto(dst[: bounds[1]], src[: bounds[1]])
        for future in futures:
            future.result()

    def _rebuild(self, rects: np.ndarray | None, stream) -> None:
        """Queue levels 1.. over level-0 ``rects`` (None: everywhere) on ``stream``, one kernel per level."""
        if self.num_levels == 1:
            return
        if rects is None:
            tables, count, totals = self._full_tables
            table_ptr = tables.data_ptr()
        else:
            count = len(rects)
            nbytes = 20 * count * (self.num_levels - 1)
            _, totals = _mip_tables(rects, self._sizes, self._tables.host(nbytes).view(np.int32))
            table_ptr = self._tables.to_device(nbytes, stream).data_ptr()
        stream_ptr = stream.cuda_stream
        for (kernel, src, src_w, src_h, dst), total in zip(self._mip_steps, totals, strict=True):
            kernel(total, stream_ptr, src, src_w, src_h, dst, table_ptr, count, total)
            table_ptr += 20 * count

    def _allocate(self, width: int, height: int) -> None:
        """(Re)create the level arrays, their surface and texture objects, and the full-rebuild tables."""
        cp = self._cp
        torch = self._torch
        runtime = cp.cuda.runtime
        texture = cp.cuda.texture
        if self._arrays:
            # Kernels queued on the old arrays must finish before they are freed.
            torch.cuda.current_stream(self._torch_device).synchronize()
        sizes = level_sizes(width, height, self._max_levels)
        arrays, surfaces, textures = [], [], []
        with self._cupy_device:
            for k, (w, h) in enumerate(sizes):
                if k == 0:
                    channels = texture.ChannelFormatDescriptor(8, 8, 8, 8, runtime.cudaChannelFormatKindUnsigned)
                    read_mode = runtime.cudaReadModeNormalizedFloat
                else:
                    channels = texture.ChannelFormatDescriptor(32, 32, 32, 32, runtime.cudaChannelFormatKindFloat)
                    read_mode = runtime.cudaReadModeElementType
                array = texture.CUDAarray(channels, w, h, 0, runtime.cudaArraySurfaceLoadStore)
                resource = texture.ResourceDescriptor(runtime.cudaResourceTypeArray, cuArr=array)
                sampler = texture.TextureDescriptor(
                    (runtime.cudaAddressModeClamp, runtime.cudaAddressModeClamp),
                    runtime.cudaFilterModeLinear,
                    read_mode,
                    normalizedCoords=0,
                )
                arrays.append(array)
                surfaces.append(texture.SurfaceObject(resource))
                textures.append(texture.TextureObject(resource, sampler))
        handles = np.array([t.ptr for t in textures], dtype=np.uint64).view(np.int64)
        self._arrays, self._surfaces, self._textures = arrays, surfaces, textures
        self._sizes = sizes
        self.width, self.height = width, height
        self._texture_table = torch.from_numpy(handles).to(self._torch_device)
        whole = np.array([[0, 0, width, height]], dtype=np.int64)
        self._full_level0_table = torch.from_numpy(_table(whole)[0]).to(self._torch_device)
        if len(sizes) > 1:
            flat, totals = _mip_tables(whole, sizes)
            self._full_tables = torch.from_numpy(flat).to(self._torch_device), 1, totals
        self._mip_steps = [
            (
                self._mip_from_rgb8 if k == 1 else self._mip_from_float,
                surfaces[k - 1].ptr,
                sizes[k - 1][0],
                sizes[k - 1][1],
                surfaces[k].ptr,
            )
            for k in range(1, len(sizes))
        ]
