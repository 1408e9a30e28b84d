"""Chunk executor: one smooth, safe command per control tick from the policy's action chunks.

The policy emits chunks of K absolute targets in a D-dim position-like command space (see
:mod:`fovea_vla.core.policy.safety`), step i due at ``start_s + i * step_s``. The executor runs
at the control rate, independently of the policy, and returns one :class:`Command` per
:meth:`ChunkExecutor.step`. Times are seconds on one caller's clock (``now_s``, ``Chunk.start_s``);
chunk stamps only label the commands and order the chunks; nothing here reads a clock.

Trajectory. Each accepted chunk is followed along its natural C2 cubic spline
(:class:`ChunkSpline`). A chunk accepted at ``t_s`` takes over through a quintic Hermite splice
``q`` on ``[t_s, t_s + W]`` from the current commanded state (position, velocity, acceleration)
to the new spline's state at ``t_s + W``; the part of the chunk before ``t_s`` (predicted from an
older frame) is skipped. ``W`` is the smallest of a geometric grid on
``[min_blend_s, min(max_blend_s, chunk end - t_s)]`` with ``max |q'''| <= J_env`` in every dim,
``J_env`` the largest |jerk| of the old and the new chunk's splines (closed form: ``q'''`` is a
quadratic). If none fits, the largest ``W`` is used and ``splice_over_jerk`` counted. When the
newest chunk runs out (policy starved) the same kind of splice brings the command to rest at
``p + v * W / 2`` and the executor holds there.

Why the sampled commands obey the chunks' own jerk at the splices: the plan is C2 everywhere
and its third derivative is piecewise continuous with ``|p'''| <= J_env``. For such a function
the third difference ``(p_k - 3 p_{k-1} + 3 p_{k-2} - p_{k-3}) / dt**3`` is the average of
``p'''`` over ``[t_{k-3}, t_k]`` weighted by the (positive, unit-mass) quadratic B-spline, so it
cannot exceed ``J_env`` either: no jump, kink or acceleration step appears between chunks.

Safety. Every output passes a :class:`~fovea_vla.core.policy.safety.SafetyFilter`, except in a
stop. A stop (the :class:`~fovea_vla.core.policy.safety.SafetyMonitor` gives a reason) holds the
last commanded position at zero velocity at once (a safety stop is not ramped), drops the plan,
and afterwards only chunks captured after the stop's onset are accepted. With no chunk to follow
(before the first, after a stop or at the end of a starvation ramp) the executor holds at rest and
reports ``stopped="no_chunk"``.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fovea_vla.core._validation import is_int, is_real
from fovea_vla.core.policy.safety import SafetyFilter, SafetyLimits, SafetyMonitor

__all__ = ["Chunk", "ChunkExecutor", "ChunkSpline", "Command", "ExecutorConfig"]

_NUM_WIDTHS = 24  # splice widths tried, geometric between the shortest and the longest allowed
_JERK_FLOOR = 1e-9  # J_env floor, relative to the chunk's magnitude / step_s**3 (rounding, not motion)

_State = tuple[np.ndarray, np.ndarray, np.ndarray]  # position, velocity, acceleration, each (..., D)


@dataclass(frozen=True)
class Chunk:
    """An action chunk from the policy.

    Attributes:
        actions: (K, D) float64 absolute targets [unit], step i due at ``start_s + i * step_s``.
            Stored as float64; shape and finiteness are checked by :meth:`ChunkExecutor.add_chunk`.
        start_s: time step 0 is due [s] (capture time of the source frame + start offset).
        step_s: time between steps [s], > 0.
        stamp_ns: capture stamp of the source frame [ns], carried onto every command that follows
            this chunk; only its order matters here (times are ``start_s``, on the caller's clock).
        capture_s: capture time of the source frame [s, caller's clock], for the "captured
            before the last stop" check; None = ``start_s``.
    """

    actions: np.ndarray
    start_s: float
    step_s: float
    stamp_ns: int
    capture_s: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "actions", np.asarray(self.actions, dtype=np.float64))
        if not is_real(self.start_s) or not math.isfinite(self.start_s):
            raise ValueError(f"chunk.start_s={self.start_s!r}: must be a finite number")
        if not is_real(self.step_s) or not math.isfinite(self.step_s) or self.step_s <= 0:
            raise ValueError(f"chunk.step_s={self.step_s!r}: must be a finite number > 0")
        if not is_int(self.stamp_ns) or self.stamp_ns < 0:
            raise ValueError(f"chunk.stamp_ns={self.stamp_ns!r}: must be an integer >= 0")
        if self.capture_s is not None and not (is_real(self.capture_s) and math.isfinite(self.capture_s)):
            raise ValueError(f"chunk.capture_s={self.capture_s!r}: must be None or a finite number")

    @property
    def end_s(self) -> float:
        """Time the last step is due [s]."""
        return self.start_s + (len(self.actions) - 1) * self.step_s


@dataclass(frozen=True, kw_only=True)
class ExecutorConfig:
    """Chunk-executor parameters.

    Attributes:
        control_rate_hz: rate of :meth:`ChunkExecutor.step` [Hz], in (0, 10000].
        max_blend_s: longest splice between chunks [s], in [min_blend_s, 10].
        min_blend_s: shortest splice [s], in (0, 10]; one control period or more is sensible.
    """

    control_rate_hz: float = 50.0
    max_blend_s: float = 0.5
    min_blend_s: float = 0.04

    def __post_init__(self):
        for name, high in (("control_rate_hz", 1e4), ("min_blend_s", 10.0), ("max_blend_s", 10.0)):
            value = getattr(self, name)
            if not is_real(value) or not 0.0 < value <= high:
                raise ValueError(f"executor.{name}={value!r}: must be in (0, {high}]")
        if self.max_blend_s < self.min_blend_s:
            raise ValueError(f"executor.max_blend_s={self.max_blend_s!r}: must be >= min_blend_s={self.min_blend_s!r}")

    @property
    def period_s(self) -> float:
        """Control period [s]."""
        return 1.0 / self.control_rate_hz


@dataclass(frozen=True)
class Command:
    """One control tick's command.

    Attributes:
        time_s: the tick's time [s].
        position: (D,) float64 commanded position [unit].
        velocity: (D,) float64 finite-difference velocity after safety [unit/s] (0 in a stop).
        acceleration: (D,) float64 finite-difference acceleration after safety [unit/s^2] (0 in a stop).
        stamp_ns: capture stamp of the chunk last followed [ns], 0 before any chunk (or since a reset).
        stopped: why the command holds (a monitor reason such as ``"estop"`` or ``"stale_frame"``,
            or ``"no_chunk"``), None while following a plan.
        clamped: what the safety filter changed this tick (see
            :class:`~fovea_vla.core.policy.safety.FilterResult`).
    """

    time_s: float
    position: np.ndarray
    velocity: np.ndarray
    acceleration: np.ndarray
    stamp_ns: int
    stopped: str | None
    clamped: frozenset[str]


def _natural_second_derivatives(values: np.ndarray, step_s: float) -> np.ndarray:
    """(K, D) second derivatives at the knots of the natural cubic spline through (K, D) ``values``.

    Solves ``m[i-1] + 4 m[i] + m[i+1] = 6 (y[i+1] - 2 y[i] + y[i-1]) / h**2`` with ``m[0] = m[-1] = 0``
    by the Thomas algorithm, vectorised over D.
    """
    m = np.zeros_like(values)
    rhs = 6.0 * (values[2:] - 2.0 * values[1:-1] + values[:-2]) / step_s**2
    upper = np.zeros(len(rhs))
    for i in range(len(rhs)):  # forward sweep: row i becomes m[i+1] + upper[i] m[i+2] = rhs[i]
        pivot = 4.0 - (upper[i - 1] if i else 0.0)
        upper[i] = 1.0 / pivot
        rhs[i] = (rhs[i] - (rhs[i - 1] if i else 0.0)) / pivot
    for i in range(len(rhs) - 1, -1, -1):
        m[i + 1] = rhs[i] - upper[i] * m[i + 2]
    return m


class ChunkSpline:
    """Natural C2 cubic spline through a chunk's targets at its step times.

    Attributes:
        start_s, end_s: its span [s].
        max_jerk: (D,) largest |third derivative| over the span [unit/s^3] (the jerk is constant
            on each step interval).
    """

    def __init__(self, chunk: Chunk):
        """Fit the spline.

        Args:
            chunk: the chunk, K >= 2 finite targets.
        """
        values, h = chunk.actions, chunk.step_s
        m = _natural_second_derivatives(values, h)
        self.start_s, self.end_s, self._step_s = chunk.start_s, chunk.end_s, h
        self._values, self._second = values, m
        self._slope = (values[1:] - values[:-1]) / h - h * (2.0 * m[:-1] + m[1:]) / 6.0
        self._jerk = (m[1:] - m[:-1]) / h
        self.max_jerk = np.abs(self._jerk).max(axis=0)

    def evaluate(self, t_s: float | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Position, velocity, acceleration and jerk at ``t_s``.

        Args:
            t_s: time [s], scalar or (M,); outside the span the end intervals' cubics extrapolate.

        Returns:
            Four arrays of shape (D,) or (M, D) [unit, unit/s, unit/s^2, unit/s^3].
        """
        t_s = np.asarray(t_s, dtype=np.float64)
        i = np.clip(np.floor((t_s - self.start_s) / self._step_s).astype(np.int64), 0, len(self._jerk) - 1)
        u = (t_s - (self.start_s + i * self._step_s))[..., None]
        y, m, b, j = self._values[i], self._second[i], self._slope[i], self._jerk[i]
        return y + u * (b + u * (m / 2.0 + u * j / 6.0)), b + u * (m + u * j / 2.0), m + u * j, j


def _quintic_coefficients(start: _State, end: _State, width: np.ndarray) -> np.ndarray:
    """(6, ..., D) coefficients in ``s = (t - t0) / W`` of the quintic from ``start`` at s=0 to ``end`` at s=1.

    ``start`` and ``end`` are (p, v, a) [unit, unit/s, unit/s^2]; ``width`` W [s] broadcasts against them.
    """
    (p0, v0, a0), (p1, v1, a1) = start, end
    d, v0, v1, a0, a1 = p1 - p0, v0 * width, v1 * width, a0 * width**2 / 2.0, a1 * width**2 / 2.0
    c3 = 10.0 * d - 6.0 * v0 - 4.0 * v1 - 3.0 * a0 + a1
    c4 = -15.0 * d + 8.0 * v0 + 7.0 * v1 + 3.0 * a0 - 2.0 * a1
    c5 = 6.0 * d - 3.0 * v0 - 3.0 * v1 - a0 + a1
    return np.stack(np.broadcast_arrays(p0, v0, a0, c3, c4, c5))


def _quintic_max_jerk(coef: np.ndarray, width: np.ndarray) -> np.ndarray:
    """Largest |q'''| [unit/s^3] over the window of each quintic of (6, ..., D) ``coef``.

    ``q''' W**3 = 6 c3 + 24 c4 s + 60 c5 s**2``: the largest magnitude is at s = 0, s = 1 or the vertex.
    """
    c3, c4, c5 = coef[3], coef[4], coef[5]
    with np.errstate(divide="ignore", invalid="ignore"):
        vertex_s = np.where(c5 != 0.0, -c4 / (5.0 * c5), 0.0)
    vertex_s = np.clip(vertex_s, 0.0, 1.0)
    peaks = [6.0 * c3 + s * (24.0 * c4 + 60.0 * c5 * s) for s in (0.0, 1.0, vertex_s)]
    return np.max(np.abs(peaks), axis=0) / width**3


def _derivative(coef: np.ndarray) -> np.ndarray:
    """Coefficients (6, D) in s of the s-derivative of a quintic."""
    out = np.zeros_like(coef)
    out[:-1] = coef[1:] * np.arange(1.0, 6.0)[:, None]
    return out


class _Quintic:
    """A splice: the quintic on ``[t0_s, t1_s]`` with (6, D) coefficients in ``s = (t - t0_s) / width_s``."""

    def __init__(self, t0_s: float, width_s: float, coef: np.ndarray):
        self.t0_s, self.width_s, self.t1_s = t0_s, width_s, t0_s + width_s
        derivatives = [coef]
        for _ in range(3):
            derivatives.append(_derivative(derivatives[-1]))
        self._coef = [c / width_s**k for k, c in enumerate(derivatives)]  # d^k/dt^k = d^k/ds^k / W^k

    def evaluate(self, t_s: float) -> tuple[np.ndarray, ...]:
        basis = ((t_s - self.t0_s) / self.width_s) ** np.arange(6)
        return tuple(basis @ c for c in self._coef)


class _Hold:
    """Rest at a position."""

    def __init__(self, position: np.ndarray):
        self.position = position

    def evaluate(self, t_s: float) -> tuple[np.ndarray, ...]:
        zeros = np.zeros_like(self.position)
        return self.position, zeros, zeros, zeros


class ChunkExecutor:
    """Follows the newest chunk at the control rate, splicing between chunks, through a safety filter.

    ``counters`` (ticks or events): ``clamped_<what>`` (ticks the filter intervened, ``what`` from
    :class:`~fovea_vla.core.policy.safety.FilterResult`), ``rejected_<reason>`` (see
    :meth:`add_chunk`), ``starved`` (times the newest chunk ran out), ``stops_<reason>`` (transitions
    into a monitor stop, or to another reason during one), ``splice_over_jerk`` (splices that could
    not keep within the chunks' jerk).
    """

    def __init__(self, cfg: ExecutorConfig, limits: SafetyLimits, monitor: SafetyMonitor | None = None):
        """Create the executor; call :meth:`reset` with the current position before anything else.

        Args:
            cfg: the configuration.
            limits: the command space's limits, D dims.
            monitor: consulted on every tick and offered chunk; None never stops.
        """
        self.cfg, self.limits, self.monitor = cfg, limits, monitor
        self.counters: Counter[str] = Counter()
        self._filter = SafetyFilter(limits, cfg.period_s)
        self._last_tick_s: float | None = None  # None until reset()
        self._splice: _Quintic | None = None
        self._target: ChunkSpline | _Hold = _Hold(np.zeros(limits.num_dims))
        self._target_jerk = np.zeros(limits.num_dims)  # J_env contribution of the chunk followed
        self._stamp_ns = 0
        self._following = False  # a chunk was accepted since the last reset (orders the next ones)
        self._intervened = False  # the filter changed the last tick's command
        self._stop_reason: str | None = None  # the last tick's monitor stop
        self._stop_s = -math.inf  # onset of the last stop

    @property
    def position(self) -> np.ndarray:
        """(D,) the last commanded position (a copy)."""
        return self._filter.position

    @property
    def splice_window(self) -> tuple[float, float] | None:
        """``(start, end)`` [s] of the last splice built (to a chunk or to rest), None after a stop or reset."""
        return None if self._splice is None else (self._splice.t0_s, self._splice.t1_s)

    def reset(self, position: np.ndarray, now_s: float) -> None:
        """Hold ``position`` ((D,) finite [unit]) at rest from ``now_s`` [s]; drops the plan."""
        self._hold(position)
        self._last_tick_s, self._stamp_ns, self._following = now_s, 0, False

    def add_chunk(self, chunk: Chunk, now_s: float) -> str | None:
        """Offer a chunk; an accepted one is spliced in from ``now_s`` [s] on.

        Returns:
            None when accepted, else the reason it was refused (counted as ``rejected_<reason>``):
            ``shape`` (not (K >= 2, D)), ``non_finite`` (NaN or inf in the actions), ``stopped`` (the
            monitor stops now), ``predates_stop`` (captured at or before the onset of the last stop),
            ``out_of_order`` (not captured after the chunk followed since the last reset),
            ``expired`` (ends less than ``min_blend_s`` after now).
        """
        if self._last_tick_s is None:
            raise RuntimeError("ChunkExecutor.reset() must be called before add_chunk()")
        reason = self._rejection(chunk, now_s)
        if reason is not None:
            self.counters[f"rejected_{reason}"] += 1
            return reason
        self._advance(now_s)
        spline = ChunkSpline(chunk)
        floor = _JERK_FLOOR * np.abs(chunk.actions).max(axis=0) / chunk.step_s**3
        jerk = np.maximum(spline.max_jerk, floor)
        t0_s, start = self._splice_start(max(now_s, self._last_tick_s))
        self._splice, _ = self._make_splice(
            t0_s,
            start,
            np.maximum(self._target_jerk, jerk),
            chunk.end_s - t0_s,
            lambda w: spline.evaluate(t0_s + w[:, 0])[:3],
        )
        self._target, self._target_jerk, self._stamp_ns = spline, jerk, chunk.stamp_ns
        self._following = True
        return None

    def step(self, now_s: float) -> Command:
        """One control tick at ``now_s`` [s]; call once per control period."""
        if self._last_tick_s is None:
            raise RuntimeError("ChunkExecutor.reset() must be called before step()")
        return self._tick(now_s, None if self.monitor is None else self.monitor.check(now_s))

    def preview(self, now_s: float, num_steps: int) -> list[Command]:
        """The commands of the next ``num_steps`` ticks from ``now_s`` [s] (e.g. JointTrajectory points).

        Simulated on a copy, assuming no chunk arrives and the stop state of the last tick persists
        (the monitor is not consulted); nothing of this executor or its monitor changes.
        """
        if self._last_tick_s is None:
            raise RuntimeError("ChunkExecutor.reset() must be called before preview()")
        sim = copy.deepcopy(self, {id(self.monitor): self.monitor})
        return [sim._tick(now_s + i * self.cfg.period_s, self._stop_reason) for i in range(num_steps)]

    def _rejection(self, chunk: Chunk, now_s: float) -> str | None:
        actions = chunk.actions
        if actions.ndim != 2 or len(actions) < 2 or actions.shape[1] != self.limits.num_dims:
            return "shape"
        if not np.isfinite(actions).all():
            return "non_finite"
        if self.monitor is not None and self.monitor.check(now_s) is not None:
            return "stopped"
        if (chunk.start_s if chunk.capture_s is None else chunk.capture_s) <= self._stop_s:
            return "predates_stop"
        if self._following and chunk.stamp_ns <= self._stamp_ns:
            return "out_of_order"
        if chunk.end_s < max(now_s, self._last_tick_s) + self.cfg.min_blend_s:
            return "expired"
        return None

    def _tick(self, now_s: float, reason: str | None) -> Command:
        if reason is not None:
            if reason != self._stop_reason:
                self.counters[f"stops_{reason}"] += 1
            if self._stop_reason is None:
                self._stop_s = now_s
            self._stop_reason, self._last_tick_s = reason, now_s
            self._hold(self._filter.position)
            zeros = np.zeros(self.limits.num_dims)
            return Command(now_s, self._filter.position, zeros, zeros.copy(), self._stamp_ns, reason, frozenset())
        self._stop_reason = None
        self._advance(now_s)
        result = self._filter.apply(self._evaluate(now_s)[0])
        for name in result.clamped:
            self.counters[f"clamped_{name}"] += 1
        self._intervened, self._last_tick_s = bool(result.clamped), now_s
        holding = isinstance(self._target, _Hold) and (self._splice is None or now_s >= self._splice.t1_s)
        return Command(
            now_s,
            result.position,
            result.velocity,
            result.acceleration,
            self._stamp_ns,
            "no_chunk" if holding else None,
            result.clamped,
        )

    def _hold(self, position: np.ndarray) -> None:
        self._filter.reset(position)
        self._splice, self._target = None, _Hold(self._filter.position)
        self._target_jerk = np.zeros(self.limits.num_dims)
        self._intervened = False

    def _evaluate(self, t_s: float) -> tuple[np.ndarray, ...]:
        """The plan's position, velocity, acceleration and jerk at ``t_s``, each (D,)."""
        if self._splice is not None and t_s < self._splice.t1_s:
            return self._splice.evaluate(t_s)
        return self._target.evaluate(t_s)

    def _advance(self, now_s: float) -> None:
        """Starvation: once past the followed chunk's end, splice from there to rest."""
        if not isinstance(self._target, ChunkSpline) or now_s <= self._target.end_s:
            return
        self.counters["starved"] += 1
        t0_s, (p, v, a) = self._splice_start(self._target.end_s)
        zeros = np.zeros_like(p)
        self._splice, (rest, _, _) = self._make_splice(
            t0_s, (p, v, a), self._target_jerk, self.cfg.max_blend_s, lambda w: (p + v * w / 2.0, zeros, zeros)
        )
        self._target, self._target_jerk = _Hold(rest), np.zeros_like(p)

    def _splice_start(self, t_s: float) -> tuple[float, _State]:
        """Time and state a splice starts from: the plan at ``t_s``, or the last command (at rest
        acceleration) at its tick when the filter changed it."""
        if self._intervened:
            self._intervened = False  # the new plan starts on the commanded state
            return self._last_tick_s, (self._filter.position, self._filter.velocity, np.zeros(self.limits.num_dims))
        p, v, a, _ = self._evaluate(t_s)
        return t_s, (p, v, a)

    def _make_splice(
        self,
        t0_s: float,
        start: _State,
        jerk_max: np.ndarray,
        max_width_s: float,
        end_at: Callable[[np.ndarray], _State],
    ) -> tuple[_Quintic, _State]:
        """The shortest splice from ``start`` at ``t0_s`` to ``end_at(W)`` with |jerk| <= ``jerk_max`` (D,).

        Tries W on a geometric grid from ``min_blend_s`` to ``min(max_blend_s, max_width_s)`` (at least
        ``min_blend_s``); ``end_at`` maps (M, 1) widths [s] to end states that broadcast to (M, D).
        If none fits, the longest is used and ``splice_over_jerk`` counted.

        Returns:
            The splice and its end state, each (D,).
        """
        low = self.cfg.min_blend_s
        widths = np.geomspace(low, max(low, min(self.cfg.max_blend_s, max_width_s)), _NUM_WIDTHS)[:, None]
        end = np.broadcast_arrays(*end_at(widths))
        coef = _quintic_coefficients(start, end, widths)
        fits = (_quintic_max_jerk(coef, widths) <= jerk_max).all(axis=1)
        k = int(np.argmax(fits)) if fits.any() else len(widths) - 1
        if not fits[k]:
            self.counters["splice_over_jerk"] += 1
        return _Quintic(t0_s, float(widths[k, 0]), coef[:, k]), tuple(x[k] for x in end)
