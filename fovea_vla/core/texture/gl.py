"""``gl`` texture backend: an OpenGL 4.5 mip pyramid on a headless EGL context, sampled by a
compute shader into a buffer that CUDA maps and torch views without a copy.

Pipeline per frame (all GPU work in one GL context, no host read-back):

1. ``upload`` / ``upload_rects``: numpy writes the frame's RGB8 bytes (whole, or the rectangles
   packed one after another) into a persistently mapped staging buffer; an *unpack* compute pass
   reads them and writes level 0 of the texture (``imageStore``). Only the 3 bytes per pixel cross
   PCIe; the RGB -> RGBA expansion and the conversion to the texel format run on the GPU.
   (For a 1080p frame on an H100 host, ``glTextureSubImage2D`` of RGB8 data, converted by the
   driver on the CPU, took about 7 ms into RGBA8 and 17 ms into RGBA32F; ``glNamedBufferSubData``
   into a staging buffer plus the unpack 2.1 ms wall; the mapped buffer plus the unpack 1.0 ms.)
2. ``rebuild_mips``: a *downsample* pass per level reads level k-1 (``imageLoad``) and writes
   level k over a list of rectangles (the whole level, or the level-k footprints of the dirty
   level-0 rectangles, :func:`~fovea_vla.core.texture.base.level_rect`): one dispatch per level
   covers all rectangles of that level. Full and incremental rebuilds run the same arithmetic, so
   they agree bit for bit.
3. ``sample``: a *sample* pass computes every (patch, row, column) sample with ``texelFetch`` and
   fp32 bilinear and level blending, writing an ``(N, 3, P, P)`` float32 shader-storage buffer.
   That buffer is registered with CUDA once; :class:`GlTexture` maps it after the dispatch and
   returns a torch view of the mapped memory.

Edge convention: GL's immutable storage gives level k the size ``floor(W0 / 2**k)`` while the
texture stage's levels are ``ceil(W / 2**k)`` with edge replication. Level 0 is therefore
*allocated* padded to a multiple of ``2**(L-1)`` (L = levels held) so that every GL level is at
least as large as ours, but the padding is never read: the downsample pass clamps its 2x2 source
texels to level k-1's own size (edge replication), and the sample pass clamps texel indices to
level k's own size, which equals clamping coordinates as the reference does. Filling the padding
by edge replication and letting ``glGenerateMipmap`` + clamp-to-edge filtering do the rest is
*not* exact: box-filtering a padded level averages real texels with replicated ones, so level k
differs from the convention at its last row/column whenever some level above it has an odd size
(1080 rows: levels 4..7). ``glGenerateMipmap`` is not used for that reason.

Filtering is done in the shader rather than by the texture unit: texture units quantise filter
weights (8 fractional bits on NVIDIA). On an rgba32f pyramid, hardware trilinear ``textureLod``
was off the float64 reference by up to 4.6e-3 on an H100 (2e-5 on llvmpipe), the shader by 5.5e-7
(``test_texture_unit_filtering_is_less_accurate_than_the_shader``). Sample coordinates are split
into an integer texel and a fraction on the host so that fp32 keeps its precision far from the
origin; footprint-to-level mapping (``lod``) is computed in float64 as the reference does.

Texel formats (``texel_format``). Bounds hold per level k (a sample is a convex combination of
texels, so the top level's bound covers it); measured = max |sample - reference| over random
frames on an H100 and on llvmpipe (the same to two digits):

=======  ===========  ===========================================  ========
format   bytes/texel  bound at level k                             measured
=======  ===========  ===========================================  ========
rgba32f  16           1e-5 (fp32 rounding; the default)            8e-7
rgba16f  8            (k + 1) * 2**-11 (one fp16 ulp per level)    1.4e-3
rgba8    4            k / 255 (level 0 exact, one rounding above)  6.9e-3
=======  ===========  ===========================================  ========

Both drivers truncate when storing fp16 (level 0 of rgba16f is off by up to one ulp, 4.9e-4).

At 1080p on an H100 the formats cost the same (GPU time: unpack 0.14 ms, full mip rebuild 0.04 to
0.06 ms, 273 patches of 16x16 0.01 ms); rgba32f is the default for exactness, rgba16f / rgba8
halve / quarter the memory (47 MB for rgba32f at 1080p with 8 levels) where that matters.

CUDA hand-over (documented contract of ``cudaGraphicsMapResources``): GL work issued before the
map completes before later CUDA work in the mapping stream, and GL must not touch the buffer while
it is mapped. :meth:`GlTexture.sample` therefore unmaps the previous frame's mapping (ordering the
consumer's CUDA work on that stream before the next GL write), dispatches, and maps again in
torch's current stream: never outside the contract. The returned tensor is a view of the mapped
buffer (no copy), valid until the next ``sample()`` or ``close()``; work on other streams must
synchronise with the current one first. The hand-over costs ~0.33 ms of latency on the CUDA
stream per frame (0.02 ms of CPU) on an H100, mapped per frame or persistently alike (see the
GL-CUDA probe); the GL dispatch itself is 0.01 ms.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from functools import lru_cache

import numpy as np

from fovea_vla.core.registry import Availability
from fovea_vla.core.texture.base import TEXTURE_BACKENDS, TextureConfig, check_rects, level_sizes

__all__ = ["TEXEL_FORMATS", "GlPyramid", "GlTexture"]

# texel_format -> (GL internal format name, GLSL image format qualifier).
TEXEL_FORMATS = {
    "rgba32f": ("GL_RGBA32F", "rgba32f"),
    "rgba16f": ("GL_RGBA16F", "rgba16f"),
    "rgba8": ("GL_RGBA8", "rgba8"),
}

_LOCAL_SIZE = 256
# Centres and footprints are clipped to +-2**24 px: int32 texel arithmetic stays exact, and any
# sample that far out lands on the border texel either way.
_COORD_LIMIT = float(2**24)
_EGL_CUDA_DEVICE_NV = 0x323A  # EGL_NV_device_cuda
_EGL_PLATFORM_DEVICE_EXT = 0x313F  # EGL_EXT_platform_device
_UNIFORMS = ("segment", "rect_count", "patch_size", "sample_count", "level_size")

_COMMON = """#version 450
layout(local_size_x = 256) in;

// Work item index of a 2D dispatch (2D only when one dimension would exceed the group limit).
uint linear_id() { return gl_GlobalInvocationID.y * gl_NumWorkGroups.x * 256u + gl_GlobalInvocationID.x; }
"""

_RECTS = """
// Rectangle tables, one segment per level written: boxes[segment * rect_count + r] =
// (x0, y0, x1, y1) and starts[segment * (rect_count + 1) + r] = texels of rectangles 0..r-1.
layout(std430, binding = 0) readonly buffer Starts { uint starts[]; };
layout(std430, binding = 1) readonly buffer Boxes { ivec4 boxes[]; };
uniform int segment;
uniform int rect_count;

uint start_at(int r) { return starts[segment * (rect_count + 1) + r]; }

uint total_work() { return start_at(rect_count); }

// The texel of work item g: binary search for the last rectangle starting at or before g.
ivec2 rect_texel(uint g) {
    int lo = 0;
    int hi = rect_count - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) >> 1;
        if (start_at(mid) <= g) lo = mid; else hi = mid - 1;
    }
    ivec4 b = boxes[segment * rect_count + lo];
    uint i = g - start_at(lo);
    uint w = uint(b.z - b.x);
    return ivec2(b.x + int(i % w), b.y + int(i / w));
}
"""

_UNPACK = (
    _COMMON
    + _RECTS
    + """
layout(binding = 0, FORMAT) uniform writeonly image2D level0;
// RGB8 bytes of the rectangles, one after another, each row-major: texel g's bytes start at 3 g.
layout(std430, binding = 2) readonly buffer Pixels { uint pixel_words[]; };

float byte_at(uint o) { return float((pixel_words[o >> 2] >> ((o & 3u) * 8u)) & 0xFFu); }

void main() {
    uint g = linear_id();
    if (g >= total_work()) return;
    uint o = 3u * g;
    imageStore(level0, rect_texel(g), vec4(byte_at(o), byte_at(o + 1u), byte_at(o + 2u), 255.0) / 255.0);
}
"""
)

_DOWNSAMPLE = (
    _COMMON
    + _RECTS
    + """
layout(binding = 0, FORMAT) uniform writeonly image2D dst;  // level k = segment + 1
layout(binding = 1, FORMAT) uniform readonly image2D src;   // level k-1
uniform ivec2 level_size[16];  // sizes under the edge-replication convention (not GL's)

void main() {
    uint g = linear_id();
    if (g >= total_work()) return;
    ivec2 p = rect_texel(g);
    ivec2 a = 2 * p;
    ivec2 b = min(a + 1, level_size[segment] - 1);  // odd sizes: the last texel stands in for the missing one
    vec4 s = imageLoad(src, a) + imageLoad(src, ivec2(a.x, b.y)) + imageLoad(src, ivec2(b.x, a.y)) + imageLoad(src, b);
    imageStore(dst, p, 0.25 * s);
}
"""
)

_SAMPLE = (
    _COMMON
    + """
layout(binding = 0) uniform sampler2D pyramid;  // texelFetch only: filtering is done below in fp32
// Per patch: i = (floor(cx), floor(cy), lower level, upper level),
//            f = (cx - floor(cx), cy - floor(cy), footprint [px], upper-level weight).
struct Patch { ivec4 i; vec4 f; };
layout(std430, binding = 0) readonly buffer Patches { Patch patches[]; };
layout(std430, binding = 1) writeonly buffer Samples { float samples[]; };  // (N, 3, P, P)
uniform int patch_size;
uniform uint sample_count;
uniform ivec2 level_size[16];  // sizes under the edge-replication convention

// Bilinear sample of level k at full-resolution x = base + t - 0.5 (t carries the fraction).
// Level-k texel coordinate (x + 0.5) / 2^k - 0.5 = q + (r + t) / 2^k - 0.5 with base = q 2^k + r,
// so the large integer part never meets fp32 rounding.
vec3 bilinear(int k, ivec2 base, vec2 t) {
    ivec2 q = base >> k;  // arithmetic shift: floor division, also for negative base
    vec2 u = (vec2(base - (q << k)) + t) / float(1 << k) - 0.5;
    vec2 fu = floor(u);
    vec2 w = u - fu;
    ivec2 last = level_size[k] - 1;
    // Clamping the two texel indices equals clamping the coordinate to [0, size - 1].
    ivec2 i0 = clamp(q + ivec2(fu), ivec2(0), last);
    ivec2 i1 = clamp(q + ivec2(fu) + 1, ivec2(0), last);
    vec3 top = mix(texelFetch(pyramid, i0, k).rgb, texelFetch(pyramid, ivec2(i1.x, i0.y), k).rgb, w.x);
    vec3 bottom = mix(texelFetch(pyramid, ivec2(i0.x, i1.y), k).rgb, texelFetch(pyramid, i1, k).rgb, w.x);
    return mix(top, bottom, w.y);
}

void main() {
    uint s = linear_id();
    if (s >= sample_count) return;
    uint pp = uint(patch_size * patch_size);
    uint n = s / pp;
    uint r = s % pp;
    Patch pa = patches[n];
    vec2 offset = (vec2(float(r % uint(patch_size)), float(r / uint(patch_size))) + 0.5) / float(patch_size) - 0.5;
    vec2 t = pa.f.xy + 0.5 + offset * pa.f.z;
    vec3 v = mix(bilinear(pa.i.z, pa.i.xy, t), bilinear(pa.i.w, pa.i.xy, t), pa.f.w);
    uint o = n * 3u * pp + r;
    samples[o] = v.r;
    samples[o + pp] = v.g;
    samples[o + 2u * pp] = v.b;
}
"""
)


@lru_cache(maxsize=1)
def _gl_modules():
    """PyOpenGL's EGL and GL modules, on the EGL platform (chosen when OpenGL is first imported).

    Raises:
        ImportError: PyOpenGL missing. RuntimeError: PyOpenGL already loaded for another platform.
    """
    os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
    from OpenGL import platform

    if "EGL" not in type(platform.PLATFORM).__name__:
        raise RuntimeError(
            f"PyOpenGL runs on {type(platform.PLATFORM).__name__} (PYOPENGL_PLATFORM="
            f"{os.environ.get('PYOPENGL_PLATFORM')!r}); the gl texture backend needs 'egl'"
        )
    from OpenGL import EGL, GL

    return EGL, GL


def _cudart():
    """cuda-python's runtime bindings (module path of cuda-bindings >= 12.6, then the older one)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        from cuda import cudart as runtime
    return runtime


def _cuda(cudart, function: str, *args):
    """Call a cuda-python runtime function and unpack its ``(err, *values)`` result.

    Raises:
        RuntimeError: the call returned an error code.
    """
    err, *values = getattr(cudart, function)(*args)
    if int(err) != 0:
        raise RuntimeError(f"{function} failed: {cudart.cudaGetErrorName(err)[1].decode()}")
    return values[0] if len(values) == 1 else tuple(values)


@lru_cache(maxsize=1)
def _egl_device_functions():
    """``eglQueryDevicesEXT``, ``eglQueryDeviceStringEXT``, ``eglQueryDeviceAttribEXT`` and
    ``eglGetPlatformDisplayEXT`` through ``eglGetProcAddress``, or None where the driver lacks them.

    Called through ctypes rather than PyOpenGL's extension wrappers, which check EGL extensions
    against the *GL* context current at the time and so fail once any context is current.
    """
    from OpenGL import platform

    get_proc = platform.PLATFORM.EGL.eglGetProcAddress
    get_proc.restype, get_proc.argtypes = ctypes.c_void_p, [ctypes.c_char_p]
    prototypes = (
        (b"eglQueryDevicesEXT", ctypes.c_uint, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p),
        (b"eglQueryDeviceStringEXT", ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int),
        (b"eglQueryDeviceAttribEXT", ctypes.c_uint, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p),
        (b"eglGetPlatformDisplayEXT", ctypes.c_void_p, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p),
    )
    functions = []
    for name, restype, *argtypes in prototypes:
        address = get_proc(name)
        if not address:
            return None
        functions.append(ctypes.CFUNCTYPE(restype, *argtypes)(address))
    return tuple(functions)


def _address(handle) -> int | None:
    """Integer value of an EGL handle (PyOpenGL returns opaque pointer objects)."""
    return ctypes.cast(handle, ctypes.c_void_p).value


class _EglContext:
    """A surfaceless OpenGL 4.5 core context on an EGL display, made current on this thread.

    Args:
        cuda_device: CUDA device ordinal the context should run on: the EGL device reporting that
            ordinal (``EGL_NV_device_cuda``) when the driver enumerates one, else the default
            display (the caller checks the interop device). None = the first EGL device.

    Raises:
        RuntimeError: no display, no GL 4.5 core context, or it cannot be made current.
    """

    def __init__(self, cuda_device: int | None = None):
        egl, gl = _gl_modules()
        self._egl = egl
        self.context = None
        self.display = self._display(cuda_device)
        major, minor = egl.EGLint(), egl.EGLint()
        try:
            egl.eglInitialize(self.display, ctypes.pointer(major), ctypes.pointer(minor))
            egl.eglBindAPI(egl.EGL_OPENGL_API)
            config, count = egl.EGLConfig(), egl.EGLint()
            attrs = [
                egl.EGL_SURFACE_TYPE,
                egl.EGL_PBUFFER_BIT,
                egl.EGL_RENDERABLE_TYPE,
                egl.EGL_OPENGL_BIT,
                egl.EGL_NONE,
            ]
            egl.eglChooseConfig(
                self.display, (egl.EGLint * len(attrs))(*attrs), ctypes.pointer(config), 1, ctypes.pointer(count)
            )
            if not count.value:
                raise RuntimeError("no EGL config with OpenGL and pbuffer support")
            attrs = [
                egl.EGL_CONTEXT_MAJOR_VERSION, 4,
                egl.EGL_CONTEXT_MINOR_VERSION, 5,
                egl.EGL_CONTEXT_OPENGL_PROFILE_MASK, egl.EGL_CONTEXT_OPENGL_CORE_PROFILE_BIT,
                egl.EGL_NONE,
            ]  # fmt: skip
            context = egl.eglCreateContext(self.display, config, egl.EGL_NO_CONTEXT, (egl.EGLint * len(attrs))(*attrs))
            if not _address(context):
                raise RuntimeError(f"eglCreateContext(OpenGL 4.5 core) failed: 0x{egl.eglGetError():x}")
            self.context = context
            self.make_current()
        except egl.EGLError as exc:  # PyOpenGL raises on EGL_FALSE results
            self.release()
            raise RuntimeError(f"EGL: {getattr(exc.baseOperation, '__name__', '?')} failed with {exc.err!r}") from exc
        self.version = gl.glGetString(gl.GL_VERSION).decode()
        self.renderer = gl.glGetString(gl.GL_RENDERER).decode()

    def _display(self, cuda_device: int | None):
        """The EGL display to use: a device display where the driver enumerates devices (no window
        system needed), else the default display."""
        egl = self._egl
        functions = _egl_device_functions()
        if functions is not None:
            query_devices, query_string, query_attrib, platform_display = functions
            devices, count = (ctypes.c_void_p * 16)(), ctypes.c_int()
            if not query_devices(16, devices, ctypes.byref(count)):
                count.value = 0
            for device in devices[: count.value]:
                if cuda_device is not None:
                    if b"EGL_NV_device_cuda" not in (query_string(device, egl.EGL_EXTENSIONS) or b""):
                        continue
                    ordinal = ctypes.c_ssize_t()
                    if (
                        not query_attrib(device, _EGL_CUDA_DEVICE_NV, ctypes.byref(ordinal))
                        or ordinal.value != cuda_device
                    ):
                        continue
                display = platform_display(_EGL_PLATFORM_DEVICE_EXT, device, None)
                if display:
                    return ctypes.cast(display, egl.EGLDisplay)
        return egl.eglGetDisplay(egl.EGL_DEFAULT_DISPLAY)

    def make_current(self) -> None:
        """Make the context current on the calling thread (another GL user may have switched it)."""
        egl = self._egl
        if _address(egl.eglGetCurrentContext()) != _address(self.context):
            egl.eglMakeCurrent(self.display, egl.EGL_NO_SURFACE, egl.EGL_NO_SURFACE, self.context)

    def release(self) -> None:
        """Destroy the context. The display stays initialised: it is shared by every EGL user of
        the process, and ``eglTerminate`` would invalidate their contexts too."""
        egl = self._egl
        if self.context is None:
            return
        if _address(egl.eglGetCurrentContext()) == _address(self.context):
            egl.eglMakeCurrent(self.display, egl.EGL_NO_SURFACE, egl.EGL_NO_SURFACE, egl.EGL_NO_CONTEXT)
        egl.eglDestroyContext(self.display, self.context)
        self.context = None


def _compile(gl, source: str, label: str) -> int:
    """Compile and link one compute shader; RuntimeError with the driver's log on failure."""
    shader = gl.glCreateShader(gl.GL_COMPUTE_SHADER)
    gl.glShaderSource(shader, source)
    gl.glCompileShader(shader)
    if not gl.glGetShaderiv(shader, gl.GL_COMPILE_STATUS):
        log = gl.glGetShaderInfoLog(shader)
        gl.glDeleteShader(shader)
        raise RuntimeError(f"{label} shader does not compile: {log.decode(errors='replace')}")
    program = gl.glCreateProgram()
    gl.glAttachShader(program, shader)
    gl.glLinkProgram(program)
    gl.glDeleteShader(shader)  # flagged; freed with the program
    if not gl.glGetProgramiv(program, gl.GL_LINK_STATUS):
        log = gl.glGetProgramInfoLog(program)
        gl.glDeleteProgram(program)
        raise RuntimeError(f"{label} program does not link: {log.decode(errors='replace')}")
    return int(program)


class _Buffer:
    """A shader-storage buffer that grows (never shrinks) to the largest size written."""

    def __init__(self, gl):
        self._gl = gl
        names = np.zeros(1, np.uint32)
        gl.glCreateBuffers(1, names)
        self.name = int(names[0])
        self.capacity = 0

    def reserve(self, nbytes: int) -> bool:
        """Make room for ``nbytes`` (contents are lost when it grows); True when it grew."""
        if nbytes <= self.capacity:
            return False
        self.capacity = max(1 << 16, 1 << (int(nbytes) - 1).bit_length())
        self._gl.glNamedBufferData(self.name, self.capacity, None, self._gl.GL_DYNAMIC_DRAW)
        return True

    def write(self, data: np.ndarray) -> None:
        self.reserve(data.nbytes)
        self._gl.glNamedBufferSubData(self.name, 0, data.nbytes, data)

    def delete(self) -> None:
        self._gl.glDeleteBuffers(1, np.array([self.name], np.uint32))


class _Staging:
    """Upload buffer mapped persistently and coherently: frames are written by numpy straight into
    GPU-visible memory (one host copy, no driver-side staging), and a coherent mapping makes the
    writes visible to later GL commands without a flush. A fence after each use keeps the next
    write from overwriting bytes a pending unpack still reads."""

    def __init__(self, gl):
        self._gl = gl
        self._flags = gl.GL_MAP_WRITE_BIT | gl.GL_MAP_PERSISTENT_BIT | gl.GL_MAP_COHERENT_BIT
        self.name = 0
        self._view = np.empty(0, np.uint8)
        self._fence = None

    def acquire(self, nbytes: int) -> np.ndarray:
        """(nbytes,) uint8 view of the mapped store, once the GPU is done with its last contents."""
        gl = self._gl
        if self._fence is not None:
            while gl.glClientWaitSync(self._fence, gl.GL_SYNC_FLUSH_COMMANDS_BIT, 1_000_000_000) not in (
                gl.GL_ALREADY_SIGNALED,
                gl.GL_CONDITION_SATISFIED,
            ):
                pass  # timed out after 1 s: keep waiting (a wait failure raises GLError)
            gl.glDeleteSync(self._fence)
            self._fence = None
        if nbytes > self._view.size:
            self.delete()
            # Immutable storage cannot grow: replace it. The shader reads whole 32-bit words.
            capacity = max(1 << 16, 1 << (int(nbytes) - 1).bit_length())
            names = np.zeros(1, np.uint32)
            gl.glCreateBuffers(1, names)
            self.name = int(names[0])
            gl.glNamedBufferStorage(self.name, capacity, None, self._flags)
            address = ctypes.cast(gl.glMapNamedBufferRange(self.name, 0, capacity, self._flags), ctypes.c_void_p).value
            self._view = np.ctypeslib.as_array((ctypes.c_uint8 * capacity).from_address(address))
        return self._view[:nbytes]

    def used(self) -> None:
        """Fence the GL commands issued so far (the unpack reading this buffer)."""
        self._fence = self._gl.glFenceSync(self._gl.GL_SYNC_GPU_COMMANDS_COMPLETE, 0)

    def delete(self) -> None:
        gl = self._gl
        if self._fence is not None:
            gl.glDeleteSync(self._fence)
            self._fence = None
        if self.name:
            self._view = np.empty(0, np.uint8)
            gl.glUnmapNamedBuffer(self.name)
            gl.glDeleteBuffers(1, np.array([self.name], np.uint32))
            self.name = 0


class GlPyramid:
    """The GL half of the ``gl`` backend: context, mip texture and the compute passes; no CUDA.

    :class:`GlTexture` adds the CUDA hand-over; tests use this class alone on any OpenGL 4.5
    implementation (Mesa's llvmpipe included) and read results back with GL. Levels follow the
    texture stage's convention (:mod:`fovea_vla.core.texture.base`). Calls must come from one
    thread at a time; each makes the context current on the calling thread.

    Args:
        max_levels: most pyramid levels, level 0 included.
        texel_format: "rgba32f", "rgba16f" or "rgba8" (accuracy table in the module docstring).
        cuda_device: CUDA ordinal whose GPU should hold the context (None = the first EGL device).

    Attributes:
        width, height: size [px] of the frame uploaded last (0 before the first upload).
        texture: GL name of the mipmapped texture (0 before the first upload); level 0 is
            allocated padded to a multiple of ``2**(num_levels - 1)``, the padding never read.
        samples: the shader-storage buffer ``sample`` writes, (N, 3, P, P) float32 from offset 0.
    """

    def __init__(self, max_levels: int = 8, texel_format: str = "rgba32f", cuda_device: int | None = None):
        if texel_format not in TEXEL_FORMATS:
            raise ValueError(f"texel_format={texel_format!r}: must be one of {sorted(TEXEL_FORMATS)}")
        if not 1 <= max_levels <= 16:
            raise ValueError(f"max_levels={max_levels}: must be in [1, 16]")
        self.max_levels = max_levels
        self.texel_format = texel_format
        self.width = 0
        self.height = 0
        self.texture = 0
        self._levels: list[tuple[int, int]] = []
        self._work: list[int] = []  # work items per table segment, set by _write_tables
        self._context = _EglContext(cuda_device)
        try:
            _, gl = _gl_modules()
            self._gl = gl
            self._internal_format = getattr(gl, TEXEL_FORMATS[texel_format][0])
            qualifier = TEXEL_FORMATS[texel_format][1]
            self._programs = {
                name: _compile(gl, source.replace("FORMAT", qualifier), name)
                for name, source in (("unpack", _UNPACK), ("downsample", _DOWNSAMPLE), ("sample", _SAMPLE))
            }
            self._uniforms = {
                (name, uniform): gl.glGetUniformLocation(program, uniform)
                for name, program in self._programs.items()
                for uniform in _UNIFORMS
            }
            self._starts, self._boxes, self._patches = (_Buffer(gl) for _ in range(3))
            self._staging = _Staging(gl)
            self.samples = _Buffer(gl)
            self._max_groups = int(gl.glGetIntegeri_v(gl.GL_MAX_COMPUTE_WORK_GROUP_COUNT, 0)[0])
        except BaseException:
            self._context.release()  # frees every object made so far with it
            raise

    @property
    def num_levels(self) -> int:
        return len(self._levels)

    @property
    def renderer(self) -> str:
        """GL_VERSION and GL_RENDERER of the context."""
        return f"OpenGL {self._context.version} on {self._context.renderer}"

    def _require_context(self) -> None:
        if self._context.context is None:
            raise RuntimeError("gl texture used after close()")
        self._context.make_current()

    def _check_frame(self, rgb: np.ndarray) -> np.ndarray:
        rgb = np.asarray(rgb)
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8 or not rgb.size:
            raise ValueError(f"expected a non-empty (H, W, 3) uint8 frame, got {rgb.shape} {rgb.dtype}")
        return rgb

    def _allocate(self, width: int, height: int) -> None:
        """(Re)create the immutable texture for a frame size."""
        gl = self._gl
        if self.texture:
            gl.glDeleteTextures(1, np.array([self.texture], np.uint32))
            self.texture = 0
        self._levels = level_sizes(width, height, self.max_levels)
        unit = 1 << (len(self._levels) - 1)
        names = np.zeros(1, np.uint32)
        gl.glCreateTextures(gl.GL_TEXTURE_2D, 1, names)
        self.texture = int(names[0])
        gl.glTextureStorage2D(
            self.texture, len(self._levels), self._internal_format, -(-width // unit) * unit, -(-height // unit) * unit
        )
        gl.glTextureParameteri(self.texture, gl.GL_TEXTURE_MIN_FILTER, gl.GL_NEAREST_MIPMAP_NEAREST)
        gl.glTextureParameteri(self.texture, gl.GL_TEXTURE_MAG_FILTER, gl.GL_NEAREST)
        sizes = np.zeros((16, 2), np.int32)
        sizes[: len(self._levels)] = self._levels
        for program in ("downsample", "sample"):
            gl.glProgramUniform2iv(self._programs[program], self._uniforms[program, "level_size"], 16, sizes)
        self.width, self.height = width, height

    def upload(self, rgb: np.ndarray) -> None:
        """Replace the texture with ``rgb`` and rebuild every level.

        Args:
            rgb: (H, W, 3) uint8 RGB frame; a new size reallocates the texture.

        Raises:
            ValueError: wrong shape or dtype.
        """
        self._require_context()
        rgb = self._check_frame(rgb)
        height, width = rgb.shape[:2]
        if (width, height) != (self.width, self.height) or not self.texture:
            self._allocate(width, height)
        np.copyto(self._staging.acquire(rgb.size).reshape(height, width, 3), rgb)
        self._unpack(np.array([[0, 0, width, height]], np.int64))
        self.rebuild_mips()

    def upload_rects(self, rgb: np.ndarray, rects: np.ndarray) -> None:
        """Replace the rectangles ``rects`` of level 0 with those of ``rgb`` (coarser levels wait
        for :meth:`rebuild_mips`).

        Args:
            rgb: (H, W, 3) uint8 RGB frame of the size uploaded last.
            rects: (M, 4) int (x0, y0, x1, y1) [px], half-open, inside the frame; may overlap.

        Raises:
            RuntimeError: no full upload yet. ValueError: wrong frame, size or rectangles.
        """
        self._require_context()
        if not self.texture:
            raise RuntimeError("upload_rects() before upload(): the texture has no frame yet")
        rgb = self._check_frame(rgb)
        if rgb.shape[:2] != (self.height, self.width):
            raise ValueError(
                f"upload_rects: frame is {rgb.shape[1]}x{rgb.shape[0]}, texture {self.width}x{self.height}"
            )
        rects = check_rects(rects, self.width, self.height)
        if not len(rects):
            return
        # Pack the rectangles one after another, each row-major, as the unpack pass reads them.
        areas = (rects[:, 2] - rects[:, 0]) * (rects[:, 3] - rects[:, 1])
        packed = self._staging.acquire(3 * int(areas.sum()))
        offset = 0
        for (x0, y0, x1, y1), area in zip(rects.tolist(), areas.tolist(), strict=True):
            packed[offset : offset + 3 * area].reshape(y1 - y0, x1 - x0, 3)[...] = rgb[y0:y1, x0:x1]
            offset += 3 * area
        self._unpack(rects)

    def rebuild_mips(self, rects: np.ndarray | None = None) -> None:
        """Recompute levels 1.. from level 0, everywhere (None) or over the level-0 ``rects``.

        Raises:
            RuntimeError: no upload yet. ValueError: rectangles outside the frame.
        """
        self._require_context()
        if not self.texture:
            raise RuntimeError("rebuild_mips() before upload()")
        count = len(self._levels) - 1
        if count == 0:
            return
        rects = (
            np.array([[0, 0, self.width, self.height]], np.int64)
            if rects is None
            else check_rects(rects, self.width, self.height)
        )
        if not len(rects):
            return
        # Level-k footprints of every rectangle (base.level_rect, vectorised), levels 1..L-1.
        shifts = np.arange(1, count + 1)[:, None]
        limits = np.array(self._levels[1:], np.int64)
        boxes = np.stack(
            [
                rects[None, :, 0] >> shifts,
                rects[None, :, 1] >> shifts,
                np.minimum(-(-rects[None, :, 2] >> shifts), limits[:, :1]),
                np.minimum(-(-rects[None, :, 3] >> shifts), limits[:, 1:]),
            ],
            axis=-1,
        )  # (levels, M, 4)
        self._write_tables(boxes)
        gl = self._gl
        gl.glUseProgram(self._programs["downsample"])
        self._bind_tables("downsample", len(rects))
        for k in range(1, count + 1):
            gl.glUniform1i(self._uniforms["downsample", "segment"], k - 1)
            gl.glBindImageTexture(0, self.texture, k, gl.GL_FALSE, 0, gl.GL_WRITE_ONLY, self._internal_format)
            gl.glBindImageTexture(1, self.texture, k - 1, gl.GL_FALSE, 0, gl.GL_READ_ONLY, self._internal_format)
            self._dispatch(self._work[k - 1])
            gl.glMemoryBarrier(gl.GL_SHADER_IMAGE_ACCESS_BARRIER_BIT | gl.GL_TEXTURE_FETCH_BARRIER_BIT)

    def _write_tables(self, boxes: np.ndarray) -> None:
        """Upload rectangle tables: ``boxes`` (S, M, 4) for S segments, and their prefix sums."""
        areas = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
        starts = np.zeros((boxes.shape[0], boxes.shape[1] + 1), np.uint32)
        np.cumsum(areas, axis=1, out=starts[:, 1:])
        self._work = starts[:, -1].tolist()
        self._starts.write(starts)
        self._boxes.write(np.ascontiguousarray(boxes, np.int32))

    def _bind_tables(self, program: str, rect_count: int) -> None:
        gl = self._gl
        gl.glBindBufferBase(gl.GL_SHADER_STORAGE_BUFFER, 0, self._starts.name)
        gl.glBindBufferBase(gl.GL_SHADER_STORAGE_BUFFER, 1, self._boxes.name)
        gl.glUniform1i(self._uniforms[program, "rect_count"], rect_count)

    def _unpack(self, rects: np.ndarray) -> None:
        """Write the rectangles packed in the staging buffer into level 0."""
        gl = self._gl
        self._write_tables(rects[None])
        gl.glUseProgram(self._programs["unpack"])
        self._bind_tables("unpack", len(rects))
        gl.glBindBufferBase(gl.GL_SHADER_STORAGE_BUFFER, 2, self._staging.name)
        gl.glBindImageTexture(0, self.texture, 0, gl.GL_FALSE, 0, gl.GL_WRITE_ONLY, self._internal_format)
        self._dispatch(self._work[0])
        self._staging.used()
        gl.glMemoryBarrier(gl.GL_SHADER_IMAGE_ACCESS_BARRIER_BIT | gl.GL_TEXTURE_FETCH_BARRIER_BIT)

    def _dispatch(self, items: int) -> None:
        """One work item per texel / sample; 2D grid of groups past the 1D group-count limit."""
        groups = -(-items // _LOCAL_SIZE)
        if groups == 0:
            return
        width = min(groups, self._max_groups)
        self._gl.glDispatchCompute(width, -(-groups // width), 1)

    def finish(self) -> None:
        """Block until every GL command issued so far has completed (for timing)."""
        self._require_context()
        self._gl.glFinish()

    def sample_bytes(self, count: int, patch_size: int) -> int:
        """Size [bytes] of ``count`` patches of ``patch_size``^2 RGB float32 samples."""
        return 4 * 3 * count * patch_size * patch_size

    def sample(self, centers: np.ndarray, sizes: np.ndarray, patch_size: int) -> int:
        """Write trilinear patch samples into :attr:`samples` as (N, 3, P, P) float32 in [0, 1].

        Args:
            centers: (N, 2) float patch centres [px] (x, y), full resolution; outside the image
                allowed (clamped to the border as in the reference).
            sizes: (N,) float footprints [px].
            patch_size: P samples per side.

        Returns:
            N, the number of patches written from offset 0 of :attr:`samples`. Visible to GL
            after ``glMemoryBarrier(GL_BUFFER_UPDATE_BARRIER_BIT)``, to CUDA after mapping.

        Raises:
            RuntimeError: no upload yet. ValueError: shapes disagree, non-finite input, P < 1.
        """
        self._require_context()
        if not self.texture:
            raise RuntimeError("sample() before upload()")
        centers = np.asarray(centers, dtype=np.float64).reshape(-1, 2)
        sizes = np.asarray(sizes, dtype=np.float64).reshape(-1)
        if centers.shape[0] != sizes.shape[0]:
            raise ValueError(f"sample: {centers.shape[0]} centres but {sizes.shape[0]} sizes")
        if not (np.isfinite(centers).all() and np.isfinite(sizes).all()):
            raise ValueError("sample: centres and sizes must be finite")
        if int(patch_size) != patch_size or patch_size < 1:
            raise ValueError(f"sample: patch_size={patch_size} must be a positive integer")
        patch_size = int(patch_size)
        count = centers.shape[0]
        if count == 0:
            return 0
        top = len(self._levels) - 1
        lod = np.clip(np.log2(np.maximum(sizes, 1e-6) / patch_size), 0.0, top)  # as the reference
        lower = np.floor(lod)
        clipped = np.clip(centers, -_COORD_LIMIT, _COORD_LIMIT)
        base = np.floor(clipped)
        params = np.empty((count, 8), np.float32)
        ints = params.view(np.int32)
        ints[:, 0:2] = base
        ints[:, 2] = lower
        ints[:, 3] = np.minimum(lower + 1, top)
        params[:, 4:6] = clipped - base
        params[:, 6] = np.clip(sizes, -_COORD_LIMIT, _COORD_LIMIT)
        params[:, 7] = lod - lower
        self._patches.write(params)
        self.samples.reserve(self.sample_bytes(count, patch_size))
        gl = self._gl
        gl.glUseProgram(self._programs["sample"])
        gl.glBindTextureUnit(0, self.texture)
        gl.glBindBufferBase(gl.GL_SHADER_STORAGE_BUFFER, 0, self._patches.name)
        gl.glBindBufferBase(gl.GL_SHADER_STORAGE_BUFFER, 1, self.samples.name)
        gl.glUniform1i(self._uniforms["sample", "patch_size"], patch_size)
        items = count * patch_size * patch_size
        gl.glUniform1ui(self._uniforms["sample", "sample_count"], items)
        self._dispatch(items)
        return count

    def close(self) -> None:
        """Delete the GL objects and destroy the context; later calls raise RuntimeError."""
        if self._context.context is None:
            return
        self._context.make_current()
        gl = self._gl
        for program in self._programs.values():
            gl.glDeleteProgram(program)
        for buffer in (self._starts, self._boxes, self._patches, self.samples):
            buffer.delete()
        self._staging.delete()
        if self.texture:
            gl.glDeleteTextures(1, np.array([self.texture], np.uint32))
            self.texture = 0
        self._context.release()

    def __del__(self):
        # Guarded: the constructor may have failed half-way; at interpreter exit GL may be gone.
        if getattr(self, "_context", None) is not None:
            with contextlib.suppress(Exception):
                self.close()


def _available() -> Availability:
    try:
        import torch
    except ImportError as exc:
        return False, f"torch not importable: {exc}"
    if not torch.cuda.is_available():
        return False, "no CUDA device (the gl backend hands its samples to CUDA)"
    return _interop_check(torch.cuda.current_device())


@lru_cache(maxsize=4)
def _interop_check(device: int) -> Availability:
    """Create a context, register a GL buffer with CUDA and release both (cached per device)."""
    try:
        cudart = _cudart()
    except ImportError as exc:
        return False, f"cuda-python (cuda.bindings) not importable: {exc}"
    try:
        _gl_modules()
    except (ImportError, RuntimeError) as exc:
        return False, f"PyOpenGL with EGL unusable: {exc}"
    try:
        context = _EglContext(device)
    except (RuntimeError, OSError) as exc:
        return False, f"no headless OpenGL 4.5 context: {exc}"
    try:
        _, gl = _gl_modules()
        buffer = _Buffer(gl)
        buffer.reserve(4)
        try:
            flags = cudart.cudaGraphicsRegisterFlags.cudaGraphicsRegisterFlagsNone
            resource = _cuda(cudart, "cudaGraphicsGLRegisterBuffer", buffer.name, flags)
            _cuda(cudart, "cudaGraphicsUnregisterResource", resource)
        finally:
            buffer.delete()
    except RuntimeError as exc:
        return False, f"CUDA-OpenGL interop on cuda:{device} fails: {exc}"
    finally:
        context.release()
    return True, f"OpenGL {context.version} on {context.renderer}, CUDA interop with cuda:{device}"


class _MappedView:
    """A mapped device buffer described for ``torch.as_tensor`` (``__cuda_array_interface__`` v3)."""

    def __init__(self, pointer: int, floats: int):
        self.__cuda_array_interface__ = {
            "shape": (floats,),
            "typestr": "<f4",
            "data": (pointer, False),
            "version": 3,
            "stream": None,  # mapped in torch's current stream: consumers there need no sync
        }


@TEXTURE_BACKENDS.register("gl", is_available=_available)
class GlTexture:
    """Mip pyramid in an OpenGL texture, patches handed to torch through CUDA-GL interop.

    Args:
        cfg: texture configuration; ``device`` must resolve to CUDA, ``max_levels`` is honoured.
        texel_format: texture internal format, "rgba32f" (default), "rgba16f" or "rgba8";
            accuracy and cost are tabled in the module docstring.

    Raises:
        RuntimeError: no CUDA device, or no GL context / interop on it.
    """

    name = "gl"

    def __init__(self, cfg: TextureConfig | None = None, *, texel_format: str = "rgba32f"):
        import torch

        cfg = cfg or TextureConfig()
        self._torch = torch
        self.device = cfg.resolved_device()
        if not self.device.startswith("cuda") or not torch.cuda.is_available():
            raise RuntimeError(
                f"gl texture needs a CUDA device, texture.device={cfg.device!r} resolved to {self.device!r}"
            )
        self._device = torch.device(self.device)
        if self._device.index is None:
            self._device = torch.device("cuda", torch.cuda.current_device())
        self.device = str(self._device)
        self._cudart = _cudart()
        self._resource = None
        self._mapped = False
        self._view = None  # (pointer, flat float32 tensor over the mapped buffer)
        self._gl = GlPyramid(cfg.max_levels, texel_format, cuda_device=self._device.index)
        try:
            cudart = self._cudart
            with torch.cuda.device(self._device):
                torch.cuda.init()
                count, devices = _cuda(cudart, "cudaGLGetDevices", 4, cudart.cudaGLDeviceList.cudaGLDeviceListAll)
            if self._device.index not in list(devices)[:count]:
                raise RuntimeError(
                    f"the GL context ({self._gl.renderer}) runs on CUDA device(s) {list(devices)[:count]}, "
                    f"not on {self.device}"
                )
        except BaseException:
            self._gl.close()
            raise

    width = property(lambda self: self._gl.width)
    height = property(lambda self: self._gl.height)

    @property
    def num_levels(self) -> int:
        return self._gl.num_levels

    @property
    def texel_format(self) -> str:
        return self._gl.texel_format

    def upload(self, rgb: np.ndarray) -> None:
        """See :meth:`GlPyramid.upload`."""
        self._gl.upload(rgb)

    def upload_rects(self, rgb: np.ndarray, rects: np.ndarray) -> None:
        """See :meth:`GlPyramid.upload_rects`."""
        self._gl.upload_rects(rgb, rects)

    def rebuild_mips(self, rects: np.ndarray | None = None) -> None:
        """See :meth:`GlPyramid.rebuild_mips`."""
        self._gl.rebuild_mips(rects)

    def _unmap(self, stream: int) -> None:
        if self._mapped:
            _cuda(self._cudart, "cudaGraphicsUnmapResources", 1, self._resource, stream)
            self._mapped = False

    def sample(self, centers: np.ndarray, sizes: np.ndarray, patch_size: int):
        """Sample square patches with trilinear filtering, without leaving the GPU.

        Args:
            centers: (N, 2) float patch centres [px] (x, y), full resolution.
            sizes: (N,) float footprints [px].
            patch_size: P samples per side.

        Returns:
            torch.Tensor (N, 3, P, P) float32 in [0, 1] on ``self.device``: a view of the mapped
            GL buffer (no copy), valid until the next ``sample()`` or ``close()``, ordered on
            torch's current stream.

        Raises:
            RuntimeError: no upload yet, or used after close(). ValueError: bad shapes or values.
        """
        torch = self._torch
        cudart = self._cudart
        with torch.cuda.device(self._device):
            stream = torch.cuda.current_stream().cuda_stream
            # The consumer's reads of the last frame (issued on this stream) finish before GL writes.
            self._unmap(stream)
            needed = self._gl.sample_bytes(len(np.asarray(sizes).reshape(-1)), int(patch_size))
            if self._resource is not None and needed > self._gl.samples.capacity:
                # The buffer is about to be reallocated: a registration does not follow it.
                _cuda(cudart, "cudaGraphicsUnregisterResource", self._resource)
                self._resource = None
                self._view = None
            count = self._gl.sample(centers, sizes, patch_size)
            if count == 0:
                return torch.empty((0, 3, int(patch_size), int(patch_size)), device=self._device)
            if self._resource is None:
                flags = cudart.cudaGraphicsRegisterFlags.cudaGraphicsRegisterFlagsNone
                self._resource = _cuda(cudart, "cudaGraphicsGLRegisterBuffer", self._gl.samples.name, flags)
            # GL work issued so far completes before later CUDA work on this stream.
            _cuda(cudart, "cudaGraphicsMapResources", 1, self._resource, stream)
            self._mapped = True
            pointer, nbytes = _cuda(cudart, "cudaGraphicsResourceGetMappedPointer", self._resource)
            pointer = int(pointer)
            if self._view is None or self._view[0] != pointer:  # the pointer may change with each map
                self._view = (pointer, torch.as_tensor(_MappedView(pointer, int(nbytes) // 4), device=self._device))
            return self._view[1][: count * 3 * patch_size * patch_size].view(count, 3, patch_size, patch_size)

    def synchronize(self) -> None:
        """Block until the queued GL work and the CUDA work on this texture's device are done (timing)."""
        self._gl.finish()
        self._torch.cuda.synchronize(self._device)

    def mapped_range(self) -> tuple[int, int]:
        """(device pointer, bytes) of the samples buffer as currently mapped; (0, 0) if unmapped."""
        if not self._mapped:
            return 0, 0
        pointer, nbytes = _cuda(self._cudart, "cudaGraphicsResourceGetMappedPointer", self._resource)
        return int(pointer), int(nbytes)

    def close(self) -> None:
        """Unmap and unregister the CUDA resource, delete the GL objects, destroy the context.

        Tensors returned by :meth:`sample` are invalid afterwards. Calling it twice is harmless.
        """
        if self._resource is not None:
            with self._torch.cuda.device(self._device):
                self._unmap(self._torch.cuda.current_stream().cuda_stream)
                _cuda(self._cudart, "cudaGraphicsUnregisterResource", self._resource)
            self._resource = None
            self._view = None
        self._gl.close()

    def __del__(self):
        # Guarded: a constructor may have failed half-way, and at interpreter exit the GL and CUDA
        # libraries can be gone before this object.
        if getattr(self, "_gl", None) is not None:
            with contextlib.suppress(Exception):
                self.close()
