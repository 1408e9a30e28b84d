"""Foveated sampling layouts (one and several fixations): budget, cortical-magnification density,
borders, determinism, and for several fixations weight shares and no double coverage of a fovea."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from fovea_vla.core.foveation import (
    _GROWTH_GRID,
    FoveationConfig,
    _owned_or_free,
    _ring_template,
    _solve_region,
    foveated_layout,
    foveated_layout_multi,
)

SIZES = [(640, 480), (1920, 1080), (1280, 720), (360, 240), (97, 61)]


@pytest.mark.parametrize(("width", "height"), SIZES)
@pytest.mark.parametrize("where", [(0.5, 0.5), (0.0, 0.0), (1.0, 1.0), (0.2, 0.9), (1.0, 0.0)])
def test_exact_budget_and_centres_inside(width, height, where):
    fixation = (where[0] * (width - 1), where[1] * (height - 1))
    layout = foveated_layout(FoveationConfig(), width, height, fixation)
    assert layout.num_tokens == 273
    assert layout.centers.shape == (273, 2) and layout.centers.dtype == np.float32
    assert (layout.centers[:, 0] >= 0).all() and (layout.centers[:, 0] <= width - 1).all()
    assert (layout.centers[:, 1] >= 0).all() and (layout.centers[:, 1] <= height - 1).all()
    assert (layout.levels >= 0).all()


@pytest.mark.parametrize("budget", [64, 150, 273, 576, 1024])
def test_other_budgets(budget):
    layout = foveated_layout(FoveationConfig(num_tokens=budget), 1280, 720, (400.0, 300.0))
    assert layout.num_tokens == budget


def test_patch_size_follows_magnification():
    """Footprint = 1 / M(e) = (e + e0) / M0 wherever it is above the full-resolution floor."""
    layout = foveated_layout(FoveationConfig(), 1920, 1080, (960.0, 540.0))
    expected = np.maximum(layout.patch_size, (layout.eccentricity + layout.e0) / layout.m0)
    np.testing.assert_allclose(layout.sizes, expected, rtol=1e-5)
    np.testing.assert_allclose(
        1.0 / layout.sizes[layout.sizes > 16], layout.magnification(layout.eccentricity[layout.sizes > 16]), rtol=1e-5
    )


def test_density_falls_with_eccentricity_as_m_squared():
    """Patches per unit area, over bands of rings, match the integral of M(e)^2 within 15%."""
    layout = foveated_layout(FoveationConfig(num_tokens=1024), 1920, 1920, (959.5, 959.5))
    radii = np.unique(layout.eccentricity)
    # Band edges halfway between ring radii, so every ring falls wholly inside one band.
    edges = np.concatenate([[0.0], 0.5 * (radii[1:] + radii[:-1])])
    inside = edges < 900.0  # bands that lie wholly in the image
    edges = edges[inside][::3]
    densities = []
    for inner, outer in itertools.pairwise(edges[1:]):
        count = ((layout.eccentricity >= inner) & (layout.eccentricity < outer)).sum()
        e = np.linspace(inner, outer, 400)
        integrand = 2 * np.pi * e * layout.magnification(e) ** 2
        predicted = float(np.sum(0.5 * (integrand[1:] + integrand[:-1]) * np.diff(e)))
        assert count == pytest.approx(predicted, rel=0.15), (inner, outer, count, predicted)
        densities.append(count / (np.pi * (outer**2 - inner**2)))
    assert len(densities) >= 3
    assert all(a > b for a, b in itertools.pairwise(densities))


def test_levels_grow_with_eccentricity():
    layout = foveated_layout(FoveationConfig(), 1280, 720, (640.0, 360.0))
    order = np.argsort(layout.eccentricity, kind="stable")
    assert (np.diff(layout.levels[order]) >= -1e-6).all()
    assert layout.levels[0] == pytest.approx(math.log2(max(layout.sizes[0], 16) / 16))
    assert layout.levels.max() > layout.levels.min() + 1.0


def test_fovea_at_full_resolution_on_vga():
    layout = foveated_layout(FoveationConfig(), 640, 480, (320.0, 240.0))
    assert layout.rings[0] == 0 and layout.levels[0] == 0.0
    assert (layout.levels[layout.eccentricity < 0.5 * layout.e0] < 0.5).all()


def test_fixation_outside_is_clamped():
    layout = foveated_layout(FoveationConfig(), 640, 480, (-50.0, 1e6))
    np.testing.assert_array_equal(layout.fixation, [0.0, 479.0])
    assert layout.num_tokens == 273


def test_corner_fixation_spends_budget_inside_with_finer_patches():
    """At a corner the budget covers a quarter of the plane, so M0 rises (finer sampling)."""
    centre = foveated_layout(FoveationConfig(), 640, 480, (320.0, 240.0))
    corner = foveated_layout(FoveationConfig(), 640, 480, (0.0, 0.0))
    assert corner.m0 > centre.m0
    # Every image quadrant far from the corner fixation still gets patches.
    far = corner.centers[(corner.centers[:, 0] > 480) & (corner.centers[:, 1] > 360)]
    assert len(far) > 0


def test_deterministic_and_ordered():
    a = foveated_layout(FoveationConfig(), 640, 480, (123.4, 321.0))
    b = foveated_layout(FoveationConfig(), 640, 480, (123.4, 321.0))
    np.testing.assert_array_equal(a.centers, b.centers)
    np.testing.assert_array_equal(a.sizes, b.sizes)
    assert (np.diff(a.rings) >= 0).all()


def test_e0_in_degrees_uses_focal_length():
    cfg = FoveationConfig(e0_deg=10.0)
    assert cfg.e0_pixels(640, 480, focal_px=500.0) == pytest.approx(500.0 * math.tan(math.radians(10.0)))
    assert cfg.e0_pixels(640, 480) == pytest.approx(0.3 * 400.0)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_tokens": 0}, "num_tokens"),
        ({"patch_size": 1}, "patch_size"),
        ({"e0_fraction": 0.0}, "e0_fraction"),
        ({"e0_deg": 95.0}, "e0_deg"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"foveation\.{field}="):
        FoveationConfig(**kwargs)


# -- several fixations ---------------------------------------------------------------------------


def _owner(layout, points):
    """Index of the highest-weight fixation (ties: the first) whose fovea holds each point, -1 if none."""
    owner = np.full(len(points), -1)
    for k in sorted(range(len(layout.weights)), key=lambda k: (-layout.weights[k], k), reverse=True):
        inside = np.hypot(*(points - layout.fixations[k]).T) < layout.e0
        owner[inside] = k
    return owner


MULTI_CASES = [
    ((640, 480), [(160.0, 240.0), (480.0, 240.0)], [0.6, 0.4]),
    ((640, 480), [(320.0, 240.0), (360.0, 260.0)], [0.5, 0.5]),  # foveas overlap almost entirely
    ((1280, 720), [(300.0, 200.0), (900.0, 500.0), (640.0, 100.0)], [0.5, 0.3, 0.2]),
    ((1920, 1080), [(0.0, 0.0), (1919.0, 1079.0), (960.0, 540.0), (400.0, 900.0)], [0.1, 0.2, 0.3, 0.4]),
    ((360, 240), [(100.0, 120.0), (250.0, 100.0)], [0.7, 0.3]),
]


@pytest.mark.parametrize(("size", "fixations", "weights"), MULTI_CASES)
@pytest.mark.parametrize("budget", [64, 273, 576])
def test_multi_exact_budget_and_shares(size, fixations, weights, budget):
    width, height = size
    layout = foveated_layout_multi(FoveationConfig(num_tokens=budget), width, height, fixations, weights)
    assert layout.num_tokens == budget and layout.centers.shape == (budget, 2)
    assert (layout.centers >= 0).all() and (layout.centers[:, 0] <= width - 1).all()
    assert (layout.centers[:, 1] <= height - 1).all()
    counts = np.bincount(layout.regions, minlength=len(weights))
    shares = counts / budget
    np.testing.assert_allclose(shares, weights, rtol=0.1, atol=1.0 / budget)
    np.testing.assert_allclose(layout.weights, weights, rtol=1e-6)


@pytest.mark.parametrize(("size", "fixations", "weights"), MULTI_CASES)
def test_multi_no_double_coverage_of_a_fovea(size, fixations, weights):
    """Every patch centred in a fovea belongs to that fovea's owner: no lower-weight region
    samples a higher-weight fovea, and no other region's periphery samples a fovea either."""
    layout = foveated_layout_multi(FoveationConfig(), *size, fixations, weights)
    owner = _owner(layout, layout.centers)
    assert ((owner == -1) | (owner == layout.regions)).all()
    # In particular, lower-weight regions stay out of higher-weight foveas.
    for k, j in itertools.permutations(range(len(weights)), 2):
        if weights[j] > weights[k]:
            mine = layout.centers[layout.regions == k]
            assert (np.hypot(*(mine - layout.fixations[j]).T) >= layout.e0).all()


def test_multi_respends_dropped_tokens_at_finer_sampling():
    """A region whose fovea overlaps a stronger one spends the dropped tokens elsewhere: with the
    same token count it samples finer (larger M0) than it would alone."""
    cfg = FoveationConfig()
    layout = foveated_layout_multi(cfg, 640, 480, [(300.0, 240.0), (400.0, 240.0)], [0.5, 0.5])
    count = int((layout.regions == 1).sum())
    alone = foveated_layout(FoveationConfig(num_tokens=count), 640, 480, (400.0, 240.0))
    assert layout.region_m0[1] > alone.m0
    # Each region follows its own magnification law.
    for k in range(2):
        mine = layout.regions == k
        expected = np.maximum(cfg.patch_size, (layout.eccentricity[mine] + layout.e0) / layout.region_m0[k])
        np.testing.assert_allclose(layout.sizes[mine], expected, rtol=1e-5)
        np.testing.assert_allclose(
            np.hypot(*(layout.centers[mine] - layout.fixations[k]).T), layout.eccentricity[mine], atol=1e-3
        )


def test_multi_deterministic_and_ordered():
    args = (FoveationConfig(), 1280, 720, [(300.5, 200.25), (900.0, 500.0), (640.0, 100.0)], [0.5, 0.3, 0.2])
    a, b = foveated_layout_multi(*args), foveated_layout_multi(*args)
    for name in ("centers", "sizes", "levels", "regions", "rings", "eccentricity"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert (np.diff(a.regions) >= 0).all()
    for k in range(3):
        assert (np.diff(a.rings[a.regions == k]) >= 0).all()


def test_multi_with_one_fixation_is_the_single_layout():
    single = foveated_layout(FoveationConfig(), 640, 480, (200.0, 100.0))
    multi = foveated_layout_multi(FoveationConfig(), 640, 480, [(200.0, 100.0)], [3.0])
    np.testing.assert_array_equal(single.centers, multi.centers)
    assert (multi.regions == 0).all() and multi.weights.tolist() == [1.0] and single.m0 == multi.m0
    # A region with no tokens owns no fovea: the others are laid out as if it were absent.
    unused = foveated_layout_multi(FoveationConfig(), 640, 480, [(200.0, 100.0), (220.0, 110.0)], [1.0, 0.0])
    np.testing.assert_array_equal(single.centers, unused.centers)
    assert np.isnan(unused.region_m0[1])


@pytest.mark.parametrize(
    ("fixations", "weights"),
    [([], []), ([(1.0, 2.0)], [1.0, 1.0]), ([(1.0, 2.0)], [-1.0]), ([(1.0, 2.0)], [0.0]), ([(np.nan, 2.0)], [1.0])],
)
def test_multi_rejects_bad_input(fixations, weights):
    with pytest.raises(ValueError):
        foveated_layout_multi(FoveationConfig(), 640, 480, fixations, weights)


# -- the growth search against a reference without shortcuts -------------------------------------


def _reference_region(cfg, width, height, fx, fy, e0, max_radius, budget, rank, region, points):
    """The region search that counts every probed template in full, the smallest growth's first."""

    def count(index):
        template = _ring_template(float(_GROWTH_GRID[index]), e0, cfg.patch_size, max_radius)
        x, y = template[:, 0] + fx, template[:, 1] + fy
        keep = (x >= 0.0) & (x <= width - 1.0) & (y >= 0.0) & (y <= height - 1.0)
        if len(rank) > 1:
            keep &= _owned_or_free(x, y, e0, rank, region, points)
        return int(keep.sum()), template[keep]

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
        patches = np.concatenate([patches] * math.ceil(budget / max(available, 1)), axis=0)
    order = np.argsort(patches[:, 3], kind="stable")[:budget]
    return patches[np.sort(order)], float(_GROWTH_GRID[lo])


@pytest.mark.parametrize(("width", "height"), SIZES)
@pytest.mark.parametrize("budget", [64, 273, 1024, 4096])
def test_region_search_matches_the_reference(width, height, budget):
    """Memoised probes and the smallest growth settled on its first rings give the same patches
    and growth, bit for bit, as counting every probe in full (one and several fixations)."""
    cfg = FoveationConfig(num_tokens=budget)
    e0 = cfg.e0_pixels(width, height)
    max_radius = float(math.ceil(math.hypot(width, height) / 64.0) * 64.0)
    rng = np.random.default_rng(budget + width)
    corners = [(0.0, 0.0), (width - 1.0, height - 1.0), (0.0, height - 1.0)]
    randoms = [tuple(rng.uniform(0, 1, 2) * (width - 1, height - 1)) for _ in range(3)]
    for fx, fy in corners + randoms:
        args = (cfg, width, height, fx, fy, e0, max_radius, budget, [0], 0, np.array([(fx, fy)]))
        (patches, growth), (expected, expected_growth) = _solve_region(*args), _reference_region(*args)
        np.testing.assert_array_equal(patches, expected)
        assert growth == expected_growth
    points = np.array(randoms)
    for region in range(3):
        args = (cfg, width, height, *points[region], e0, max_radius, budget // 3, [2, 0, 1], region, points)
        (patches, growth), (expected, expected_growth) = _solve_region(*args), _reference_region(*args)
        np.testing.assert_array_equal(patches, expected)
        assert growth == expected_growth


def test_ring_templates_of_a_smaller_radius_are_prefixes():
    """The search settles the smallest growth on a template of a quarter of the radius, which only
    holds if such a template is the first rows of the full one."""
    for growth in (_GROWTH_GRID[0], _GROWTH_GRID[57], _GROWTH_GRID[120]):
        full = _ring_template(float(growth), 330.4, 16, 2240.0)
        prefix = _ring_template(float(growth), 330.4, 16, 560.0)
        assert len(prefix) < len(full)
        np.testing.assert_array_equal(full[: len(prefix)], prefix)
