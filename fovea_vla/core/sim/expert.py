"""Scripted pushing expert for the tabletop task, from privileged simulator state.

The expert keeps the gripper closed (1.0) and pointing straight down (tool rpy = 0, 0, 0). With the
chosen block's position ``b``, the target square's centre ``g``, the push direction
``d = (g - b) / |g - b|`` and the pre-push point ``p = b - pre_push_distance * d`` it picks a waypoint
from the *current* state alone (first rule that applies):

============  ==============================================================================
``done``      the block's centre is inside the square: hold where the tool is
``push``      the tool is in the zone behind the block (within ``steer_width`` of the line through
              ``b`` along ``d``, between ``pre_push_distance + zone_slack`` and ``min_behind``
              behind ``b``), within ``max_lateral_error`` of the line and at push height: drive
              it towards ``b`` (the target is inside the block, so the block is pushed and the
              tool slides back onto the line as ``d`` turns)
``descend``   elsewhere in that zone: go to push height on the line, at least ``realign_distance``
              behind ``b`` (from the side or from above: a tool that drifted off the line while
              pushing steers back behind the block instead of going up and around)
``approach``  below ``rise_height``: straight up; otherwise travel to ``p`` at ``safe_height``
============  ==============================================================================

and commands the tool position moved towards the waypoint by at most ``max_lead``.

Why memoryless: a cloned policy sees the scene and the tool, not the expert's history. An expert
whose phase depends on how it got somewhere (hysteresis, "straight up from where the previous
command was") labels one state with different actions (up 1 cm on one visit, down 6 cm on another)
and the clone averages them into hovering. Here one state has one label, so behaviour cloning and
DAgger relabelling have a well-defined target. Why steer back low instead of going around: a clone
is off by a centimetre or so, and an expert that treats 2 cm off the line as "start over" loops;
with a smooth random offset of 1.5 cm on its commands (:class:`ActionNoise`), the steering rule
solved 44 / 60 scenes against 21 / 60 when leaving the lane meant going up and around.

:class:`ActionNoise` perturbs the commands that are *executed* while the clean expert commands are
the recorded labels (DART, Laskey et al. 2017): the demonstrations then visit states off the
expert's own path and show how to get back, which a cloned policy needs once its own small errors
add up in closed loop.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from fovea_vla.core._validation import is_int, is_real
from fovea_vla.core.sim.tabletop import Observation, TabletopConfig, TabletopEnv

__all__ = [
    "PHASES",
    "ActionNoise",
    "EpisodeResult",
    "PushExpert",
    "PushExpertConfig",
    "expert_plan",
    "expert_success_rate",
    "run_expert",
]

PHASES = ("approach", "descend", "push", "done")


@dataclass(frozen=True, kw_only=True)
class PushExpertConfig:
    """Scripted pusher parameters (lengths in metres, in the robot base frame).

    Attributes:
        max_lead: a command lies at most this far [m] from the measured tool position (with the
            arm's tracking, this sets the speed).
        safe_height: tool height [m] for travel above the blocks.
        rise_height: below this tool height [m] (and outside the zone behind the block) the tool
            first goes straight up; above it, it travels (the closed fingertips clear the blocks).
        push_height: tool height [m] while pushing (the closed fingertips are ~1 cm lower).
        pre_push_distance: distance [m] of the pre-push point behind the block's centre.
        push_depth: the push target lies this far [m] behind the block's centre, inside the block
            (smaller than the pusher's contact distance, so the block is driven forward).
        max_lateral_error: the tool pushes when within this distance [m] of the line through the
            block's centre (and at push height).
        steer_width: half-width [m] of the zone behind the block where the tool descends onto and
            steers back to the line instead of going around.
        min_behind: the zone ends this far [m] behind the block's centre (closer, the tool has
            slipped past the block: back up and around).
        zone_slack: the zone starts this far [m] behind the pre-push point.
        realign_distance: the tool steers back to the line at least this far [m] behind the block's
            centre (clear of it).
        push_tolerance: the tool pushes once it is this close [m] above push height.
    """

    max_lead: float = 0.02
    safe_height: float = 0.09
    rise_height: float = 0.07
    push_height: float = 0.02
    pre_push_distance: float = 0.06
    push_depth: float = 0.0
    max_lateral_error: float = 0.02
    steer_width: float = 0.05
    min_behind: float = 0.02
    zone_slack: float = 0.04
    realign_distance: float = 0.045
    push_tolerance: float = 0.012

    def __post_init__(self):
        checks = {
            "max_lead": (0.005, 0.2),
            "safe_height": (0.05, 0.4),
            "rise_height": (0.04, 0.4),
            "push_height": (0.01, 0.04),
            "pre_push_distance": (0.03, 0.2),
            "push_depth": (0.0, 0.05),
            "max_lateral_error": (0.005, 0.1),
            "steer_width": (0.005, 0.2),
            "min_behind": (0.0, 0.1),
            "zone_slack": (0.0, 0.1),
            "realign_distance": (0.0, 0.2),
            "push_tolerance": (0.001, 0.05),
        }
        for name, (low, high) in checks.items():
            value = getattr(self, name)
            if not is_real(value) or not math.isfinite(value) or not low <= value <= high:
                raise ValueError(f"expert.{name}={value!r}: must be in [{low}, {high}]")
        if self.safe_height <= self.push_height + 0.03:
            raise ValueError(
                f"expert.safe_height={self.safe_height!r}: must exceed push_height={self.push_height!r} by > 0.03 m"
            )
        if not self.push_height < self.rise_height <= self.safe_height:
            raise ValueError(
                f"expert.rise_height={self.rise_height!r}: must be in (push_height={self.push_height!r}, "
                f"safe_height={self.safe_height!r}]"
            )


class PushExpert:
    """Scripted pusher: a function of the current observation and privileged state.

    It keeps no memory between steps (:attr:`phase` only reports the last rule applied) and reads
    the task from the privileged state, so one instance serves any number of episodes and a fresh
    one labels any state.

    Args:
        cfg: expert parameters.
    """

    def __init__(self, cfg: PushExpertConfig | None = None):
        self.cfg = cfg or PushExpertConfig()
        self.phase = "approach"

    def act(self, obs: Observation, privileged: dict) -> np.ndarray:
        """Next action.

        Args:
            obs: the latest observation (uses ``ee_pose``).
            privileged: ``env.privileged()`` of the same instant (uses ``target_block_position``,
                ``target_square_centre`` and ``success``).

        Returns:
            (7,) float64 action: tool target x, y, z [m], roll, pitch, yaw [rad] (all 0: pointing
            down), gripper 1.0 (closed).
        """
        cfg = self.cfg
        tool = np.asarray(obs.ee_pose[:3], np.float64)
        block = np.asarray(privileged["target_block_position"][:2], np.float64)
        goal = np.asarray(privileged["target_square_centre"], np.float64)
        offset = goal - block
        distance = float(np.linalg.norm(offset))
        if privileged.get("success", False) or distance < 1e-3:
            self.phase = "done"
            return self._action(tool)

        direction = offset / distance
        normal = np.array([-direction[1], direction[0]])
        pre_push = block - cfg.pre_push_distance * direction
        relative = tool[:2] - block
        along, lateral = float(relative @ direction), float(relative @ normal)
        in_zone = abs(lateral) < cfg.steer_width and (
            -(cfg.pre_push_distance + cfg.zone_slack) < along < -cfg.min_behind
        )
        if in_zone and abs(lateral) < cfg.max_lateral_error and tool[2] < cfg.push_height + cfg.push_tolerance:
            self.phase, waypoint = "push", np.r_[block - cfg.push_depth * direction, cfg.push_height]
        elif in_zone:
            on_line = block + min(along, -cfg.realign_distance) * direction
            self.phase, waypoint = "descend", np.r_[on_line, cfg.push_height]
        elif tool[2] < cfg.rise_height:
            self.phase, waypoint = "approach", np.r_[tool[:2], cfg.safe_height]
        else:
            self.phase, waypoint = "approach", np.r_[pre_push, cfg.safe_height]
        lead = waypoint - tool
        length = float(np.linalg.norm(lead))
        if length > cfg.max_lead:
            lead *= cfg.max_lead / length
        return self._action(tool + lead)

    @staticmethod
    def _action(position: np.ndarray) -> np.ndarray:
        return np.r_[position, 0.0, 0.0, 0.0, 1.0]


class ActionNoise:
    """Smooth random offsets of the commanded tool position: an Ornstein-Uhlenbeck process per axis.

    ``n[t + 1] = a n[t] + sqrt(1 - a^2) std e[t]``, ``a = exp(-1 / (control_hz time_constant_s))``, e
    standard normal, ``n[0] = 0`` (so the first command is clean). Its stationary standard deviation
    is ``std`` on each of x, y, z and consecutive offsets differ by about ``std sqrt(2 (1 - a))``
    (6 mm at std 2 cm, 1 s, 10 Hz), so a perturbed command drifts the way a policy's errors do
    instead of jittering. z offsets are halved: the push height leaves little room. Since the
    expert's commands are relative to the measured tool, a held offset acts like a velocity error.
    With random starts (``start_offset`` 8, 15, 5 cm) the expert solved 99 / 100 scenes (seeds
    1000-1099) at std 8 mm (43 steps on average, 28 without noise) and 44 / 60 at 1.5 cm.

    Args:
        std: stationary standard deviation [m], >= 0 (0: no noise).
        control_hz: the environment's control rate [Hz].
        seed: generator seed, or a sequence of ints (e.g. ``(seed, goal_index, 2)``).
        time_constant_s: correlation time [s], > 0.

    >>> noise = ActionNoise(0.0, 10.0, 0)
    >>> noise(np.r_[0.5, 0.0, 0.1, 0.0, 0.0, 0.0, 1.0]).tolist()
    [0.5, 0.0, 0.1, 0.0, 0.0, 0.0, 1.0]
    """

    def __init__(self, std: float, control_hz: float, seed, time_constant_s: float = 1.0):
        if not is_real(std) or not (0.0 <= std <= 0.1):
            raise ValueError(f"std={std!r}: must be in [0, 0.1] m")
        if not is_real(time_constant_s) or not time_constant_s > 0:
            raise ValueError(f"time_constant_s={time_constant_s!r}: must be > 0")
        self.std = float(std)
        self._decay = math.exp(-1.0 / (float(control_hz) * float(time_constant_s)))
        self._rng = np.random.default_rng(seed)
        self._offset = np.zeros(3)

    def __call__(self, action: np.ndarray) -> np.ndarray:
        """(7,) ``action`` with the current offset added to x, y, z; advances the process."""
        perturbed = np.array(action, np.float64)
        perturbed[:3] += self._offset * (1.0, 1.0, 0.5)
        if self.std > 0:
            innovation = self._rng.standard_normal(3) * self.std * math.sqrt(1.0 - self._decay**2)
            self._offset = self._decay * self._offset + innovation
        return perturbed


@dataclass(frozen=True)
class EpisodeResult:
    """Outcome of one scripted episode.

    Attributes:
        seed: the reset seed.
        instruction: the episode's instruction.
        success: the task was solved within the step limit.
        steps: control steps taken (until success, else the limit).
        final_distance: xy distance [m] from the chosen block's centre to the square's centre at the end.
        states: (steps + 1, 7) float64 policy states (tool pose + gripper) from the reset on.
        actions: (steps, 7) float64 actions sent.
        phases: the expert's phase at each action.
    """

    seed: int
    instruction: str
    success: bool
    steps: int
    final_distance: float
    states: np.ndarray
    actions: np.ndarray
    phases: tuple[str, ...]


def run_expert(
    env: TabletopEnv,
    seed: int,
    cfg: PushExpertConfig | None = None,
    *,
    max_steps: int | None = None,
    goal: tuple[str, str] | None = None,
) -> EpisodeResult:
    """Reset ``env`` with ``seed`` and run the scripted expert until success or the step limit.

    Args:
        env: the environment (any image size: the physics does not depend on it).
        seed: reset seed.
        cfg: expert parameters.
        max_steps: step limit; ``env.cfg.max_steps`` when None.
        goal: (block colour, square colour) instead of the seed's own goal (see
            :meth:`TabletopEnv.reset`).

    Returns:
        The episode's outcome with its states and actions.
    """
    limit = env.cfg.max_steps if max_steps is None else int(max_steps)
    obs = env.reset(seed, goal=goal)
    expert = PushExpert(cfg)
    states, actions, phases = [env.state()], [], []
    success = env.success()
    while not success and len(actions) < limit:
        action = expert.act(obs, env.privileged())
        obs = env.step(action)
        actions.append(action)
        phases.append(expert.phase)
        states.append(env.state())
        success = env.success()
    privileged = env.privileged()
    final = float(np.linalg.norm(privileged["target_block_position"][:2] - privileged["target_square_centre"]))
    return EpisodeResult(
        seed=int(seed),
        instruction=env.instruction,
        success=bool(success),
        steps=len(actions),
        final_distance=final,
        states=np.array(states),
        actions=np.array(actions).reshape(-1, 7),
        phases=tuple(phases),
    )


def expert_plan(
    env: TabletopEnv, observation: Observation, horizon: int, cfg: PushExpertConfig | None = None
) -> np.ndarray:
    """What the expert would do from the present state if it took over for ``horizon`` steps.

    The simulation runs ahead without rendering inside :meth:`TabletopEnv.lookahead` and is then
    put back, so the caller's episode is unchanged. Used as the training chunk of a frame
    (``action.plan``): for states a policy visited (DAgger), the expert's labels at the *following*
    visited states describe where the policy went next, not where the expert would have gone; a
    policy that hesitated would be taught to hesitate.

    Args:
        env: the environment, mid-episode.
        observation: its latest observation.
        horizon: steps to plan, >= 1.
        cfg: expert parameters.

    Returns:
        (horizon, 7) float64 actions; the first is ``PushExpert.act(observation, ...)``.
    """
    if not is_int(horizon) or horizon < 1:
        raise ValueError(f"horizon={horizon!r}: must be an integer >= 1")
    expert = PushExpert(cfg)
    actions = []
    with env.lookahead():
        for step in range(horizon):
            actions.append(expert.act(observation, env.privileged()))
            if step + 1 < horizon:
                observation = env.step(actions[-1], render=False)
    return np.array(actions)


def expert_success_rate(
    seeds: Iterable[int], env_cfg: TabletopConfig | None = None, cfg: PushExpertConfig | None = None
) -> float:
    """Share of seeds the scripted expert solves, in [0, 1].

    Args:
        seeds: reset seeds.
        env_cfg: environment config; by default the standard task without rendering (rendering
            does not affect the simulation, and skipping it makes a step ~20x cheaper).
        cfg: expert parameters.
    """
    env_cfg = env_cfg or TabletopConfig(render=False)
    seeds = list(seeds)
    if not seeds:
        raise ValueError("expert_success_rate: no seeds")
    with TabletopEnv(env_cfg) as env:
        solved = sum(run_expert(env, seed, cfg).success for seed in seeds)
    return solved / len(seeds)
