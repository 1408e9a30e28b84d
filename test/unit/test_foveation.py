"""Foveated sampling layout: budget, cortical-magnification density, borders, determinism."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from fovea_vla.core.foveation import FoveationConfig, foveated_layout

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
