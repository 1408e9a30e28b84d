"""Saccade scheduling: rate, inhibition of return, events, pursuit priority, latency, multiple fixations.

Scenes are synthetic 640x480 frames at 30 fps: a static gray frame with bright discs (salient
targets for the spectral-residual map) and constructed flow fields (exact motion).
"""

from __future__ import annotations

import itertools

import cv2
import numpy as np
import pytest

from fovea_vla.core.fixation import FixationConfig, FixationController, FixationMode, FixationSource

WIDTH, HEIGHT, GRID, FPS = 640, 480, 4, 30.0
STILL = np.zeros((HEIGHT // GRID, WIDTH // GRID, 2), np.float32)


def salient_scene(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) uint8 gray frame with 12 discs of different size and contrast on a 4x3 grid, and
    their (12, 2) centres [px]."""
    rng = np.random.default_rng(seed)
    gray = cv2.GaussianBlur(rng.integers(50, 90, (HEIGHT, WIDTH), dtype=np.uint8), (0, 0), 1.5)
    centres = []
    for (i, j), radius, level in zip(
        itertools.product(range(3), range(4)), rng.uniform(8, 18, 12), rng.uniform(150, 255, 12), strict=True
    ):
        x, y = 90 + 150 * j + rng.uniform(-20, 20), 90 + 150 * i + rng.uniform(-20, 20)
        cv2.circle(gray, (round(x), round(y)), round(radius), int(level), -1)
        centres.append((x, y))
    return gray, np.asarray(centres)


def moving_blob(center, velocity, radius=25.0) -> tuple[np.ndarray, np.ndarray]:
    """Flow (Hg, Wg, 2) of a disc moving with ``velocity`` [px/frame] and its (Hg, Wg) mask."""
    ys, xs = np.mgrid[0 : HEIGHT // GRID, 0 : WIDTH // GRID] * GRID + (GRID - 1) / 2
    inside = (xs - center[0]) ** 2 + (ys - center[1]) ** 2 <= radius**2
    flow = STILL.copy()
    flow[inside] = velocity
    return flow, inside


def run_static(
    ctrl: FixationController, gray: np.ndarray, frames: int, start: int = 0
) -> list[tuple[float, float, float]]:
    """Feed a still scene; return (time [s], x, y) of every saccade."""
    saccades = []
    for i in range(start, start + frames):
        state = ctrl.update(STILL, GRID, i / FPS, gray=gray)
        if ctrl.fixations.saccade is not None:
            assert state.mode == FixationMode.SACCADE and state.source == FixationSource.SACCADE
            saccades.append((i / FPS, state.x, state.y))
    return saccades


@pytest.mark.parametrize("rate", [1.0, 2.0, 4.0, 6.0])
def test_scheduled_rate(rate):
    """10 s at 30 fps of a static salient scene: rate x 10 s saccades, within one."""
    gray, _ = salient_scene()
    ctrl = FixationController(FixationConfig(saccade_rate_hz=rate), WIDTH, HEIGHT)
    saccades = run_static(ctrl, gray, 300)
    assert abs(len(saccades) - rate * 10.0) <= 1, len(saccades)


def test_rate_zero_means_events_only():
    gray, _ = salient_scene()
    ctrl = FixationController(FixationConfig(saccade_rate_hz=0.0), WIDTH, HEIGHT)
    assert run_static(ctrl, gray, 150) == []


def test_saccades_land_on_salient_targets():
    gray, centres = salient_scene()
    ctrl = FixationController(FixationConfig(), WIDTH, HEIGHT)
    for _, x, y in run_static(ctrl, gray, 90):
        assert np.min(np.hypot(centres[:, 0] - x, centres[:, 1] - y)) < 15.0


@pytest.mark.parametrize("window_s", [1.0, 2.0])
def test_inhibition_of_return(window_s):
    """No saccade lands within the IOR radius of a target visited less than the window ago;
    targets are revisited once the window has passed."""
    gray, _ = salient_scene()
    ctrl = FixationController(FixationConfig(saccade_rate_hz=4.0, ior_window_s=window_s), WIDTH, HEIGHT)
    saccades = run_static(ctrl, gray, 300)
    revisits = []
    for (t0, x0, y0), (t1, x1, y1) in itertools.combinations(saccades, 2):
        if np.hypot(x1 - x0, y1 - y0) < ctrl.ior_radius:
            assert t1 - t0 >= window_s - 1e-6, (t0, t1)
            revisits.append(t1 - t0)
    assert revisits, "no target was ever revisited"
    assert min(revisits) < window_s + 0.5


def test_new_motion_away_from_the_fovea_triggers_a_saccade():
    gray, _ = salient_scene()
    ctrl = FixationController(FixationConfig(saccade_rate_hz=0.0), WIDTH, HEIGHT)
    run_static(ctrl, gray, 30)
    centre, velocity = np.array([120.0, 380.0]), np.array([2.0, -1.0])
    triggers = []
    for i in range(30, 33):
        flow, mask = moving_blob(centre, velocity)
        state = ctrl.update(flow, GRID, i / FPS, gray=gray, independent=mask)
        centre = centre + velocity
        triggers.append(ctrl.fixations.saccade)
        if triggers[-1]:
            break
    assert triggers[-1] == "new_motion" and len(triggers) <= 2, triggers
    # It lands on the mover's centre and pursues it.
    assert np.hypot(state.x - centre[0], state.y - centre[1]) < 6.0
    flow, mask = moving_blob(centre, velocity)
    assert ctrl.update(flow, GRID, 33 / FPS, gray=gray, independent=mask).mode == FixationMode.PURSUE


def test_motion_already_present_or_in_the_fovea_is_no_event():
    gray, _ = salient_scene()
    ctrl = FixationController(FixationConfig(saccade_rate_hz=0.0, saccade_events=("new_motion",)), WIDTH, HEIGHT)
    centre = np.array([330.0, 250.0])  # inside the window around the start at the image centre
    velocity = np.array([1.0, 0.0])
    for i in range(30):
        flow, mask = moving_blob(centre, velocity)
        state = ctrl.update(flow, GRID, i / FPS, gray=gray, independent=mask)
        centre = centre + velocity
        assert ctrl.fixations.saccade is None
    assert state.mode == FixationMode.PURSUE


def test_scene_cut_triggers_a_saccade_into_the_new_scene():
    gray, _ = salient_scene(0)
    new_gray, new_centres = salient_scene(7)
    ctrl = FixationController(FixationConfig(saccade_rate_hz=0.0), WIDTH, HEIGHT)
    run_static(ctrl, gray, 30)
    state = ctrl.update(None, GRID, 30 / FPS, gray=new_gray, is_cut=True)
    assert ctrl.fixations.saccade == "cut"
    assert np.min(np.hypot(new_centres[:, 0] - state.x, new_centres[:, 1] - state.y)) < 15.0


def test_instruction_change_triggers_a_saccade():
    gray, _ = salient_scene()
    ctrl = FixationController(FixationConfig(saccade_rate_hz=0.0), WIDTH, HEIGHT)
    run_static(ctrl, gray, 30)
    ctrl.notify_instruction_change()
    ctrl.update(STILL, GRID, 30 / FPS, gray=gray)
    assert ctrl.fixations.saccade == "instruction"


def test_instruction_change_clears_ior():
    """Scheduled saccades visit A, then B; after an instruction change A is worth a look again
    (only B, the current fixation, is inhibited), where without the change IOR would forbid it."""
    gray, _ = salient_scene()
    ctrl = FixationController(FixationConfig(saccade_rate_hz=4.0, min_saccade_interval_s=0.1), WIDTH, HEIGHT)
    (_, ax, ay), (_, bx, by) = run_static(ctrl, gray, 18)
    assert (ctrl.state.x, ctrl.state.y) == pytest.approx((bx, by))
    ctrl.notify_instruction_change()
    state = ctrl.update(STILL, GRID, 18 / FPS, gray=gray)
    assert ctrl.fixations.saccade == "instruction"
    assert np.hypot(state.x - ax, state.y - ay) < 1.0
    # A is inhibited again from its new landing time.
    later = run_static(ctrl, gray, 15, start=19)
    assert all(np.hypot(x - ax, y - ay) >= ctrl.ior_radius for _, x, y in later)


def test_event_waits_out_the_minimum_interval():
    gray, _ = salient_scene()
    ctrl = FixationController(FixationConfig(saccade_rate_hz=0.0, min_saccade_interval_s=0.2), WIDTH, HEIGHT)
    run_static(ctrl, gray, 10)
    ctrl.notify_instruction_change()
    ctrl.update(STILL, GRID, 10 / FPS, gray=gray)
    assert ctrl.fixations.saccade == "instruction"
    ctrl.notify_instruction_change()
    fired = [t for t, _, _ in run_static(ctrl, gray, 10, start=11)]
    assert fired == [pytest.approx(16 / FPS)]  # the first frame >= 0.2 s after frame 10


def test_hold_drops_events():
    gray, _ = salient_scene()
    ctrl = FixationController(FixationConfig(), WIDTH, HEIGHT)
    ctrl.set_external(50.0, 50.0, now_s=0.0, hold_s=0.5)
    ctrl.notify_instruction_change()
    assert run_static(ctrl, gray, 14, start=1) == []
    assert ctrl.state.source == FixationSource.EXTERNAL


def test_pursuit_suppresses_scheduled_saccades():
    """A confident pursuit holds the gaze at 4 Hz scheduling; the overdue saccade follows once
    the target stops (after the coast time)."""
    gray, _ = salient_scene()
    cfg = FixationConfig(saccade_rate_hz=4.0, coast_s=0.5)
    ctrl = FixationController(cfg, WIDTH, HEIGHT)
    centre, velocity = np.array([330.0, 250.0]), np.array([2.0, 1.0])
    for i in range(60):
        flow, mask = moving_blob(centre, velocity)
        state = ctrl.update(flow, GRID, i / FPS, gray=gray, independent=mask)
        centre = centre + velocity
        assert ctrl.fixations.saccade is None, i
        assert state.mode == FixationMode.PURSUE
    assert np.hypot(state.x - centre[0], state.y - centre[1]) < 6.0
    saccades = run_static(ctrl, gray, 30, start=60)
    assert saccades and saccades[0][0] - 59 / FPS == pytest.approx(cfg.coast_s + 1 / FPS, abs=1.5 / FPS)


def test_latency_compensation_leads_by_velocity_times_latency():
    ctrl = FixationController(FixationConfig(latency_s=0.1, saccade_rate_hz=0.0), WIDTH, HEIGHT)
    centre, velocity = np.array([300.0, 250.0]), np.array([3.0, 1.5])
    for i in range(45):
        flow, mask = moving_blob(centre, velocity)
        state = ctrl.update(flow, GRID, i / FPS, independent=mask)
        centre = centre + velocity
    lead = state.position - state.filtered
    np.testing.assert_allclose(lead, velocity * FPS * 0.1, rtol=0.1)
    # The published position is where the target is 0.1 s (3 frames) after capture.
    future = centre + 3 * velocity
    assert np.linalg.norm(state.position - future) < 4.0
    assert np.linalg.norm(state.position - future) < np.linalg.norm(state.filtered - future)


def test_multiple_fixations_are_separated_and_weighted():
    gray, centres = salient_scene()
    cfg = FixationConfig(num_fixations=4, primary_weight=0.4)
    ctrl = FixationController(cfg, WIDTH, HEIGHT)
    ctrl.update(STILL, GRID, 0.0, gray=gray)
    fixations = ctrl.fixations
    assert len(fixations.fixations) == len(fixations.weights) == 4
    assert fixations.primary == ctrl.state
    assert sum(fixations.weights) == pytest.approx(1.0) and fixations.weights[0] == pytest.approx(0.4)
    assert list(fixations.weights[1:]) == sorted(fixations.weights[1:], reverse=True)
    points = np.array([(f.x, f.y) for f in fixations.fixations])
    for a, b in itertools.combinations(points, 2):
        assert np.hypot(*(a - b)) >= ctrl.ior_radius
    for x, y in points[1:]:
        assert np.min(np.hypot(centres[:, 0] - x, centres[:, 1] - y)) < 15.0


def test_external_relevance_steers_the_saccade():
    """A relevance map (e.g. from the encoder) outweighs saliency where it is high."""
    gray, centres = salient_scene()
    relevance = np.zeros((12, 16), np.float32)
    target = centres[9]
    relevance[int(target[1] // 40), int(target[0] // 40)] = 1.0
    ctrl = FixationController(FixationConfig(saccade_rate_hz=0.0), WIDTH, HEIGHT)
    ctrl.notify_instruction_change()
    state = ctrl.update(STILL, GRID, 0.0, gray=gray, relevance=relevance)
    assert ctrl.fixations.saccade == "instruction"
    assert np.hypot(state.x - target[0], state.y - target[1]) < 40.0
