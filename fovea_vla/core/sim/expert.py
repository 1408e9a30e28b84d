"""Scripted pushing expert for the tabletop task, from privileged simulator state.

The expert keeps the gripper closed (1.0) and pointing straight down (tool rpy = 0, 0, 0) and
runs a small state machine on the chosen block's position ``b`` and the target square's centre
``g``, with the push direction ``d = (g - b) / |g - b|`` recomputed every step:

============  ==============================================================================
``approach``  rise to ``safe_height`` where it is, then travel at that height to the pre-push
              point ``b - pre_push_distance * d`` behind the block
``descend``   go down to ``push_height`` at the pre-push point
``push``      drive the tool along the line through the block's centre towards ``g`` (the
              target point is on the line, inside the block, so the block is pushed and the
              tool slides back onto the line as ``d`` turns); when the tool is no longer behind
              the block or too far off the line, go back to ``approach`` (up and around)
``done``      the block's centre is inside the square: hold still
============  ==============================================================================

Every command moves the previous one by at most ``max_speed / control_hz`` (1.5 cm at 0.15 m/s
and 10 Hz) and stays within ``max_lead`` of the measured tool position, so consecutive targets
never jump and the commanded motion is one a policy can learn.

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

from fovea_vla.core._validation import is_real
from fovea_vla.core.sim.tabletop import Observation, TabletopConfig, TabletopEnv, Task

__all__ = [
    "PHASES",
    "ActionNoise",
    "EpisodeResult",
    "PushExpert",
    "PushExpertConfig",
    "expert_success_rate",
    "run_expert",
]

PHASES = ("approach", "descend", "push", "done")


@dataclass(frozen=True, kw_only=True)
class PushExpertConfig:
    """Scripted pusher parameters (lengths in metres, in the robot base frame).

    Attributes:
        max_speed: tool speed limit [m/s]; one command moves at most ``max_speed / control_hz``.
        max_lead: a command stays within this distance [m] of the measured tool position.
        safe_height: tool height [m] for travel above the blocks.
        push_height: tool height [m] while pushing (the closed fingertips are ~1 cm lower).
        pre_push_distance: distance [m] of the pre-push point behind the block's centre.
        push_depth: the push target lies this far [m] behind the block's centre, inside the block
            (smaller than the pusher's contact distance, so the block is driven forward).
        max_lateral_error: the tool's distance [m] from the push line above which it goes back
            up and around.
        min_behind: the tool must stay at least this far [m] behind the block's centre along the
            push direction, otherwise it goes back up and around.
        position_tolerance: distance [m] to a waypoint counted as reached.
    """

    max_speed: float = 0.15
    max_lead: float = 0.025
    safe_height: float = 0.09
    push_height: float = 0.02
    pre_push_distance: float = 0.06
    push_depth: float = 0.0
    max_lateral_error: float = 0.02
    min_behind: float = 0.02
    position_tolerance: float = 0.006

    def __post_init__(self):
        checks = {
            "max_speed": (0.01, 1.0),
            "max_lead": (0.005, 0.2),
            "safe_height": (0.05, 0.4),
            "push_height": (0.01, 0.04),
            "pre_push_distance": (0.03, 0.2),
            "push_depth": (0.0, 0.05),
            "max_lateral_error": (0.005, 0.1),
            "min_behind": (0.0, 0.1),
            "position_tolerance": (0.001, 0.05),
        }
        for name, (low, high) in checks.items():
            value = getattr(self, name)
            if not is_real(value) or not math.isfinite(value) or not low <= value <= high:
                raise ValueError(f"expert.{name}={value!r}: must be in [{low}, {high}]")
        if self.safe_height <= self.push_height + 0.03:
            raise ValueError(
                f"expert.safe_height={self.safe_height!r}: must exceed push_height={self.push_height!r} by > 0.03 m"
            )


class PushExpert:
    """Closed-loop scripted pusher for one episode (build a new one, or call :meth:`reset`, per episode).

    Args:
        task: the episode's task (``env.task``, after the reset) or the environment itself.
        cfg: expert parameters.
    """

    def __init__(self, task: Task | TabletopEnv, cfg: PushExpertConfig | None = None):
        self.task = task.task if isinstance(task, TabletopEnv) else task
        self.cfg = cfg or PushExpertConfig()
        self.phase = "approach"
        self._command: np.ndarray | None = None

    def reset(self, task: Task | None = None) -> None:
        """Start a new episode (optionally with a new task)."""
        if task is not None:
            self.task = task
        self.phase = "approach"
        self._command = None

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
        if self._command is None:
            self._command = tool.copy()
        block = np.asarray(privileged["target_block_position"][:2], np.float64)
        goal = np.asarray(privileged["target_square_centre"], np.float64)
        offset = goal - block
        distance = float(np.linalg.norm(offset))
        if privileged.get("success", False) or distance < 1e-3:
            self.phase = "done"
        if self.phase == "done":
            return self._action(self._command)

        direction = offset / distance
        normal = np.array([-direction[1], direction[0]])
        pre_push = block - cfg.pre_push_distance * direction
        relative = tool[:2] - block
        along, lateral = float(relative @ direction), float(relative @ normal)

        if self.phase == "push" and (abs(lateral) > cfg.max_lateral_error or along > -cfg.min_behind):
            self.phase = "approach"
        if self.phase == "approach":
            if tool[2] < cfg.safe_height - cfg.position_tolerance and np.linalg.norm(tool[:2] - pre_push) > 0.01:
                waypoint = np.r_[self._command[:2], cfg.safe_height]  # straight up first
            else:
                waypoint = np.r_[pre_push, cfg.safe_height]
                if np.linalg.norm(tool - waypoint) < cfg.position_tolerance + 0.004:
                    self.phase = "descend"
        if self.phase == "descend":
            waypoint = np.r_[pre_push, cfg.push_height]
            if tool[2] < cfg.push_height + cfg.position_tolerance:
                self.phase = "push"
        if self.phase == "push":
            waypoint = np.r_[block - cfg.push_depth * direction, cfg.push_height]
        return self._action(self._move_towards(waypoint, tool))

    def _move_towards(self, waypoint: np.ndarray, tool: np.ndarray) -> np.ndarray:
        """Step the command towards a waypoint, bounded in speed and in lead over the tool."""
        max_step = self.cfg.max_speed / self.task.control_hz
        step = waypoint - self._command
        length = float(np.linalg.norm(step))
        command = self._command + (step * (max_step / length) if length > max_step else step)
        lead = command - tool
        lead_length = float(np.linalg.norm(lead))
        if lead_length > self.cfg.max_lead:
            command = tool + lead * (self.cfg.max_lead / lead_length)
        self._command = command
        return command

    @staticmethod
    def _action(position: np.ndarray) -> np.ndarray:
        return np.r_[position, 0.0, 0.0, 0.0, 1.0]


class ActionNoise:
    """Smooth random offsets of the commanded tool position: an Ornstein-Uhlenbeck process per axis.

    ``n[t + 1] = a n[t] + sqrt(1 - a^2) std e[t]``, ``a = exp(-1 / (control_hz time_constant_s))``, e
    standard normal, ``n[0] = 0`` (so the first command is clean). Its stationary standard deviation
    is ``std`` on each of x, y, z and consecutive offsets differ by about ``std sqrt(2 (1 - a))``
    (6 mm at std 2 cm, 1 s, 10 Hz), so a perturbed command drifts the way a policy's errors do
    instead of jittering. z offsets are halved: the push height leaves little room. The expert
    switches phase on a ~1 cm waypoint tolerance, so it tolerates about 1 cm: with std 1 cm it solved
    37 of 39 episodes (seeds 0-19, two goals each; ~73 steps instead of ~40), with 2 cm 9 of 39.

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
    expert = PushExpert(env, cfg)
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
