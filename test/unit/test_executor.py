"""Chunk executor: spline, splices keep the chunks' own jerk, latency, rejections, starvation, stops, preview.

Everything runs on a simulated clock (ticks ``k * DT``); no wall clock, seeded RNGs.
"""

from __future__ import annotations

import numpy as np
import pytest

from fovea_vla.core.policy.executor import Chunk, ChunkExecutor, ChunkSpline, ExecutorConfig
from fovea_vla.core.policy.safety import SafetyLimits, SafetyMonitor, WatchdogConfig

DT = 0.02  # control period [s] of the default 50 Hz
STEP = 0.1  # chunk step [s]
K = 16  # chunk length


def _chunk(function, start_s: float, num_steps: int = K) -> Chunk:
    """A chunk sampling ``function`` (times (K,) [s] -> (K, D)) at its step times, stamped at ``start_s``."""
    return Chunk(function(start_s + STEP * np.arange(num_steps)), start_s, STEP, round(start_s * 1e9))


def _third_difference(positions: np.ndarray) -> np.ndarray:
    """(N - 3, D) discrete jerk (p_k - 3 p_{k-1} + 3 p_{k-2} - p_{k-3}) / DT**3 of (N, D) positions."""
    return (positions[3:] - 3 * positions[2:-1] + 3 * positions[1:-2] - positions[:-3]) / DT**3


def _within_jerk(chunk: Chunk) -> np.ndarray:
    """(D,) largest discrete jerk of the chunk's own spline sampled at the control rate over its span."""
    times = chunk.start_s + DT * np.arange(round((chunk.end_s - chunk.start_s) / DT) + 1)
    return np.abs(_third_difference(ChunkSpline(chunk).evaluate(times)[0])).max(axis=0)


def _policy_stream(seed: int, duration_s: float = 20.0, dims: int = 7):
    """Chunks of a random smooth trajectory as a policy would send them.

    The trajectory is at rest until 0.5 s, then a sum of three ``1 - cos`` waves per dim (0.2-1 Hz)
    whose clock speeds up smoothly from 0 to 1 over 1 s. Every 0.25-0.4 s a frame is captured; its
    chunk (K steps of STEP from the capture time) samples the trajectory shifted in time by its own
    random amount per dim (5 ms standard deviation: tens of mm where it moves fast), so consecutive
    chunks disagree in position, velocity and acceleration. It arrives 60-150 ms after the capture.

    Returns:
        The chunks and their arrival times [s].
    """
    rng = np.random.default_rng(seed)
    freq = rng.uniform(0.2, 1.0, (3, 1, dims))
    amp = rng.uniform(0.05, 0.3, (3, 1, dims))

    def trajectory(t):  # (K, D) times [s] -> (K, D)
        x = np.clip(t - 0.5, 0.0, 1.0)
        clock = x**4 * (2.5 - 3 * x + x**2) + np.maximum(t - 1.5, 0.0)  # its derivative is the smoothstep
        return (amp * (1.0 - np.cos(2 * np.pi * freq * clock))).sum(axis=0)

    chunks, arrivals, capture = [], [], 0.1
    while capture < duration_s:
        shift = rng.normal(0.0, 0.005, dims)
        chunks.append(_chunk(lambda t, s=shift: trajectory(t[:, None] + s), capture))
        arrivals.append(capture + rng.uniform(0.06, 0.15))
        capture += rng.uniform(0.25, 0.4)
    return chunks, arrivals


def _run(executor: ChunkExecutor, chunks, arrivals, ticks, on_tick=None):
    """Offer each chunk at its arrival and tick at ``ticks``.

    Returns:
        The commands, the (N, 2) splice windows [s] of the N accepted chunks and the rejection reasons.
    """
    commands, windows, rejections, pending = [], [], [], 0
    for t in ticks:
        while pending < len(chunks) and arrivals[pending] <= t:
            reason = executor.add_chunk(chunks[pending], arrivals[pending])
            if reason is None:
                windows.append(executor.splice_window)
            else:
                rejections.append(reason)
            pending += 1
        commands.append(executor.step(t))
        if on_tick is not None:
            on_tick(executor, t)
    return commands, np.array(windows), rejections


def _positions(commands) -> np.ndarray:
    return np.array([c.position for c in commands])


def test_spline_interpolates_and_is_c2():
    rng = np.random.default_rng(0)
    actions = rng.normal(size=(K, 3))
    chunk = Chunk(actions, 2.0, STEP, 1)
    spline = ChunkSpline(chunk)
    knots = 2.0 + STEP * np.arange(K)
    p, _, a, j = spline.evaluate(knots)
    np.testing.assert_allclose(p, actions, atol=1e-12)
    np.testing.assert_allclose(a[[0, -1]], 0.0, atol=1e-9)  # natural end conditions
    # Independent reference: the natural spline's knot accelerations from a dense solve.
    system = np.zeros((K, K))
    system[0, 0] = system[-1, -1] = 1.0
    for i in range(1, K - 1):
        system[i, i - 1 : i + 2] = (1.0, 4.0, 1.0)
    rhs = np.zeros_like(actions)
    rhs[1:-1] = 6 * (actions[2:] - 2 * actions[1:-1] + actions[:-2]) / STEP**2
    np.testing.assert_allclose(a, np.linalg.solve(system, rhs), atol=1e-9)
    # C2: velocity and acceleration continuous across the interior knots (jerk is piecewise constant).
    eps = 1e-7
    left, right = spline.evaluate(knots[1:-1] - eps), spline.evaluate(knots[1:-1] + eps)
    assert np.abs(left[1] - right[1]).max() < 1e-9 + 2 * eps * np.abs(a).max()
    assert np.abs(left[2] - right[2]).max() < 1e-9 + 2 * eps * np.abs(j).max()
    assert np.abs(left[3] - right[3]).max() > 1.0  # the jerk does jump: the check above is not vacuous
    np.testing.assert_allclose(spline.max_jerk, np.abs(np.diff(a, axis=0) / STEP).max(axis=0), rtol=1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_splices_keep_the_chunks_own_jerk(seed):
    """The acceptance test: at chunk boundaries the commanded discrete jerk stays within the chunks' own."""
    chunks, arrivals = _policy_stream(seed)
    executor = ChunkExecutor(ExecutorConfig(), SafetyLimits.unlimited(7))
    executor.reset(np.zeros(7), 0.0)
    ticks = DT * np.arange(1001)
    commands, windows, rejections = _run(executor, chunks, arrivals, ticks)
    assert not rejections and len(windows) > 50  # every chunk that arrived in time was accepted
    assert executor.counters["splice_over_jerk"] == 0
    assert not any(c.clamped for c in commands)
    jerk = np.abs(_third_difference(_positions(commands)))
    within = np.array([_within_jerk(c) for c in chunks[: len(windows)]])

    starts, ends = ticks[:-3], ticks[3:]  # each stencil's first and last tick
    boundary = ((starts[:, None] <= windows[:, 1]) & (ends[:, None] >= windows[:, 0])).any(axis=1)
    assert boundary.sum() > 200
    assert (jerk[boundary].max(axis=0) <= within.max(axis=0) * (1 + 1e-6)).all()

    # Stricter, per stencil: only the chunks in play there. Chunk n is followed from the start of its
    # splice and still bounds the next splice, up to that one's end.
    in_play_until = np.append(windows[1:, 1], np.inf)
    for k in np.flatnonzero(ends >= windows[0, 0]):
        in_play = (windows[:, 0] <= ends[k]) & (in_play_until >= starts[k])
        assert (jerk[k] <= within[in_play].max(axis=0) * (1 + 1e-6)).all(), f"stencil ending at {ends[k]:.2f} s"


@pytest.mark.parametrize("seed", range(2))
def test_naive_switching_breaks_the_jerk_bound(seed):
    """Negative control: jumping straight onto each new chunk's spline on the same data."""
    chunks, arrivals = _policy_stream(seed)
    ticks = DT * np.arange(1001)
    positions, followed, switches = [], None, []
    for t in ticks:
        while len(switches) < len(chunks) and arrivals[len(switches)] <= t:
            followed = ChunkSpline(chunks[len(switches)])
            switches.append(arrivals[len(switches)])
        positions.append(np.zeros(7) if followed is None else followed.evaluate(t)[0])
    jerk = np.abs(_third_difference(np.array(positions)))
    switches = np.array(switches[1:])
    boundary = ((ticks[:-3, None] <= switches) & (ticks[3:, None] >= switches)).any(axis=1)
    within = np.array([_within_jerk(c) for c in chunks]).max(axis=0)
    assert (jerk[boundary].max(axis=0) > 5 * within).all()


def test_late_chunk_runs_from_now_not_from_its_first_step():
    rate = np.array([0.5, -0.3])
    line = lambda t: 0.2 + rate * t[:, None]  # noqa: E731
    other = lambda t: -0.1 + 2 * rate * t[:, None]  # noqa: E731
    executor = ChunkExecutor(ExecutorConfig(), SafetyLimits.unlimited(2))
    executor.reset(line(np.zeros(1))[0], 0.0)
    ticks = DT * np.arange(140)
    executor.step(ticks[0])
    assert executor.add_chunk(_chunk(line, 0.01), 0.01) is None
    for t in ticks[1:50]:
        executor.step(t)
    # A chunk of the same line captured 100 ms ago: its past steps are skipped, the motion is untouched.
    assert executor.add_chunk(_chunk(line, 0.9), 1.0) is None
    commands = [executor.step(t) for t in ticks[50:75]]
    np.testing.assert_allclose(_positions(commands), line(ticks[50:75]), atol=1e-9)
    # A different line captured 120 ms ago: after the splice the commands are on it at their own time.
    late = _chunk(other, 1.38)
    assert executor.add_chunk(late, 1.5) is None
    start, end = executor.splice_window
    assert start == 1.5 and end <= 1.5 + 0.5
    commands = [executor.step(t) for t in ticks[75:]]
    after = (ticks[75:] > end) & (ticks[75:] <= late.end_s)
    assert after.sum() > 20
    np.testing.assert_allclose(_positions(commands)[after], other(ticks[75:][after]), atol=1e-9)
    assert np.abs(other(ticks[75:][after] - 0.12) - other(ticks[75:][after])).min() > 0.01  # from step 0 it fails


def test_rejected_chunks_leave_the_motion_untouched():
    rng = np.random.default_rng(3)
    good = Chunk(np.cumsum(rng.normal(0, 0.01, (K, 3)), axis=0), 0.05, STEP, 50_000_000)
    nan_actions, inf_actions = good.actions.copy(), good.actions.copy()
    nan_actions[4, 1], inf_actions[7, 2] = np.nan, -np.inf
    offers = {  # tick index: (chunk, expected rejection)
        12: (Chunk(nan_actions, 0.2, STEP, 200_000_000), "non_finite"),
        17: (Chunk(inf_actions, 0.3, STEP, 300_000_000), "non_finite"),
        22: (Chunk(good.actions[:, :2], 0.4, STEP, 400_000_000), "shape"),
        27: (Chunk(good.actions[:1], 0.5, STEP, 500_000_000), "shape"),
        32: (Chunk(good.actions[:3], 0.43, STEP, 430_000_000), "expired"),  # ends at 0.63 s < 0.64 s
        37: (Chunk(good.actions, 0.04, STEP, 40_000_000), "out_of_order"),
        42: (Chunk(good.actions, 0.05, STEP, 50_000_000), "out_of_order"),  # the same frame again
    }
    reference, executor = (ChunkExecutor(ExecutorConfig(), SafetyLimits.unlimited(3)) for _ in range(2))
    for ex in (reference, executor):
        ex.reset(good.actions[0], 0.0)
    for k in range(60):
        t = k * DT
        if k == 5:
            assert reference.add_chunk(good, t) is None and executor.add_chunk(good, t) is None
        if k in offers:
            assert executor.add_chunk(offers[k][0], t) == offers[k][1]
        expected, command = reference.step(t), executor.step(t)
        assert np.isfinite(command.position).all() and np.isfinite(command.velocity).all()
        np.testing.assert_array_equal(command.position, expected.position)
        assert command.stamp_ns == (50_000_000 if k >= 5 else 0)
    assert executor.counters["rejected_non_finite"] == 2
    assert executor.counters["rejected_shape"] == 2
    assert executor.counters["rejected_out_of_order"] == 2
    assert executor.counters["rejected_expired"] == 1


def test_starved_executor_ramps_to_rest_and_holds():
    wave = lambda t: 0.3 * np.sin(2 * np.pi * np.array([0.8, 1.0, 0.9]) * t[:, None])  # noqa: E731
    chunk = _chunk(wave, 0.05)
    executor = ChunkExecutor(ExecutorConfig(), SafetyLimits.unlimited(3))
    executor.reset(wave(np.array([0.16]))[0], 0.0)
    ticks = DT * np.arange(150)
    commands = [executor.step(t) for t in ticks[:8]]
    assert executor.add_chunk(chunk, ticks[8]) is None
    over_before = executor.counters["splice_over_jerk"]
    commands += [executor.step(t) for t in ticks[8:]]
    assert executor.counters["starved"] == 1
    assert executor.counters["splice_over_jerk"] == over_before
    ramp_start, ramp_end = executor.splice_window
    assert ramp_start == pytest.approx(chunk.end_s)
    speeds = np.abs(np.array([c.velocity for c in commands]))
    ramp = (ticks > chunk.end_s + DT) & (ticks <= ramp_end + DT)
    assert speeds[ramp][0].max() > 0.3  # it was moving when the chunk ran out
    assert (np.diff(speeds[ramp], axis=0) <= 1e-12).all()  # speed falls monotonically ...
    held = ticks > ramp_end
    assert (speeds[ticks > ramp_end + DT] == 0).all() and held.sum() > 20  # ... to rest, and holds
    assert all(c.stopped == "no_chunk" for c, h in zip(commands, held, strict=True) if h)
    assert all(c.stopped is None for c, t in zip(commands, ticks, strict=True) if ticks[8] <= t < ramp_end)
    jerk = np.abs(_third_difference(_positions(commands)))
    after_end = ticks[3:] > chunk.end_s
    assert (jerk[after_end].max(axis=0) <= ChunkSpline(chunk).max_jerk * (1 + 1e-6)).all()


def test_splice_after_an_intervention_starts_from_the_command():
    """While the filter holds the command below the plan, a new chunk starts from the command itself."""
    limits = SafetyLimits(position_min=(-10.0,), position_max=(10.0,), velocity_max=(0.5,), acceleration_max=(2.0,))
    executor = ChunkExecutor(ExecutorConfig(), limits)
    executor.reset(np.zeros(1), 0.0)
    ticks = DT * np.arange(1, 100)  # the second chunk ends at 2.45 s
    assert executor.add_chunk(_chunk(lambda t: 1.0 * t[:, None], 0.005), 0.01) is None  # 1 unit/s: too fast
    commands = [executor.step(t) for t in ticks[:50]]
    assert commands[-1].clamped == {"velocity"} and commands[-1].velocity[0] == pytest.approx(0.5)
    # A chunk that continues the commanded motion at the allowed speed.
    last_s, last = ticks[49], commands[-1].position[0]
    line = lambda t: last + 0.45 * (t[:, None] - last_s)  # noqa: E731
    assert executor.add_chunk(_chunk(line, last_s - 0.05), last_s + 0.01) is None
    start, end = executor.splice_window
    assert start == last_s  # from the last tick, where the command is known
    commands = [executor.step(t) for t in ticks[50:]]
    assert not any(c.clamped for c in commands)  # no jump in velocity for the filter to catch
    after = ticks[50:] > end
    assert after.sum() > 10
    np.testing.assert_allclose(_positions(commands)[after], line(ticks[50:][after]), atol=1e-9)


def _moving_executor(monitor: SafetyMonitor) -> tuple[ChunkExecutor, Chunk]:
    wave = lambda t: 0.2 * np.sin(2 * np.pi * 0.5 * t[:, None]) * np.ones(2)  # noqa: E731
    executor = ChunkExecutor(ExecutorConfig(), SafetyLimits.unlimited(2), monitor)
    executor.reset(np.zeros(2), 0.0)
    chunk = _chunk(wave, 0.005, num_steps=40)
    assert executor.add_chunk(chunk, 0.01) is None  # the ticks start at DT
    return executor, chunk


def test_stale_observations_stop_at_once_and_only_newer_chunks_resume():
    monitor = SafetyMonitor(WatchdogConfig(max_observation_age_s=0.2, required=("frame", "state")))
    monitor.observe("frame", 0.0)
    monitor.observe("state", 0.0)
    executor, chunk = _moving_executor(monitor)
    ticks = DT * np.arange(1, 100)
    commands = [executor.step(t) for t in ticks[:40]]
    first = next(i for i, c in enumerate(commands) if c.stopped is not None)
    assert first == next(i for i, t in enumerate(ticks) if t - 0.0 > 0.2)
    assert 0.2 < ticks[first] <= 0.2 + DT
    assert commands[first].stopped == "stale_frame"
    assert np.abs(commands[first - 1].velocity).max() > 0.05  # it was moving ...
    assert (commands[first].velocity == 0).all()  # ... and stops on that tick
    np.testing.assert_array_equal(commands[first].position, commands[first - 1].position)
    assert all(c.stopped == "stale_frame" for c in commands[first:])
    assert all((c.position == commands[first].position).all() for c in commands[first:])
    assert executor.counters["stops_stale_frame"] == 1
    assert executor.add_chunk(_chunk(lambda t: np.zeros((len(t), 2)), 0.5), ticks[39]) == "stopped"

    def observe_and_step(t):
        monitor.observe("frame", t)
        monitor.observe("state", t)
        return executor.step(t)

    monitor.observe("frame", ticks[40])  # observations are back
    monitor.observe("state", ticks[40])
    assert executor.add_chunk(chunk, ticks[40]) == "predates_stop"  # captured before the stop
    held = observe_and_step(ticks[40])
    assert held.stopped == "no_chunk"
    np.testing.assert_array_equal(held.position, commands[first].position)
    newer = _chunk(lambda t: 0.05 + np.zeros((len(t), 2)), ticks[39])
    assert executor.add_chunk(newer, ticks[40] + 0.01) is None
    resumed = [observe_and_step(t) for t in ticks[41:]]
    assert resumed[0].stopped is None and resumed[0].stamp_ns == newer.stamp_ns
    np.testing.assert_allclose(resumed[-1].position, 0.05, atol=1e-9)
    assert executor.counters["stops_stale_frame"] == 1


def test_estop_latches_until_rearmed():
    monitor = SafetyMonitor(WatchdogConfig(required=()))
    executor, _ = _moving_executor(monitor)
    ticks = DT * np.arange(1, 200)
    for t in ticks[:20]:
        assert executor.step(t).stopped is None
    monitor.estop(True, ticks[19] + 0.005)  # between two ticks
    stopped = executor.step(ticks[20])
    assert stopped.stopped == "estop" and (stopped.velocity == 0).all()
    monitor.estop(False, ticks[25])  # released, not rearmed
    for k in range(21, 150):
        fresh = _chunk(lambda t: np.ones((len(t), 2)), ticks[k] - 0.05)
        assert executor.add_chunk(fresh, ticks[k]) == "stopped"
        command = executor.step(ticks[k])
        assert command.stopped == "estop"
        np.testing.assert_array_equal(command.position, stopped.position)
    assert executor.counters["stops_estop"] == 1
    assert monitor.rearm(ticks[150]) == (True, "")
    assert executor.step(ticks[150]).stopped == "no_chunk"
    before = _chunk(lambda t: np.ones((len(t), 2)), ticks[20] - 0.01)  # captured before the stop's tick
    assert executor.add_chunk(before, ticks[150] + 0.01) == "predates_stop"
    assert executor.add_chunk(_chunk(lambda t: np.ones((len(t), 2)), ticks[140]), ticks[150] + 0.01) is None
    assert executor.step(ticks[151]).stopped is None


def test_preview_does_not_change_anything():
    chunks, arrivals = _policy_stream(7, duration_s=3.0, dims=3)
    limits = SafetyLimits(
        position_min=(-0.3,) * 3, position_max=(0.3,) * 3, velocity_max=(0.5,) * 3, acceleration_max=(4.0,) * 3
    )
    ticks = DT * np.arange(150)

    def observe(monitor, t):
        if t < 1.5 or t > 2.0:  # a stale gap: the run has a stop in it
            monitor.observe("frame", t)

    def make():
        monitor = SafetyMonitor(WatchdogConfig(required=("frame",)))
        monitor.observe("frame", 0.0)
        executor = ChunkExecutor(ExecutorConfig(), limits, monitor)
        executor.reset(np.zeros(3), 0.0)
        return executor

    previews = []

    def preview(executor, t):
        observe(executor.monitor, t)
        previews.append(executor.preview(t + DT, 10))

    plain, previewed = make(), make()
    expected, _, rejections = _run(plain, chunks, arrivals, ticks, on_tick=lambda ex, t: observe(ex.monitor, t))
    got, _, _ = _run(previewed, chunks, arrivals, ticks, on_tick=preview)
    assert "stopped" in rejections
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_array_equal(a.position, b.position)
        np.testing.assert_array_equal(a.velocity, b.velocity)
        assert (a.stopped, a.clamped, a.stamp_ns) == (b.stopped, b.clamped, b.stamp_ns)
    assert plain.counters == previewed.counters and plain.monitor.counters == previewed.monitor.counters
    assert plain.counters["clamped_velocity"] > 0 and plain.counters["stops_stale_frame"] == 1
    # Where no chunk arrived before the next tick, the preview's first point is that tick's command.
    arrival_ticks = {int(np.ceil(a / DT - 1e-9)) for a in arrivals}
    matched = 0
    for k in range(len(ticks) - 1):
        if k + 1 not in arrival_ticks and got[k + 1].stopped == got[k].stopped:
            np.testing.assert_allclose(previews[k][0].position, got[k + 1].position, rtol=1e-12, atol=1e-15)
            matched += 1
    assert matched > 100


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match=r"executor\.max_blend_s"):
        ExecutorConfig(min_blend_s=0.2, max_blend_s=0.1)
    with pytest.raises(ValueError, match=r"executor\.control_rate_hz"):
        ExecutorConfig(control_rate_hz=0)
    with pytest.raises(ValueError, match=r"chunk\.step_s"):
        Chunk(np.zeros((4, 2)), 0.0, 0.0, 1)
    with pytest.raises(RuntimeError, match="reset"):
        ChunkExecutor(ExecutorConfig(), SafetyLimits.unlimited(2)).step(0.0)


def test_first_chunk_after_a_reset_is_followed_whatever_its_stamp():
    executor = ChunkExecutor(ExecutorConfig(), SafetyLimits.unlimited(2))
    executor.reset(np.zeros(2), 0.0)
    # A simulator's first frame is stamped at time 0: nothing was followed yet, so it is not "out of order".
    assert executor.add_chunk(Chunk(np.ones((K, 2)), 0.0, STEP, 0), 0.0) is None
    assert executor.add_chunk(Chunk(np.ones((K, 2)), 0.1, STEP, 0), 0.1) == "out_of_order"


def test_capture_time_not_step_time_decides_predates_stop():
    monitor = SafetyMonitor(WatchdogConfig(max_observation_age_s=10.0, required=()))
    executor = ChunkExecutor(ExecutorConfig(), SafetyLimits.unlimited(1), monitor)
    executor.reset(np.zeros(1), 0.0)
    monitor.estop(True, 1.0)
    assert executor.step(1.0).stopped == "estop"
    monitor.estop(False, 1.1)
    monitor.rearm(1.1)
    # Step 0 is due after the stop, but the frame was captured before it.
    late = Chunk(np.ones((K, 1)), start_s=1.05, step_s=STEP, stamp_ns=2, capture_s=0.95)
    assert executor.add_chunk(late, 1.2) == "predates_stop"
    fresh = Chunk(np.ones((K, 1)), start_s=1.25, step_s=STEP, stamp_ns=3, capture_s=1.15)
    assert executor.add_chunk(fresh, 1.2) is None
