"""``vpi`` flow backend (Jetson Orin OFA through VPI).

Without VPI (every machine but an Orin) the pure parts run: S10.5 conversion, preset mapping,
geometry, resampling of the block field, input preparation, and the unavailable-backend paths.
The tests at the end need the real OFA and skip elsewhere; nothing here fakes VPI.
"""

from __future__ import annotations

import doctest
import importlib.util
import re

import numpy as np
import pytest

from fovea_vla.core.flow import FLOW_BACKENDS, FlowConfig, endpoint_error, make_flow
from fovea_vla.core.flow import vpi as vpi_backend
from fovea_vla.core.flow.base import FLOW_PRESETS, check_frame_pair, flow_at_grid, grid_shape
from fovea_vla.core.flow.flo import read_flo
from fovea_vla.core.flow.vpi import (
    MAX_PYRAMID_LEVELS,
    OFA_GRID,
    native_to_output,
    ofa_geometry,
    ofa_quality,
    s10_5_to_float,
)

HAS_VPI_MODULE = importlib.util.find_spec("vpi") is not None
OFA_OK, OFA_REASON = FLOW_BACKENDS.availability("vpi")
needs_ofa = pytest.mark.skipif(not OFA_OK, reason=f"needs the Jetson Orin OFA: {OFA_REASON}")
without_vpi = pytest.mark.skipif(HAS_VPI_MODULE, reason="checks the path of machines without VPI")


def test_doctests():
    assert doctest.testmod(vpi_backend).failed == 0


# --- S10.5 ----------------------------------------------------------------------------------


def test_s10_5_exact_values_signs_and_saturation():
    raw = np.array(
        [[0, 1], [-1, 32], [-32, 16], [-16, 48], [-49, 1000], [32767, -32768], [-32767, 31], [3200, -3200]],
        np.int16,
    )
    expected = np.array(
        [
            [0.0, 1 / 32],
            [-1 / 32, 1.0],
            [-1.0, 0.5],
            [-0.5, 1.5],
            [-1.53125, 31.25],
            [1023.96875, -1024.0],  # int16 limits: the saturated extremes of S10.5
            [-1023.96875, 0.96875],
            [100.0, -100.0],
        ],
        np.float32,
    )
    out = s10_5_to_float(raw)
    assert out.dtype == np.float32 and out.shape == raw.shape
    np.testing.assert_array_equal(out, expected)  # exact: k / 32 is representable


def test_s10_5_keeps_field_shape_and_is_exact_over_full_range():
    every = np.arange(-32768, 32768, dtype=np.int32).astype(np.int16).reshape(256, 128, 2)
    out = s10_5_to_float(every)
    assert out.shape == (256, 128, 2)
    np.testing.assert_array_equal(out.astype(np.float64) * 32, every.astype(np.float64))


@pytest.mark.parametrize(
    "raw", [np.zeros((4, 2), np.int32), np.zeros((4, 2), np.float32), np.zeros((4, 3), np.int16), np.int16(5)]
)
def test_s10_5_rejects_other_layouts(raw):
    with pytest.raises(ValueError, match=r"int16 S10\.5"):
        s10_5_to_float(np.asarray(raw))


# --- presets --------------------------------------------------------------------------------


def test_preset_mapping_covers_every_stage_preset():
    assert {p: ofa_quality(p) for p in FLOW_PRESETS} == {
        "ultrafast": "LOW",
        "fast": "LOW",
        "medium": "MEDIUM",
        "slow": "HIGH",
    }
    with pytest.raises(ValueError, match=re.escape("flow.preset='turbo'")):
        ofa_quality("turbo")


# --- geometry -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hw", "scale", "grid", "working", "native", "levels"),
    [
        ((480, 640), 1.0, 4, (480, 640), (120, 160), 3),
        ((480, 640), 0.5, 1, (240, 320), (60, 80), 3),
        ((388, 584), 0.5, 4, (194, 292), (49, 73), 3),  # RubberWhale: partial last blocks
        ((436, 1024), 0.25, 4, (109, 256), (28, 64), 2),  # 109 >> 2 = 27 < 32: two levels
        ((64, 64), 1.0, 4, (64, 64), (16, 16), 2),  # the availability probe
        ((40, 90), 0.8, 1, (32, 72), (8, 18), 1),
    ],
)
def test_geometry(hw, scale, grid, working, native, levels):
    g = ofa_geometry(*hw, scale, grid)
    assert g.input_hw == hw and g.working_hw == working and g.native_hw == native
    assert g.output_hw == grid_shape(*hw, grid)
    assert g.levels == levels
    # OFA rules: coarsest level >= 32x32 and >= 4x4 after dividing by the grid.
    assert 1 <= g.levels <= MAX_PYRAMID_LEVELS <= 7
    assert min(working) >> (g.levels - 1) >= 32


def test_geometry_refuses_working_size_under_32():
    with pytest.raises(ValueError, match=re.escape("got 160x31 (640x124 at scale 0.25); raise flow.scale")):
        ofa_geometry(124, 640, 0.25, 4)


def _block_field(dense: np.ndarray) -> np.ndarray:
    """What an ideal OFA returns for a dense working-resolution field: 4x4 block means."""
    return flow_at_grid(dense, OFA_GRID)


def test_identity_geometry_returns_the_ofa_field():
    native = np.random.default_rng(0).normal(size=(120, 160, 2)).astype(np.float32)
    out = native_to_output(native, ofa_geometry(480, 640, 1.0, 4), 4)
    assert out is native


def test_grid1_interpolates_a_linear_field_exactly():
    # Block means of a linear field are its values at the block centres, so bilinear
    # interpolation between block centres reproduces the field away from the border blocks.
    h, w = 64, 96
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    dense = np.stack([0.05 * x + 0.5, -0.02 * y + 0.01 * x], axis=2)
    geometry = ofa_geometry(h, w, 1.0, 1)
    out = native_to_output(_block_field(dense), geometry, 1)
    assert out.shape == (h, w, 2) and out.dtype == np.float32
    inner = (slice(2, h - 2), slice(2, w - 2))  # outside the outermost block centres: extended
    np.testing.assert_allclose(out[inner], dense[inner], atol=1e-5)
    # Border pixels take the border blocks' values.
    np.testing.assert_allclose(out[0, 0], dense[:4, :4].mean(axis=(0, 1)), atol=1e-5)


def test_scale_half_rescales_vectors_and_lands_on_the_output_grid():
    # A uniform translation of (1.25, -0.5) working pixels at scale 0.5 is (2.5, -1.0) input px.
    for grid in (1, 4):
        geometry = ofa_geometry(388, 584, 0.5, grid)
        native = np.empty((*geometry.native_hw, 2), np.float32)
        native[...] = (1.25, -0.5)
        out = native_to_output(native, geometry, grid)
        assert out.shape == (*grid_shape(388, 584, grid), 2) and out.dtype == np.float32
        np.testing.assert_allclose(out[..., 0], 1.25 * 584 / 292, rtol=1e-6)
        np.testing.assert_allclose(out[..., 1], -0.5 * 388 / 194, rtol=1e-6)


def test_scale_half_grid4_follows_a_linear_field():
    # Working-pixel field that is linear in working coordinates; each grid-4 output cell centre
    # maps to a known working coordinate, where the interpolated value must equal the field.
    h, w = 256, 384
    geometry = ofa_geometry(h, w, 0.5, 4)
    hs, ws = geometry.working_hw
    y, x = np.mgrid[0:hs, 0:ws].astype(np.float32)
    dense = np.stack([0.01 * x, 0.02 * y], axis=2)
    out = native_to_output(_block_field(dense), geometry, 4)
    centres_in = 4 * np.arange(geometry.output_hw[1]) + 1.5
    centres_work = (centres_in + 0.5) * 0.5 - 0.5
    expected_u = 0.01 * centres_work * (w / ws)
    inner = slice(2, -2)
    np.testing.assert_allclose(out[10, inner, 0], expected_u[inner], atol=1e-5)


def test_native_shape_mismatch_raises():
    with pytest.raises(ValueError, match="does not match the geometry"):
        native_to_output(np.zeros((10, 10, 2), np.float32), ofa_geometry(480, 640, 1.0, 1), 1)


# --- input preparation ----------------------------------------------------------------------


def test_vpi_inputs_gray_working_size_contiguous():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (388, 584, 3), np.uint8)
    gray = rng.integers(0, 256, (388, 584), np.uint8)
    for prev in (rgb, gray):
        a, b = vpi_backend._vpi_inputs(prev, prev.copy(), (194, 292))
        for out in (a, b):
            assert out.shape == (194, 292) and out.dtype == np.uint8 and out.flags.c_contiguous
    crop = gray[10:200:, 5:300]  # strided view at the working size: copied contiguous
    a, _ = vpi_backend._vpi_inputs(crop, crop, crop.shape)
    assert a.flags.c_contiguous and np.array_equal(a, crop)
    contiguous = np.ascontiguousarray(crop)
    a, _ = vpi_backend._vpi_inputs(contiguous, crop, crop.shape)
    assert a is contiguous  # a contiguous gray frame of the working size is wrapped as is


@pytest.mark.parametrize(
    ("prev", "cur", "message"),
    [
        (np.zeros((64, 64), np.float32), np.zeros((64, 64), np.float32), "uint8"),
        (np.zeros((64, 64, 4), np.uint8), np.zeros((64, 64, 4), np.uint8), r"\(H, W\) or \(H, W, 3\)"),
        (np.zeros((64, 64), np.uint8), np.zeros((64, 65), np.uint8), "same shape"),
        ([[0]], np.zeros((64, 64), np.uint8), "numpy array"),
    ],
)
def test_frame_checks(prev, cur, message):
    with pytest.raises(ValueError, match=message):
        check_frame_pair(prev, cur)


# --- selection without VPI ------------------------------------------------------------------


@without_vpi
def test_registry_reports_vpi_unavailable_with_reason():
    assert "vpi" in FLOW_BACKENDS.names()
    ok, reason = FLOW_BACKENDS.report()["vpi"]
    assert not ok and "VPI Python module is not installed" in reason
    assert next(iter(FLOW_BACKENDS.report())) == "vpi"  # first in auto order


@without_vpi
def test_auto_skips_vpi():
    backend, selection = make_flow(FlowConfig(backend="auto"))
    assert backend.name != "vpi"
    assert "skipped vpi: VPI Python module is not installed" in selection.reason


@without_vpi
def test_explicit_vpi_raises_clear_runtime_error():
    with pytest.raises(RuntimeError, match="flow backend 'vpi' is unavailable: VPI Python module is not installed"):
        make_flow(FlowConfig(backend="vpi"))
    with pytest.raises(RuntimeError, match="not installed"):
        vpi_backend.VpiFlow(FlowConfig())  # direct construction fails the same way


# --- real OFA (Jetson Orin only) ------------------------------------------------------------


@needs_ofa
@pytest.mark.parametrize("grid", [1, 4])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_ofa_output_shape_and_dtype(grid, scale):
    from fovea_vla.core.flow import make_example

    prev, cur, _ = make_example(240, 320, shift=(2.0, -1.0))
    result = make_flow(FlowConfig(backend="vpi", grid=grid, scale=scale))[0].compute(prev, cur)
    assert result.backend == "vpi" and result.confidence is None and result.device_flow is None
    assert result.flow.shape == (*grid_shape(240, 320, grid), 2) and result.flow.dtype == np.float32


@needs_ofa
@pytest.mark.parametrize("preset", ["fast", "medium", "slow"])
def test_ofa_epe_on_real_pair(shared_data, preset):
    # Not calibrated yet: the bound only catches sign, unit and grid errors (which give EPE of
    # several px on RubberWhale). Replace it by ~1.3x the value measured on an Orin.
    import cv2

    frames = shared_data / "VISION-Optical-Flow/data2/other-data-gray/RubberWhale"
    prev, cur = (cv2.imread(str(frames / f"frame{i}.png"), cv2.IMREAD_GRAYSCALE) for i in (10, 11))
    gt = read_flo(shared_data / "VISION-Optical-Flow/data2/other-gt-flow/RubberWhale/flow10.flo")
    flow = make_flow(FlowConfig(backend="vpi", preset=preset, scale=1.0))[0].compute(prev, cur).flow
    assert endpoint_error(flow, gt)["epe"] < 1.0
