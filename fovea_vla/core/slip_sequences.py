"""Grasp-slip test sequences with ground truth: a textured object held by a two-finger gripper.

Each sequence is a grey camera view of a real background image (e.g. a frame of the developer
video ``bgslibrary/dataset/video03.avi``) with a gripper (a palm bar and two fingers) holding a
rounded-rectangle object between its finger tips. Object and gripper textures are the most
evenly textured crops of the same image, contrast-normalised (the gripper darker and flatter),
so flow has something to lock onto in both regions. Every nuisance a camera on a robot sees is on:

- arm motion: gripper and object move together along a smooth path (up to ``arm_speed_px``);
- camera shake: the whole view jitters by a mean-reverting sub-pixel random walk (translation,
  optionally a small rotation about the image centre);
- lighting flicker: a global gain of ``1 +- flicker_global`` that changes every frame, and
  Gaussian light blobs of ``+- flicker_local`` drifting across the view;
- sensor noise: additive Gaussian, then rounding to uint8.

A slip sequence adds, at a random onset frame, motion of the object relative to the gripper in a
random direction: the speed ramps up smoothly (smoothstep over ``slip_ramp_frames``) to a peak in
``slip_speed_px``, holds, and then either ramps down again (probability
``slip_stop_probability``) or lasts to the end. The total travel stays within ``slip_travel_px``,
so the object stays between the fingers (only a fast unbroken slip that must start at the latest
onset may overshoot it by a few frames' worth). A control sequence (``slip=False``) draws everything
else from the same seed streams, so a control and a slip sequence with one seed differ only in
the slip.

Rendering is exact to sub-pixel level: every layer (background, object, gripper) is held at
``supersample`` times the output resolution, placed with ``cv2.warpAffine`` (bilinear, 1/32 of a
high-resolution pixel) and the composite is area-averaged (``INTER_AREA``) down to the output.
With noise and nuisances off, the object's motion measured between rendered frames (Gauss-Newton
translation fit, uint8 rounding included) matches the ground truth to 0.031 px at most, median
0.016 px, on three test sequences; plain bilinear placement (``supersample=1``) gives 0.089 px.

Pixel convention: x right, y down, the centre of the top-left pixel is (0, 0). Rectangles are
``(x, y, w, h)`` in px and hold the pixel centres in ``[x, x + w) x [y, y + h)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import cv2
import numpy as np

from fovea_vla.core._validation import is_int, is_real

__all__ = [
    "SlipSequence",
    "SlipSequenceConfig",
    "make_example",
    "make_sequence",
    "make_sequences",
    "synthetic_background",
]

# Seed-sequence tags that keep the random streams apart, so a control sequence shares the layout,
# arm path, shake, flicker and noise of the slip sequence with the same seed.
_LAYOUT, _ARM, _SHAKE, _FLICKER, _NOISE, _SLIP = range(6)
# Candidate crops tried when looking for the most textured patch of the source image.
_TEXTURE_CANDIDATES = 24
# Mean reversion per frame of the camera-shake random walk (1 = pure random walk).
_SHAKE_REVERSION = 0.85
# Gripper geometry [px]: finger width, palm height, how far the fingers overlap the object's
# sides, and how far the fingers reach above the object.
_FINGER_W, _PALM_H, _GRIP_OVERLAP, _FINGER_ABOVE = 18, 16, 6, 10


@dataclass(frozen=True, kw_only=True)
class SlipSequenceConfig:
    """Parameters of one generated sequence.

    Attributes:
        width: frame width W [px], >= 128; the background image is resized to W x H.
        height: frame height H [px], >= 128.
        frames: sequence length F, >= 20.
        supersample: rendering resolution factor, >= 1 (1 = plain bilinear placement).
        object_size_px: (w, h) of the held object [px], each in [24, min(W, H) / 2].
        slip: True for a slip sequence, False for a no-slip control.
        slip_speed_px: (min, max) peak slip speed [px/frame], 0 < min <= max.
        slip_ramp_frames: (min, max) frames of the smooth speed ramp, integers >= 1.
        slip_travel_px: most the object may travel relative to the gripper [px], > 0.
        slip_stop_probability: chance, in [0, 1], that the slip ramps down before the end.
        slip_lead_frames: earliest onset frame, >= 2.
        slip_tail_frames: the onset is at least this many frames before the end, >= 2.
        arm_speed_px: peak speed of the arm (gripper and object together) [px/frame], >= 0.
        shake_px: standard deviation of the per-frame step of the shake random walk [px], >= 0.
        shake_rotation_deg: the same for a rotation about the image centre [deg], >= 0.
        flicker_global: (min, max) amplitude of the per-frame global gain, in [0, 0.5].
        flicker_local: (min, max) amplitude of the local light blobs, in [0, 0.5].
        noise_std: sensor noise standard deviation [grey levels], >= 0.
        seed: seed of every random stream, >= 0.
    """

    width: int = 320
    height: int = 240
    frames: int = 60
    supersample: int = 4
    object_size_px: tuple[int, int] = (64, 56)
    slip: bool = True
    slip_speed_px: tuple[float, float] = (0.3, 1.5)
    slip_ramp_frames: tuple[int, int] = (2, 4)
    slip_travel_px: float = 10.0
    slip_stop_probability: float = 0.5
    slip_lead_frames: int = 8
    slip_tail_frames: int = 10
    arm_speed_px: float = 1.5
    shake_px: float = 0.3
    shake_rotation_deg: float = 0.0
    flicker_global: tuple[float, float] = (0.1, 0.2)
    flicker_local: tuple[float, float] = (0.1, 0.2)
    noise_std: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        ints = {"width": 128, "height": 128, "frames": 20, "supersample": 1, "seed": 0}
        ints |= {"slip_lead_frames": 2, "slip_tail_frames": 2}
        for name, minimum in ints.items():
            if not (is_int(getattr(self, name)) and getattr(self, name) >= minimum):
                _fail(name, getattr(self, name), f"an integer >= {minimum}")
        if not isinstance(self.slip, bool):
            _fail("slip", self.slip, "a bool")
        side = min(self.width, self.height) // 2
        _check_range("object_size_px", self.object_size_px, 24, side, integer=True, ordered=False)
        _check_range("slip_speed_px", self.slip_speed_px, 0.0, math.inf, low_open=True)
        _check_range("slip_ramp_frames", self.slip_ramp_frames, 1, self.frames, integer=True)
        _check_range("flicker_global", self.flicker_global, 0.0, 0.5)
        _check_range("flicker_local", self.flicker_local, 0.0, 0.5)
        floats = {
            "slip_travel_px": (0.0, True),
            "slip_stop_probability": (0.0, False),
            "arm_speed_px": (0.0, False),
            "shake_px": (0.0, False),
            "shake_rotation_deg": (0.0, False),
            "noise_std": (0.0, False),
        }
        for name, (low, open_) in floats.items():
            value = getattr(self, name)
            if not (is_real(value) and math.isfinite(value) and (value > low if open_ else value >= low)):
                _fail(name, value, f"a finite number {'>' if open_ else '>='} {low:g}")
        if self.slip_stop_probability > 1:
            _fail("slip_stop_probability", self.slip_stop_probability, "in [0, 1]")
        if self.slip_lead_frames + self.slip_tail_frames >= self.frames:
            _fail("slip_lead_frames", self.slip_lead_frames, f"< frames - slip_tail_frames = {self.frames}")


def _fail(name: str, value, requirement: str):
    raise ValueError(f"slip_sequence.{name}={value!r}: must be {requirement}")


def _check_range(name, value, low, high, *, integer=False, low_open=False, ordered=True) -> None:
    """Checks a pair of numbers in bounds; ``ordered``: a (min, max) range with min <= max."""
    kind = "integers" if integer else "numbers"
    bound = f"{'>' if low_open else '>='} {low:g} and <= {high:g}"
    requirement = f"a (min, max) pair of {kind} {bound}, min <= max" if ordered else f"a pair of {kind} {bound}"
    if not isinstance(value, tuple) or len(value) != 2:
        _fail(name, value, requirement)
    check = is_int if integer else is_real
    ok = all(check(v) and (v > low if low_open else v >= low) and v <= high for v in value)
    if not ok or (ordered and value[0] > value[1]):
        _fail(name, value, requirement)


@dataclass(frozen=True, eq=False)
class SlipSequence:
    """A rendered sequence and its ground truth (F frames of H x W).

    Slip velocities, flags and events refer to the frame pair ``(i - 1, i)``, as flow does;
    frame 0 has none. Regions are where the layers are in frame ``i``, so the regions of the
    first frame of a pair are the ones to hand to the detector with that pair's flow.

    Attributes:
        frames: (F, H, W) uint8 grey frames.
        gripper_regions: (F, 3, 4) float64 rectangles (x, y, w, h) [px] of the palm, the left and
            the right finger.
        object_region: (F, 4) float64 rectangle [px] of the object's visible part between the
            fingers where it sits in the grasp (it follows the gripper, not the slipping object,
            like a box projected from the gripper pose).
        slip_velocity: (F, 2) float64 motion of the object relative to the gripper from frame
            i - 1 to i [px/frame], x right, y down (scene axes; the shake rotation, at most a
            degree or so, is ignored).
        slipping: (F,) bool, ``slip_velocity[i] != 0``.
        onset: first slipping frame, None for a control sequence.
        stop: first frame after the slip ended, None when it lasts to the end (or no slip).
        ego_motion: (F, 3, 3) float64 homogeneous camera map of frame i - 1 pixel coordinates to
            frame i (the shake); the identity at frame 0.
        config: the config that rendered it.
    """

    frames: np.ndarray
    gripper_regions: np.ndarray
    object_region: np.ndarray
    slip_velocity: np.ndarray
    slipping: np.ndarray
    onset: int | None
    stop: int | None
    ego_motion: np.ndarray
    config: SlipSequenceConfig


def synthetic_background(width: int = 320, height: int = 240, seed: int = 0) -> np.ndarray:
    """A built-in textured scene (no objects), for use where no real background image exists.

    Args:
        width: W [px].
        height: H [px].
        seed: scene seed.

    Returns:
        (H, W) uint8 grey frame 0 of :class:`~fovea_vla.core.synthetic.SyntheticScene`.
    """
    from fovea_vla.core.synthetic import SyntheticScene, SyntheticSceneConfig

    scene = SyntheticScene(SyntheticSceneConfig(width=width, height=height, num_objects=0, noise_std=0, seed=seed))
    return cv2.cvtColor(scene.render(0)[0], cv2.COLOR_RGB2GRAY)


def make_sequences(
    backgrounds: list[np.ndarray], count: int, cfg: SlipSequenceConfig | None = None, seed: int = 0
) -> list[SlipSequence]:
    """``count`` sequences, slip and no-slip alternating (even index: slip), seeds ``seed + k``.

    Args:
        backgrounds: (H', W') uint8 grey or (H', W', 3) uint8 RGB images; sequence ``k`` uses
            ``backgrounds[k % len(backgrounds)]``.
        count: number of sequences, >= 1.
        cfg: template config (defaults when None); ``slip`` and ``seed`` are overridden.
        seed: first seed.

    Returns:
        The sequences, in order.
    """
    if count < 1 or not backgrounds:
        raise ValueError(f"count={count} and {len(backgrounds)} backgrounds: need count >= 1 and a background")
    cfg = cfg or SlipSequenceConfig()
    return [
        make_sequence(backgrounds[k % len(backgrounds)], replace(cfg, slip=k % 2 == 0, seed=seed + k))
        for k in range(count)
    ]


def make_sequence(background: np.ndarray, cfg: SlipSequenceConfig | None = None) -> SlipSequence:
    """Render one sequence over ``background``.

    Args:
        background: (H', W') uint8 grey or (H', W', 3) uint8 RGB image; resized (area or cubic)
            to the configured W x H. It also supplies the object and gripper textures.
        cfg: sequence parameters (defaults when None).

    Returns:
        The frames and their ground truth.

    Raises:
        ValueError: a background that is not a uint8 image.
    """
    cfg = cfg or SlipSequenceConfig()
    width, height, count, s = cfg.width, cfg.height, cfg.frames, cfg.supersample
    gray = _background(background, width, height)

    def stream(tag: int) -> np.random.Generator:
        return np.random.default_rng([cfg.seed, tag])

    layout = stream(_LAYOUT)
    ow, oh = cfg.object_size_px
    object_sprite = _object_sprite(_textured_crop(gray, ow, oh, layout), s, layout)
    gripper_sprite, gripper_rects = _gripper_sprite(gray, ow, oh, s, layout)
    # Rest position of the object centre: the gripper needs room above for the palm and fingers.
    top = oh / 2 + _FINGER_ABOVE + _PALM_H + 4
    anchor = np.array([layout.uniform(0.35, 0.65) * width, layout.uniform(top + 8, height - oh / 2 - 24)])

    arm = anchor + _arm_path(stream(_ARM), count, cfg.arm_speed_px)
    shake = _shake(stream(_SHAKE), count, cfg, width, height)
    velocity, onset, stop = _slip_profile(stream(_SLIP), cfg) if cfg.slip else (np.zeros((count, 2)), None, None)
    offset = np.cumsum(velocity, axis=0)
    gain = _Flicker(stream(_FLICKER), cfg, width, height)
    noise = stream(_NOISE)

    up = _upscale(s)
    background_hi = cv2.resize(gray.astype(np.float32), (width * s, height * s), interpolation=cv2.INTER_CUBIC)
    frames = np.empty((count, height, width), np.uint8)
    for i in range(count):
        canvas = cv2.warpAffine(
            background_hi, (up @ shake[i] @ np.linalg.inv(up))[:2], (width * s, height * s),
            flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT,
        )  # fmt: skip
        _blend(canvas, object_sprite, up @ shake[i] @ _translation(arm[i] + offset[i]), s)
        _blend(canvas, gripper_sprite, up @ shake[i] @ _translation(arm[i]), s)
        low = cv2.resize(canvas, (width, height), interpolation=cv2.INTER_AREA) * gain(i)
        low += noise.normal(0.0, cfg.noise_std, low.shape).astype(np.float32) if cfg.noise_std else 0.0
        frames[i] = np.clip(np.rint(low), 0, 255).astype(np.uint8)

    centres = np.stack([_apply(shake[i], arm[i]) for i in range(count)])
    object_rect = np.array([-(ow / 2 - _GRIP_OVERLAP), -oh / 2, ow - 2 * _GRIP_OVERLAP, oh])
    ego = np.stack([np.eye(3)] + [shake[i] @ np.linalg.inv(shake[i - 1]) for i in range(1, count)])
    return SlipSequence(
        frames=frames,
        gripper_regions=gripper_rects[None] + np.pad(centres, ((0, 0), (0, 2)))[:, None, :],
        object_region=object_rect[None] + np.pad(centres, ((0, 0), (0, 2))),
        slip_velocity=velocity,
        slipping=np.any(velocity != 0, axis=1),
        onset=onset,
        stop=stop,
        ego_motion=ego,
        config=cfg,
    )


def make_example() -> SlipSequence:
    """A short slip sequence over the built-in synthetic background.

    >>> seq = make_example()
    >>> seq.frames.shape, seq.onset is not None, bool(seq.slipping[seq.onset])
    ((30, 240, 320), True, True)
    """
    return make_sequence(synthetic_background(), SlipSequenceConfig(frames=30, seed=1))


# --- scene content ---------------------------------------------------------------------------


def _background(image: np.ndarray, width: int, height: int) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(f"background must be an (H, W) or (H, W, 3) uint8 array, got {getattr(image, 'shape', image)}")
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
    if gray.shape != (height, width):
        shrink = gray.shape[0] >= height and gray.shape[1] >= width
        gray = cv2.resize(gray, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
    return gray


def _textured_crop(gray: np.ndarray, w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """(h, w) float32 crop of ``gray``, the most evenly textured of a few random candidates.

    The score is the 20th percentile of the gradient magnitude: a crop wins when most of it is
    textured, not when a few strong edges (lane markings) dominate it.
    """
    gx = cv2.Sobel(gray, cv2.CV_32F, 1, 0)
    gy = cv2.Sobel(gray, cv2.CV_32F, 0, 1)
    magnitude = cv2.magnitude(gx, gy)
    best, best_score = None, -1.0
    for _ in range(_TEXTURE_CANDIDATES):
        x, y = int(rng.integers(0, gray.shape[1] - w + 1)), int(rng.integers(0, gray.shape[0] - h + 1))
        score = float(np.percentile(magnitude[y : y + h, x : x + w], 20))
        if score > best_score:
            best, best_score = (x, y), score
    x, y = best
    crop = gray[y : y + h, x : x + w].astype(np.float32)
    # Half of the crops turned by 180 degrees, so crops of the same region do not look alike.
    return np.ascontiguousarray(np.rot90(crop, 2 * int(rng.integers(0, 2))))


def _normalise(texture: np.ndarray, mean: float, std: float) -> np.ndarray:
    return (texture - texture.mean()) * (std / max(float(texture.std()), 1.0)) + mean


def _rounded_rect_alpha(w_hi: int, h_hi: int, radius: float) -> np.ndarray:
    """(h_hi, w_hi) float32 coverage of a rounded rectangle filling the array, 1-px soft edge."""
    x = np.abs(np.arange(w_hi, dtype=np.float32) - (w_hi - 1) / 2)[None, :]
    y = np.abs(np.arange(h_hi, dtype=np.float32) - (h_hi - 1) / 2)[:, None]
    qx, qy = x - (w_hi / 2 - radius), y - (h_hi / 2 - radius)
    sdf = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0) - radius
    return np.clip(0.5 - sdf, 0.0, 1.0)


def _object_sprite(crop: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    """(h*s, w*s, 2) float32 premultiplied sprite: grey * alpha and alpha, shaded toward the rim."""
    h, w = crop.shape
    texture = _normalise(crop, rng.uniform(100, 160), rng.uniform(30, 40))
    texture_hi = cv2.resize(texture, (w * s, h * s), interpolation=cv2.INTER_CUBIC)
    alpha = _rounded_rect_alpha(w * s, h * s, 0.2 * min(w, h) * s)
    # A darker rim reads as a 3-D object and gives its outline an edge.
    rim = cv2.GaussianBlur(alpha, (0, 0), 2.0 * s)
    value = np.clip(texture_hi * (0.6 + 0.4 * rim), 0, 255)
    return np.dstack([value * alpha, alpha]).astype(np.float32)


def _gripper_sprite(gray: np.ndarray, ow: int, oh: int, s: int, rng: np.random.Generator):
    """Palm bar plus two fingers, centred on the held object's centre.

    Returns:
        ``(sprite, rects)``: (Hs*s, Ws*s, 2) float32 premultiplied sprite whose middle is the
        object centre, and (3, 4) float64 rectangles (x, y, w, h) of palm, left and right finger
        relative to the object centre [px].
    """
    inner = ow / 2 - _GRIP_OVERLAP  # finger inner edge, from the object centre
    finger_top, finger_bottom = -oh / 2 - _FINGER_ABOVE, oh / 6
    palm_top = finger_top - _PALM_H
    outer = inner + _FINGER_W
    rects = np.array(
        [
            [-outer, palm_top, 2 * outer, _PALM_H],
            [-outer, finger_top, _FINGER_W, finger_bottom - finger_top],
            [inner, finger_top, _FINGER_W, finger_bottom - finger_top],
        ]
    )
    # Sprite symmetric about the object centre, so its middle is the centre.
    half_w, half_h = math.ceil(outer) + 1, math.ceil(-palm_top) + 1
    sw, sh = 2 * half_w, 2 * half_h
    crop = _textured_crop(gray, sw, sh, rng)
    value = _normalise(crop, rng.uniform(60, 90), rng.uniform(20, 28))
    value_hi = cv2.resize(value, (sw * s, sh * s), interpolation=cv2.INTER_CUBIC)
    alpha = np.zeros((sh * s, sw * s), np.float32)
    for x, y, w, h in rects:
        x0, y0 = round((x + half_w) * s), round((y + half_h) * s)
        part = _rounded_rect_alpha(round(w * s), round(h * s), 2.0 * s)
        alpha[y0 : y0 + part.shape[0], x0 : x0 + part.shape[1]] = np.maximum(
            alpha[y0 : y0 + part.shape[0], x0 : x0 + part.shape[1]], part
        )
    return np.dstack([value_hi * alpha, alpha]).astype(np.float32), rects


# --- motion ----------------------------------------------------------------------------------


def _arm_path(rng: np.random.Generator, count: int, peak_speed: float) -> np.ndarray:
    """(F, 2) smooth arm displacement [px]: one slow sinusoid per axis, peak speed <= peak_speed."""
    t = np.arange(count, dtype=np.float64)[:, None]
    omega = 2 * np.pi / rng.uniform(40, 120, 2)
    amplitude = np.minimum(peak_speed * rng.uniform(0.3, 1.0, 2) / omega, 20.0)
    phase = rng.uniform(0, 2 * np.pi, 2)
    path = amplitude * np.sin(omega * t + phase)
    return path - path[0]


def _shake(rng: np.random.Generator, count: int, cfg: SlipSequenceConfig, width: int, height: int) -> np.ndarray:
    """(F, 3, 3) camera maps scene -> image: a mean-reverting random walk of translation and
    rotation about the image centre."""
    maps = np.empty((count, 3, 3))
    t, angle = np.zeros(2), 0.0
    centre = np.array([(width - 1) / 2, (height - 1) / 2])
    for i in range(count):
        maps[i] = _translation(t + centre) @ _rotation(angle) @ _translation(-centre)
        t = _SHAKE_REVERSION * t + rng.normal(0.0, cfg.shake_px, 2)
        angle = _SHAKE_REVERSION * angle + math.radians(rng.normal(0.0, cfg.shake_rotation_deg))
    return maps


def _slip_profile(rng: np.random.Generator, cfg: SlipSequenceConfig) -> tuple[np.ndarray, int, int | None]:
    """(F, 2) slip velocity [px/frame], the onset frame and the stop frame (None: to the end)."""
    count = cfg.frames
    peak = rng.uniform(*cfg.slip_speed_px)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = int(rng.integers(cfg.slip_ramp_frames[0], cfg.slip_ramp_frames[1] + 1))
    stops = rng.uniform() < cfg.slip_stop_probability
    up = peak * _smoothstep(np.arange(1, ramp + 1) / ramp)
    down = up[-2::-1] if stops else up[:0]
    # Frames at full speed that the travel budget allows (at least one).
    hold = max(1, int((cfg.slip_travel_px - up.sum() - down.sum()) / peak))
    latest = count - cfg.slip_tail_frames
    if stops:
        hold = int(rng.integers(1, hold + 1))
        onset = int(rng.integers(cfg.slip_lead_frames, latest + 1))
    else:
        # An unbroken slip lasts to the end, so it starts late enough to stay within the travel
        # budget (only a fast slip forced to start at the latest onset may overshoot it).
        onset = int(rng.integers(min(max(cfg.slip_lead_frames, count - ramp - hold), latest), latest + 1))
        hold = max(0, count - onset - ramp)
    speeds = np.concatenate([up, np.full(hold, peak), down])[: count - onset]
    velocity = np.zeros((count, 2))
    velocity[onset : onset + len(speeds)] = speeds[:, None] * [math.cos(angle), math.sin(angle)]
    stop = onset + len(speeds)
    return velocity, onset, (stop if stop < count else None)


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


class _Flicker:
    """Per-frame (H, W) float32 gain: global flicker times drifting local light blobs."""

    def __init__(self, rng: np.random.Generator, cfg: SlipSequenceConfig, width: int, height: int):
        self._global = rng.uniform(*cfg.flicker_global)
        # Mains flicker aliased by the frame rate: a beat of random frequency (cycles per frame).
        self._freq, self._phase = rng.uniform(0.05, 0.45), rng.uniform(0, 2 * np.pi)
        blobs = int(rng.integers(1, 3))
        self._amp = rng.uniform(*cfg.flicker_local, blobs) * rng.choice([-1.0, 1.0], blobs)
        self._blob_freq = rng.uniform(0.02, 0.3, blobs)
        self._blob_phase = rng.uniform(0, 2 * np.pi, blobs)
        self._sigma = rng.uniform(25, 60, blobs)
        self._centre = rng.uniform([0, 0], [width, height], (blobs, 2))
        self._drift = rng.normal(0.0, 0.5, (blobs, 2))
        self._x = np.arange(width, dtype=np.float32)[None, :]
        self._y = np.arange(height, dtype=np.float32)[:, None]

    def __call__(self, i: int) -> np.ndarray:
        field = np.ones((self._y.shape[0], self._x.shape[1]), np.float32)
        for k in range(len(self._amp)):
            cx, cy = self._centre[k] + self._drift[k] * i
            level = self._amp[k] * math.sin(2 * np.pi * self._blob_freq[k] * i + self._blob_phase[k])
            blob = np.exp(-((self._x - cx) ** 2) / (2 * self._sigma[k] ** 2)) * np.exp(
                -((self._y - cy) ** 2) / (2 * self._sigma[k] ** 2)
            )
            field += np.float32(level) * blob
        return field * np.float32(1.0 + self._global * math.sin(2 * np.pi * self._freq * i + self._phase))


# --- rendering -------------------------------------------------------------------------------


def _translation(t) -> np.ndarray:
    m = np.eye(3)
    m[:2, 2] = t
    return m


def _rotation(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _apply(matrix: np.ndarray, point: np.ndarray) -> np.ndarray:
    return matrix[:2, :2] @ point + matrix[:2, 2]


def _upscale(s: int) -> np.ndarray:
    """Output px -> supersampled px: output pixel centre x sits at s*x + (s-1)/2."""
    return np.array([[s, 0.0, (s - 1) / 2], [0.0, s, (s - 1) / 2], [0.0, 0.0, 1.0]])


def _blend(canvas: np.ndarray, sprite: np.ndarray, placement: np.ndarray, s: int) -> None:
    """Composite a premultiplied sprite over the supersampled canvas in place.

    Args:
        canvas: (H*s, W*s) float32 supersampled frame.
        sprite: (h, w, 2) float32 grey * alpha and alpha, supersampled; its middle is its anchor.
        placement: (3, 3) map of the anchor's output-resolution scene coordinates (centred on the
            anchor) to supersampled canvas px, i.e. ``upscale @ camera @ translation(anchor)``.
        s: supersampling factor.
    """
    h, w = sprite.shape[:2]
    # Sprite px -> output-resolution offsets from the anchor.
    local = np.array([[1 / s, 0.0, -(w - 1) / (2 * s)], [0.0, 1 / s, -(h - 1) / (2 * s)], [0.0, 0.0, 1.0]])
    matrix = placement @ local
    corners = np.array([[-0.5, -0.5, 1], [w - 0.5, -0.5, 1], [-0.5, h - 0.5, 1], [w - 0.5, h - 0.5, 1]])
    mapped = corners @ matrix[:2].T
    x0, y0 = np.maximum(np.floor(mapped.min(axis=0)).astype(int) - 1, 0)
    x1, y1 = np.minimum(np.ceil(mapped.max(axis=0)).astype(int) + 2, canvas.shape[::-1])
    if x0 >= x1 or y0 >= y1:
        return
    placed = cv2.warpAffine(
        sprite, (_translation((-x0, -y0)) @ matrix)[:2], (int(x1 - x0), int(y1 - y0)),
        flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0,
    )  # fmt: skip
    roi = canvas[y0:y1, x0:x1]
    roi *= 1.0 - placed[..., 1]
    roi += placed[..., 0]
