"""Flow test inputs with exact ground truth, shared by the backends' tests."""

from __future__ import annotations

import cv2
import numpy as np

from fovea_vla.core.flow.base import flow_at_grid
from fovea_vla.core.flow.flo import read_flo

MIDDLEBURY = "VISION-Optical-Flow/data2"
SINTEL = "faldoi-ipol/example_data/clean/easy"


def rotation_example(
    height: int, width: int, degrees: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Textured pair rotated by ``degrees`` about the image centre, with exact ground truth.

    The texture is a sum of 96 plane waves (periods 6-40 px, random directions and phases),
    evaluated analytically at the pixel centres of both frames: ``cur(x) = T(R⁻¹ (x - c) + c)``
    moves the content at ``q`` to ``R (q - c) + c``, so ``flow(x) = R (x - c) + c - x`` holds with
    no interpolation at all (only the final rounding to uint8).

    Returns:
        ``(prev, cur, flow_gt, residual)``: (H, W) uint8 frames (mean ~128, std 50), (H, W, 2)
        float32 flow in pixels, and the (H, W) float64 check ``T(x) - cur(x + flow_gt(x))`` in
        gray levels before rounding (zero up to float64 rounding when the ground truth is right).
    """
    rng = np.random.default_rng(seed)
    waves = 96
    freq = rng.uniform(1 / 40, 1 / 6, waves)
    angle = rng.uniform(0, np.pi, waves)
    freqs = np.stack([freq * np.cos(angle), freq * np.sin(angle)], axis=1)
    phase = rng.uniform(0, 2 * np.pi, waves)
    amplitude = rng.normal(size=waves)

    def texture(points: np.ndarray) -> np.ndarray:
        return np.cos(2 * np.pi * (points @ freqs.T) + phase) @ amplitude

    a = np.deg2rad(degrees)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    centre = np.array([(width - 1) / 2, (height - 1) / 2])
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    points = np.stack([xs, ys], axis=-1)
    prev_f = texture(points)
    cur_f = texture((points - centre) @ rot + centre)  # row vectors: y @ R = R⁻¹ y
    flow = (points - centre) @ rot.T + centre - points
    gain, offset = 50.0 / prev_f.std(), prev_f.mean()
    # cur at x + flow(x) must show what prev shows at x.
    residual = (prev_f - texture((points + flow - centre) @ rot + centre)) * gain
    prev, cur = (np.clip(np.rint((f - offset) * gain + 128.0), 0, 255).astype(np.uint8) for f in (prev_f, cur_f))
    return prev, cur, flow.astype(np.float32), residual


def interior_error(flow: np.ndarray, gt: np.ndarray, grid: int, margin: int = 16) -> float:
    """Mean endpoint error against ``gt`` block-averaged to ``grid``, ``margin`` px from the border."""
    m = margin // grid
    err = np.linalg.norm(flow - flow_at_grid(gt, grid), axis=2)
    return float(err[m:-m, m:-m].mean())


def load_pair(shared_data, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prev, cur, gt): Middlebury pairs are 8-bit gray; Sintel is read as RGB."""
    if name == "alley_1":
        prev, cur = (
            cv2.cvtColor(cv2.imread(str(shared_data / SINTEL / f"frame_000{i}.png")), cv2.COLOR_BGR2RGB) for i in (2, 3)
        )
        return prev, cur, read_flo(shared_data / SINTEL / "gt/frame_0002.flo")
    frames = shared_data / MIDDLEBURY / "other-data-gray" / name
    prev, cur = (cv2.imread(str(frames / f"frame{i}.png"), cv2.IMREAD_GRAYSCALE) for i in (10, 11))
    return prev, cur, read_flo(shared_data / MIDDLEBURY / "other-gt-flow" / name / "flow10.flo")
