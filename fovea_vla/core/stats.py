"""Run-time statistics: per-stage latency percentiles, rates and drop counters."""

from __future__ import annotations

import threading
from collections import Counter, deque

import numpy as np

__all__ = ["DropCounter", "LatencyTracker", "RateMeter"]


class LatencyTracker:
    """Rolling latency samples per stage.

    Args:
        window: samples kept per stage for the percentiles.
    """

    def __init__(self, window: int = 300):
        if window < 1:
            raise ValueError(f"window={window}: must be >= 1")
        self.window = window
        self._samples: dict[str, deque] = {}
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()  # nodes add from several executor threads

    def add(self, stage: str, ms: float) -> None:
        with self._lock:
            self._samples.setdefault(stage, deque(maxlen=self.window)).append(float(ms))
            self._last[stage] = float(ms)

    def add_all(self, timings_ms: dict[str, float]) -> None:
        for stage, ms in timings_ms.items():
            self.add(stage, ms)

    def stages(self) -> list[str]:
        with self._lock:
            return list(self._samples)

    def last(self, stage: str) -> float:
        return self._last.get(stage, float("nan"))

    def percentile(self, stage: str, q: float) -> float:
        """q-th percentile [ms] of the stage's recent samples (NaN when none)."""
        with self._lock:
            samples = list(self._samples.get(stage, ()))
        if not samples:
            return float("nan")
        return float(np.percentile(np.asarray(samples, dtype=np.float64), q))

    def summary(self) -> dict[str, dict[str, float]]:
        """``{stage: {"last", "p50", "p90", "p99", "count"}}`` in milliseconds."""
        out = {}
        with self._lock:
            snapshot = {stage: (list(samples), self._last[stage]) for stage, samples in self._samples.items()}
        for stage, (samples, last) in snapshot.items():
            values = np.asarray(samples, dtype=np.float64)
            p50, p90, p99 = np.percentile(values, [50, 90, 99])
            out[stage] = {
                "last": last,
                "p50": float(p50),
                "p90": float(p90),
                "p99": float(p99),
                "count": int(values.size),
            }
        return out


class DropCounter:
    """Counts dropped inputs by reason (``stale``, ``truncated``, ...)."""

    def __init__(self):
        self._counts: Counter[str] = Counter()

    def add(self, reason: str, count: int = 1) -> None:
        self._counts[reason] += count

    def items(self) -> list[tuple[str, int]]:
        return sorted(self._counts.items())

    def total(self) -> int:
        return sum(self._counts.values())

    def as_dict(self) -> dict[str, int]:
        return dict(self.items())


class RateMeter:
    """Event rate [Hz] over a sliding time window of monotonic timestamps [s]."""

    def __init__(self, window_s: float = 2.0):
        self.window_s = window_s
        self._times: deque[float] = deque()

    def tick(self, now_s: float) -> None:
        self._times.append(now_s)
        while self._times and now_s - self._times[0] > self.window_s:
            self._times.popleft()

    def rate_hz(self) -> float:
        if len(self._times) < 2:
            return 0.0
        span = self._times[-1] - self._times[0]
        return (len(self._times) - 1) / span if span > 0 else 0.0
