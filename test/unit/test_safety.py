"""Safety layer: the limit filter under adversarial input, braking at the box, config validation, the monitor.

The filter treats every dim independently, so one filter over many dims runs many independent
sequences at once. Simulated clock, seeded RNGs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fovea_vla.core.policy.executor import Chunk, ChunkExecutor, ExecutorConfig
from fovea_vla.core.policy.safety import SafetyFilter, SafetyLimits, SafetyMonitor, WatchdogConfig

TOLERANCE = 1 + 1e-9


def _random_limits(rng, num_dims: int) -> SafetyLimits:
    """Finite limits of random size, with some infinite entries (the checks must hold with inf too)."""
    low, high = -rng.uniform(0.2, 2.0, num_dims), rng.uniform(0.2, 2.0, num_dims)
    vmax, amax = rng.uniform(0.1, 5.0, num_dims), rng.uniform(0.5, 50.0, num_dims)
    for values, sign in ((low, -1), (high, 1), (vmax, 1), (amax, 1)):
        values[rng.random(num_dims) < 0.05] = sign * math.inf
    return SafetyLimits(
        position_min=tuple(low), position_max=tuple(high), velocity_max=tuple(vmax), acceleration_max=tuple(amax)
    )


def _adversarial_desired(rng, num_ticks: int, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """(T, N) desired positions, N = len(low), from five generators in equal shares, NaN/inf sprinkled."""
    num = len(low)
    low, high = np.where(np.isfinite(low), low, -2.0), np.where(np.isfinite(high), high, 2.0)
    span, centre = high - low, (low + high) / 2
    ticks = np.arange(num_ticks)[:, None]
    kind = np.arange(num) % 5
    huge = rng.uniform(-1e6, 1e6, (num_ticks, num))
    walk = centre + np.cumsum(rng.normal(0, 0.5, (num_ticks, num)) * span, axis=0)
    flips = centre + 3 * span * np.sign(np.sin(2 * np.pi * ticks / rng.integers(2, 40, num)) + 1e-3)
    outside = centre + np.where(rng.random(num) < 0.5, -1, 1) * rng.uniform(0.6, 5, num) * span + 0 * ticks
    waves = centre + 0.6 * span * np.sin(2 * np.pi * ticks * rng.uniform(0.01, 0.3, num))  # inside, too fast
    desired = np.choose(kind, [huge, walk, flips, outside, waves])
    bad = rng.random(desired.shape) < 0.05
    desired[bad] = rng.choice([np.nan, np.inf, -np.inf], bad.sum())
    return desired


def _check_limits(positions: np.ndarray, start: np.ndarray, limits: SafetyLimits, period_s: float) -> None:
    """Box, |v| and |a| of the (T, N) commanded positions' finite differences, from rest at ``start``."""
    assert np.isfinite(positions).all()
    low, high = np.array(limits.position_min), np.array(limits.position_max)
    assert ((positions >= low) & (positions <= high)).all(), "left the box"
    velocity = np.diff(np.vstack([start, positions]), axis=0) / period_s
    acceleration = np.diff(np.vstack([np.zeros_like(start), velocity]), axis=0) / period_s
    assert (np.abs(velocity) <= np.array(limits.velocity_max) * TOLERANCE).all(), "velocity limit"
    assert (np.abs(acceleration) <= np.array(limits.acceleration_max) * TOLERANCE).all(), "acceleration limit"


@pytest.mark.parametrize("period_s", [0.02, 0.002])
def test_filter_never_exceeds_the_limits(period_s):
    rng = np.random.default_rng(round(1 / period_s))
    num_sequences, num_ticks = 1000, 200
    limits = _random_limits(rng, num_sequences)
    low, high = np.array(limits.position_min), np.array(limits.position_max)
    start = np.clip(np.where(np.isfinite(low), low, -2) + rng.random(num_sequences) * 4, low, high)
    desired = _adversarial_desired(rng, num_ticks, low, high)
    safety = SafetyFilter(limits, period_s)
    safety.reset(start)
    results = [safety.apply(row) for row in desired]
    positions = np.array([r.position for r in results])
    _check_limits(positions, start, limits, period_s)
    # The reported velocity and acceleration are those finite differences.
    velocity = np.diff(np.vstack([start, positions]), axis=0) / period_s
    np.testing.assert_allclose([r.velocity for r in results], velocity, rtol=0, atol=1e-9)
    # Adversarial enough: every limit intervened, and a tick where nothing intervened follows the input.
    assert {"position", "velocity", "acceleration", "nan"} <= set().union(*(r.clamped for r in results))
    free = [i for i, r in enumerate(results) if not r.clamped]
    for i in free:
        np.testing.assert_array_equal(results[i].position, desired[i])
    # Negative control: the raw input breaks the checker.
    with pytest.raises(AssertionError):
        _check_limits(np.nan_to_num(desired, posinf=0, neginf=0), start, limits, period_s)


def test_executor_output_stays_within_the_limits():
    rng = np.random.default_rng(11)
    dims, period_s = 4, 0.02
    limits = SafetyLimits(
        position_min=(-1.0, -0.5, -math.inf, 0.0),
        position_max=(1.0, 0.5, math.inf, 0.08),
        velocity_max=(1.0, 0.5, 2.0, 0.2),
        acceleration_max=(5.0, 2.0, 10.0, math.inf),
    )
    executor = ChunkExecutor(ExecutorConfig(), limits)
    start = np.array([0.2, -0.1, 3.0, 0.04])
    executor.reset(start, 0.0)
    positions, rejected = [], 0
    for k in range(1, 400):
        t = k * period_s
        if k % 5 == 0:
            actions = rng.choice([1.0, 1e3, 1e6]) * rng.normal(size=(16, dims))
            if k % 15 == 0:
                actions[rng.integers(16), rng.integers(dims)] = rng.choice([np.nan, np.inf])
            rejected += executor.add_chunk(Chunk(actions, t - 0.05, 0.1, round((t - 0.05) * 1e9)), t) is not None
        command = executor.step(t)
        assert np.isfinite(command.velocity).all() and np.isfinite(command.acceleration).all()
        positions.append(command.position)
    assert rejected == executor.counters["rejected_non_finite"] > 0
    assert executor.counters["clamped_position"] > 0 and executor.counters["clamped_acceleration"] > 0
    _check_limits(np.array(positions), start, limits, period_s)


def test_braking_stops_exactly_at_the_wall():
    limits = SafetyLimits(position_min=(-1.0,), position_max=(1.0,), velocity_max=(2.0,), acceleration_max=(4.0,))
    period_s = 0.01
    safety = SafetyFilter(limits, period_s)
    safety.reset(np.array([-1.0]))
    results = [safety.apply(np.array([100.0])) for _ in range(300)]
    positions = np.array([r.position[0] for r in results])
    speeds = np.array([r.velocity[0] for r in results])
    assert speeds.max() == pytest.approx(2.0)  # it reached full speed towards the wall ...
    braking = np.flatnonzero(np.diff(speeds) < 0)
    assert positions[braking[0]] < 0.6  # ... started braking well before it (v^2 / 2a = 0.5) ...
    assert positions.max() <= 1.0 and positions[-1] == 1.0  # ... and stops exactly at the wall
    assert (speeds[-100:] == 0).all()
    assert any("position" in r.clamped for r in results[braking[0] : braking[-1]])
    _check_limits(positions[:, None], np.array([-1.0]), limits, period_s)
    # A NaN at full speed: the axis brakes to a hold within the limits instead of jumping.
    safety.reset(np.array([-1.0]))
    results = [safety.apply(np.array([100.0])) for _ in range(60)]
    results += [safety.apply(np.array([np.nan])) for _ in range(100)]
    assert "nan" in results[60].clamped and results[-1].velocity[0] == 0
    _check_limits(np.array([r.position for r in results]), np.array([-1.0]), limits, period_s)


def test_start_outside_the_box_decelerates_back_in():
    limits = SafetyLimits(position_min=(-1.0,), position_max=(1.0,), velocity_max=(0.5,), acceleration_max=(2.0,))
    safety = SafetyFilter(limits, 0.02)
    safety.reset(np.array([1.5]))
    positions = np.array([safety.apply(np.array([5.0])).position[0] for _ in range(200)])
    inside = np.flatnonzero(positions <= 1.0)
    assert positions.max() < 1.5 and positions[-1] == 1.0  # heads back in at once and settles on the edge
    assert (np.abs(positions[inside[0] :]) <= 1.0).all()  # once in, it stays in
    velocity = np.diff(np.concatenate([[1.5], positions])) / 0.02
    assert (np.abs(velocity) <= 0.5 * TOLERANCE).all()
    assert (np.abs(np.diff(np.concatenate([[0.0], velocity]))) / 0.02 <= 2.0 * TOLERANCE).all()


def test_unstoppable_state_gets_the_hardest_deceleration():
    """From rest the filter's intervals always intersect (see its proof); a state moving out of the box
    faster than it can stop (set directly: the API cannot reach it) gets the full deceleration."""
    limits = SafetyLimits(position_min=(-1.0,), position_max=(1.0,), velocity_max=(3.0,), acceleration_max=(2.0,))
    safety = SafetyFilter(limits, 0.02)
    safety.reset(np.array([0.99]))
    safety._velocity = np.array([2.0])
    results = [safety.apply(np.array([5.0])) for _ in range(400)]
    velocities = np.array([r.velocity[0] for r in results])
    np.testing.assert_allclose(velocities[:10], 2.0 - 0.04 * np.arange(1, 11), atol=1e-9)
    assert results[0].position[0] > 1.0  # it cannot stay in the box ...
    assert (
        np.abs(np.diff(np.concatenate([[2.0], velocities]))) / 0.02 <= 2.0 * TOLERANCE
    ).all()  # ... nor brake harder
    assert (np.abs(velocities) <= 3.0 * TOLERANCE).all()
    assert results[-1].position[0] == 1.0 and velocities[-1] == 0  # back at the wall, at rest


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"position_max": (1.0,)}, "limits.position_max"),
        ({"position_min": (2.0, 0.0)}, "limits.position_max"),
        ({"velocity_max": (1.0, 0.0)}, "limits.velocity_max"),
        ({"velocity_max": (1.0, -2.0)}, "limits.velocity_max"),
        ({"acceleration_max": (math.nan, 1.0)}, "limits.acceleration_max"),
        ({"position_min": (math.inf, 0.0)}, "limits.position_min"),
        ({"position_min": "ab"}, "limits.position_min"),
    ],
)
def test_limits_validation_names_the_field(fields, message):
    valid = {
        "position_min": (-1.0, -1.0),
        "position_max": (1.0, 1.0),
        "velocity_max": (1.0, 1.0),
        "acceleration_max": (1.0, math.inf),
    }
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        SafetyLimits(**(valid | fields))
    assert SafetyLimits(**valid).num_dims == 2
    assert SafetyLimits.unlimited(3).velocity_max == (math.inf,) * 3


def test_other_configs_are_validated():
    with pytest.raises(ValueError, match=r"watchdog\.max_observation_age_s"):
        WatchdogConfig(max_observation_age_s=0.0)
    with pytest.raises(ValueError, match=r"watchdog\.required"):
        WatchdogConfig(required="frame")
    with pytest.raises(ValueError, match="period_s"):
        SafetyFilter(SafetyLimits.unlimited(1), 0.0)
    with pytest.raises(ValueError, match="position"):
        SafetyFilter(SafetyLimits.unlimited(2), 0.02).reset(np.array([0.0, np.nan]))


def test_monitor_counts_transitions_and_latches_the_estop():
    monitor = SafetyMonitor(WatchdogConfig(max_observation_age_s=0.2, required=("frame", "state")))
    assert monitor.check(0.0) == "no_frame"
    monitor.observe("frame", 0.0)
    assert monitor.check(0.0) == "no_state"
    monitor.observe("state", 0.0)
    monitor.observe("depth", -5.0)  # not required: ignored
    assert [monitor.check(t) for t in (0.1, 0.2, 0.25, 0.3)] == [None, None, "stale_frame", "stale_frame"]
    monitor.observe("frame", 0.3)
    monitor.observe("frame", 0.1)  # older than the newest: ignored
    assert monitor.check(0.3) == "stale_state"
    monitor.observe("state", 0.3)
    assert monitor.check(0.31) is None
    monitor.observe("state", 0.9)  # a clock mismatch
    assert monitor.check(0.35) == "future_state"
    monitor.observe("state", 0.35)  # still the newest is 0.9
    assert monitor.check(0.4) == "future_state"
    monitor.observe("frame", 0.9)
    assert monitor.check(0.9) is None
    assert dict(monitor.counters) == {
        "no_frame": 1,
        "no_state": 1,
        "stale_frame": 1,
        "stale_state": 1,
        "future_state": 1,
    }

    monitor.observe("frame", 1.0)
    monitor.estop(True, 1.0)
    assert monitor.latched_at_s == 1.0
    assert [monitor.check(1.0 + 0.01 * i) for i in range(5)] == ["estop"] * 5
    assert monitor.rearm(1.05) == (False, "estop_engaged")  # input still engaged
    monitor.estop(False, 1.06)
    assert monitor.check(1.07) == "estop"  # releasing does not unlatch
    monitor.observe("state", 1.0)
    assert monitor.rearm(1.5) == (True, "stale_frame")  # unlatched, the watchdog still stops
    assert monitor.latched_at_s is None
    monitor.observe("frame", 1.5)
    monitor.observe("state", 1.5)
    assert monitor.check(1.5) is None
    monitor.estop(True, 1.6)
    monitor.estop(True, 1.7)  # already latched: the latch time stays
    assert monitor.latched_at_s == 1.6 and monitor.check(1.7) == "estop"
    assert monitor.counters["estop"] == 2 and monitor.counters["stale_frame"] == 2
