"""Safety layer of the action path: a per-tick limit filter, a stale-observation watchdog and a latched e-stop.

:class:`SafetyFilter` clamps each desired command so that the commanded sequence stays in the
position box and within the velocity and acceleration limits, where velocity and acceleration
are the finite differences of the commanded positions at the control period. From a start at
rest in the box the limits are met exactly (velocity and acceleration up to rounding) on every
tick, whatever the input: huge values, steps, sign flips, targets outside the box and non-finite
values (the axis then holds). From a start outside the box the axis moves in within the velocity
and acceleration limits and stays in once there. It is a safety net, not a planner: it does not
slow down ahead of a target inside the box (the executor's plan is smooth so it seldom acts).

:class:`SafetyMonitor` decides whether commands may move at all: every required observation
kind must be fresh and the e-stop must not be latched.

Command space: D dims of positions (joint positions [rad or m], or end-effector x y z [m] and
roll pitch yaw [rad], optionally a gripper dim); velocities in [unit/s], accelerations in
[unit/s^2]. Times are seconds on the caller's clock; nothing here reads a clock.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from fovea_vla.core._validation import is_real

__all__ = ["FilterResult", "SafetyFilter", "SafetyLimits", "SafetyMonitor", "WatchdogConfig"]


@dataclass(frozen=True, kw_only=True)
class SafetyLimits:
    """Per-dim limits of the command space (sequences are stored as tuples of floats).

    Attributes:
        position_min: (D,) lower edge of the box [unit], may be -inf.
        position_max: (D,) upper edge of the box [unit], may be +inf. On x, y, z of an
            end-effector command space the box is the workspace.
        velocity_max: (D,) largest |velocity| [unit/s], > 0, may be inf.
        acceleration_max: (D,) largest |acceleration| [unit/s^2], > 0, may be inf.
    """

    position_min: tuple[float, ...]
    position_max: tuple[float, ...]
    velocity_max: tuple[float, ...]
    acceleration_max: tuple[float, ...]

    def __post_init__(self):
        names = ("position_min", "position_max", "velocity_max", "acceleration_max")
        for name in names:
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, Iterable):
                raise ValueError(f"limits.{name}={value!r}: must be a sequence of numbers")
            value = tuple(value)
            if not value or not all(is_real(x) and not math.isnan(x) for x in value):
                raise ValueError(f"limits.{name}={value!r}: must be a non-empty sequence of numbers (no NaN)")
            object.__setattr__(self, name, tuple(float(x) for x in value))
        num_dims = len(self.position_min)
        for name in names[1:]:
            if len(getattr(self, name)) != num_dims:
                raise ValueError(
                    f"limits.{name}={getattr(self, name)!r}: has {len(getattr(self, name))} dims, "
                    f"position_min has {num_dims}"
                )
        if math.inf in self.position_min:
            raise ValueError(f"limits.position_min={self.position_min!r}: must be finite or -inf")
        if -math.inf in self.position_max:
            raise ValueError(f"limits.position_max={self.position_max!r}: must be finite or +inf")
        if any(low > high for low, high in zip(self.position_min, self.position_max, strict=True)):
            raise ValueError(
                f"limits.position_max={self.position_max!r}: must be >= position_min={self.position_min!r}"
            )
        for name in names[2:]:
            if not all(x > 0 for x in getattr(self, name)):
                raise ValueError(f"limits.{name}={getattr(self, name)!r}: must be > 0 (inf allowed)")

    @property
    def num_dims(self) -> int:
        return len(self.position_min)

    @classmethod
    def unlimited(cls, num_dims: int) -> SafetyLimits:
        """Limits that never intervene: an infinite box, velocity and acceleration."""
        return cls(
            position_min=(-math.inf,) * num_dims,
            position_max=(math.inf,) * num_dims,
            velocity_max=(math.inf,) * num_dims,
            acceleration_max=(math.inf,) * num_dims,
        )


@dataclass(frozen=True)
class FilterResult:
    """One filtered command.

    Attributes:
        position: (D,) float64 commanded position [unit].
        velocity: (D,) float64 ``(position - previous position) / period`` [unit/s].
        acceleration: (D,) float64 ``(velocity - previous velocity) / period`` [unit/s^2].
        clamped: what intervened this tick, a subset of ``{"position", "velocity",
            "acceleration", "nan"}`` (``nan``: a non-finite desired value, NaN or inf, held that axis).
    """

    position: np.ndarray
    velocity: np.ndarray
    acceleration: np.ndarray
    clamped: frozenset[str]


def _braking_speed(distance: np.ndarray, acceleration_max: np.ndarray, period_s: float) -> np.ndarray:
    """Largest speed v [unit/s] from which an axis still stops within ``distance`` [unit] (clipped at 0).

    Solves ``v * dt + v**2 / (2 * a) = d`` in its rationalised form ``2 d / (dt + sqrt(dt**2 + 2 d / a))``,
    which needs no cancellation and gives ``d / dt`` for ``a = inf``; ``d = inf`` gives inf.
    """
    distance = np.maximum(distance, 0.0)
    finite = np.where(np.isinf(distance), 0.0, distance)
    speed = 2.0 * finite / (period_s + np.sqrt(period_s**2 + 2.0 * finite / acceleration_max))
    return np.where(np.isinf(distance), np.inf, speed)


class SafetyFilter:
    """Per-tick clamp of a desired position so that the commanded sequence never leaves the box,
    never exceeds ``|v| <= velocity_max`` and ``|a| <= acceleration_max``, where
    ``v_k = (p_k - p_{k-1}) / dt`` and ``a_k = (v_k - v_{k-1}) / dt``.

    Per tick and dim: the target ``p* = clip(desired, box)`` (the current position where desired
    is not finite) asks for ``v* = (p* - p) / dt``. The dynamic interval is
    ``[max(-vmax, v_prev - amax dt), min(vmax, v_prev + amax dt)]`` and the braking interval
    ``[-vbrake(p - pmin), vbrake(pmax - p)]``, ``vbrake`` from :func:`_braking_speed`. The command
    is ``v = clip(clip(v*, braking), dynamic)``: ``clip(v*, lower, upper)`` of the intersection
    when it is not empty, else the end of the dynamic interval nearest the braking one, i.e. the
    hardest deceleration towards the box. The intersection is never empty for states reached from
    :meth:`reset` (proof below), inside the box or out; the fallback guards rounding.
    """

    # Feasibility, upper side (the lower is symmetric). f(v) = v dt + v^2 / (2 amax) inverts vbrake; d = pmax - p.
    # Invariant: v_prev <= vbrake(max(d + v_prev dt, 0)), last tick's bound; true at rest. If v_prev > amax dt, then
    # f(v_prev - amax dt) = f(v_prev) - v_prev dt - amax dt^2 / 2 <= d, so v_prev - amax dt <= vbrake(d): the bounds
    # intersect (the rest pair up as |v_prev| <= vmax), and v <= vbrake(d) keeps the invariant and v dt <= d (the box).

    def __init__(self, limits: SafetyLimits, period_s: float):
        """Create the filter at rest at the origin (call :meth:`reset` with the real position).

        Args:
            limits: the limits, D dims.
            period_s: control period dt [s], > 0; :meth:`apply` is called once per period.
        """
        if not is_real(period_s) or not math.isfinite(period_s) or period_s <= 0:
            raise ValueError(f"period_s={period_s!r}: must be a finite number > 0")
        self.limits = limits
        self.period_s = float(period_s)
        self._low = np.array(limits.position_min)
        self._high = np.array(limits.position_max)
        self._vmax = np.array(limits.velocity_max)
        self._amax = np.array(limits.acceleration_max)
        self._position = np.zeros(limits.num_dims)
        self._velocity = np.zeros(limits.num_dims)

    @property
    def position(self) -> np.ndarray:
        """(D,) float64 last commanded position [unit] (a copy)."""
        return self._position.copy()

    @property
    def velocity(self) -> np.ndarray:
        """(D,) float64 last commanded velocity [unit/s] (a copy)."""
        return self._velocity.copy()

    def reset(self, position: np.ndarray) -> None:
        """Start at rest at ``position``: (D,) finite [unit], which may lie outside the box."""
        position = np.asarray(position, dtype=np.float64)
        if position.shape != (self.limits.num_dims,) or not np.isfinite(position).all():
            raise ValueError(f"position={position!r}: must be finite with shape ({self.limits.num_dims},)")
        self._position = position.copy()
        self._velocity = np.zeros_like(position)

    def apply(self, desired: np.ndarray) -> FilterResult:
        """Filter one tick's desired position and advance the state.

        Args:
            desired: (D,) desired position [unit]; non-finite entries hold their axis.

        Returns:
            The commanded position, its finite-difference velocity and acceleration, and what
            intervened.
        """
        desired = np.asarray(desired, dtype=np.float64)
        if desired.shape != self._position.shape:
            raise ValueError(f"desired has shape {desired.shape}, expected {self._position.shape}")
        dt, p, v_prev = self.period_s, self._position, self._velocity
        finite = np.isfinite(desired)
        target = np.where(finite, np.clip(np.where(finite, desired, 0.0), self._low, self._high), p)
        v_star = (target - p) / dt
        brake_low = -_braking_speed(p - self._low, self._amax, dt)
        brake_high = _braking_speed(self._high - p, self._amax, dt)
        accel_low, accel_high = v_prev - self._amax * dt, v_prev + self._amax * dt
        dynamic_low, dynamic_high = np.maximum(-self._vmax, accel_low), np.minimum(self._vmax, accel_high)
        v = np.clip(np.clip(v_star, brake_low, brake_high), dynamic_low, dynamic_high)
        changed = v != v_star
        position = np.where(changed, p + v * dt, target)
        # Inside the box with intersecting intervals the new position is in the box: clip the rounding.
        exact = (p >= self._low) & (p <= self._high)
        exact &= np.maximum(brake_low, dynamic_low) <= np.minimum(brake_high, dynamic_high)
        position = np.where(exact, np.clip(position, self._low, self._high), position)
        velocity = (position - p) / dt

        clamped = set()
        if not finite.all():
            clamped.add("nan")
        if (finite & (target != desired)).any() or (changed & ((v == brake_low) | (v == brake_high))).any():
            clamped.add("position")
        if (changed & (np.abs(v) == self._vmax)).any():
            clamped.add("velocity")
        if (changed & ((v == accel_low) | (v == accel_high))).any():
            clamped.add("acceleration")
        result = FilterResult(position, velocity, (velocity - v_prev) / dt, frozenset(clamped))
        self._position, self._velocity = position, velocity
        return result


@dataclass(frozen=True, kw_only=True)
class WatchdogConfig:
    """Stale-observation watchdog.

    Attributes:
        max_observation_age_s: an observation older than this [s, capture time against the
            caller's ``now_s``] stops the commands; > 0.
        required: observation kinds that must be fresh (e.g. ``"frame"``, ``"state"``); empty
            leaves only the e-stop.
    """

    max_observation_age_s: float = 0.2
    required: tuple[str, ...] = ("frame", "state")

    def __post_init__(self):
        age = self.max_observation_age_s
        if not is_real(age) or not math.isfinite(age) or age <= 0:
            raise ValueError(f"watchdog.max_observation_age_s={age!r}: must be a finite number > 0")
        required = self.required
        if not isinstance(required, str) and isinstance(required, Iterable):
            required = tuple(required)
            if all(isinstance(kind, str) and kind for kind in required) and len(set(required)) == len(required):
                object.__setattr__(self, "required", required)
                return
        raise ValueError(f"watchdog.required={self.required!r}: must be a sequence of distinct non-empty strings")


class SafetyMonitor:
    """Stale-observation watchdog + latched e-stop.

    :meth:`check` gives the reason commands must stop, or None: ``"estop"`` while the e-stop is
    latched, else for the first required kind in order that is not fresh ``"no_<kind>"`` (never
    observed), ``"stale_<kind>"`` (older than ``max_observation_age_s``) or ``"future_<kind>"``
    (stamped more than ``max_observation_age_s`` ahead of ``now_s``: a clock mismatch).
    ``counters`` counts each reason once per transition into it, not per check.
    """

    def __init__(self, cfg: WatchdogConfig | None = None):
        """Create the monitor: not latched, nothing observed (so it stops until every required kind is).

        Args:
            cfg: the watchdog configuration; None for the defaults.
        """
        self.cfg = cfg or WatchdogConfig()
        self.counters: Counter[str] = Counter()
        self._stamps: dict[str, float] = {}
        self._engaged = False  # the e-stop input as last received
        self._latched = False
        self._latched_at_s: float | None = None
        self._reason: str | None = None

    @property
    def latched_at_s(self) -> float | None:
        """When the e-stop latched [s], None while not latched."""
        return self._latched_at_s

    def observe(self, kind: str, stamp_s: float) -> None:
        """Record an observation of ``kind`` captured at ``stamp_s`` [s]; older stamps than the newest are ignored."""
        if not is_real(stamp_s) or not math.isfinite(stamp_s):
            raise ValueError(f"stamp_s={stamp_s!r}: must be a finite number")
        self._stamps[kind] = max(self._stamps.get(kind, -math.inf), float(stamp_s))

    def estop(self, engaged: bool, now_s: float) -> None:
        """Receive the e-stop input: True latches; False only releases the input (see :meth:`rearm`)."""
        self._engaged = bool(engaged)
        if self._engaged and not self._latched:
            self._latched, self._latched_at_s = True, now_s

    def rearm(self, now_s: float) -> tuple[bool, str]:
        """Unlatch the e-stop.

        Returns:
            ``(False, "estop_engaged")`` while the e-stop input is still engaged (nothing changes);
            else ``(True, reason)`` with the latch cleared and ``reason`` what :meth:`check` still
            stops for at ``now_s`` (e.g. ``"stale_frame"``), ``""`` if nothing.
        """
        if self._engaged:
            return False, "estop_engaged"
        self._latched, self._latched_at_s = False, None
        return True, self.check(now_s) or ""

    def check(self, now_s: float) -> str | None:
        """The reason commands must stop at ``now_s`` [s], or None when they may move."""
        reason = "estop" if self._latched else self._stale(now_s)
        if reason is not None and reason != self._reason:
            self.counters[reason] += 1
        self._reason = reason
        return reason

    def _stale(self, now_s: float) -> str | None:
        max_age = self.cfg.max_observation_age_s
        for kind in self.cfg.required:
            age = now_s - self._stamps.get(kind, math.nan)
            if math.isnan(age):
                return f"no_{kind}"
            if age > max_age:
                return f"stale_{kind}"
            if age < -max_age:
                return f"future_{kind}"
        return None
