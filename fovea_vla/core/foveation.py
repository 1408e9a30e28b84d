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

import numpy as np

__all__ = ["FoveatedLayout", "FoveationConfig", "foveated_layout", "foveated_layout_multi", "make_example"]

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

    @property
    def num_tokens(self) -> int:
        return int(self.centers.shape[0])

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

    def count(index: int) -> tuple[int, np.ndarray]:
        template = _ring_template(float(_GROWTH_GRID[index]), e0, cfg.patch_size, max_radius)
        keep = _inside(template, fx, fy, width, height)
        if len(rank) > 1:
            keep &= _owned_or_free(template[:, 0] + fx, template[:, 1] + fy, e0, rank, region, points)
        return int(keep.sum()), template[keep]

    # Counts fall as growth rises: find the largest growth that still fills the budget.
    lo, hi = 0, len(_GROWTH_GRID) - 1
    if count(lo)[0] < budget:
        hi = lo
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(mid)[0] >= budget:
            lo = mid
        else:
            hi = mid - 1
    available, patches = count(lo)
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


def make_example() -> FoveatedLayout:
    """A layout for a 640x480 image fixated left of centre."""
    return foveated_layout(FoveationConfig(), 640, 480, (200.0, 260.0))
