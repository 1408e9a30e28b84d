"""Foveated sampling layouts: where the token budget is spent in the image.

Patch density follows cortical magnification, M(e) = M0 / (e + e0): a patch's footprint (the side
of the image square it summarises, in full-resolution pixels) grows linearly with eccentricity e,
``size(e) = max(patch_size, (e + e0) / M0)``, so the fovea is sampled at full resolution and the
periphery ever more coarsely. Patches lie on concentric rings around the fixation whose spacing
equals the local footprint, so the layout tiles the plane without gaps or heavy overlap.

``M0`` is not configured: for a given budget it is solved so the budget covers the whole image
around the current fixation. Patches whose centre would fall outside the image are not spent
(the budget moves to the part of the image that exists), and the few most eccentric surplus
patches are dropped so the count is exactly the budget (fixed shapes for batching and CUDA graphs).

Several simultaneous fixations (:func:`foveated_layout_multi`) split the budget by importance
weight; each region has its own rings, and no fovea is sampled by two regions.

Pixel convention: x right, y down, the centre of the top-left pixel is (0, 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

from fovea_vla.core._validation import is_int, is_real

__all__ = [
    "AdaptiveBudget",
    "AdaptiveBudgetConfig",
    "FoveatedLayout",
    "FoveationConfig",
    "foveated_layout",
    "foveated_layout_multi",
    "make_example",
    "scene_complexity",
]

# Candidate values of 1/M0 (footprint growth per pixel of eccentricity), searched per frame.
_GROWTH_GRID = np.geomspace(0.005, 2.0, 240)


@dataclass(frozen=True, kw_only=True)
class FoveationConfig:
    """Sampling layout parameters.

    Attributes:
        num_tokens: patches per frame (the token budget). 273 by default.
        patch_size: samples per patch side; a patch is ``patch_size x patch_size`` samples.
        e0_fraction: e0 as a fraction of the image half-diagonal: the eccentricity at which
            magnification halves, i.e. the size of the fovea.
        e0_deg: when set and the camera focal length is known, e0 in degrees of visual angle
            instead (overrides ``e0_fraction``).
    """

    num_tokens: int = 273
    patch_size: int = 16
    e0_fraction: float = 0.3
    e0_deg: float | None = None

    def __post_init__(self):
        if not 1 <= self.num_tokens <= 16384:
            raise ValueError(f"foveation.num_tokens={self.num_tokens}: must be in [1, 16384]")
        if not 2 <= self.patch_size <= 64:
            raise ValueError(f"foveation.patch_size={self.patch_size}: must be in [2, 64]")
        if not 0.0 < self.e0_fraction <= 4.0:
            raise ValueError(f"foveation.e0_fraction={self.e0_fraction}: must be in (0, 4]")
        if self.e0_deg is not None and not 0.0 < self.e0_deg < 90.0:
            raise ValueError(f"foveation.e0_deg={self.e0_deg}: must be in (0, 90) degrees")

    def e0_pixels(self, width: int, height: int, focal_px: float | None = None) -> float:
        """e0 in full-resolution pixels for an image of this size (and focal length, if known)."""
        if self.e0_deg is not None and focal_px is not None and focal_px > 0:
            return float(focal_px * math.tan(math.radians(self.e0_deg)))
        return float(self.e0_fraction * 0.5 * math.hypot(width, height))


@dataclass(frozen=True)
class FoveatedLayout:
    """One frame's sampling layout, in a deterministic order (by region, then ring, then angle).

    Attributes:
        centers: (N, 2) float32 patch centres [px] (x, y), inside the image.
        sizes: (N,) float32 footprint side [px] in the full-resolution image.
        levels: (N,) float32 continuous mip level, ``log2(size / patch_size)`` clamped at 0.
        eccentricity: (N,) float32 distance of each centre from the fixation [px].
        rings: (N,) int32 ring index (0 = the patch at the fixation).
        fixation: (2,) float32 the fixation [px] the layout was built around.
        e0: e0 [px].
        m0: M0 [patches per px of eccentricity]; M(e) = M0 / (e + e0).
        patch_size: samples per patch side.
        regions: (N,) int32 index of the fixation each patch belongs to (0 for one fixation).
        fixations: (K, 2) float32 every fixation [px], ``fixation`` first.
        weights: (K,) float32 their normalised weights (sum 1).
        region_m0: (K,) float64 M0 of each region (NaN for a region without tokens).
        focal_px: camera focal length [px] the layout was built with, or None when unknown.
    """

    centers: np.ndarray
    sizes: np.ndarray
    levels: np.ndarray
    eccentricity: np.ndarray
    rings: np.ndarray
    fixation: np.ndarray
    e0: float
    m0: float
    patch_size: int
    regions: np.ndarray
    fixations: np.ndarray
    weights: np.ndarray
    region_m0: np.ndarray
    focal_px: float | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.centers.shape[0])

    def eccentricity_deg(self) -> np.ndarray | None:
        """(N,) float32 eccentricity [deg of visual angle] of each token, None without a focal length.

        Exact for a pinhole camera fixating the principal point; elsewhere it is the angle
        subtended at the principal-point distance, the same approximation ``e0_deg`` uses.
        """
        if self.focal_px is None or not self.focal_px > 0:
            return None
        return np.degrees(np.arctan(self.eccentricity.astype(np.float64) / self.focal_px)).astype(np.float32)

    def magnification(self, eccentricity: np.ndarray) -> np.ndarray:
        """M(e) [patches per px] at the given eccentricities [px]."""
        return self.m0 / (np.asarray(eccentricity, dtype=np.float64) + self.e0)


@lru_cache(maxsize=64)
def _ring_template(growth: float, e0: float, patch_size: int, max_radius: float) -> np.ndarray:
    """Patch offsets around a fixation for one growth rate, as an (M, 5) float64 array of
    (dx, dy, size, eccentricity, ring), ordered by ring then angle."""
    rows = [(0.0, 0.0, max(patch_size, growth * e0), 0.0, 0)]
    radius = rows[0][2]
    ring = 1
    while radius - 0.5 * max(patch_size, growth * (radius + e0)) <= max_radius:
        size = max(float(patch_size), growth * (radius + e0))
        count = max(6, round(2.0 * math.pi * radius / size))
        # Alternate rings are rotated by half a step so patches do not line up radially.
        phase = (0.5 if ring % 2 else 0.0) * 2.0 * math.pi / count
        angles = phase + np.arange(count) * (2.0 * math.pi / count)
        rows.extend((radius * math.cos(a), radius * math.sin(a), size, radius, ring) for a in angles)
        radius += size
        ring += 1
    return np.asarray(rows, dtype=np.float64)


def _inside(template: np.ndarray, fx: float, fy: float, width: int, height: int) -> np.ndarray:
    x = template[:, 0] + fx
    y = template[:, 1] + fy
    return (x >= 0.0) & (x <= width - 1.0) & (y >= 0.0) & (y <= height - 1.0)


def foveated_layout(
    cfg: FoveationConfig,
    width: int,
    height: int,
    fixation: tuple[float, float] | np.ndarray,
    *,
    focal_px: float | None = None,
) -> FoveatedLayout:
    """Build the sampling layout for one fixation.

    Args:
        cfg: layout parameters.
        width: image width [px].
        height: image height [px].
        fixation: (x, y) [px]; clamped into the image.
        focal_px: camera focal length [px], used only when ``cfg.e0_deg`` is set.

    Returns:
        A layout with exactly ``cfg.num_tokens`` patches whose centres lie in the image.

    Raises:
        ValueError: the image is empty.

    Example:
        >>> layout = foveated_layout(FoveationConfig(), 640, 480, (320.0, 240.0))
        >>> layout.centers.shape, layout.levels.min()
        ((273, 2), np.float32(0.0))
    """
    return foveated_layout_multi(cfg, width, height, [fixation], [1.0], focal_px=focal_px)


def foveated_layout_multi(
    cfg: FoveationConfig,
    width: int,
    height: int,
    fixations: Sequence[tuple[float, float]] | np.ndarray,
    weights: Sequence[float] | np.ndarray,
    *,
    focal_px: float | None = None,
) -> FoveatedLayout:
    """Build one layout for K simultaneous fixations, splitting the token budget by weight.

    Region k gets ``n_k`` tokens, ``n_k`` the largest-remainder rounding of
    ``cfg.num_tokens * w_k / sum(w)`` (so ``sum(n_k)`` is the budget exactly), laid out on its
    own cortical-magnification rings around fixation k. Foveas do not get double coverage:
    every point within e0 of a fixation belongs to the fovea of the highest-weight region (ties:
    the earlier one) among those whose fovea contains it, and any other region's patch centred
    there is dropped; the region re-spends those tokens (its M0 is solved with the dropped area
    excluded). Regions of 0 tokens own no fovea. Peripheries of different regions may overlap.

    Args:
        cfg: layout parameters (budget, patch size, e0).
        width: image width [px].
        height: image height [px].
        fixations: (K, 2) fixations (x, y) [px], K >= 1, the primary first; clamped into the
            image.
        weights: (K,) importance weights >= 0 with a positive sum (normalised here).
        focal_px: camera focal length [px], used only when ``cfg.e0_deg`` is set.

    Returns:
        A layout with exactly ``cfg.num_tokens`` patches whose centres lie in the image,
        ordered by region, then ring, then angle. ``regions`` gives each token's fixation index;
        ``eccentricity`` and ``rings`` refer to that fixation; ``fixation``, ``m0`` and the
        magnification are the first region's.

    Raises:
        ValueError: the image is empty, or fixations and weights do not match or are invalid.

    Example:
        >>> layout = foveated_layout_multi(FoveationConfig(), 640, 480, [(200, 240), (500, 120)], [0.7, 0.3])
        >>> layout.num_tokens, np.bincount(layout.regions).tolist()
        (273, [191, 82])
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size {width}x{height}: must be at least 1x1")
    points = np.asarray(fixations, dtype=np.float64).reshape(-1, 2)
    shares = np.asarray(weights, dtype=np.float64).reshape(-1)
    if len(points) < 1 or len(points) != len(shares):
        raise ValueError(f"{len(points)} fixations and {len(shares)} weights: need K >= 1 of each")
    if not (np.isfinite(points).all() and np.isfinite(shares).all() and (shares >= 0).all() and shares.sum() > 0):
        raise ValueError(f"fixations {points.tolist()} / weights {shares.tolist()}: must be finite, weights >= 0")
    points = np.clip(points, [0.0, 0.0], [width - 1.0, height - 1.0])
    shares = shares / shares.sum()
    counts = _split_budget(cfg.num_tokens, shares)
    e0 = cfg.e0_pixels(width, height, focal_px)
    # Far enough to reach every corner from any fixation, quantised so templates are reused.
    max_radius = float(math.ceil(math.hypot(width, height) / 64.0) * 64.0)
    # Fovea owners in priority order: weight, then input order; regions without tokens own none.
    rank = [k for k in sorted(range(len(points)), key=lambda k: (-shares[k], k)) if counts[k] > 0]

    parts, region_ids, m0s = [], [], []
    for k, (fx, fy) in enumerate(points):
        if counts[k] == 0:
            m0s.append(math.nan)
            continue
        patches, growth = _solve_region(
            cfg, width, height, float(fx), float(fy), e0, max_radius, counts[k], rank, k, points
        )
        parts.append(np.column_stack([patches[:, 0] + fx, patches[:, 1] + fy, patches[:, 2:]]))
        region_ids.append(np.full(len(patches), k, np.int32))
        m0s.append(1.0 / growth)
    patches = np.concatenate(parts, axis=0)
    sizes = patches[:, 2].astype(np.float32)
    return FoveatedLayout(
        centers=patches[:, :2].astype(np.float32),
        sizes=sizes,
        levels=np.maximum(np.log2(sizes / cfg.patch_size), 0.0).astype(np.float32),
        eccentricity=patches[:, 3].astype(np.float32),
        rings=patches[:, 4].astype(np.int32),
        fixation=points[0].astype(np.float32),
        e0=e0,
        m0=m0s[0],
        patch_size=cfg.patch_size,
        regions=np.concatenate(region_ids),
        fixations=points.astype(np.float32),
        weights=shares.astype(np.float32),
        region_m0=np.asarray(m0s, dtype=np.float64),
        focal_px=focal_px,
    )


def _split_budget(budget: int, shares: np.ndarray) -> list[int]:
    """Largest-remainder split of ``budget`` tokens by ``shares`` (sum 1); ties go to the earlier.

    >>> _split_budget(273, np.array([0.5, 0.3, 0.2]))
    [136, 82, 55]
    """
    exact = budget * shares
    counts = np.floor(exact).astype(int)
    order = sorted(range(len(shares)), key=lambda k: (-(exact[k] - counts[k]), k))
    for k in order[: budget - int(counts.sum())]:
        counts[k] += 1
    return counts.tolist()


def _solve_region(cfg, width, height, fx, fy, e0, max_radius, budget, rank, region, points):
    """Patch offsets (M = budget rows of _ring_template) of one region and its growth 1/M0.

    Finds the largest growth whose allowed patches (centre in the image and not in a fovea that
    another region owns) still fill the budget, then drops the most eccentric surplus.
    """

    def allowed(template: np.ndarray) -> np.ndarray:
        keep = _inside(template, fx, fy, width, height)
        if len(rank) > 1:
            keep &= _owned_or_free(template[:, 0] + fx, template[:, 1] + fy, e0, rank, region, points)
        return keep

    def template_at(index: int, radius: float = max_radius) -> np.ndarray:
        return _ring_template(float(_GROWTH_GRID[index]), e0, cfg.patch_size, radius)

    # Each probed growth's allowed patches, kept for this call: the search ends on one it probed.
    probed: dict[int, np.ndarray] = {}

    def patches_at(index: int) -> np.ndarray:
        if index not in probed:
            template = template_at(index)
            probed[index] = template[allowed(template)]
        return probed[index]

    def smallest_growth_fills() -> bool:
        # The smallest growth's template is the largest by far (~60k patches at 1080p, 50 ms to build).
        # Its first rings, the template up to a quarter of the radius (a prefix: the rings do not
        # depend on max_radius), settle the question on all but huge budgets without building it.
        prefix = template_at(0, max_radius / 4.0)
        return int(allowed(prefix).sum()) >= budget or len(patches_at(0)) >= budget

    # Counts fall as growth rises: find the largest growth that still fills the budget.
    lo, hi = 0, len(_GROWTH_GRID) - 1
    if not smallest_growth_fills():
        hi = lo
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(patches_at(mid)) >= budget:
            lo = mid
        else:
            hi = mid - 1
    patches = patches_at(lo)
    available = len(patches)
    if available < budget:
        # Tiny images cannot hold the budget at full resolution: repeat the layout cyclically
        # rather than change the token count the encoder was built for.
        repeats = math.ceil(budget / max(available, 1))
        patches = np.concatenate([patches] * repeats, axis=0)
    # Drop the most eccentric surplus; stable sort keeps the ring/angle order otherwise.
    order = np.argsort(patches[:, 3], kind="stable")[:budget]
    return patches[np.sort(order)], float(_GROWTH_GRID[lo])


def _owned_or_free(x, y, e0, rank, region, points) -> np.ndarray:
    """(M,) bool: the points lie in no fovea, or in one whose owner (first of ``rank``) is ``region``."""
    owner = np.full(x.shape, -1)
    for k in reversed(rank):
        inside = (x - points[k, 0]) ** 2 + (y - points[k, 1]) ** 2 < e0 * e0
        owner[inside] = k
    return (owner == -1) | (owner == region)


@dataclass(frozen=True, kw_only=True)
class AdaptiveBudgetConfig:
    """Token budget that follows scene complexity and a latency target.

    Attributes:
        enabled: when false the budget is ``FoveationConfig.num_tokens`` on every frame.
        min_tokens, max_tokens: the budget's range.
        step: budgets are multiples of ``step`` (within the range), so an encoder captures at
            most ``(max - min) / step + 1`` CUDA graphs.
        latency_target_ms: the vision stage (sampling + encoding) should take at most this [ms].
        ewma_alpha: weight of the newest latency sample in its exponentially weighted average.
        textured_std: grey-level standard deviation [0-255] above which a 16-px block of the
            quarter-resolution image counts as textured (see :func:`scene_complexity`).
    """

    enabled: bool = False
    min_tokens: int = 128
    max_tokens: int = 512
    step: int = 32
    latency_target_ms: float = 10.0
    ewma_alpha: float = 0.2
    textured_std: float = 12.0

    def __post_init__(self):
        for name in ("min_tokens", "max_tokens", "step"):
            value = getattr(self, name)
            if not is_int(value) or not 1 <= value <= 16384:
                raise ValueError(f"foveation.adaptive.{name}={value!r}: must be an integer in [1, 16384]")
        if self.min_tokens > self.max_tokens:
            raise ValueError(
                f"foveation.adaptive.min_tokens={self.min_tokens}: must not exceed max_tokens={self.max_tokens}"
            )
        for name, high in (("latency_target_ms", 1e4), ("ewma_alpha", 1.0), ("textured_std", 255.0)):
            value = getattr(self, name)
            if not is_real(value) or not 0.0 < value <= high:
                raise ValueError(f"foveation.adaptive.{name}={value!r}: must be in (0, {high}]")


def scene_complexity(gray: np.ndarray, textured_std: float = 12.0) -> float:
    """Share of the image that holds detail, in [0, 1].

    The frame is area-downsampled 4x and cut into 16 x 16 blocks (64 px at full resolution); the
    result is the share of blocks whose grey-level standard deviation exceeds ``textured_std``.
    A bare wall gives 0, a cluttered table close to 1.

    Args:
        gray: (H, W) uint8 grey image.
        textured_std: threshold [grey levels].
    """
    small = cv2.resize(gray, (max(1, gray.shape[1] // 4), max(1, gray.shape[0] // 4)), interpolation=cv2.INTER_AREA)
    h, w = (small.shape[0] // 16) * 16, (small.shape[1] // 16) * 16
    if h == 0 or w == 0:
        return float(small.std() > textured_std)
    blocks = small[:h, :w].astype(np.float32).reshape(h // 16, 16, w // 16, 16)
    return float((blocks.std(axis=(1, 3)) > textured_std).mean())


class AdaptiveBudget:
    """Chooses each frame's token budget.

    The complexity target is ``min + complexity * (max - min)``. The latency cap is
    ``latency_target / cost``, where ``cost`` [ms per token] is the exponentially weighted
    average of each measured latency divided by the budget it was measured at (encoder cost
    grows about linearly with tokens at these sizes), so a slow stage sheds tokens and a fast one
    regains them up to the complexity target. The result is rounded down to a multiple of
    ``step`` and clamped to the range, which keeps the set of CUDA graphs small.

    Example:
        >>> budget = AdaptiveBudget(AdaptiveBudgetConfig(enabled=True), initial=273)
        >>> budget.tokens, budget.update(1.0, latency_ms=5.0), budget.update(1.0, latency_ms=40.0)
        (256, 512, 320)
    """

    def __init__(self, cfg: AdaptiveBudgetConfig, initial: int):
        self.cfg = cfg
        self.tokens = self._quantise(initial)
        self.cost_ms_per_token: float | None = None

    def _quantise(self, tokens: float) -> int:
        cfg = self.cfg
        stepped = int(tokens // cfg.step) * cfg.step
        return int(min(max(stepped, cfg.min_tokens), cfg.max_tokens))

    def update(self, complexity: float, latency_ms: float | None) -> int:
        """Fold in one frame's complexity in [0, 1] and the latency [ms] of the vision stage at the
        current budget (None when nothing was encoded); returns the next budget."""
        cfg = self.cfg
        if latency_ms is not None and math.isfinite(latency_ms) and latency_ms > 0:
            cost = latency_ms / self.tokens
            if self.cost_ms_per_token is not None:
                cost = (1 - cfg.ewma_alpha) * self.cost_ms_per_token + cfg.ewma_alpha * cost
            self.cost_ms_per_token = cost
        target = cfg.min_tokens + min(max(complexity, 0.0), 1.0) * (cfg.max_tokens - cfg.min_tokens)
        if self.cost_ms_per_token is not None:
            target = min(target, cfg.latency_target_ms / self.cost_ms_per_token)
        self.tokens = self._quantise(target)
        return self.tokens


def make_example() -> FoveatedLayout:
    """A layout for a 640x480 image fixated left of centre."""
    return foveated_layout(FoveationConfig(), 640, 480, (200.0, 260.0))
