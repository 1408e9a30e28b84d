"""Closed-loop evaluation in one process: simulator -> foveated pipeline -> action head -> executor -> simulator.

The same stages as ``vla_stack`` on a robot, driven by simulated time: at every control step the
rendered frame (stamped with the simulated time) goes through :class:`FoveaPipeline`, the action
head predicts a chunk from the tokens, the instruction and the state, the :class:`ChunkExecutor`
splices it in (its ticks at the executor's own rate between two simulator steps), and the
executor's command for the next step becomes the simulator's end-effector target. Wall time of the
per-step work is measured (pipeline + head + executor), so latency percentiles come with the success
rate.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fovea_vla.core.frames import Frame
from fovea_vla.core.pipeline import FoveaPipeline
from fovea_vla.core.policy.checkpoint import PolicySpec
from fovea_vla.core.policy.executor import Chunk, ChunkExecutor, ExecutorConfig
from fovea_vla.core.policy.observation import token_positions
from fovea_vla.core.policy.runner import ActionHeadRunner
from fovea_vla.core.policy.safety import SafetyLimits
from fovea_vla.core.policy.text import TextEncoder

__all__ = ["EpisodeReport", "run_episode", "summarize_episodes"]


@dataclass
class EpisodeReport:
    """One evaluated episode.

    Attributes:
        seed: the simulator seed.
        instruction: the task's text.
        success: whether the task was solved within the step limit.
        steps: control steps run.
        time_to_success_s: simulated time until success, None on failure.
        step_ms: (steps,) wall time of pipeline + head + executor per step [ms].
        encoder_ms: wall time of the encoder per step that ran it [ms] (the pipeline's
            ``timing_ms["encoder"]``; steps that reused every token have none).
        frames: rendered RGB frames when recorded (for videos), else empty.
        rejected_chunks: chunks the executor refused, by reason.
    """

    seed: int
    instruction: str
    success: bool
    steps: int
    time_to_success_s: float | None
    step_ms: list[float] = field(default_factory=list)
    encoder_ms: list[float] = field(default_factory=list)
    frames: list[np.ndarray] = field(default_factory=list)
    rejected_chunks: dict[str, int] = field(default_factory=dict)


def run_episode(
    env,
    seed: int,
    pipeline: FoveaPipeline,
    runner: ActionHeadRunner,
    spec: PolicySpec,
    text_encoder: TextEncoder,
    *,
    limits: SafetyLimits,
    executor_cfg: ExecutorConfig | None = None,
    max_steps: int | None = None,
    record: bool = False,
    overlay: Callable[[np.ndarray, object], np.ndarray] | None = None,
    goal: tuple[str, str] | None = None,
    on_step: Callable[[object, np.ndarray, np.ndarray], None] | None = None,
    policy_rate_hz: float | None = None,
) -> EpisodeReport:
    """Run one episode of ``env`` (a :class:`fovea_vla.core.sim.tabletop.TabletopEnv`) under the policy.

    Args:
        env: the simulator; reset here with ``seed``.
        seed: episode seed.
        pipeline: the vision pipeline (reset here), encoder enabled.
        runner: the action head.
        spec: the checkpoint's spec (step period, names).
        text_encoder: embeds the episode's instruction.
        limits: the executor's safety limits in the action space.
        executor_cfg: executor settings (default 50 Hz).
        max_steps: step limit (default: the env's).
        record: keep the frames (with ``overlay`` applied when given) for a video.
        overlay: ``overlay(rgb, pipeline_output) -> rgb`` for recorded frames.
        goal: (block colour, square colour) instead of the seed's own (see ``env.reset``).
        on_step: called at every step before the simulator moves, with the observation, the
            (S,) state and the (A,) command about to be sent; e.g. to label the states the policy
            visits with the expert's actions (DAgger).
        policy_rate_hz: chunks per second (policy_node's ``policy.rate_hz``); None: one per
            simulator step. At a lower rate than the simulator's the executor follows each chunk
            for several steps (the frames in between still run through the pipeline).

    Returns:
        The :class:`EpisodeReport`.
    """
    observation = env.reset(seed, goal=goal)
    pipeline.reset()
    executor = ChunkExecutor(executor_cfg or ExecutorConfig(), limits)
    step_s = 1.0 / env.cfg.control_hz
    state = env.state()
    executor.reset(state, observation.time_s)
    embedding = text_encoder.embed(env.instruction)
    limit = max_steps or env.cfg.max_steps
    report = EpisodeReport(seed=seed, instruction=env.instruction, success=False, steps=0, time_to_success_s=None)
    ticks_per_step = max(1, round(executor.cfg.control_rate_hz * step_s))
    steps_per_chunk = 1 if policy_rate_hz is None else max(1, round(env.cfg.control_hz / policy_rate_hz))
    for step in range(limit):
        start = time.perf_counter()
        now_s = observation.time_s
        frame = Frame(rgb=observation.rgb, stamp_ns=round(now_s * 1e9), frame_id="sim_camera")
        output = pipeline.process(frame)
        if step % steps_per_chunk == 0:
            positions = token_positions(output.layout.centers, output.layout.levels, output.width, output.height)
            head = runner.predict(output.tokens, positions, embedding, state)
            chunk = Chunk(head.actions, start_s=now_s + spec.step_s, step_s=spec.step_s, stamp_ns=frame.stamp_ns)
            rejected = executor.add_chunk(chunk, now_s)
            if rejected:
                report.rejected_chunks[rejected] = report.rejected_chunks.get(rejected, 0) + 1
        command = None
        for tick in range(1, ticks_per_step + 1):
            command = executor.step(now_s + tick * step_s / ticks_per_step)
        report.step_ms.append((time.perf_counter() - start) * 1e3)
        if "encoder" in output.timing_ms:
            report.encoder_ms.append(output.timing_ms["encoder"])
        if record:
            report.frames.append(overlay(observation.rgb, output) if overlay else observation.rgb)
        if on_step is not None:
            on_step(observation, state, command.position)
        observation = env.step(command.position)
        state = env.state()
        report.steps += 1
        if env.success():
            report.success, report.time_to_success_s = True, observation.time_s
            break
    return report


def summarize_episodes(reports: list[EpisodeReport]) -> dict:
    """Success rate, time to success and step-latency percentiles over episodes."""
    latencies = np.array([ms for r in reports for ms in r.step_ms], dtype=np.float64)
    encoder = np.array([ms for r in reports for ms in r.encoder_ms], dtype=np.float64)
    times = [r.time_to_success_s for r in reports if r.success]
    return {
        "episodes": len(reports),
        "successes": sum(r.success for r in reports),
        "success_rate": sum(r.success for r in reports) / max(1, len(reports)),
        "time_to_success_s_mean": float(np.mean(times)) if times else None,
        "time_to_success_s_median": float(np.median(times)) if times else None,
        "step_ms_p50": float(np.percentile(latencies, 50)) if latencies.size else None,
        "step_ms_p99": float(np.percentile(latencies, 99)) if latencies.size else None,
        "encoder_ms_p50": float(np.percentile(encoder, 50)) if encoder.size else None,
        "encoder_ms_p99": float(np.percentile(encoder, 99)) if encoder.size else None,
        "per_episode": [
            {"seed": r.seed, "success": r.success, "steps": r.steps, "time_to_success_s": r.time_to_success_s}
            for r in reports
        ],
    }
