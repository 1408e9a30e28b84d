"""nvof backend: ABI layout and fixed-point conversion everywhere; flow quality on an NVIDIA GPU."""

from __future__ import annotations

import ctypes

import cv2
import numpy as np
import pytest

from fovea_vla.core.flow import FLOW_BACKENDS, FlowConfig, endpoint_error, make_example, make_flow
from fovea_vla.core.flow.base import flow_at_grid
from fovea_vla.core.flow.flo import read_flo
from fovea_vla.core.flow.nvof import (
    _BufferDescriptor,
    _ExecuteInput,
    _ExecuteOutput,
    _InitParams,
    _StrideInfo,
    s10_5_to_pixels,
)


def test_structures_match_the_sdk_5_abi():
    """Sizes and the pointer offset of the SDK 5.0 structures on x86_64 (natural alignment)."""
    assert ctypes.sizeof(_InitParams) == 64 and _InitParams.hPrivData.offset == 32
    assert ctypes.sizeof(_BufferDescriptor) == 16
    assert ctypes.sizeof(_ExecuteInput) == 56
    assert ctypes.sizeof(_ExecuteOutput) == 48
    assert ctypes.sizeof(_StrideInfo) == 28


def test_s10_5_conversion_is_exact():
    raw = np.array([[0, 32], [-32, 1], [-1, 32767], [-32768, 16]], dtype=np.int16)
    expected = np.array([[0, 1], [-1, 1 / 32], [-1 / 32, 32767 / 32], [-1024, 0.5]], dtype=np.float32)
    np.testing.assert_array_equal(s10_5_to_pixels(raw), expected)


def test_unavailable_without_a_gpu_says_why():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    ok, reason = FLOW_BACKENDS.availability("nvof")
    assert not ok and reason
    with pytest.raises(RuntimeError, match="nvof"):
        make_flow(FlowConfig(backend="nvof"))


def _nvof(**kwargs):
    ok, reason = FLOW_BACKENDS.availability("nvof")
    if not ok:
        pytest.skip(f"nvof unavailable: {reason}")
    return make_flow(FlowConfig(backend="nvof", **kwargs))[0]


@pytest.mark.gpu
@pytest.mark.parametrize(("grid", "bound"), [(1, 0.25), (4, 0.5)])
def test_known_translation(grid, bound):
    """Project bounds: error in textured regions under 0.25 px at grid 1, 0.5 px at grid 4."""
    prev, cur, _ = make_example(480, 640, shift=(3.4, -2.25), seed=1)
    result = _nvof(grid=grid, preset="medium", scale=1.0).compute(prev, cur)
    assert result.flow.shape == (*(-(-np.array(prev.shape) // grid)), 2)
    interior = result.flow[16 // grid : -16 // grid, 16 // grid : -16 // grid]
    error = np.linalg.norm(interior - np.array([3.4, -2.25]), axis=-1)
    print(f"nvof medium grid {grid}: mean error {error.mean():.3f} px")
    assert error.mean() < bound
    assert result.device_ms is not None and result.device_ms > 0
    assert result.confidence is not None and result.confidence.shape == result.flow.shape[:2]


@pytest.mark.gpu
def test_engine_alone_is_within_half_a_pixel_at_grid_4():
    from fovea_vla.core.flow.nvof import NvofFlow

    _nvof()  # skips without the engine
    prev, cur, _ = make_example(480, 640, shift=(3.4, -2.25), seed=1)
    engine = NvofFlow(FlowConfig(backend="nvof", grid=4, preset="ultrafast", scale=1.0), refine=False)
    error = np.linalg.norm(engine.compute(prev, cur).flow[4:-4, 4:-4] - np.array([3.4, -2.25]), axis=-1)
    print(f"nvof engine alone grid 4: mean error {error.mean():.3f} px")
    assert error.mean() < 0.5


@pytest.mark.gpu
@pytest.mark.parametrize(("grid", "bound"), [(1, 0.25), (4, 0.5)])
def test_rotation(grid, bound):
    rng = np.random.default_rng(4)
    big = cv2.GaussianBlur(rng.uniform(0, 255, (1920, 2560)).astype(np.float32), (0, 0), 8)
    angle = 1.5
    matrix = cv2.getRotationMatrix2D((1279.5, 959.5), angle, 1.0)
    rotated = cv2.warpAffine(big, matrix, (2560, 1920), flags=cv2.INTER_CUBIC)

    def down(image):
        return np.clip(cv2.resize(image, (640, 480), interpolation=cv2.INTER_AREA), 0, 255).astype(np.uint8)

    prev, cur = down(big), down(rotated)
    ys, xs = np.mgrid[0:480, 0:640].astype(np.float64)
    small = cv2.getRotationMatrix2D((319.5, 239.5), angle, 1.0)
    gt = np.stack(
        [
            small[0, 0] * xs + small[0, 1] * ys + small[0, 2] - xs,
            small[1, 0] * xs + small[1, 1] * ys + small[1, 2] - ys,
        ],
        axis=-1,
    )
    result = _nvof(grid=grid, preset="medium", scale=1.0).compute(prev, cur)
    expected = flow_at_grid(gt, grid)
    margin = 32 // grid
    error = np.linalg.norm(result.flow - expected, axis=-1)[margin:-margin, margin:-margin]
    print(f"nvof medium rotation grid {grid}: mean error {error.mean():.3f} px")
    assert error.mean() < bound


@pytest.mark.gpu
def test_torch_input_matches_numpy_and_sizes_change():
    import torch

    prev, cur, _ = make_example(240, 320, shift=(1.5, 0.5))
    flow = _nvof(grid=4, preset="fast", scale=1.0)
    from_numpy = flow.compute(prev, cur).flow
    flow.reset()
    from_torch = flow.compute(torch.from_numpy(prev).cuda(), torch.from_numpy(cur).cuda()).flow
    np.testing.assert_array_equal(from_numpy, from_torch)
    rgb_prev, rgb_cur, _ = make_example(300, 500, shift=(-2.0, 1.0))
    result = flow.compute(np.dstack([rgb_prev] * 3), np.dstack([rgb_cur] * 3))
    assert result.flow.shape == (75, 125, 2)


def _pairs(shared_data):
    middlebury = shared_data / "VISION-Optical-Flow/data2"
    sintel = shared_data / "faldoi-ipol/example_data/clean/easy"
    for name in ("RubberWhale", "Grove2"):
        folder = middlebury / "other-data-gray" / name
        yield name, folder / "frame10.png", folder / "frame11.png", middlebury / "other-gt-flow" / name / "flow10.flo"
    yield "alley_1", sintel / "frame_0002.png", sintel / "frame_0003.png", sintel / "gt/frame_0002.flo"


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["fast", "medium", "slow"])
def test_real_pairs_within_1_5x_of_dis_medium(shared_data, preset):
    flow = _nvof(grid=1, preset=preset, scale=1.0)
    dis = make_flow(FlowConfig(backend="dis", grid=1, preset="medium", scale=1.0))[0]
    for name, a, b, gt_path in _pairs(shared_data):
        prev, cur = cv2.imread(str(a), cv2.IMREAD_GRAYSCALE), cv2.imread(str(b), cv2.IMREAD_GRAYSCALE)
        gt = read_flo(gt_path)
        flow.reset()
        ours = endpoint_error(flow.compute(prev, cur).flow, gt)["epe"]
        reference = endpoint_error(dis.compute(prev, cur).flow, gt)["epe"]
        print(f"{name} nvof-{preset} EPE {ours:.3f} dis-medium {reference:.3f} ratio {ours / reference:.2f}")
        assert ours <= 1.5 * reference, (name, ours, reference)
