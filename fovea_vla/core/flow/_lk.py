"""Dense Lucas–Kanade machinery shared by the ``torch`` and ``nvof`` flow backends.

:class:`DenseLK` holds one input size's pyramid geometry and runs the coarse-to-fine pyramidal
Lucas–Kanade of the ``torch`` backend (see :mod:`fovea_vla.core.flow.torch_cuda` for the algorithm
and its references), or only its finest-level refinement from an initial field, which is how the
``nvof`` backend brings the hardware's quarter-pixel block matches to sub-pixel accuracy.
Everything is whole-image tensor work, so it runs on CUDA and on the CPU and can be captured in a
CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fovea_vla.core.flow.base import grid_shape

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # the backends report it through their availability checks
    torch = None
try:  # the median filter on the CPU
    import cv2
except ImportError:
    cv2 = None
try:  # ships with torch's CUDA builds; the median filter on CUDA
    import triton
    import triton.language as tl
except ImportError:
    triton = None
HAVE_TRITON = triton is not None

__all__ = ["GRAY_WEIGHTS", "DenseLK", "LKParams", "Level", "median5", "to_output_grid", "upsample", "with_differences"]

# ITU-R BT.601 luma, the weights of cv2.COLOR_RGB2GRAY, divided by 255 to give [0, 1].
GRAY_WEIGHTS = (0.299 / 255.0, 0.587 / 255.0, 0.114 / 255.0)
# Binomial [1, 4, 6, 4, 1] convolved with the 2-tap box: blur and 2x decimation centred on 2j + 0.5.
_PYRAMID_TAPS = (1.0, 5.0, 10.0, 10.0, 5.0, 1.0)
# Residual scale of the confidence, intensity in [0, 1]: 0.02 ~ 5 gray levels gives 1/e.
_CONFIDENCE_SIGMA = 0.02


@dataclass(frozen=True, kw_only=True)
class LKParams:
    """Algorithm settings a preset maps to.

    Attributes:
        levels: maximum number of pyramid levels (1 = the working resolution alone). Fewer are
            built when a level's shorter side would drop under ``min_level_side``.
        iterations: Lucas–Kanade steps (warp, solve, median filtering) per level.
        window: side of the box window the structure tensor is averaged over, odd, pixels of
            the level.
        median_passes: 5 x 5 median filters applied to the flow after every step (0 = none);
            repeated passes act as a wider robust smoother (3 passes: 13 x 13 support).
        finest_level: the level refinement stops at (0 = working resolution); coarser levels
            trade accuracy for about 4x less work per level skipped.
        regularization: Tikhonov term λ added to the diagonal of the window-averaged structure
            tensor, (intensity / px)² with intensity in [0, 1]; keeps flat regions at the
            coarser level's estimate.
        min_level_side: smallest shorter side of a pyramid level, pixels.
    """

    levels: int
    iterations: int
    window: int
    median_passes: int
    finest_level: int = 0
    regularization: float = 3e-5
    min_level_side: int = 16

    def __post_init__(self) -> None:
        for name in ("levels", "iterations", "min_level_side"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: must be an integer >= 1")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1 or self.window % 2 == 0:
            raise ValueError(f"window={self.window!r}: must be an odd integer >= 1")
        if isinstance(self.median_passes, bool) or not isinstance(self.median_passes, int) or self.median_passes < 0:
            raise ValueError(f"median_passes={self.median_passes!r}: must be an integer >= 0")
        if isinstance(self.finest_level, bool) or not 0 <= self.finest_level < self.levels:
            raise ValueError(f"finest_level={self.finest_level!r}: must be in [0, levels={self.levels})")
        if not self.regularization > 0:
            raise ValueError(f"regularization={self.regularization!r}: must be > 0")


@dataclass
class Level:
    """Geometry of one pyramid level, kept across calls of the same input size."""

    height: int
    width: int
    base_grid: object  # (1, h, w, 2) float32: grid_sample coordinates of the pixel centres
    to_grid: object  # (2,) float32: pixels -> grid_sample units, (2 / w, 2 / h)


class DenseLK:
    """Pyramid geometry and Lucas–Kanade steps for one working size on one device.

    Args:
        params: algorithm settings.
        device: torch device.
    """

    def __init__(self, params: LKParams, device):
        self.params = params
        self.device = torch.device(device)
        kw = {"device": self.device, "dtype": torch.float32}
        taps = torch.tensor(_PYRAMID_TAPS, **kw) / sum(_PYRAMID_TAPS)
        # Separable: a (1, 6) then a (6, 1) stride-2 convolution, cheaper than one 6 x 6.
        self._pyramid_kernels = (taps.view(1, 1, 1, 6), taps.view(1, 1, 6, 1))
        # addcmul(warped, prev, sign) -> v = [It, 4 gx, 4 gy]: the symmetric gradient (mean of the
        # two frames' central differences) times 4, as the differences are not halved.
        self._sign = torch.tensor([-1.0, 1.0, 1.0], **kw).view(1, 3, 1, 1)
        # Window means t of the products [4gx, 4gy] x [It, 4gx, 4gy] (channel 3i + j) gathered as
        # [a12, a12, b2, b1, a22, a11, b1, b2], A = [[t1, t2], [t2, t5]] and b = (t0, t3), so both
        # components of the step come from 2-channel ops.
        self._solve_index = torch.tensor([2, 4, 3, 0, 5, 1, 0, 3], device=self.device)
        # v carries 4 g, so A is 16x: λ follows.
        self._lambda = 16.0 * params.regularization
        self.levels: list[Level] = []

    def prepare(self, height: int, width: int) -> None:
        """Pyramid geometry for (height, width) working images."""
        p = self.params
        sizes = [(height, width)]
        while len(sizes) < p.levels and min(-(-sizes[-1][0] // 2), -(-sizes[-1][1] // 2)) >= p.min_level_side:
            sizes.append((-(-sizes[-1][0] // 2), -(-sizes[-1][1] // 2)))
        kw = {"device": self.device, "dtype": torch.float32}
        self.levels = []
        for lh, lw in sizes:
            # grid_sample with align_corners=False: pixel centre x maps to (2x + 1) / w - 1.
            xs = (2.0 * torch.arange(lw, **kw) + 1.0) / lw - 1.0
            ys = (2.0 * torch.arange(lh, **kw) + 1.0) / lh - 1.0
            base = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).unsqueeze(0)
            self.levels.append(Level(lh, lw, base, torch.tensor([2.0 / lw, 2.0 / lh], **kw)))

    def downsample(self, images):
        """Next pyramid level of a (2, 1, h, w) batch: (2, 1, ceil(h / 2), ceil(w / 2))."""
        h, w = images.shape[-2:]
        padded = F.pad(images, (2, 2 + w % 2, 2, 2 + h % 2), mode="replicate")
        rows = F.conv2d(padded, self._pyramid_kernels[0], stride=(1, 2))
        return F.conv2d(rows, self._pyramid_kernels[1], stride=(2, 1))

    def refine(self, level: Level, prev3, cur3, flow, iterations: int | None = None):
        """``iterations`` Lucas–Kanade steps at one level.

        Args:
            level: geometry of the level, (h, w).
            prev3, cur3: (1, 3, h, w) float32 ``[I, 2 dI/dx, 2 dI/dy]`` of the two frames.
            flow: (1, 2, h, w) float32 initial flow, pixels of the level.
            iterations: steps to run; None = ``params.iterations``.

        Returns:
            (1, 2, h, w) float32 refined flow.
        """
        p = self.params
        for _ in range(p.iterations if iterations is None else iterations):
            grid = torch.addcmul(level.base_grid, flow.permute(0, 2, 3, 1), level.to_grid)
            warped = F.grid_sample(cur3, grid, mode="bilinear", padding_mode="border", align_corners=False)
            v = torch.addcmul(warped, prev3, self._sign)
            # The products in one pass; the window mean divides by the in-image pixel count.
            products = (v[:, 1:].unsqueeze(2) * v.unsqueeze(1)).view(1, 6, level.height, level.width)
            t = F.avg_pool2d(products, p.window, stride=1, padding=p.window // 2, count_include_pad=False)
            q = t.index_select(1, self._solve_index)[0]
            diag = q[4:6] + self._lambda  # (a22, a11)
            numerator = torch.addcmul(q[0:2] * q[2:4], diag, q[6:8], value=-1.0)  # -adj(A) b
            det = torch.addcmul(diag[0] * diag[1], q[0], q[0], value=-1.0)
            # Step -A⁻¹ b = numerator / det; with A 16x and b 4x (g times 4) the true step is 4x it.
            flow = torch.add(flow, numerator / det, alpha=4.0)
            for _ in range(p.median_passes):
                flow = median5(flow)
        return flow

    def confidence(self, level: Level, prev_image, cur_image, flow):
        """(1, 1, h, w) float32 in (0, 1]: ``exp(-mean |cur(x + u) - prev(x)| / sigma)`` over the window."""
        grid = torch.addcmul(level.base_grid, flow.permute(0, 2, 3, 1), level.to_grid)
        warped = F.grid_sample(cur_image, grid, mode="bilinear", padding_mode="border", align_corners=False)
        k = self.params.window
        residual = F.avg_pool2d((warped - prev_image).abs_(), k, stride=1, padding=k // 2, count_include_pad=False)
        return torch.exp(residual * (-1.0 / _CONFIDENCE_SIGMA))

    def coarse_to_fine(self, gray):
        """Coarse-to-fine flow and confidence of a (2, 1, hs, ws) pair: (1, 3, hs, ws) float32.

        Channels: u, v in working pixels, confidence in [0, 1].
        """
        pyramid = [gray]
        for _ in self.levels[1:]:
            pyramid.append(self.downsample(pyramid[-1]))
        finest = min(self.params.finest_level, len(self.levels) - 1)
        flow = None
        for index in range(len(self.levels) - 1, finest - 1, -1):
            level = self.levels[index]
            frames3 = with_differences(pyramid[index])
            if flow is None:
                flow = torch.zeros(1, 2, level.height, level.width, device=self.device)
            else:
                flow = upsample(flow, 2, level.height, level.width)
            flow = self.refine(level, frames3[0:1], frames3[1:2], flow)
        level = self.levels[finest]
        confidence = self.confidence(level, pyramid[finest][0:1], pyramid[finest][1:2], flow)
        field = torch.cat((flow, confidence), dim=1)
        if finest:
            top = self.levels[0]
            field = upsample(field, 2**finest, top.height, top.width, channels=2)
        return field

    def refine_from(self, gray, flow, iterations: int | None = None):
        """Refine an initial flow at the finest level only: (1, 3, h, w) flow + confidence.

        Args:
            gray: (2, 1, h, w) float32 prev and cur in [0, 1] at the level-0 size.
            flow: (1, 2, h, w) float32 initial prev -> cur flow, pixels.
            iterations: Lucas–Kanade steps; None = ``params.iterations``.
        """
        level = self.levels[0]
        frames3 = with_differences(gray)
        flow = self.refine(level, frames3[0:1], frames3[1:2], flow, iterations)
        return torch.cat((flow, self.confidence(level, gray[0:1], gray[1:2], flow)), dim=1)


def median5(field):
    """Median of every 5 x 5 window of a (1, C, H, W) float32 tensor, border replicated.

    CUDA with Triton: one fused kernel (torch's ``median(dim)`` launches a thread block per
    window, ~2.4 ms for a 1080p field on an H100 against 0.07 ms). CPU: OpenCV's ``medianBlur``
    (a sorting network, ~100x faster than ``median(dim)``). Otherwise ``unfold`` + ``median``.
    All return the exact 13th smallest of the 25 values, so the results are identical.

    Args:
        field: (1, C, H, W) float32, any device, finite values.

    Returns:
        (1, C, H, W) float32 on the same device.

    >>> x = torch.zeros(1, 1, 5, 5)
    >>> x[0, 0, 2, 2] = 9.0  # an isolated outlier
    >>> float(median5(x).abs().max())
    0.0
    """
    _, channels, height, width = field.shape
    field = field.contiguous()
    if field.is_cuda and triton is not None:
        out = torch.empty_like(field)
        grid = (triton.cdiv(height * width, _MEDIAN_BLOCK), channels)
        _median5_kernel[grid](field, out, height, width, BLOCK=_MEDIAN_BLOCK)
        return out
    if field.device.type == "cpu" and cv2 is not None:
        planes = field[0].numpy()
        return torch.from_numpy(np.stack([cv2.medianBlur(plane, 5) for plane in planes]))[None]
    patches = F.unfold(F.pad(field, (2, 2, 2, 2), mode="replicate"), 5)
    return patches.view(1, channels, 25, height, width).median(dim=2).values


# Pixels per Triton program; each thread keeps its pixels' 25 window values in registers.
_MEDIAN_BLOCK = 256

if triton is not None:

    @triton.jit
    def _sort2(a, b):
        return tl.minimum(a, b), tl.maximum(a, b)

    @triton.jit
    def _median5_kernel(src, dst, height, width, BLOCK: tl.constexpr):
        """dst[c, y, x] = median of src[c] over the 5 x 5 window at (y, x), coordinates clamped."""
        plane = tl.program_id(1).to(tl.int64) * height * width
        src += plane
        dst += plane
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < height * width
        y = offs // width
        x = offs % width
        r0 = tl.minimum(tl.maximum(y - 2, 0), height - 1) * width
        r1 = tl.minimum(tl.maximum(y - 1, 0), height - 1) * width
        r2 = y * width
        r3 = tl.minimum(y + 1, height - 1) * width
        r4 = tl.minimum(y + 2, height - 1) * width
        c0 = tl.minimum(tl.maximum(x - 2, 0), width - 1)
        c1 = tl.minimum(tl.maximum(x - 1, 0), width - 1)
        c2 = x
        c3 = tl.minimum(x + 1, width - 1)
        c4 = tl.minimum(x + 2, width - 1)
        p0 = tl.load(src + r0 + c0, mask=inside, other=0.0)
        p1 = tl.load(src + r0 + c1, mask=inside, other=0.0)
        p2 = tl.load(src + r0 + c2, mask=inside, other=0.0)
        p3 = tl.load(src + r0 + c3, mask=inside, other=0.0)
        p4 = tl.load(src + r0 + c4, mask=inside, other=0.0)
        p5 = tl.load(src + r1 + c0, mask=inside, other=0.0)
        p6 = tl.load(src + r1 + c1, mask=inside, other=0.0)
        p7 = tl.load(src + r1 + c2, mask=inside, other=0.0)
        p8 = tl.load(src + r1 + c3, mask=inside, other=0.0)
        p9 = tl.load(src + r1 + c4, mask=inside, other=0.0)
        p10 = tl.load(src + r2 + c0, mask=inside, other=0.0)
        p11 = tl.load(src + r2 + c1, mask=inside, other=0.0)
        p12 = tl.load(src + r2 + c2, mask=inside, other=0.0)
        p13 = tl.load(src + r2 + c3, mask=inside, other=0.0)
        p14 = tl.load(src + r2 + c4, mask=inside, other=0.0)
        p15 = tl.load(src + r3 + c0, mask=inside, other=0.0)
        p16 = tl.load(src + r3 + c1, mask=inside, other=0.0)
        p17 = tl.load(src + r3 + c2, mask=inside, other=0.0)
        p18 = tl.load(src + r3 + c3, mask=inside, other=0.0)
        p19 = tl.load(src + r3 + c4, mask=inside, other=0.0)
        p20 = tl.load(src + r4 + c0, mask=inside, other=0.0)
        p21 = tl.load(src + r4 + c1, mask=inside, other=0.0)
        p22 = tl.load(src + r4 + c2, mask=inside, other=0.0)
        p23 = tl.load(src + r4 + c3, mask=inside, other=0.0)
        p24 = tl.load(src + r4 + c4, mask=inside, other=0.0)
        # Median-of-25 selection network of 99 compare-exchanges (N. Devillard's opt_med25, after
        # J. L. Smith, XCELL 23, 1996); checked on all 2^25 0/1 inputs, which by the 0-1 principle
        # proves it for every input. The median ends in p12.
        p0, p1 = _sort2(p0, p1)
        p3, p4 = _sort2(p3, p4)
        p2, p4 = _sort2(p2, p4)
        p2, p3 = _sort2(p2, p3)
        p6, p7 = _sort2(p6, p7)
        p5, p7 = _sort2(p5, p7)
        p5, p6 = _sort2(p5, p6)
        p9, p10 = _sort2(p9, p10)
        p8, p10 = _sort2(p8, p10)
        p8, p9 = _sort2(p8, p9)
        p12, p13 = _sort2(p12, p13)
        p11, p13 = _sort2(p11, p13)
        p11, p12 = _sort2(p11, p12)
        p15, p16 = _sort2(p15, p16)
        p14, p16 = _sort2(p14, p16)
        p14, p15 = _sort2(p14, p15)
        p18, p19 = _sort2(p18, p19)
        p17, p19 = _sort2(p17, p19)
        p17, p18 = _sort2(p17, p18)
        p21, p22 = _sort2(p21, p22)
        p20, p22 = _sort2(p20, p22)
        p20, p21 = _sort2(p20, p21)
        p23, p24 = _sort2(p23, p24)
        p2, p5 = _sort2(p2, p5)
        p3, p6 = _sort2(p3, p6)
        p0, p6 = _sort2(p0, p6)
        p0, p3 = _sort2(p0, p3)
        p4, p7 = _sort2(p4, p7)
        p1, p7 = _sort2(p1, p7)
        p1, p4 = _sort2(p1, p4)
        p11, p14 = _sort2(p11, p14)
        p8, p14 = _sort2(p8, p14)
        p8, p11 = _sort2(p8, p11)
        p12, p15 = _sort2(p12, p15)
        p9, p15 = _sort2(p9, p15)
        p9, p12 = _sort2(p9, p12)
        p13, p16 = _sort2(p13, p16)
        p10, p16 = _sort2(p10, p16)
        p10, p13 = _sort2(p10, p13)
        p20, p23 = _sort2(p20, p23)
        p17, p23 = _sort2(p17, p23)
        p17, p20 = _sort2(p17, p20)
        p21, p24 = _sort2(p21, p24)
        p18, p24 = _sort2(p18, p24)
        p18, p21 = _sort2(p18, p21)
        p19, p22 = _sort2(p19, p22)
        p8, p17 = _sort2(p8, p17)
        p9, p18 = _sort2(p9, p18)
        p0, p18 = _sort2(p0, p18)
        p0, p9 = _sort2(p0, p9)
        p10, p19 = _sort2(p10, p19)
        p1, p19 = _sort2(p1, p19)
        p1, p10 = _sort2(p1, p10)
        p11, p20 = _sort2(p11, p20)
        p2, p20 = _sort2(p2, p20)
        p2, p11 = _sort2(p2, p11)
        p12, p21 = _sort2(p12, p21)
        p3, p21 = _sort2(p3, p21)
        p3, p12 = _sort2(p3, p12)
        p13, p22 = _sort2(p13, p22)
        p4, p22 = _sort2(p4, p22)
        p4, p13 = _sort2(p4, p13)
        p14, p23 = _sort2(p14, p23)
        p5, p23 = _sort2(p5, p23)
        p5, p14 = _sort2(p5, p14)
        p15, p24 = _sort2(p15, p24)
        p6, p24 = _sort2(p6, p24)
        p6, p15 = _sort2(p6, p15)
        p7, p16 = _sort2(p7, p16)
        p7, p19 = _sort2(p7, p19)
        p13, p21 = _sort2(p13, p21)
        p15, p23 = _sort2(p15, p23)
        p7, p13 = _sort2(p7, p13)
        p7, p15 = _sort2(p7, p15)
        p1, p9 = _sort2(p1, p9)
        p3, p11 = _sort2(p3, p11)
        p5, p17 = _sort2(p5, p17)
        p11, p17 = _sort2(p11, p17)
        p9, p17 = _sort2(p9, p17)
        p4, p10 = _sort2(p4, p10)
        p6, p12 = _sort2(p6, p12)
        p7, p14 = _sort2(p7, p14)
        p4, p6 = _sort2(p4, p6)
        p4, p7 = _sort2(p4, p7)
        p12, p14 = _sort2(p12, p14)
        p10, p14 = _sort2(p10, p14)
        p6, p7 = _sort2(p6, p7)
        p10, p12 = _sort2(p10, p12)
        p6, p10 = _sort2(p6, p10)
        p6, p17 = _sort2(p6, p17)
        p12, p17 = _sort2(p12, p17)
        p7, p17 = _sort2(p7, p17)
        p7, p10 = _sort2(p7, p10)
        p12, p18 = _sort2(p12, p18)
        p7, p12 = _sort2(p7, p12)
        p10, p18 = _sort2(p10, p18)
        p12, p20 = _sort2(p12, p20)
        p10, p20 = _sort2(p10, p20)
        p10, p12 = _sort2(p10, p12)
        tl.store(dst + offs, p12, mask=inside)


def with_differences(images):
    """(N, 1, h, w) -> (N, 3, h, w): ``[I, I(x+1) - I(x-1), I(y+1) - I(y-1)]``, border replicated."""
    padded = F.pad(images, (1, 1, 1, 1), mode="replicate")
    dx = padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2]
    dy = padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1]
    return torch.cat((images, dx, dy), dim=1)


def upsample(field, factor: int, height: int, width: int, channels: int | None = None):
    """Bilinear ``factor``-x upsampling of a (1, C, h, w) field onto the (height, width) finer level.

    Levels are aligned so that this is exactly ``F.interpolate(scale_factor=factor)`` cropped to the
    finer size (which is at most ``factor - 1`` pixels smaller). The first ``channels`` channels
    (all when None) are vectors and are multiplied by ``factor``.
    """
    up = F.interpolate(field, scale_factor=factor, mode="bilinear", align_corners=False)[..., :height, :width]
    if channels is None:
        return up * float(factor)
    return torch.cat((up[:, :channels] * float(factor), up[:, channels:]), dim=1)


def to_output_grid(field, height: int, width: int, grid: int):
    """(1, C, hs, ws) working-resolution field -> (1, C, Hg, Wg) on the output grid of the input.

    Channels 0 and 1 are vectors in working pixels and come out in input pixels; the others
    (confidence) are resampled unscaled. At the input resolution, ``grid`` 4 is a block average
    with partial border blocks averaging only their pixels (as ``flow_at_grid``); otherwise the
    field is area-resampled when shrinking and bilinearly when growing.
    """
    hs, ws = field.shape[-2:]
    if (hs, ws) == (height, width):
        if grid == 1:
            return field
        return F.avg_pool2d(field, grid, ceil_mode=True, count_include_pad=False)
    hg, wg = grid_shape(height, width, grid)
    mode = {"mode": "area"} if hs >= hg and ws >= wg else {"mode": "bilinear", "align_corners": False}
    out = F.interpolate(field, size=(hg, wg), **mode)
    # Python-scalar products: no host-to-device copy, so this can be captured in a CUDA graph.
    return torch.cat((out[:, 0:1] * (width / ws), out[:, 1:2] * (height / hs), out[:, 2:]), dim=1)
