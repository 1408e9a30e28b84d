"""Stage diagnostics: every level transition, the wording, the hold, the config checks and the ROS adapter."""

from __future__ import annotations

import doctest
import math

import pytest

from fovea_vla.core import diagnostics as diagnostics_module
from fovea_vla.core.diagnostics import (
    STAGES,
    DiagnosticsConfig,
    DiagnosticsMonitor,
    Level,
    StageLimits,
    StageSample,
    Status,
    assess,
)

LIMITS = StageLimits(
    warn_rate_hz=10.0,
    error_rate_hz=2.0,
    warn_latency_ms=15.0,
    error_latency_ms=50.0,
    warn_drop_ratio=0.05,
    error_drop_ratio=0.5,
    warn_age_s=0.5,
    stale_after_s=2.0,
    warn_interventions_per_s=1.0,
    error_interventions_per_s=20.0,
    warn_gpu_memory_mb=1000.0,
    error_gpu_memory_mb=2000.0,
)


def healthy(**changes) -> StageSample:
    """A flow sample well within LIMITS, with ``changes`` applied."""
    values = {
        "name": "flow",
        "rate_hz": 30.0,
        "latency_p99_ms": 4.0,
        "received": 100,
        "drops": 0,
        "age_s": 0.03,
        "gpu_memory_mb": 300.0,
        "backend": "nvof",
    }
    return StageSample(**{**values, **changes})


def test_doctests():
    assert doctest.testmod(diagnostics_module).failed == 0


def test_every_stage_has_default_limits_and_a_healthy_sample_is_ok():
    cfg = DiagnosticsConfig()
    for stage in STAGES:
        assert isinstance(cfg.limits(stage), StageLimits)
    status = assess(healthy(), LIMITS, drop_ratio=0.0, interventions_per_s=0.0)
    assert status == Status("flow", Level.OK, "OK", status.values)
    assert Level.OK == 0 and Level.WARN == 1 and Level.ERROR == 2 and Level.STALE == 3  # DiagnosticStatus's bytes


@pytest.mark.parametrize(
    ("changes", "level", "message"),
    [
        # made slow
        ({"latency_p99_ms": 15.0}, Level.OK, "OK"),  # at the threshold is still fine
        ({"latency_p99_ms": 23.4}, Level.WARN, "latency p99 23.4 ms above 15 ms"),
        ({"latency_p99_ms": 50.5}, Level.ERROR, "latency p99 50.5 ms above 50 ms"),
        # starved
        ({"rate_hz": 10.0}, Level.OK, "OK"),
        ({"rate_hz": 7.5}, Level.WARN, "input rate 7.5 Hz below 10 Hz"),
        ({"rate_hz": 0.0}, Level.ERROR, "input rate 0 Hz below 2 Hz"),
        # inputs getting old, then stale
        ({"age_s": 0.8}, Level.WARN, "newest input age 0.8 s above 0.5 s"),
        ({"age_s": 3.1}, Level.STALE, "no input for 3.1 s (stale after 2 s)"),
        ({"age_s": None, "received": 0}, Level.STALE, "no data received yet"),
        # GPU memory
        ({"gpu_memory_mb": 1500.0}, Level.WARN, "GPU memory 1500 MiB above 1000 MiB"),
        ({"gpu_memory_mb": 2500.0}, Level.ERROR, "GPU memory 2500 MiB above 2000 MiB"),
        # NaN is "not measured" (an empty LatencyTracker reports NaN), never a problem
        ({"latency_p99_ms": math.nan, "rate_hz": math.nan, "gpu_memory_mb": None}, Level.OK, "OK"),
    ],
)
def test_each_quantity_crosses_its_thresholds(changes, level, message):
    status = assess(healthy(**changes), LIMITS)
    assert (status.level, status.message) == (level, message)


@pytest.mark.parametrize(
    ("ratio", "level", "message"),
    [
        (0.05, Level.OK, "OK"),
        (0.12, Level.WARN, "drop ratio 12% above 5%"),
        (0.75, Level.ERROR, "drop ratio 75% above 50%"),
    ],
)
def test_too_many_drops(ratio, level, message):
    status = assess(healthy(), LIMITS, drop_ratio=ratio)
    assert (status.level, status.message) == (level, message)


@pytest.mark.parametrize(
    ("per_s", "level", "message"),
    [
        (1.0, Level.OK, "OK"),
        (2.5, Level.WARN, "safety interventions 2.5 /s above 1 /s"),
        (50.0, Level.ERROR, "safety interventions 50 /s above 20 /s"),
    ],
)
def test_safety_interventions_rate(per_s, level, message):
    status = assess(healthy(name="executor"), LIMITS, interventions_per_s=per_s)
    assert (status.level, status.message) == (level, message)


def test_several_problems_give_the_worst_level_and_name_each_errors_first():
    status = assess(healthy(latency_p99_ms=20.0, rate_hz=1.0, age_s=0.9), LIMITS, drop_ratio=0.1)
    assert status.level == Level.ERROR
    assert status.message == (
        "input rate 1 Hz below 2 Hz; latency p99 20 ms above 15 ms; drop ratio 10% above 5%; "
        "newest input age 0.9 s above 0.5 s"
    )


def test_stale_skips_the_other_checks():
    status = assess(healthy(age_s=10.0, latency_p99_ms=500.0, rate_hz=0.0), LIMITS, drop_ratio=1.0)
    assert status.level == Level.STALE and status.message == "no input for 10 s (stale after 2 s)"


def test_thresholds_at_their_off_values_never_fire():
    off = StageLimits(warn_drop_ratio=1.0, error_drop_ratio=1.0, warn_age_s=math.inf, stale_after_s=math.inf)
    sample = healthy(rate_hz=0.0, latency_p99_ms=1e9, age_s=1e6, gpu_memory_mb=1e9)
    status = assess(sample, off, drop_ratio=1.0, interventions_per_s=1e9)
    assert (status.level, status.message) == (Level.OK, "OK")


def test_values_carry_backend_measurements_counters_and_details():
    sample = healthy(drops=3, interventions=7, details={"preset": "fast", "grid": 4})
    values = dict(assess(sample, LIMITS, drop_ratio=0.25, interventions_per_s=0.5).values)
    assert values == {
        "backend": "nvof",
        "rate_hz": "30",
        "latency_p99_ms": "4",
        "age_s": "0.03",
        "drop_ratio": "0.25",
        "interventions_per_s": "0.5",
        "gpu_memory_mb": "300",
        "received": "100",
        "drops": "3",
        "interventions": "7",
        "preset": "fast",
        "grid": "4",
    }
    unmeasured = dict(assess(StageSample(name="slip", received=1), LIMITS).values)
    assert unmeasured == {"received": "1", "drops": "0"}


def test_monitor_takes_the_drop_ratio_over_the_interval_since_the_last_update():
    monitor = DiagnosticsMonitor(DiagnosticsConfig(flow=LIMITS, hold_s=0.0))
    # First update: the whole count (10 of 100).
    [status] = monitor.update([healthy(received=100, drops=10)], now_s=0.0)
    assert status.message == "drop ratio 10% above 5%"
    # Then only what happened since: 2 more drops in 100 more frames is 2 %.
    [status] = monitor.update([healthy(received=200, drops=12)], now_s=1.0)
    assert (status.level, status.message) == (Level.OK, "OK")
    [status] = monitor.update([healthy(received=210, drops=18)], now_s=2.0)
    assert (status.level, status.message) == (Level.ERROR, "drop ratio 60% above 50%")
    # Nothing received in the interval: no ratio to judge.
    [status] = monitor.update([healthy(received=210, drops=18)], now_s=3.0)
    assert status.level == Level.OK and "drop_ratio" not in dict(status.values)


def test_monitor_rates_interventions_over_the_interval_and_restarts_on_a_counter_reset():
    monitor = DiagnosticsMonitor(DiagnosticsConfig(executor=LIMITS, hold_s=0.0))
    executor = {"name": "executor", "received": 10, "age_s": 0.01}
    [status] = monitor.update([StageSample(**executor, interventions=100)], now_s=0.0)
    assert status.level == Level.OK  # no interval yet: no rate
    [status] = monitor.update([StageSample(**executor, interventions=105)], now_s=2.0)
    assert (status.level, status.message) == (Level.WARN, "safety interventions 2.5 /s above 1 /s")
    # The node restarted (counters went down): a new window, never a negative rate or ratio.
    [status] = monitor.update([StageSample(**executor, interventions=3, drops=0)], now_s=3.0)
    assert status.level == Level.OK and "interventions_per_s" not in dict(status.values)


def test_hold_keeps_a_dropping_level_for_hold_s_and_rises_at_once():
    monitor = DiagnosticsMonitor(DiagnosticsConfig(flow=LIMITS, hold_s=2.0))

    def level_at(now_s: float, latency_ms: float) -> Status:
        return monitor.update([healthy(latency_p99_ms=latency_ms)], now_s)[0]

    assert level_at(0.0, 4.0).level == Level.OK
    assert level_at(1.0, 20.0).level == Level.WARN  # rises at once
    assert level_at(1.5, 60.0).level == Level.ERROR  # and again
    held = level_at(2.0, 4.0)  # fine again, but within 2 s of the error
    assert held.level == Level.ERROR
    assert held.message == "recovering, was: latency p99 60 ms above 50 ms"
    assert dict(held.values)["latency_p99_ms"] == "4"  # the values are the current ones
    assert level_at(3.4, 20.0).level == Level.ERROR  # a warning is still within the error's hold
    warn = level_at(3.6, 20.0)  # 2.1 s after the error: down to the warning
    assert (warn.level, warn.message) == (Level.WARN, "latency p99 20 ms above 15 ms")
    assert level_at(5.0, 4.0).level == Level.WARN  # the warning held 2 s after 3.6 s
    assert level_at(5.7, 4.0).level == Level.OK


def test_stale_is_reported_and_cleared_at_once():
    monitor = DiagnosticsMonitor(DiagnosticsConfig(flow=LIMITS, hold_s=10.0))
    assert monitor.update([healthy(latency_p99_ms=60.0)], 0.0)[0].level == Level.ERROR
    assert monitor.update([healthy(age_s=5.0)], 1.0)[0].level == Level.STALE  # above ERROR's hold
    assert monitor.update([healthy()], 2.0)[0].level == Level.OK  # data back: no hold after STALE


def test_monitor_reports_one_status_per_sample_in_order_and_reset_forgets():
    monitor = DiagnosticsMonitor()
    samples = [StageSample(name=stage) for stage in reversed(STAGES)]
    statuses = monitor.update(samples, 0.0)
    assert [s.name for s in statuses] == list(reversed(STAGES))
    assert all(s.level == Level.STALE for s in statuses)
    monitor.update([healthy(latency_p99_ms=100.0)], 1.0)
    monitor.reset()
    assert monitor.update([healthy()], 1.1)[0].level == Level.OK  # no hold survives a reset


def test_unknown_stage_names_the_known_ones_and_the_closest():
    with pytest.raises(KeyError, match=r"unknown stage 'flwo' \(did you mean 'flow'\?\); known: ingest, flow"):
        DiagnosticsMonitor().update([StageSample(name="flwo")], 0.0)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"warn_latency_ms": -1.0}, "warn_latency_ms=-1.0: must be a number >= 0"),
        ({"stale_after_s": math.nan}, "stale_after_s=nan: must be a number >= 0"),
        ({"warn_rate_hz": True}, "warn_rate_hz=True: must be a number >= 0"),
        ({"warn_gpu_memory_mb": "1000"}, "warn_gpu_memory_mb='1000': must be a number >= 0"),
        ({"error_drop_ratio": 1.5}, "error_drop_ratio=1.5: must be in [0, 1]"),
        (
            {"warn_latency_ms": 60.0, "error_latency_ms": 50.0},
            "warn_latency_ms=60.0: must not exceed error_latency_ms=50.0",
        ),
        ({"warn_rate_hz": 1.0, "error_rate_hz": 2.0}, "error_rate_hz=2.0: must not exceed warn_rate_hz=1.0"),
        ({"warn_age_s": 3.0, "stale_after_s": 2.0}, "warn_age_s=3.0: must not exceed stale_after_s=2.0"),
        (
            {"warn_interventions_per_s": 5.0, "error_interventions_per_s": 1.0},
            "warn_interventions_per_s=5.0: must not exceed error_interventions_per_s=1.0",
        ),
    ],
)
def test_stage_limits_refuse_bad_values_naming_the_field(kwargs, needle):
    with pytest.raises(ValueError) as info:
        StageLimits(**kwargs)
    assert needle in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"hold_s": -1.0}, "hold_s=-1.0: must be a finite number >= 0"),
        ({"hold_s": math.inf}, "hold_s=inf: must be a finite number >= 0"),
        ({"flow": {"warn_latency_ms": 1.0}}, "flow={'warn_latency_ms': 1.0}: must be a StageLimits"),
    ],
)
def test_config_refuses_bad_values_naming_the_field(kwargs, needle):
    with pytest.raises(ValueError) as info:
        DiagnosticsConfig(**kwargs)
    assert needle in str(info.value)


def test_config_is_frozen_and_keyword_only():
    with pytest.raises(TypeError):
        StageLimits(1.0)  # positional arguments are refused
    cfg = DiagnosticsConfig()
    with pytest.raises(AttributeError):
        cfg.hold_s = 1.0


def test_diagnostic_array_adapter():
    pytest.importorskip("diagnostic_msgs")
    from builtin_interfaces.msg import Time
    from diagnostic_msgs.msg import DiagnosticStatus

    from fovea_vla.nodes.diagnostics import diagnostic_array

    statuses = [
        assess(healthy(), LIMITS),
        assess(healthy(latency_p99_ms=20.0), LIMITS),
        assess(healthy(latency_p99_ms=60.0), LIMITS),
        assess(StageSample(name="captions"), LIMITS),
    ]
    array = diagnostic_array(statuses, "fovea_node", "NVIDIA H100", Time(sec=12, nanosec=34))
    assert (array.header.stamp.sec, array.header.stamp.nanosec) == (12, 34)
    assert [s.name for s in array.status] == [
        "fovea_node: flow",
        "fovea_node: flow",
        "fovea_node: flow",
        "fovea_node: captions",
    ]
    assert [s.level for s in array.status] == [
        DiagnosticStatus.OK,
        DiagnosticStatus.WARN,
        DiagnosticStatus.ERROR,
        DiagnosticStatus.STALE,
    ]
    assert array.status[1].message == "latency p99 20 ms above 15 ms"
    assert all(s.hardware_id == "NVIDIA H100" for s in array.status)
    values = {kv.key: kv.value for kv in array.status[0].values}
    assert values["backend"] == "nvof" and values["latency_p99_ms"] == "4"
    assert [(kv.key, kv.value) for kv in array.status[3].values] == [("received", "0"), ("drops", "0")]


def test_threshold_parameters_map_onto_the_config_and_bad_ones_are_named():
    from rclpy.parameter import Parameter

    from fovea_vla.nodes.diagnostics import diagnostics_config, diagnostics_params
    from fovea_vla.nodes.params import validate_changes

    specs = diagnostics_params(("ingest", "flow"))
    names = [spec.name for spec in specs]
    assert names[0] == "diagnostics.rate_hz"
    assert "diagnostics.ingest.warn_rate_hz" in names and "diagnostics.flow.error_latency_ms" in names
    assert "diagnostics.flow.warn_rate_hz" not in names  # flow has no rate limit to tune
    values = {spec.name: spec.default for spec in specs} | {"diagnostics.flow.warn_latency_ms": 7.0}
    cfg = diagnostics_config(values, ("ingest", "flow"))
    assert cfg.flow.warn_latency_ms == 7.0 and cfg.ingest == DiagnosticsConfig().ingest
    with pytest.raises(ValueError, match=r"diagnostics\.flow\.warn_latency_ms=70\.0: must not exceed"):
        diagnostics_config(values | {"diagnostics.flow.warn_latency_ms": 70.0}, ("ingest", "flow"))
    changes, refused = validate_changes(specs, [Parameter("diagnostics.flow.warn_latency_ms", value=3)])
    assert changes == {"diagnostics.flow.warn_latency_ms": 3.0} and refused is None
    _, refused = validate_changes(specs, [Parameter("diagnostics.rate_hz", value=2.0)])
    assert refused == "diagnostics.rate_hz is read-only: changing it needs a restart"
    _, refused = validate_changes(specs, [Parameter("diagnostics.flow.warn_latency_ms", value="fast")])
    assert refused.startswith("diagnostics.flow.warn_latency_ms='fast': expected float")
