"""Stage health as diagnostic statuses: per-stage measurements in, OK / WARN / ERROR / STALE out.

ROS-free: the nodes feed plain numbers (:class:`StageSample`, one per stage they run) to a
:class:`DiagnosticsMonitor` and publish the :class:`Status` list it returns (as
``diagnostic_msgs/DiagnosticArray`` through :mod:`fovea_vla.nodes.diagnostics`).

Each stage is checked against its :class:`StageLimits`:

* **STALE** when it has no data: nothing received yet, or the newest input is older than
  ``stale_after_s``. The other checks are skipped then (their numbers describe the past).
* **WARN** / **ERROR** when a measurement crosses its warn / error threshold: input rate below
  ``warn_rate_hz`` / ``error_rate_hz``, p99 latency above ``warn_latency_ms`` /
  ``error_latency_ms``, drop ratio (drops / received since the previous update) above
  ``warn_drop_ratio`` / ``error_drop_ratio``, newest input older than ``warn_age_s``, safety
  interventions per second above ``warn_interventions_per_s`` / ``error_interventions_per_s``,
  GPU memory above ``warn_gpu_memory_mb`` / ``error_gpu_memory_mb``.
* **OK** otherwise.

The message names every offending quantity with its value and threshold ("latency p99 23.4 ms
above 15 ms; ..."). A level that drops (ERROR -> WARN -> OK) is held for ``hold_s`` after the
condition last held, so a quantity hovering at a threshold does not flap; STALE is reported and
cleared at once.

>>> monitor = DiagnosticsMonitor()
>>> [status] = monitor.update([StageSample(name="flow", latency_p99_ms=40.0, received=10, age_s=0.1)], now_s=0.0)
>>> status.level.name, status.message
('WARN', 'latency p99 40 ms above 15 ms')
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from enum import IntEnum
from functools import partial

__all__ = [
    "STAGES",
    "DiagnosticsConfig",
    "DiagnosticsMonitor",
    "Level",
    "StageLimits",
    "StageSample",
    "Status",
    "assess",
]

# The stages a status may be about, in pipeline order.
STAGES = ("ingest", "flow", "texture", "encoder", "fixation", "slip", "policy", "executor", "captions")


class Level(IntEnum):
    """Status levels, numbered as diagnostic_msgs/DiagnosticStatus's (OK=0, WARN=1, ERROR=2, STALE=3)."""

    OK = 0
    WARN = 1
    ERROR = 2
    STALE = 3


@dataclass(frozen=True, kw_only=True)
class StageSample:
    """What one stage measured, as plain numbers. Unmeasured quantities are None (or NaN, which
    counts as None: an empty LatencyTracker reports NaN) and are not checked.

    Attributes:
        name: one of :data:`STAGES`.
        rate_hz: input (or output) rate over a recent window [Hz].
        latency_p99_ms: 99th percentile of the stage's recent latencies [ms].
        received: inputs received since the start (a counter; only its increase between updates is used).
        drops: inputs dropped since the start (a counter, as ``received``).
        interventions: safety interventions since the start (clamps, stops, rejected chunks; a counter).
        age_s: time since the newest input arrived [s]; None while nothing arrived.
        gpu_memory_mb: GPU memory the stage holds [MiB].
        backend: the implementation in use (e.g. ``nvof``), reported as a value.
        details: further key-values reported as they are (counters, settings).
    """

    name: str
    rate_hz: float | None = None
    latency_p99_ms: float | None = None
    received: int = 0
    drops: int = 0
    interventions: int = 0
    age_s: float | None = None
    gpu_memory_mb: float | None = None
    backend: str = ""
    details: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Status:
    """One stage's health.

    Attributes:
        name: the stage.
        level: OK, WARN, ERROR or STALE.
        message: "OK", or every offending quantity with its value and threshold.
        values: ``(key, value)`` string pairs: backend, measurements, counters, details.
    """

    name: str
    level: Level
    message: str
    values: tuple[tuple[str, str], ...] = ()


_INF = math.inf


@dataclass(frozen=True, kw_only=True)
class StageLimits:
    """Thresholds of one stage. A check whose threshold is at its "off" value (0 for rates,
    inf for the rest) never fires.

    Attributes:
        warn_rate_hz: WARN when the rate is below this [Hz]; 0 = off.
        error_rate_hz: ERROR when the rate is below this [Hz]; at most ``warn_rate_hz``; 0 = off.
        warn_latency_ms: WARN when the p99 latency is above this [ms].
        error_latency_ms: ERROR when the p99 latency is above this [ms]; at least ``warn_latency_ms``.
        warn_drop_ratio: WARN when drops / received since the previous update is above this, in [0, 1].
        error_drop_ratio: ERROR above this, in [warn_drop_ratio, 1].
        warn_age_s: WARN when the newest input is older than this [s].
        stale_after_s: STALE when the newest input is older than this [s]; at least ``warn_age_s``.
        warn_interventions_per_s: WARN when safety interventions per second (since the previous
            update) are above this [1/s].
        error_interventions_per_s: ERROR above this [1/s]; at least ``warn_interventions_per_s``.
        warn_gpu_memory_mb: WARN when the stage's GPU memory is above this [MiB].
        error_gpu_memory_mb: ERROR above this [MiB]; at least ``warn_gpu_memory_mb``.

    Raises:
        ValueError: a threshold that is negative, NaN, not a number, a ratio above 1, or a warn /
            error pair in the wrong order; the message names the field and its value.
    """

    warn_rate_hz: float = 0.0
    error_rate_hz: float = 0.0
    warn_latency_ms: float = _INF
    error_latency_ms: float = _INF
    warn_drop_ratio: float = 0.05
    error_drop_ratio: float = 0.5
    warn_age_s: float = 1.0
    stale_after_s: float = 5.0
    warn_interventions_per_s: float = _INF
    error_interventions_per_s: float = _INF
    warn_gpu_memory_mb: float = _INF
    error_gpu_memory_mb: float = _INF

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                raise ValueError(f"{f.name}={value!r}: must be a number >= 0")
        for name in ("warn_drop_ratio", "error_drop_ratio"):
            if getattr(self, name) > 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be in [0, 1]")
        # (lower, higher): the first must not exceed the second.
        ordered = (
            ("error_rate_hz", "warn_rate_hz"),
            ("warn_latency_ms", "error_latency_ms"),
            ("warn_drop_ratio", "error_drop_ratio"),
            ("warn_age_s", "stale_after_s"),
            ("warn_interventions_per_s", "error_interventions_per_s"),
            ("warn_gpu_memory_mb", "error_gpu_memory_mb"),
        )
        for low, high in ordered:
            if getattr(self, low) > getattr(self, high):
                raise ValueError(f"{low}={getattr(self, low)!r}: must not exceed {high}={getattr(self, high)!r}")


@dataclass(frozen=True, kw_only=True)
class DiagnosticsConfig:
    """Thresholds per stage (:class:`StageLimits`) and the level hold.

    The defaults suit a 30 Hz camera and the default rates (policy 10 Hz, control 50 Hz) on a
    desktop GPU or an Orin; GPU memory is not checked unless a platform sets a budget.

    Attributes:
        ingest: camera input and decode: rate >= 5 Hz (ERROR < 1 Hz), decode p99 <= 20 ms (ERROR
            > 100 ms), drops <= 5 % (ERROR > 50 %), input <= 0.5 s old, STALE after 2 s.
        flow: optical flow p99 <= 15 ms (ERROR > 50 ms), STALE after 2 s.
        texture: texture update p99 <= 10 ms (ERROR > 50 ms), STALE after 2 s.
        encoder: encoder p99 <= 30 ms (ERROR > 100 ms), STALE after 2 s.
        fixation: fixation controller p99 <= 5 ms (ERROR > 20 ms), STALE after 2 s.
        slip: slip detection p99 <= 20 ms (ERROR > 100 ms), STALE after 2 s.
        policy: chunk rate >= 2 Hz (ERROR < 0.5 Hz), head p99 <= 100 ms (ERROR > 500 ms), tokens
            <= 0.5 s old, STALE after 2 s.
        executor: control rate >= 20 Hz (ERROR < 5 Hz), tick p99 <= 2 ms (ERROR > 10 ms), safety
            interventions <= 1 /s (ERROR > 25 /s), STALE after 2 s.
        captions: caption latency p99 <= 2 s (ERROR > 10 s), input <= 10 s old, STALE after 30 s.
        hold_s: a level that drops stays reported this long after its condition last held [s];
            0 = no hold.

    Raises:
        ValueError: ``hold_s`` negative or not finite (named with its value).
    """

    ingest: StageLimits = field(
        default_factory=partial(
            StageLimits,
            warn_rate_hz=5.0,
            error_rate_hz=1.0,
            warn_latency_ms=20.0,
            error_latency_ms=100.0,
            warn_age_s=0.5,
            stale_after_s=2.0,
        )
    )
    flow: StageLimits = field(
        default_factory=partial(StageLimits, warn_latency_ms=15.0, error_latency_ms=50.0, stale_after_s=2.0)
    )
    texture: StageLimits = field(
        default_factory=partial(StageLimits, warn_latency_ms=10.0, error_latency_ms=50.0, stale_after_s=2.0)
    )
    encoder: StageLimits = field(
        default_factory=partial(StageLimits, warn_latency_ms=30.0, error_latency_ms=100.0, stale_after_s=2.0)
    )
    fixation: StageLimits = field(
        default_factory=partial(StageLimits, warn_latency_ms=5.0, error_latency_ms=20.0, stale_after_s=2.0)
    )
    slip: StageLimits = field(
        default_factory=partial(StageLimits, warn_latency_ms=20.0, error_latency_ms=100.0, stale_after_s=2.0)
    )
    policy: StageLimits = field(
        default_factory=partial(
            StageLimits,
            warn_rate_hz=2.0,
            error_rate_hz=0.5,
            warn_latency_ms=100.0,
            error_latency_ms=500.0,
            warn_age_s=0.5,
            stale_after_s=2.0,
        )
    )
    executor: StageLimits = field(
        default_factory=partial(
            StageLimits,
            warn_rate_hz=20.0,
            error_rate_hz=5.0,
            warn_latency_ms=2.0,
            error_latency_ms=10.0,
            warn_interventions_per_s=1.0,
            error_interventions_per_s=25.0,
            stale_after_s=2.0,
        )
    )
    captions: StageLimits = field(
        default_factory=partial(
            StageLimits, warn_latency_ms=2000.0, error_latency_ms=10000.0, warn_age_s=10.0, stale_after_s=30.0
        )
    )
    hold_s: float = 2.0

    def __post_init__(self):
        for name in STAGES:
            if not isinstance(getattr(self, name), StageLimits):
                raise ValueError(f"{name}={getattr(self, name)!r}: must be a StageLimits")
        if isinstance(self.hold_s, bool) or not isinstance(self.hold_s, int | float) or not 0 <= self.hold_s < _INF:
            raise ValueError(f"hold_s={self.hold_s!r}: must be a finite number >= 0")

    def limits(self, stage: str) -> StageLimits:
        """The thresholds of ``stage``.

        Raises:
            KeyError: an unknown stage, listing the known ones and the closest match.
        """
        if stage not in STAGES:
            close = difflib.get_close_matches(stage, STAGES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise KeyError(f"unknown stage {stage!r}{hint}; known: {', '.join(STAGES)}")
        return getattr(self, stage)


def _measured(value) -> float | None:
    """A measurement as a float, or None when not measured (None or NaN)."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _fmt(value: float) -> str:
    """A number for messages and values: 4 significant digits, no exponent below 1e6."""
    return f"{value:.4g}" if abs(value) < 1e6 else f"{value:.3e}"


def _values(
    sample: StageSample, drop_ratio: float | None, interventions_per_s: float | None
) -> tuple[tuple[str, str], ...]:
    pairs: list[tuple[str, str]] = []
    if sample.backend:
        pairs.append(("backend", sample.backend))
    measured = (
        ("rate_hz", _measured(sample.rate_hz)),
        ("latency_p99_ms", _measured(sample.latency_p99_ms)),
        ("age_s", _measured(sample.age_s)),
        ("drop_ratio", drop_ratio),
        ("interventions_per_s", interventions_per_s),
        ("gpu_memory_mb", _measured(sample.gpu_memory_mb)),
    )
    pairs += [(key, _fmt(value)) for key, value in measured if value is not None]
    pairs += [("received", str(sample.received)), ("drops", str(sample.drops))]
    if sample.interventions:
        pairs.append(("interventions", str(sample.interventions)))
    pairs += [(str(key), str(value)) for key, value in sample.details.items()]
    return tuple(pairs)


def assess(
    sample: StageSample,
    limits: StageLimits,
    *,
    drop_ratio: float | None = None,
    interventions_per_s: float | None = None,
) -> Status:
    """The status of one stage from its sample and thresholds (no hold: see :class:`DiagnosticsMonitor`).

    Args:
        sample: the stage's measurements.
        limits: its thresholds.
        drop_ratio: drops / received over the evaluated window, in [0, 1]; None = not checked.
        interventions_per_s: safety interventions per second over the window; None = not checked.

    Returns:
        The :class:`Status`; its message names each offending quantity, value and threshold.

    >>> assess(StageSample(name="ingest", rate_hz=3.0, received=90, age_s=0.1), StageLimits(warn_rate_hz=5.0)).message
    'input rate 3 Hz below 5 Hz'
    >>> assess(StageSample(name="ingest"), StageLimits()).level.name
    'STALE'
    """
    values = _values(sample, drop_ratio, interventions_per_s)
    age = _measured(sample.age_s)
    if age is None and sample.received == 0:
        return Status(sample.name, Level.STALE, "no data received yet", values)
    if age is not None and age > limits.stale_after_s:
        return Status(
            sample.name, Level.STALE, f"no input for {_fmt(age)} s (stale after {_fmt(limits.stale_after_s)} s)", values
        )
    problems: list[tuple[Level, str]] = []

    def above(value: float | None, warn: float, error: float, what: str, unit: str) -> None:
        if value is None:
            return
        if value > error:
            problems.append((Level.ERROR, f"{what} {_fmt(value)}{unit} above {_fmt(error)}{unit}"))
        elif value > warn:
            problems.append((Level.WARN, f"{what} {_fmt(value)}{unit} above {_fmt(warn)}{unit}"))

    rate = _measured(sample.rate_hz)
    if rate is not None and rate < limits.error_rate_hz:
        problems.append((Level.ERROR, f"input rate {_fmt(rate)} Hz below {_fmt(limits.error_rate_hz)} Hz"))
    elif rate is not None and rate < limits.warn_rate_hz:
        problems.append((Level.WARN, f"input rate {_fmt(rate)} Hz below {_fmt(limits.warn_rate_hz)} Hz"))
    above(_measured(sample.latency_p99_ms), limits.warn_latency_ms, limits.error_latency_ms, "latency p99", " ms")
    if drop_ratio is not None:
        # As percentages: "12% above 5%".
        above(100.0 * drop_ratio, 100.0 * limits.warn_drop_ratio, 100.0 * limits.error_drop_ratio, "drop ratio", "%")
    above(age, limits.warn_age_s, _INF, "newest input age", " s")
    above(
        interventions_per_s,
        limits.warn_interventions_per_s,
        limits.error_interventions_per_s,
        "safety interventions",
        " /s",
    )
    above(_measured(sample.gpu_memory_mb), limits.warn_gpu_memory_mb, limits.error_gpu_memory_mb, "GPU memory", " MiB")
    if not problems:
        return Status(sample.name, Level.OK, "OK", values)
    level = max(level for level, _ in problems)
    # Errors first, then warnings, each in check order.
    message = "; ".join(text for lvl, text in sorted(problems, key=lambda p: -p[0]))
    return Status(sample.name, level, message, values)


@dataclass
class _Track:
    """What the monitor remembers of one stage between updates."""

    counters: tuple[int, int, int]  # received, drops, interventions at time_s
    time_s: float
    held: Status | None = None  # the level being held, with the message that raised it
    held_seen_s: float = -_INF  # when the held level's condition last held


class DiagnosticsMonitor:
    """Statuses from successive samples: windowed drop ratio and intervention rate, and the level hold.

    Args:
        cfg: thresholds and hold; None for the defaults.
    """

    def __init__(self, cfg: DiagnosticsConfig | None = None):
        self.cfg = cfg or DiagnosticsConfig()
        self._tracks: dict[str, _Track] = {}

    def reset(self) -> None:
        """Forget the previous samples and held levels."""
        self._tracks.clear()

    def update(self, samples: Iterable[StageSample], now_s: float) -> list[Status]:
        """One status per sample, in the samples' order.

        The drop ratio and intervention rate are taken over the interval since the previous update
        of that stage (the whole count on its first update; no intervention rate then). A counter
        that went down (a restarted stage) starts a new window.

        Args:
            samples: one per stage the node runs; names from :data:`STAGES`.
            now_s: monotonic time of this update [s].

        Raises:
            KeyError: an unknown stage name (listing the known ones).
        """
        statuses = []
        for sample in samples:
            limits = self.cfg.limits(sample.name)
            track = self._tracks.get(sample.name)
            counters = (sample.received, sample.drops, sample.interventions)
            if track is None or any(now < before for now, before in zip(counters, track.counters, strict=True)):
                window_s = None
                track = self._tracks[sample.name] = _Track((0, 0, 0), now_s, None if track is None else track.held)
            else:
                window_s = now_s - track.time_s
            received, drops, interventions = (
                now - before for now, before in zip(counters, track.counters, strict=True)
            )
            drop_ratio = min(drops / received, 1.0) if received > 0 else None
            rate = interventions / window_s if window_s else None
            raw = assess(sample, limits, drop_ratio=drop_ratio, interventions_per_s=rate)
            track.counters, track.time_s = counters, now_s
            statuses.append(self._hold(track, raw, now_s))
        return statuses

    def _hold(self, track: _Track, raw: Status, now_s: float) -> Status:
        """``raw``, or the held WARN / ERROR while it is less than hold_s since that condition held."""
        held = track.held
        if raw.level == Level.STALE or held is None or raw.level >= held.level:
            track.held = raw if raw.level in (Level.WARN, Level.ERROR) else None
            track.held_seen_s = now_s
            return raw
        if now_s - track.held_seen_s < self.cfg.hold_s:
            return Status(raw.name, held.level, f"recovering, was: {held.message}", raw.values)
        track.held = raw if raw.level == Level.WARN else None
        track.held_seen_s = now_s
        return raw
