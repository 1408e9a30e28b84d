"""Tabletop pushing task in PyBullet: "push the <colour> block onto the <colour> square".

A Franka Panda (``franka_panda/panda.urdf`` from ``pybullet_data``, fixed base at the origin) stands
at a table whose top is the plane z = 0. In front of it lie 2-4 cubes of distinct colours (from
:data:`BLOCK_COLOURS`) and two flat, collision-free target squares (:data:`SQUARE_COLOURS`). The
instruction names one block and one square; success is that block's centre inside that square (xy)
with the block resting on the table. Layout, colours and the chosen block and square all follow
from the seed given to :meth:`TabletopEnv.reset`, and a reset is bit-identical for a seed (images
included). ``reset(seed, goal=(block, square))`` asks for another goal in the same scene, one of
:func:`feasible_goals`; :func:`layout_goals` draws several per layout, so demonstrations can show one
image with different instructions and actions (``fovea-vla record-sim --instructions-per-layout``).

Frames and conventions:

* **Base frame**: the robot base, x forward (towards the workspace), y left, z up, metres. The
  table top is z = 0.
* **Tool frame**: ``panda_grasptarget`` (link 11, between the fingertips) rotated by Rx(pi), so
  with the gripper pointing straight down the tool's roll, pitch and yaw are all 0 (instead of
  roll = +-pi, which wraps and is hard to learn). Its origin is the grasp target's. Both the
  observed ``ee_pose`` and the commanded action use this frame.
* **Orientation**: roll, pitch, yaw [rad] with R = Rz(yaw) Ry(pitch) Rx(roll) (extrinsic x-y-z,
  PyBullet's Euler convention).
* **Action** (7,): absolute tool target in the base frame, x y z [m], roll pitch yaw [rad], gripper
  in [0, 1] (0 open, 1 closed). Each step clips it to a workspace box, solves IK for link 11,
  drives the seven arm joints in POSITION_CONTROL (bounded force and speed) and the fingers from
  the gripper value, then runs ``240 / control_hz`` physics steps at 240 Hz.
* **Camera**: fixed, in front of and above the workspace, looking back at the robot, PyBullet's
  ``ER_TINY_RENDERER`` (no OpenGL) without shadows. :meth:`TabletopEnv.camera_info` gives its
  pinhole intrinsics (square pixels, horizontal field of view ``fov_deg``) and its pose as an
  OpenCV optical frame (x right, y down, z forward) in the base frame. Pixel convention: x right,
  y down, the centre of the top-left pixel is (0, 0).

Layout: the squares do not overlap, no block starts on a square or touches another, the chosen
block starts at least ``min_push_distance`` from the square's centre, and the straight push
corridor from behind it to the square is free of the other blocks.

Accuracy and cost (2-core CPU): the tool settles within ~2-3 mm of a reachable target (null-space
IK towards :data:`HOME_JOINTS` leaves a small bias) and lags a 1.5 cm-per-step target by ~2 mm.
Rendering dominates a step: ~70-105 ms at 640x480, ~30 ms at 320x240, ~20 ms at 160x120 (the
robot's meshes cost even at tiny sizes); physics and IK ~2 ms; a reset ~70-170 ms. Rendering does
not affect the simulation, so ``render=False`` gives the same trajectories for scripted runs.

PyBullet is imported when an environment is built, so this module imports without it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from fovea_vla.core._validation import is_int, is_real

__all__ = [
    "BLOCK_COLOURS",
    "FINGER_JOINTS",
    "HOME_JOINTS",
    "JOINT_NAMES",
    "SQUARE_COLOURS",
    "CameraIntrinsics",
    "Observation",
    "TabletopConfig",
    "TabletopEnv",
    "Task",
    "feasible_goals",
    "layout_goals",
    "matrix_to_rpy",
    "rpy_to_matrix",
]

# Block and square colours (RGBA in [0, 1]); the two sets share no word, so an instruction is unambiguous.
BLOCK_COLOURS = {
    "red": (0.85, 0.10, 0.10, 1.0),
    "yellow": (0.95, 0.85, 0.10, 1.0),
    "purple": (0.55, 0.15, 0.75, 1.0),
    "orange": (1.00, 0.50, 0.00, 1.0),
}
SQUARE_COLOURS = {
    "green": (0.10, 0.65, 0.20, 1.0),
    "blue": (0.10, 0.30, 0.90, 1.0),
}
_TABLE_RGBA = (0.72, 0.69, 0.64, 1.0)

JOINT_NAMES = tuple(f"panda_joint{i}" for i in range(1, 8))
FINGER_JOINTS = ("panda_finger_joint1", "panda_finger_joint2")
# Arm joints [rad] at reset: the tool points straight down (rpy = 0) at about (0.40, 0, 0.25) m.
HOME_JOINTS = (0.0, -0.3447, 0.0, -2.6467, 0.0, 2.3017, 0.7854)

_PHYSICS_HZ = 240.0
_EE_LINK = 11  # panda_grasptarget
_ARM_JOINTS = tuple(range(7))
_FINGER_JOINTS = (9, 10)
_FINGER_OPEN_M = 0.04  # per finger
_ARM_FORCES_NM = (87.0, 87.0, 87.0, 87.0, 12.0, 12.0, 12.0)
_FINGER_FORCE_N = 20.0
_FINGER_MAX_SPEED = 0.2  # m/s
# Rx(pi): tool frame <-> panda_grasptarget.
_RX_PI = np.diag([1.0, -1.0, -1.0])
# Physics steps after a reset, so the blocks settle on the table before the first observation.
_SETTLE_STEPS = 24
# Layout rejection sampling: attempts per object before the whole layout is drawn again.
_LAYOUT_TRIES = 200
# Observation.rgb when rendering is off.
_NO_IMAGE = np.zeros((0, 0, 3), np.uint8)
_NO_IMAGE.flags.writeable = False


def rpy_to_matrix(rpy) -> np.ndarray:
    """Rotation matrix of roll, pitch, yaw: R = Rz(yaw) Ry(pitch) Rx(roll).

    Args:
        rpy: (3,) roll, pitch, yaw [rad].

    Returns:
        (3, 3) float64 rotation matrix.

    >>> np.round(rpy_to_matrix([0.0, 0.0, np.pi / 2]) @ [1.0, 0.0, 0.0], 6) + 0.0
    array([0., 1., 0.])
    """
    roll, pitch, yaw = (float(v) for v in rpy)
    cr, sr, cp, sp, cy, sy = (
        math.cos(roll),
        math.sin(roll),
        math.cos(pitch),
        math.sin(pitch),
        math.cos(yaw),
        math.sin(yaw),
    )
    return np.array(
        [
            [cy * cp, cy * sp * sr - sy * cr, cy * sp * cr + sy * sr],
            [sy * cp, sy * sp * sr + cy * cr, sy * sp * cr - cy * sr],
            [-sp, cp * sr, cp * cr],
        ]
    )


def matrix_to_rpy(rotation: np.ndarray) -> np.ndarray:
    """Roll, pitch, yaw [rad] of a rotation matrix, the inverse of :func:`rpy_to_matrix`.

    Args:
        rotation: (3, 3) rotation matrix.

    Returns:
        (3,) float64 roll, pitch, yaw; roll and yaw in (-pi, pi], pitch in [-pi/2, pi/2].

    >>> np.round(matrix_to_rpy(rpy_to_matrix([0.1, -0.2, 0.3])), 6)
    array([ 0.1, -0.2,  0.3])
    """
    r = np.asarray(rotation, np.float64)
    pitch = math.atan2(-r[2, 0], math.hypot(r[0, 0], r[1, 0]))
    roll = math.atan2(r[2, 1], r[2, 2])
    yaw = math.atan2(r[1, 0], r[0, 0])
    return np.array([roll, pitch, yaw])


def _matrix_to_quaternion(rotation: np.ndarray) -> tuple[float, float, float, float]:
    """(x, y, z, w) unit quaternion of a rotation matrix (PyBullet's order)."""
    r = rotation
    trace = r[0, 0] + r[1, 1] + r[2, 2]
    if trace > 0.0:
        s = 2.0 * math.sqrt(trace + 1.0)
        q = ((r[2, 1] - r[1, 2]) / s, (r[0, 2] - r[2, 0]) / s, (r[1, 0] - r[0, 1]) / s, 0.25 * s)
    elif r[0, 0] > r[1, 1] and r[0, 0] > r[2, 2]:
        s = 2.0 * math.sqrt(1.0 + r[0, 0] - r[1, 1] - r[2, 2])
        q = (0.25 * s, (r[0, 1] + r[1, 0]) / s, (r[0, 2] + r[2, 0]) / s, (r[2, 1] - r[1, 2]) / s)
    elif r[1, 1] > r[2, 2]:
        s = 2.0 * math.sqrt(1.0 + r[1, 1] - r[0, 0] - r[2, 2])
        q = ((r[0, 1] + r[1, 0]) / s, 0.25 * s, (r[1, 2] + r[2, 1]) / s, (r[0, 2] - r[2, 0]) / s)
    else:
        s = 2.0 * math.sqrt(1.0 + r[2, 2] - r[0, 0] - r[1, 1])
        q = ((r[0, 2] + r[2, 0]) / s, (r[1, 2] + r[2, 1]) / s, 0.25 * s, (r[1, 0] - r[0, 1]) / s)
    norm = math.sqrt(sum(v * v for v in q))
    return tuple(float(v / norm) for v in q)


def _check_vector(name: str, value, length: int) -> tuple[float, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != length:
        raise ValueError(f"sim.{name}={value!r}: must be {length} numbers")
    if not all(is_real(v) and math.isfinite(v) for v in value):
        raise ValueError(f"sim.{name}={value!r}: must be {length} finite numbers")
    return tuple(float(v) for v in value)


@dataclass(frozen=True, kw_only=True)
class TabletopConfig:
    """Tabletop task parameters. Sequences are accepted for vectors and ranges and stored as tuples.

    Attributes:
        image_width: camera image width [px], in [32, 4096].
        image_height: camera image height [px], in [32, 4096].
        fov_deg: horizontal field of view [deg], in [10, 150]; pixels are square.
        control_hz: control rate [Hz], in [10, 30], dividing 240 (10, 12, 15, 16, 20, 24 or 30):
            each step runs ``240 / control_hz`` physics steps at 240 Hz.
        num_blocks: (min, max) inclusive range of the number of blocks, within [2, 4].
        max_steps: episode length limit in control steps (informational for runners: the
            environment keeps stepping past it), >= 1.
        block_size: cube side [m], in [0.02, 0.06].
        square_size: target square side [m], in [0.06, 0.16].
        min_push_distance: the chosen block starts at least this far [m] from the centre of the
            chosen square, in [0.05, 0.3].
        layout_low: (x, y) [m] lower corner of the area holding block and square centres.
        layout_high: (x, y) [m] upper corner of that area.
        workspace_low: (x, y, z) [m] lower corner of the box the commanded tool position is
            clipped to. Its z keeps the closed fingertips (about 11 mm below the tool origin)
            above the table.
        workspace_high: (x, y, z) [m] upper corner of that box.
        camera_eye: (x, y, z) [m] camera position in the base frame.
        camera_target: (x, y, z) [m] point the optical axis passes through; the image's up is
            the base frame's +z projected onto the image.
        max_joint_speed: arm joint speed limit [rad/s] of the position controller, in (0, 2.6].
        block_mass: cube mass [kg], in (0, 2].
        friction: lateral friction coefficient of the table and the blocks, in (0, 2].
        start_offset: (x, y, z) half-extents [m], each in [0, 0.2], of a uniform random offset of the
            tool's start position from the home pose (drawn from the seed alone, so every goal of a
            layout starts alike; the arm is placed there by IK, pointing down). (0, 0, 0): the arm
            starts at :data:`HOME_JOINTS`. A fixed start lets a cloned policy read where it is
            heading from how far it has come, instead of from the instruction.
        render: render the camera image at every observation. When false, ``Observation.rgb`` is
            an empty (0, 0, 3) array and a step costs only the physics (scripted evaluation:
            rendering does not affect the simulation).
    """

    image_width: int = 640
    image_height: int = 480
    fov_deg: float = 60.0
    control_hz: float = 10.0
    num_blocks: tuple[int, int] = (2, 4)
    max_steps: int = 150
    block_size: float = 0.04
    square_size: float = 0.10
    min_push_distance: float = 0.12
    layout_low: tuple[float, float] = (0.40, -0.20)
    layout_high: tuple[float, float] = (0.65, 0.20)
    workspace_low: tuple[float, float, float] = (0.25, -0.40, 0.015)
    workspace_high: tuple[float, float, float] = (0.80, 0.40, 0.45)
    camera_eye: tuple[float, float, float] = (0.95, 0.0, 0.95)
    camera_target: tuple[float, float, float] = (0.47, 0.0, 0.0)
    max_joint_speed: float = 1.5
    block_mass: float = 0.1
    friction: float = 0.5
    start_offset: tuple[float, float, float] = (0.0, 0.0, 0.0)
    render: bool = True

    def __post_init__(self):
        if not isinstance(self.render, bool):
            raise ValueError(f"sim.render={self.render!r}: must be a bool")
        for name in ("image_width", "image_height"):
            value = getattr(self, name)
            if not is_int(value) or not 32 <= value <= 4096:
                raise ValueError(f"sim.{name}={value!r}: must be an integer in [32, 4096]")
        if not is_int(self.max_steps) or self.max_steps < 1:
            raise ValueError(f"sim.max_steps={self.max_steps!r}: must be an integer >= 1")
        ranges = {
            "fov_deg": (10.0, 150.0, True),
            "control_hz": (10.0, 30.0, True),
            "block_size": (0.02, 0.06, True),
            "square_size": (0.06, 0.16, True),
            "min_push_distance": (0.05, 0.3, True),
            "max_joint_speed": (0.0, 2.6, False),
            "block_mass": (0.0, 2.0, False),
            "friction": (0.0, 2.0, False),
        }
        for name, (low, high, low_inclusive) in ranges.items():
            value = getattr(self, name)
            above = is_real(value) and (value >= low if low_inclusive else value > low)
            if not above or not math.isfinite(value) or value > high:
                bracket = "[" if low_inclusive else "("
                raise ValueError(f"sim.{name}={value!r}: must be in {bracket}{low}, {high}]")
        substeps = _PHYSICS_HZ / self.control_hz
        if abs(substeps - round(substeps)) > 1e-9:
            raise ValueError(
                f"sim.control_hz={self.control_hz!r}: 240 / control_hz must be an integer (10, 12, 15, 16, 20, 24, 30)"
            )
        blocks = self.num_blocks
        if (
            isinstance(blocks, (str, bytes))
            or not hasattr(blocks, "__len__")
            or len(blocks) != 2
            or not all(is_int(v) for v in blocks)
            or not 2 <= blocks[0] <= blocks[1] <= len(BLOCK_COLOURS)
        ):
            raise ValueError(
                f"sim.num_blocks={blocks!r}: must be (min, max) integers with 2 <= min <= max <= {len(BLOCK_COLOURS)}"
            )
        object.__setattr__(self, "num_blocks", (int(blocks[0]), int(blocks[1])))
        for name, length in (
            ("layout_low", 2),
            ("layout_high", 2),
            ("workspace_low", 3),
            ("workspace_high", 3),
            ("camera_eye", 3),
            ("camera_target", 3),
            ("start_offset", 3),
        ):
            object.__setattr__(self, name, _check_vector(name, getattr(self, name), length))
        if not all(0.0 <= v <= 0.2 for v in self.start_offset):
            raise ValueError(f"sim.start_offset={self.start_offset!r}: each half-extent must be in [0, 0.2] m")
        for low_name, high_name in (("layout_low", "layout_high"), ("workspace_low", "workspace_high")):
            low, high = getattr(self, low_name), getattr(self, high_name)
            if not all(a < b for a, b in zip(low, high, strict=True)):
                raise ValueError(f"sim.{high_name}={high!r}: must exceed {low_name}={low!r} on every axis")
        span = np.subtract(self.layout_high, self.layout_low)
        if min(span) < self.square_size or math.hypot(*span) < self.min_push_distance + self.square_size:
            raise ValueError(
                f"sim.layout_high={self.layout_high!r}: the layout area from {self.layout_low!r} is too small "
                f"for squares of {self.square_size} m and a push of {self.min_push_distance} m"
            )
        if self.workspace_low[2] < 0.0:
            raise ValueError(f"sim.workspace_low={self.workspace_low!r}: z must be >= 0 (the table top)")
        view = np.subtract(self.camera_target, self.camera_eye)
        if np.linalg.norm(view) < 0.05 or np.linalg.norm(np.cross(view, (0.0, 0.0, 1.0))) < 1e-3 * np.linalg.norm(view):
            raise ValueError(
                f"sim.camera_target={self.camera_target!r}: must be >= 0.05 m from camera_eye and not straight "
                "above or below it"
            )

    @property
    def substeps(self) -> int:
        """Physics steps (240 Hz) per control step."""
        return round(_PHYSICS_HZ / self.control_hz)


@dataclass(frozen=True)
class Task:
    """One episode's scene and goal, fixed at reset.

    Attributes:
        instruction: "push the <block colour> block onto the <square colour> square".
        block_colour: colour word of the block to push (a key of :data:`BLOCK_COLOURS`).
        square_colour: colour word of the target square (a key of :data:`SQUARE_COLOURS`).
        block_index: index of the chosen block in ``block_colours``.
        block_id: PyBullet body id of the chosen block.
        square_index: index of the chosen square in ``square_colours``.
        square_centre: (2,) float64 x, y [m] of the chosen square's centre, base frame.
        square_size: side of the squares [m].
        block_colours: colours of all blocks, in body order.
        block_ids: PyBullet body ids of all blocks.
        initial_block_positions: (N, 3) float64 block centres [m] at reset (after settling).
        square_colours: colours of both squares.
        square_centres: (2, 2) float64 x, y [m] of both square centres.
        seed: the seed the episode was reset with.
        control_hz: the environment's control rate [Hz].
    """

    instruction: str
    block_colour: str
    square_colour: str
    block_index: int
    block_id: int
    square_index: int
    square_centre: np.ndarray
    square_size: float
    block_colours: tuple[str, ...]
    block_ids: tuple[int, ...]
    initial_block_positions: np.ndarray
    square_colours: tuple[str, ...]
    square_centres: np.ndarray
    seed: int
    control_hz: float


@dataclass(frozen=True)
class CameraIntrinsics:
    """Pinhole model and pose of the fixed camera.

    Attributes:
        width: image width [px].
        height: image height [px].
        fx: focal length along x [px].
        fy: focal length along y [px] (equal to ``fx``: square pixels).
        cx: principal point x [px] (pixel centres at integer coordinates).
        cy: principal point y [px].
        position: (3,) float64 camera centre [m] in the base frame.
        rotation: (3, 3) float64 camera-to-base rotation of the OpenCV optical frame (columns:
            image x right, image y down, optical axis forward, in base coordinates).
        near: near clipping distance [m].
        far: far clipping distance [m].
    """

    width: int
    height: int
    fx: float
    fy: float
    cx: float
    cy: float
    position: np.ndarray
    rotation: np.ndarray
    near: float
    far: float

    @property
    def matrix(self) -> np.ndarray:
        """(3, 3) float64 intrinsic matrix K."""
        return np.array([[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]])

    def project(self, points: np.ndarray) -> np.ndarray:
        """Project base-frame points into the image.

        Args:
            points: (N, 3) points [m] in the base frame, in front of the camera.

        Returns:
            (N, 2) float64 pixel coordinates (x right, y down, top-left pixel centre at (0, 0)).
        """
        cam = (np.asarray(points, np.float64).reshape(-1, 3) - self.position) @ self.rotation
        return np.stack([self.fx * cam[:, 0] / cam[:, 2] + self.cx, self.fy * cam[:, 1] / cam[:, 2] + self.cy], 1)


@dataclass(frozen=True)
class Observation:
    """What the robot sees after a reset or a step.

    Attributes:
        rgb: (H, W, 3) uint8 camera image, HWC, RGB.
        ee_pose: (6,) float64 tool pose in the base frame: x, y, z [m], roll, pitch, yaw [rad]
            (tool frame and Euler convention in the module docstring).
        gripper: closure in [0, 1] measured from the finger joints (0 open, 1 closed).
        joint_positions: (7,) float64 arm joint angles [rad], panda_joint1..7.
        finger_positions: (2,) float64 finger joint positions [m], 0 closed .. 0.04 open.
        time_s: simulated time since the reset [s].
        step: control steps since the reset.
    """

    rgb: np.ndarray
    ee_pose: np.ndarray
    gripper: float
    joint_positions: np.ndarray
    finger_positions: np.ndarray
    time_s: float
    step: int


def _import_pybullet():
    try:
        import pybullet
        import pybullet_data
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"the tabletop simulation needs pybullet (pip install pybullet==3.2.7): {exc}") from exc
    return pybullet, pybullet_data


@dataclass
class _Layout:
    block_colours: tuple[str, ...]
    block_xy: np.ndarray  # (N, 2)
    block_yaw: np.ndarray  # (N,)
    square_colours: tuple[str, ...]
    square_xy: np.ndarray  # (2, 2)
    block_index: int
    square_index: int


def _segment_distance(point: np.ndarray, start: np.ndarray, end: np.ndarray) -> float:
    """Distance [m] from a 2-D point to the segment start-end."""
    direction = end - start
    t = float(np.clip(np.dot(point - start, direction) / max(float(np.dot(direction, direction)), 1e-12), 0.0, 1.0))
    return float(np.linalg.norm(point - (start + t * direction)))


def _goal_feasible(
    cfg: TabletopConfig, block_xy: np.ndarray, square_xy: np.ndarray, block_index: int, square_index: int
) -> bool:
    """Whether pushing block ``block_index`` straight onto square ``square_index`` is a fair task.

    The block starts at least ``min_push_distance`` from the square's centre, the pre-push point
    behind it lies in the workspace, and the straight corridor from there to the square's centre is
    free of the other blocks.
    """
    block_radius = cfg.block_size / math.sqrt(2.0)  # circumscribed, any yaw
    pusher_clearance = 0.045  # half width of the closed fingers plus a margin [m]
    goal, chosen = square_xy[square_index], block_xy[block_index]
    distance = float(np.linalg.norm(goal - chosen))
    if distance < cfg.min_push_distance:
        return False
    direction = (goal - chosen) / distance
    start = chosen - direction * (cfg.block_size / 2 + 0.06)
    if not np.all((start >= np.array(cfg.workspace_low[:2])) & (start <= np.array(cfg.workspace_high[:2]))):
        return False
    return all(
        _segment_distance(xy, start, goal) >= block_radius + pusher_clearance
        for i, xy in enumerate(block_xy)
        if i != block_index
    )


def feasible_goals(cfg: TabletopConfig, seed: int) -> tuple[tuple[str, str], ...]:
    """Every (block colour, square colour) goal that is a fair task in the layout of ``seed``.

    The seed's own goal comes first; the others follow in block, then square order. Each satisfies
    the constraints the seed's goal was drawn under (distance, free push corridor, reachable
    pre-push point), so the scripted expert handles them alike. No simulation runs.

    Args:
        cfg: the environment's configuration (layout area, sizes).
        seed: non-negative reset seed.

    Returns:
        At least one (block colour, square colour) pair.

    >>> feasible_goals(TabletopConfig(), 0)
    (('purple', 'blue'), ('red', 'blue'), ('orange', 'blue'))
    """
    layout = _sample_layout(cfg, np.random.default_rng(_checked_seed(seed)))
    own = (layout.block_colours[layout.block_index], layout.square_colours[layout.square_index])
    others = [
        (block, square)
        for b, block in enumerate(layout.block_colours)
        for s, square in enumerate(layout.square_colours)
        if (block, square) != own and _goal_feasible(cfg, layout.block_xy, layout.square_xy, b, s)
    ]
    return (own, *others)


def layout_goals(cfg: TabletopConfig, seed: int, count: int) -> tuple[tuple[str, str], ...]:
    """Up to ``count`` distinct goals for the layout of ``seed``: its own, then others drawn at random.

    Deterministic for (cfg, seed, count): the other feasible goals (:func:`feasible_goals`) are
    shuffled by a generator seeded with ``(seed, 1)``, independent of the layout's own generator.
    Fewer than ``count`` come back when the layout has fewer feasible goals.

    Args:
        cfg: the environment's configuration.
        seed: non-negative reset seed.
        count: goals wanted, >= 1.

    Returns:
        Between 1 and ``count`` (block colour, square colour) pairs, the seed's own first.
    """
    if not is_int(count) or count < 1:
        raise ValueError(f"count={count!r}: must be an integer >= 1")
    own, *others = feasible_goals(cfg, seed)
    order = np.random.default_rng((_checked_seed(seed), 1)).permutation(len(others))
    return (own, *(others[i] for i in order[: count - 1]))


def _with_goal(cfg: TabletopConfig, layout: _Layout, goal, seed: int) -> _Layout:
    """``layout`` with its block and square choice replaced by ``goal`` (checked)."""
    if not (isinstance(goal, tuple | list) and len(goal) == 2 and all(isinstance(g, str) for g in goal)):
        raise ValueError(f"goal={goal!r}: must be a (block colour, square colour) pair")
    block, square = goal
    if block not in layout.block_colours or square not in layout.square_colours:
        raise ValueError(
            f"goal={tuple(goal)!r}: seed {seed} has blocks {list(layout.block_colours)} and squares "
            f"{list(layout.square_colours)}"
        )
    block_index, square_index = layout.block_colours.index(block), layout.square_colours.index(square)
    if not _goal_feasible(cfg, layout.block_xy, layout.square_xy, block_index, square_index):
        raise ValueError(
            f"goal={tuple(goal)!r}: not a fair task in the layout of seed {seed} (too close, blocked or "
            f"unreachable); feasible: {list(feasible_goals(cfg, seed))}"
        )
    return dataclasses.replace(layout, block_index=block_index, square_index=square_index)


def _checked_seed(seed) -> int:
    if not is_int(seed) or seed < 0:
        raise ValueError(f"seed={seed!r}: must be a non-negative integer")
    return int(seed)


def _sample_layout(cfg: TabletopConfig, rng: np.random.Generator) -> _Layout:
    """Draw colours, positions and the goal. Rejection sampling; deterministic for a generator state.

    Constraints: the squares do not overlap; no block starts on a square or touches another block;
    the chosen block is at least ``min_push_distance`` from the chosen square's centre; and the
    straight push corridor (from a point behind the chosen block to the square's centre) is free
    of the other blocks, so a straight push is feasible.
    """
    low, high = np.array(cfg.layout_low), np.array(cfg.layout_high)
    half_square = cfg.square_size / 2
    block_radius = cfg.block_size / math.sqrt(2.0)  # circumscribed, any yaw
    # The discrete choices are drawn once, so rejections do not bias them (e.g. towards fewer blocks).
    num = int(rng.integers(cfg.num_blocks[0], cfg.num_blocks[1] + 1))
    block_colours = tuple(str(c) for c in rng.permutation(list(BLOCK_COLOURS))[:num])
    square_colours = tuple(str(c) for c in rng.permutation(list(SQUARE_COLOURS)))
    block_index = int(rng.integers(num))
    square_index = int(rng.integers(len(square_colours)))
    while True:
        squares = [rng.uniform(low + half_square, high - half_square)]
        for _ in range(_LAYOUT_TRIES):
            candidate = rng.uniform(low + half_square, high - half_square)
            if np.max(np.abs(candidate - squares[0])) >= cfg.square_size + 0.03:
                squares.append(candidate)
                break
        if len(squares) < 2:
            continue
        square_xy = np.array(squares)
        goal = square_xy[square_index]
        blocks: list[np.ndarray] = []
        for i in range(num):
            for _ in range(_LAYOUT_TRIES):
                xy = rng.uniform(low, high)
                if np.min(np.max(np.abs(square_xy - xy), axis=1)) < half_square + block_radius + 0.005:
                    continue
                if any(np.linalg.norm(xy - other) < 2 * block_radius + 0.02 for other in blocks):
                    continue
                if i == block_index and np.linalg.norm(goal - xy) < cfg.min_push_distance:
                    continue
                blocks.append(xy)
                break
            else:
                break
        if len(blocks) < num or not _goal_feasible(cfg, np.array(blocks), square_xy, block_index, square_index):
            continue
        yaws = rng.uniform(-math.pi / 4, math.pi / 4, num)
        return _Layout(block_colours, np.array(blocks), yaws, square_colours, square_xy, block_index, square_index)


class TabletopEnv:
    """The pushing task with one PyBullet DIRECT client per instance (several may coexist).

    Example::

        env = TabletopEnv(TabletopConfig(image_width=320, image_height=240))
        obs = env.reset(seed=0)
        print(env.instruction)
        obs = env.step(np.r_[obs.ee_pose, 1.0])
        env.close()
    """

    JOINT_NAMES = JOINT_NAMES
    FINGER_JOINTS = FINGER_JOINTS

    def __init__(self, cfg: TabletopConfig | None = None):
        self.cfg = cfg or TabletopConfig()
        self._p, self._data = _import_pybullet()
        self._client = self._p.connect(self._p.DIRECT)
        self._robot = -1
        self._task: Task | None = None
        self._step = 0
        self._camera = self._build_camera()
        self._view = self._p.computeViewMatrix(
            self.cfg.camera_eye, self.cfg.camera_target, (0.0, 0.0, 1.0), physicsClientId=self._client
        )
        aspect = self.cfg.image_width / self.cfg.image_height
        vfov = math.degrees(2.0 * math.atan(self.cfg.image_height / 2.0 / self._camera.fy))
        self._projection = self._p.computeProjectionMatrixFOV(
            vfov, aspect, self._camera.near, self._camera.far, physicsClientId=self._client
        )
        self._low = np.array(self.cfg.workspace_low)
        self._high = np.array(self.cfg.workspace_high)

    # ----------------------------------------------------------------------------------- public API
    @property
    def instruction(self) -> str:
        """The episode's instruction; requires :meth:`reset`."""
        return self.task.instruction

    @property
    def task(self) -> Task:
        """The episode's scene and goal; requires :meth:`reset`."""
        if self._task is None:
            raise RuntimeError("TabletopEnv: call reset(seed) first")
        return self._task

    @property
    def client_id(self) -> int:
        """This environment's PyBullet client id (for tests and debugging tools; -1 once closed)."""
        return self._client

    def camera_info(self) -> CameraIntrinsics:
        """Intrinsics and pose of the fixed camera (constant for the environment's lifetime)."""
        return self._camera

    def reset(self, seed: int, *, goal: tuple[str, str] | None = None) -> Observation:
        """Rebuild the scene from scratch for a seed; bit-identical for the same seed, goal and config.

        Args:
            seed: non-negative integer selecting layout, colours, block and square.
            goal: (block colour, square colour) to ask for instead of the seed's own goal, in the
                same scene (layout and colours still follow the seed); one of
                :func:`feasible_goals` for the seed. None: the seed's goal.

        Returns:
            The first observation (arm at :data:`HOME_JOINTS`, gripper open, step 0).

        Raises:
            ValueError: a bad seed, or a goal that names a colour missing from the scene or is
                not a fair task in it (named).
        """
        p, c, cfg = self._p, self._client, self.cfg
        layout = _sample_layout(cfg, np.random.default_rng(_checked_seed(seed)))
        if goal is not None:
            layout = _with_goal(cfg, layout, goal, seed)

        p.resetSimulation(physicsClientId=c)
        p.setPhysicsEngineParameter(
            fixedTimeStep=1.0 / _PHYSICS_HZ, numSolverIterations=50, deterministicOverlappingPairs=1, physicsClientId=c
        )
        p.setGravity(0.0, 0.0, -9.81, physicsClientId=c)
        p.setAdditionalSearchPath(self._data.getDataPath(), physicsClientId=c)

        table_half = (0.55, 0.60, 0.025)
        table = p.createMultiBody(
            baseMass=0.0,
            baseCollisionShapeIndex=p.createCollisionShape(p.GEOM_BOX, halfExtents=table_half, physicsClientId=c),
            baseVisualShapeIndex=p.createVisualShape(
                p.GEOM_BOX, halfExtents=table_half, rgbaColor=_TABLE_RGBA, physicsClientId=c
            ),
            basePosition=(0.35, 0.0, -table_half[2]),
            physicsClientId=c,
        )
        p.changeDynamics(table, -1, lateralFriction=cfg.friction, physicsClientId=c)

        self._robot = p.loadURDF("franka_panda/panda.urdf", (0.0, 0.0, 0.0), useFixedBase=True, physicsClientId=c)
        for joint, angle in zip(_ARM_JOINTS, HOME_JOINTS, strict=True):
            p.resetJointState(self._robot, joint, angle, physicsClientId=c)
        for joint in _FINGER_JOINTS:
            p.resetJointState(self._robot, joint, _FINGER_OPEN_M, physicsClientId=c)
        info = [
            p.getJointInfo(self._robot, j, physicsClientId=c)
            for j in range(p.getNumJoints(self._robot, physicsClientId=c))
        ]
        self._lower = [i[8] for i in info if i[2] != p.JOINT_FIXED]
        self._upper = [i[9] for i in info if i[2] != p.JOINT_FIXED]
        self._rest = [*HOME_JOINTS, _FINGER_OPEN_M, _FINGER_OPEN_M]

        half_square = cfg.square_size / 2
        for xy, colour in zip(layout.square_xy, layout.square_colours, strict=True):
            p.createMultiBody(
                baseMass=0.0,
                baseCollisionShapeIndex=-1,
                baseVisualShapeIndex=p.createVisualShape(
                    p.GEOM_BOX,
                    halfExtents=(half_square, half_square, 0.0005),
                    rgbaColor=SQUARE_COLOURS[colour],
                    physicsClientId=c,
                ),
                basePosition=(float(xy[0]), float(xy[1]), 0.0005),
                physicsClientId=c,
            )
        half_block = cfg.block_size / 2
        block_collision = p.createCollisionShape(p.GEOM_BOX, halfExtents=(half_block,) * 3, physicsClientId=c)
        block_ids = []
        for xy, yaw, colour in zip(layout.block_xy, layout.block_yaw, layout.block_colours, strict=True):
            body = p.createMultiBody(
                baseMass=cfg.block_mass,
                baseCollisionShapeIndex=block_collision,
                baseVisualShapeIndex=p.createVisualShape(
                    p.GEOM_BOX, halfExtents=(half_block,) * 3, rgbaColor=BLOCK_COLOURS[colour], physicsClientId=c
                ),
                basePosition=(float(xy[0]), float(xy[1]), half_block),
                baseOrientation=p.getQuaternionFromEuler((0.0, 0.0, float(yaw))),
                physicsClientId=c,
            )
            p.changeDynamics(body, -1, lateralFriction=cfg.friction, physicsClientId=c)
            block_ids.append(body)
        self._block_ids = tuple(block_ids)

        start = self._start_joints(seed)
        for joint, angle in zip(_ARM_JOINTS, start, strict=True):
            p.resetJointState(self._robot, joint, angle, physicsClientId=c)
        self._command_joints(start, 0.0)
        for _ in range(_SETTLE_STEPS):
            p.stepSimulation(physicsClientId=c)

        block_colour = layout.block_colours[layout.block_index]
        square_colour = layout.square_colours[layout.square_index]
        self._task = Task(
            instruction=f"push the {block_colour} block onto the {square_colour} square",
            block_colour=block_colour,
            square_colour=square_colour,
            block_index=layout.block_index,
            block_id=block_ids[layout.block_index],
            square_index=layout.square_index,
            square_centre=layout.square_xy[layout.square_index].copy(),
            square_size=cfg.square_size,
            block_colours=layout.block_colours,
            block_ids=self._block_ids,
            initial_block_positions=self._block_poses()[0],
            square_colours=layout.square_colours,
            square_centres=layout.square_xy.copy(),
            seed=int(seed),
            control_hz=float(cfg.control_hz),
        )
        self._step = 0
        return self._observe()

    def step(self, action: np.ndarray, *, render: bool | None = None) -> Observation:
        """Command a tool target and advance the simulation by one control period.

        Args:
            action: (7,) absolute tool target in the base frame: x, y, z [m] (clipped to the
                workspace box), roll, pitch, yaw [rad] (tool frame, R = Rz Ry Rx), gripper in
                [0, 1] (clipped; 0 open, 1 closed).
            render: whether the observation carries an image; None: ``cfg.render`` (False, e.g.
                when simulating ahead in :meth:`lookahead`).

        Returns:
            The observation after ``240 / control_hz`` physics steps.

        Raises:
            ValueError: the action is not 7 finite numbers.
            RuntimeError: :meth:`reset` was not called.
        """
        if self._task is None:
            raise RuntimeError("TabletopEnv: call reset(seed) first")
        target = np.asarray(action, dtype=np.float64)
        if target.shape != (7,):
            raise ValueError(f"action shape {target.shape}: must be (7,) x y z roll pitch yaw gripper")
        if not np.all(np.isfinite(target)):
            raise ValueError(f"action={target.tolist()}: must be finite (no NaN or inf)")
        position = np.clip(target[:3], self._low, self._high)
        gripper = float(np.clip(target[6], 0.0, 1.0))
        orientation = _matrix_to_quaternion(rpy_to_matrix(target[3:6]) @ _RX_PI)
        p, c = self._p, self._client
        self._command_joints(self._inverse_kinematics(position, orientation), gripper)
        for _ in range(self.cfg.substeps):
            p.stepSimulation(physicsClientId=c)
        self._step += 1
        return self._observe(render)

    @contextlib.contextmanager
    def lookahead(self) -> Iterator[None]:
        """Steps taken inside the ``with`` block are undone at its end: the physics (PyBullet's
        ``saveState`` / ``restoreState``, contacts included) and the step count are put back, so
        the episode then continues as if they had not been taken (e.g. to label a state with what
        the expert would do from it, :func:`fovea_vla.core.sim.expert.expert_plan`): the restored
        state is identical, the continuation agrees to PyBullet's round-off (~1e-8 m a step, which
        contacts may amplify over many steps like any other round-off).

        Raises:
            RuntimeError: :meth:`reset` was not called.
        """
        if self._task is None:
            raise RuntimeError("TabletopEnv: call reset(seed) first")
        p, c = self._p, self._client
        saved, step = p.saveState(physicsClientId=c), self._step
        try:
            yield
        finally:
            p.restoreState(stateId=saved, physicsClientId=c)
            p.removeState(saved, physicsClientId=c)
            self._step = step

    def success(self) -> bool:
        """Whether the chosen block's centre lies inside the chosen square (xy) and the block rests on the table.

        Resting on the table: the centre is within 5 mm of half the block size above it (a cube lying
        flat on any face, not lifted, not on another block, not fallen off).
        """
        task = self.task
        position, _ = self._p.getBasePositionAndOrientation(task.block_id, physicsClientId=self._client)
        inside = bool(np.all(np.abs(np.asarray(position[:2]) - task.square_centre) <= task.square_size / 2))
        return inside and abs(position[2] - self.cfg.block_size / 2) < 0.005

    def state(self) -> np.ndarray:
        """(7,) float64 policy state: tool pose x, y, z [m], roll, pitch, yaw [rad] and gripper [0, 1]."""
        pose, gripper = self._ee_pose(), self._gripper()
        return np.r_[pose, gripper]

    def privileged(self) -> dict:
        """Simulator ground truth for the scripted expert and for evaluation (never for the policy).

        Returns:
            ``block_positions`` (N, 3) float64 block centres [m]; ``block_yaws`` (N,) [rad];
            ``block_colours``; ``target_block_index``; ``target_block_position`` (3,);
            ``target_block_yaw`` [rad]; ``square_centres`` (2, 2) [m]; ``square_colours``;
            ``target_square_centre`` (2,) [m]; ``square_size`` [m]; ``block_size`` [m];
            ``success`` (bool).
        """
        task = self.task
        positions, yaws = self._block_poses()
        return {
            "block_positions": positions,
            "block_yaws": yaws,
            "block_colours": task.block_colours,
            "target_block_index": task.block_index,
            "target_block_position": positions[task.block_index].copy(),
            "target_block_yaw": float(yaws[task.block_index]),
            "square_centres": task.square_centres.copy(),
            "square_colours": task.square_colours,
            "target_square_centre": task.square_centre.copy(),
            "square_size": task.square_size,
            "block_size": self.cfg.block_size,
            "success": self.success(),
        }

    def render(self) -> np.ndarray:
        """(H, W, 3) uint8 RGB image of the fixed camera, without stepping."""
        _, _, rgba, _, _ = self._p.getCameraImage(
            self.cfg.image_width,
            self.cfg.image_height,
            self._view,
            self._projection,
            shadow=0,
            renderer=self._p.ER_TINY_RENDERER,
            flags=self._p.ER_NO_SEGMENTATION_MASK,
            physicsClientId=self._client,
        )
        image = np.asarray(rgba, dtype=np.uint8).reshape(self.cfg.image_height, self.cfg.image_width, 4)
        return np.ascontiguousarray(image[:, :, :3])

    def close(self) -> None:
        """Disconnect the PyBullet client (idempotent)."""
        if self._client >= 0:
            self._p.disconnect(physicsClientId=self._client)
            self._client = -1
            self._task = None

    def __enter__(self) -> TabletopEnv:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        with contextlib.suppress(Exception):  # interpreter shutdown: pybullet may already be gone
            self.close()

    # ------------------------------------------------------------------------------------- helpers
    def _build_camera(self) -> CameraIntrinsics:
        cfg = self.cfg
        eye, target = np.array(cfg.camera_eye), np.array(cfg.camera_target)
        forward = (target - eye) / np.linalg.norm(target - eye)
        right = np.cross(forward, (0.0, 0.0, 1.0))
        right /= np.linalg.norm(right)
        down = np.cross(forward, right)
        focal = cfg.image_width / 2.0 / math.tan(math.radians(cfg.fov_deg) / 2.0)
        return CameraIntrinsics(
            width=cfg.image_width,
            height=cfg.image_height,
            fx=focal,
            fy=focal,
            cx=cfg.image_width / 2.0 - 0.5,
            cy=cfg.image_height / 2.0 - 0.5,
            position=eye,
            rotation=np.stack([right, down, forward], 1),
            near=0.05,
            far=5.0,
        )

    def _inverse_kinematics(self, position: np.ndarray, orientation) -> np.ndarray:
        """(7,) arm joint angles [rad] putting the grasp target at ``position`` with ``orientation``
        (a panda_grasptarget quaternion), from the current joints, within the joint limits."""
        joints = self._p.calculateInverseKinematics(
            self._robot,
            _EE_LINK,
            np.asarray(position, np.float64).tolist(),
            orientation,
            lowerLimits=self._lower,
            upperLimits=self._upper,
            jointRanges=[u - lo for lo, u in zip(self._lower, self._upper, strict=True)],
            restPoses=self._rest,
            maxNumIterations=100,
            residualThreshold=1e-5,
            physicsClientId=self._client,
        )
        return np.clip(joints[:7], self._lower[:7], self._upper[:7])

    def _start_joints(self, seed: int) -> np.ndarray:
        """(7,) arm joints [rad] at the start: home, or home's tool position moved by the seed's
        ``start_offset`` draw (the arm must already be at :data:`HOME_JOINTS`)."""
        if not any(self.cfg.start_offset):
            return np.array(HOME_JOINTS)
        p, c = self._p, self._client
        extent = np.array(self.cfg.start_offset)
        # Its own generator: the layout's draws (and so every earlier recording) stay as they were.
        target = self._ee_pose()[:3] + np.random.default_rng((int(seed), 3)).uniform(-extent, extent)
        target = np.clip(target, self._low, self._high)
        down = _matrix_to_quaternion(_RX_PI)
        for _ in range(3):  # IK from the joints it last set: each pass starts nearer the solution
            joints = self._inverse_kinematics(target, down)
            for joint, angle in zip(_ARM_JOINTS, joints, strict=True):
                p.resetJointState(self._robot, joint, angle, physicsClientId=c)
        return joints

    def _command_joints(self, arm: np.ndarray, gripper: float) -> None:
        p, c = self._p, self._client
        for joint, angle, force in zip(_ARM_JOINTS, arm, _ARM_FORCES_NM, strict=True):
            p.setJointMotorControl2(
                self._robot,
                joint,
                p.POSITION_CONTROL,
                targetPosition=float(angle),
                force=force,
                maxVelocity=self.cfg.max_joint_speed,
                physicsClientId=c,
            )
        finger = _FINGER_OPEN_M * (1.0 - gripper)
        for joint in _FINGER_JOINTS:
            p.setJointMotorControl2(
                self._robot,
                joint,
                p.POSITION_CONTROL,
                targetPosition=finger,
                force=_FINGER_FORCE_N,
                maxVelocity=_FINGER_MAX_SPEED,
                physicsClientId=c,
            )

    def _ee_pose(self) -> np.ndarray:
        p = self._p
        link = p.getLinkState(self._robot, _EE_LINK, computeForwardKinematics=True, physicsClientId=self._client)
        rotation = np.array(p.getMatrixFromQuaternion(link[5])).reshape(3, 3) @ _RX_PI
        return np.r_[np.asarray(link[4], np.float64), matrix_to_rpy(rotation)]

    def _fingers(self) -> np.ndarray:
        states = self._p.getJointStates(self._robot, _FINGER_JOINTS, physicsClientId=self._client)
        return np.array([s[0] for s in states], np.float64)

    def _gripper(self) -> float:
        return float(np.clip(1.0 - self._fingers().sum() / (2 * _FINGER_OPEN_M), 0.0, 1.0))

    def _block_poses(self) -> tuple[np.ndarray, np.ndarray]:
        positions, yaws = [], []
        for body in self._block_ids:
            position, orientation = self._p.getBasePositionAndOrientation(body, physicsClientId=self._client)
            positions.append(position)
            yaws.append(self._p.getEulerFromQuaternion(orientation)[2])
        return np.array(positions, np.float64), np.array(yaws, np.float64)

    def _observe(self, render: bool | None = None) -> Observation:
        states = self._p.getJointStates(self._robot, _ARM_JOINTS, physicsClientId=self._client)
        fingers = self._fingers()
        return Observation(
            rgb=self.render() if (self.cfg.render if render is None else render) else _NO_IMAGE,
            ee_pose=self._ee_pose(),
            gripper=float(np.clip(1.0 - fingers.sum() / (2 * _FINGER_OPEN_M), 0.0, 1.0)),
            joint_positions=np.array([s[0] for s in states], np.float64),
            finger_positions=fingers,
            time_s=self._step * self.cfg.substeps / _PHYSICS_HZ,
            step=self._step,
        )
