"""Event narration: a grounded description of what the pipeline itself measured.

Unlike a vision-language model, the narrator cannot hallucinate: every phrase comes from a
measured quantity (the fixation's source and speed, the frame's coherence decision, scene cuts,
grasp slip, the policy's state and the action chunk's motion). It runs in microseconds, so it is
both the fallback when no model is available and the context a model is prompted with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["EventNarrator", "PipelineSnapshot", "action_phase"]

_FIXATION_WORDS = {
    "pursuit": "following a moving target",
    "saccade": "looking at a new point of interest",
    "external": "looking where the operator pointed",
    "query": "looking at the region the task names",
    "default": "looking at the image centre (nothing to track yet)",
}
_DECISION_WORDS = {
    "static": "the scene is still",
    "partial": "part of the scene is changing",
    "full": "the whole view is changing (camera motion)",
    "refresh": "the scene is being refreshed",
    "first": "the camera just started",
}


def _region_name(u: float, v: float) -> str:
    """Where (u, v) in [0, 1]^2 lies in a 3 x 3 grid of the image, in words."""
    column = ("left", "centre", "right")[min(2, max(0, int(u * 3)))]
    row = ("upper", "middle", "lower")[min(2, max(0, int(v * 3)))]
    if row == "middle":
        return "the centre" if column == "centre" else f"the {column}"
    return f"the {row} {column}" if column != "centre" else f"the {row} middle"


def _speed_class(speed_px_s: float) -> str:
    if not math.isfinite(speed_px_s) or speed_px_s < 20.0:
        return "still"
    return "slow" if speed_px_s < 150.0 else "fast"


def action_phase(
    actions: np.ndarray,
    names: tuple[str, ...] | list[str],
    *,
    move_threshold_m: float = 0.01,
    move_threshold_rad: float = 0.05,
    gripper_threshold: float = 0.2,
) -> str:
    """What an action chunk does, in words: ``"holding still"``, ``"lowering the arm, closing the gripper"``, ...

    Args:
        actions: ``(K, D)`` the chunk's absolute targets.
        names: the D dimension names; ``x y z`` make it an end-effector chunk (metres), anything else
            a joint chunk (radians); a last ``gripper`` dimension is 0 open, 1 closed.
        move_threshold_m: end-effector displacement over the chunk that counts as moving [m].
        move_threshold_rad: largest joint displacement that counts as moving [rad].
        gripper_threshold: gripper change over the chunk that counts as opening or closing.
    """
    actions = np.asarray(actions, dtype=np.float64)
    names = list(names)
    if actions.ndim != 2 or actions.shape[0] < 2 or actions.shape[1] != len(names) or not np.isfinite(actions).all():
        return "unknown"
    delta = actions[-1] - actions[0]
    phrases = []
    arm = [i for i, name in enumerate(names) if name != "gripper"]
    if {"x", "y", "z"} <= set(names):
        xyz = delta[[names.index("x"), names.index("y"), names.index("z")]]
        if np.linalg.norm(xyz) >= move_threshold_m:
            vertical = abs(xyz[2]) > 1.5 * np.linalg.norm(xyz[:2])
            phrases.append(("lowering" if xyz[2] < 0 else "raising") + " the arm" if vertical else "moving the arm")
    elif arm and np.abs(delta[arm]).max() >= move_threshold_rad:
        phrases.append("moving the arm")
    if "gripper" in names:
        change = delta[names.index("gripper")]
        if change >= gripper_threshold:
            phrases.append("closing the gripper")
        elif change <= -gripper_threshold:
            phrases.append("opening the gripper")
    return ", ".join(phrases) if phrases else "holding still"


@dataclass(frozen=True, kw_only=True)
class PipelineSnapshot:
    """The newest measurements of the pipeline, as the narrator sees them (None: not received yet).

    Attributes:
        stamp_ns: capture stamp of the newest frame these measurements describe.
        fixation_source: ``pursuit``, ``saccade``, ``external``, ``query`` or ``default``.
        fixation_uv: fixation in [0, 1]^2 image coordinates (x right, y down).
        fixation_speed_px_s: image speed of the fixated target [px/s].
        decision: the frame's coherence decision (``static``, ``partial``, ``full``, ``cut``, ``first``, ``refresh``).
        changed_fraction: share of tiles the motion analysis marked changed [0, 1].
        seconds_since_cut: since the last scene cut [s] (capture time), None when none was seen.
        slip: ``onset``, ``ongoing`` or ``cleared``; None when no slip was reported.
        policy_status: the policy node's status (``running``, ``waiting``, ``stopped: <reason>``).
        actions_enabled: whether the policy commands the robot (False: dry run).
        action_phase: :func:`action_phase` of the newest chunk.
        instruction: the current task instruction.
    """

    stamp_ns: int
    fixation_source: str | None = None
    fixation_uv: tuple[float, float] | None = None
    fixation_speed_px_s: float = 0.0
    decision: str | None = None
    changed_fraction: float = 0.0
    seconds_since_cut: float | None = None
    slip: str | None = None
    policy_status: str | None = None
    actions_enabled: bool | None = None
    action_phase: str | None = None
    instruction: str = ""


class EventNarrator:
    """Turns a :class:`PipelineSnapshot` into one short paragraph, and tells when it says something new.

    Args:
        cut_memory_s: a scene cut is mentioned for this long after it happened [s].
    """

    name = "events"
    kind = "events"

    def __init__(self, cut_memory_s: float = 3.0):
        if not cut_memory_s > 0:
            raise ValueError(f"cut_memory_s={cut_memory_s!r}: must be > 0")
        self.cut_memory_s = cut_memory_s

    def facts(self, snapshot: PipelineSnapshot) -> tuple:
        """The narration's content, quantised so that noise does not count as news."""
        fixation = None
        if snapshot.fixation_source is not None:
            region = _region_name(*snapshot.fixation_uv) if snapshot.fixation_uv else None
            fixation = (snapshot.fixation_source, region, _speed_class(snapshot.fixation_speed_px_s))
        recent_cut = snapshot.seconds_since_cut is not None and snapshot.seconds_since_cut <= self.cut_memory_s
        scene = "cut" if recent_cut else snapshot.decision
        slip = snapshot.slip if snapshot.slip in ("onset", "ongoing") else None
        policy = None
        if snapshot.policy_status is not None:
            policy = (snapshot.policy_status, snapshot.actions_enabled, snapshot.action_phase)
        return fixation, scene, slip, policy, snapshot.instruction

    def narrate(self, snapshot: PipelineSnapshot) -> str:
        """One to five sentences, each grounded in a measurement of the snapshot."""
        fixation, scene, slip, policy, instruction = self.facts(snapshot)
        sentences = []
        if fixation is not None:
            source, region, speed = fixation
            text = _FIXATION_WORDS.get(source, f"fixation source {source}")
            where = f" in {region}" if region and source != "default" else ""
            moving = ""
            if source == "pursuit" and speed != "still":
                moving = f" ({speed}, {snapshot.fixation_speed_px_s:.0f} px/s)"
            sentences.append(f"Gaze: {text}{where}{moving}.")
        if scene == "cut":
            sentences.append("Scene: the view changed abruptly (scene cut).")
        elif scene is not None:
            words = _DECISION_WORDS.get(scene, scene)
            share = f" ({snapshot.changed_fraction:.0%} of the image moving)" if scene == "partial" else ""
            sentences.append(f"Scene: {words}{share}.")
        if slip is not None:
            sentences.append("Grasp: the held object is slipping." if slip == "onset" else "Grasp: slip continues.")
        if policy is not None:
            status, enabled, phase = policy
            if status.startswith("stopped"):
                sentences.append(f"Robot: {status}.")
            elif status == "running" and phase and enabled:
                sentences.append(f"Robot: {phase}.")
            elif status == "running" and phase:
                sentences.append(f"Robot (dry run, not commanding): the policy would be {phase}.")
            else:
                sentences.append(f"Robot: policy {status}.")
        if instruction:
            sentences.append(f'Task: "{instruction}".')
        return " ".join(sentences) if sentences else "No pipeline data yet."
