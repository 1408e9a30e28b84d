"""Built-in synthetic camera scene with ground truth, the default input of the demo and many tests.

The scene is a rich multi-scale texture (smoothed noise octaves, antialiased coloured shapes and
fine grain) seen through a camera that optionally pans and shakes along a smooth path, with
textured objects (rounded rectangles and ellipses of distinct saturated colours, soft edges)
moving over it on smooth Lissajous paths, drawn in a fixed depth order. Everything moves by pure
sub-pixel translation rendered with bilinear interpolation, so optical flow has an exact answer
(:meth:`SyntheticScene.dense_flow`). Optional scene cuts re-draw the background and objects from
a new seed. Sensor noise is added last.

Rendering is random access and deterministic: frame ``i`` depends only on the config and ``i``.
The per-segment textures are built once and cached, after which a 640x480 frame costs a few
milliseconds (one background warp, one small warp and blend per object, the noise).

Pixel convention: x right, y down, the centre of the top-left pixel is (0, 0).
"""

from __future__ import annotations

import colorsys
import math
from collections import OrderedDict
from dataclasses import dataclass

import cv2
import numpy as np

__all__ = ["SceneTruth", "SyntheticScene", "SyntheticSceneConfig", "make_example"]

# Seed-sequence tags that keep the texture and noise random streams apart.
_SEGMENT_STREAM, _NOISE_STREAM = 0, 1
# Number of set bits of each byte value, for the binomial sensor noise.
_POPCOUNT = np.array([bin(v).count("1") for v in range(256)], np.uint8)
# Segments kept in the cache: two, so a frame pair that spans a cut does not rebuild either side.
_CACHED_SEGMENTS = 2
# Blur (px) that band-limits every texture so bilinear sub-pixel shifts stay faithful.
_BAND_LIMIT_SIGMA = 0.8
# Sprite padding (px) around an object's nominal size, room for its antialiased edge.
_SPRITE_PAD = 2


@dataclass(frozen=True, kw_only=True)
class SyntheticSceneConfig:
    """Synthetic scene parameters. Sequences are accepted for the ranges and stored as tuples.

    Attributes:
        width: frame width in pixels (>= 16).
        height: frame height in pixels (>= 16).
        fps: frame rate in Hz; frame ``i`` is at time ``i / fps`` seconds.
        num_objects: moving objects (>= 0), drawn in index order (object 0 at the back).
        object_speed_px_s: (min, max) range from which each object's RMS speed in px/s is drawn.
        object_size_px: (min, max) range of object width and height in pixels (drawn
            independently); max at most 3/4 of the smaller frame side so objects can move.
        camera_motion: slow pan plus a faster, smaller shake of the background along a smooth
            translation path.
        camera_speed_px_s: peak camera speed along each axis in px/s (used with camera_motion).
        scene_cut_every_s: seconds between scene cuts, at which the background and objects are
            re-drawn from a new seed; 0 means never, otherwise at least one frame period.
        noise_std: standard deviation of the additive, approximately Gaussian sensor noise in
            grey levels (independent per pixel, channel and frame).
        seed: non-negative seed; the same config always renders the same frames.
    """

    width: int = 640
    height: int = 480
    fps: float = 30.0
    num_objects: int = 3
    object_speed_px_s: tuple[float, float] = (60.0, 180.0)
    object_size_px: tuple[int, int] = (50, 110)
    camera_motion: bool = False
    camera_speed_px_s: float = 40.0
    scene_cut_every_s: float = 0.0
    noise_std: float = 2.0
    seed: int = 0

    def __post_init__(self):
        # Normalised values are written back so numpy scalars and lists (ROS params, YAML) work.
        set_ = object.__setattr__
        set_(self, "width", _as_int("width", self.width, 16))
        set_(self, "height", _as_int("height", self.height, 16))
        set_(self, "fps", _as_float("fps", self.fps, 0.0, strict=True))
        set_(self, "num_objects", _as_int("num_objects", self.num_objects, 0))
        set_(self, "object_speed_px_s", _as_range("object_speed_px_s", self.object_speed_px_s, False, 0))
        set_(self, "object_size_px", _as_range("object_size_px", self.object_size_px, True, 4))
        max_size = 0.75 * min(self.width, self.height)
        if self.object_size_px[1] > max_size:
            _fail(
                "object_size_px",
                self.object_size_px,
                f"a (min, max) range with max <= 3/4 of min(width, height) = {max_size:g}",
            )
        if not isinstance(self.camera_motion, (bool, np.bool_)):
            _fail("camera_motion", self.camera_motion, "a bool")
        set_(self, "camera_motion", bool(self.camera_motion))
        set_(self, "camera_speed_px_s", _as_float("camera_speed_px_s", self.camera_speed_px_s, 0.0))
        cut = _as_float("scene_cut_every_s", self.scene_cut_every_s, 0.0)
        if 0.0 < cut * self.fps < 1.0:
            _fail(
                "scene_cut_every_s",
                cut,
                f"0 (never) or at least one frame period (1/fps = {1 / self.fps:g} s)",
            )
        set_(self, "scene_cut_every_s", cut)
        set_(self, "noise_std", _as_float("noise_std", self.noise_std, 0.0))
        set_(self, "seed", _as_int("seed", self.seed, 0))


def _fail(name: str, value, requirement: str):
    raise ValueError(f"synthetic.{name}={value!r}: must be {requirement}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _as_int(name: str, value, minimum: int) -> int:
    if not (_is_number(value) and float(value).is_integer() and value >= minimum):
        _fail(name, value, f"an integer >= {minimum}")
    return int(value)


def _as_float(name: str, value, minimum: float, *, strict: bool = False) -> float:
    ok = _is_number(value) and math.isfinite(value) and (value > minimum if strict else value >= minimum)
    if not ok:
        _fail(name, value, f"a finite number {'>' if strict else '>='} {minimum:g}")
    return float(value)


def _as_range(name: str, value, integer: bool, minimum: float) -> tuple:
    kind = "integers" if integer else "finite numbers"
    requirement = f"a (min, max) pair of {kind} >= {minimum:g} with min <= max"
    if not isinstance(value, (tuple, list, np.ndarray)) or len(value) != 2:
        _fail(name, value, requirement)
    ok = all(_is_number(v) and math.isfinite(v) and v >= minimum for v in value)
    if not ok or (integer and not all(float(v).is_integer() for v in value)) or value[0] > value[1]:
        _fail(name, value, requirement)
    convert = int if integer else float
    return (convert(value[0]), convert(value[1]))


@dataclass(frozen=True, eq=False)
class SceneTruth:
    """Ground truth of one rendered frame.

    Attributes:
        object_centers: (N, 2) float32 object centres (x, y) in px.
        object_velocities: (N, 2) float32 instantaneous object velocities in px/s (image space).
        object_boxes: (N, 4) float32 boxes (x, y, w, h) in px; (x, y) is the top-left corner of
            the object's extent, so the centre is (x + w/2, y + h/2).
        camera_offset: (2,) float32 camera translation in px relative to the segment's rest
            position: frame pixel (x, y) shows the background point (x, y) + camera_offset, so the
            background moves in the image by minus the change of the offset.
        is_cut: True on the first frame of a new segment (frame 0 is not a cut).
        segment: index of the cut segment (0 before the first cut).
    """

    object_centers: np.ndarray
    object_velocities: np.ndarray
    object_boxes: np.ndarray
    camera_offset: np.ndarray
    is_cut: bool
    segment: int


@dataclass(frozen=True, eq=False)
class _Segment:
    """Everything that is fixed between two cuts: textures and motion parameters."""

    start_index: int
    background: np.ndarray  # (H + 2*margin, W + 2*margin, 3) uint8 RGB
    margin: int
    cam_amp: np.ndarray  # (2, 2) px: rows x, y axis; columns pan, shake component
    cam_omega: np.ndarray  # (2, 2) rad/s
    cam_phase: np.ndarray  # (2, 2) rad
    obj_sizes: np.ndarray  # (N, 2) w, h px
    obj_center: np.ndarray  # (N, 2) Lissajous centre px
    obj_amp: np.ndarray  # (N, 2) px
    obj_omega: np.ndarray  # (N, 2) rad/s
    obj_phase: np.ndarray  # (N, 2) rad
    sprites: tuple[np.ndarray, ...]  # (h + 2*pad, w + 2*pad, 4) float32: RGB * alpha, alpha

    def camera_offset(self, t: float) -> np.ndarray:
        return (self.cam_amp * np.sin(self.cam_omega * t + self.cam_phase)).sum(axis=1)

    def object_centers(self, t: float) -> np.ndarray:
        return self.obj_center + self.obj_amp * np.sin(self.obj_omega * t + self.obj_phase)

    def object_velocities(self, t: float) -> np.ndarray:
        return self.obj_amp * self.obj_omega * np.cos(self.obj_omega * t + self.obj_phase)


class SyntheticScene:
    """Deterministic, random-access renderer of a :class:`SyntheticSceneConfig`.

    Not thread safe (it caches segment textures); give each thread its own scene.

    Args:
        cfg: scene parameters (defaults when None).
    """

    def __init__(self, cfg: SyntheticSceneConfig | None = None):
        self.cfg = cfg if cfg is not None else SyntheticSceneConfig()
        self._segments: OrderedDict[int, _Segment] = OrderedDict()

    def render(self, index: int) -> tuple[np.ndarray, SceneTruth]:
        """Renders frame ``index`` (time ``index / fps``).

        Args:
            index: frame index >= 0.

        Returns:
            ``(rgb, truth)``: (H, W, 3) uint8 RGB frame (a new array) and its :class:`SceneTruth`.
        """
        _, seg, t = self._locate(index)
        frame = _view(seg.background, seg.margin, seg.camera_offset(t), self.cfg.width, self.cfg.height)
        for sprite, center in zip(seg.sprites, seg.object_centers(t), strict=True):
            _paste(frame, sprite, center)
        if self.cfg.noise_std > 0:
            frame = self._add_noise(frame, index)
        return frame, self.truth(index)

    def truth(self, index: int) -> SceneTruth:
        """Ground truth of frame ``index`` without rendering it.

        Args:
            index: frame index >= 0.
        """
        seg_no, seg, t = self._locate(index)
        centers = seg.object_centers(t)
        boxes = np.concatenate([centers - seg.obj_sizes / 2, seg.obj_sizes], axis=1)
        return SceneTruth(
            object_centers=centers.astype(np.float32),
            object_velocities=seg.object_velocities(t).astype(np.float32),
            object_boxes=boxes.astype(np.float32),
            camera_offset=seg.camera_offset(t).astype(np.float32),
            is_cut=seg_no > 0 and int(index) == seg.start_index,
            segment=seg_no,
        )

    def dense_flow(self, index: int) -> np.ndarray:
        """Ground-truth optical flow from frame ``index`` to frame ``index + 1``.

        Background pixels get the camera-induced translation, pixels covered by an object in
        frame ``index`` (alpha >= 0.5, front-most object wins) get that object's displacement.
        Occlusion is not modelled: background uncovered or covered by an object between the two
        frames keeps the background flow although it is not visible in both frames. When frame
        ``index + 1`` starts a new segment there is no correspondence and the flow is all NaN, so
        a metric computed over it fails loudly instead of rewarding zero flow.

        Args:
            index: frame index >= 0.

        Returns:
            (H, W, 2) float32 flow (dx, dy) in px: frame ``index`` at (x, y) matches frame
            ``index + 1`` at (x + dx, y + dy).
        """
        cfg = self.cfg
        seg_no, seg, t = self._locate(index)
        flow = np.empty((cfg.height, cfg.width, 2), np.float32)
        if self._segment_of(index + 1)[0] != seg_no:
            flow.fill(np.nan)
            return flow
        dt = 1.0 / cfg.fps
        flow[:] = -(seg.camera_offset(t + dt) - seg.camera_offset(t))
        shifts = seg.object_centers(t + dt) - seg.object_centers(t)
        for sprite, center, shift in zip(seg.sprites, seg.object_centers(t), shifts, strict=True):
            placed = _place(sprite[..., 3], center, cfg.width, cfg.height)
            if placed is not None:
                patch, rows, cols = placed
                flow[rows, cols][patch >= 0.5] = shift
        return flow

    def _segment_of(self, index: int) -> tuple[int, int]:
        """(segment number, first frame index of that segment) of a frame."""
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
            raise ValueError(f"synthetic frame index must be an integer >= 0, got {index!r}")
        frames_per_segment = self.cfg.scene_cut_every_s * self.cfg.fps
        if frames_per_segment == 0:
            return 0, 0
        # The epsilons keep float round-off from moving a cut by one frame.
        seg_no = math.floor(int(index) / frames_per_segment + 1e-9)
        return seg_no, math.ceil(seg_no * frames_per_segment - 1e-9)

    def _locate(self, index: int) -> tuple[int, _Segment, float]:
        """(segment number, segment, time since the segment's first frame in s) of a frame."""
        seg_no, start = self._segment_of(index)
        seg = self._segments.get(seg_no)
        if seg is None:
            seg = self._build_segment(seg_no, start)
            self._segments[seg_no] = seg
            if len(self._segments) > _CACHED_SEGMENTS:
                self._segments.popitem(last=False)
        else:
            self._segments.move_to_end(seg_no)
        return seg_no, seg, (int(index) - start) / self.cfg.fps

    def _build_segment(self, seg_no: int, start: int) -> _Segment:
        cfg = self.cfg
        # Independent streams, so e.g. num_objects does not change the background.
        cam_ss, bg_ss, obj_ss = np.random.SeedSequence([cfg.seed, _SEGMENT_STREAM, seg_no]).spawn(3)

        cam_amp = np.zeros((2, 2))
        cam_omega = np.zeros((2, 2))
        cam_phase = np.zeros((2, 2))
        if cfg.camera_motion and cfg.camera_speed_px_s > 0:
            rng = np.random.default_rng(cam_ss)
            # Pan (period ~8-16 s) takes 80 % of the per-axis speed budget, shake (~2-3 s) 20 %,
            # so the peak speed along each axis is exactly camera_speed_px_s.
            cam_omega[:, 0] = rng.uniform(0.4, 0.8, 2)
            cam_omega[:, 1] = rng.uniform(2.0, 3.5, 2)
            cam_amp[:] = np.array([0.8, 0.2]) * cfg.camera_speed_px_s / cam_omega
            cam_phase[:] = rng.uniform(0.0, 2 * np.pi, (2, 2))
        margin = math.ceil(cam_amp.sum(axis=1).max()) + 2
        background = _make_background(np.random.default_rng(bg_ss), cfg.height + 2 * margin, cfg.width + 2 * margin)

        n = cfg.num_objects
        sizes = np.zeros((n, 2))
        center = np.zeros((n, 2))
        amp = np.zeros((n, 2))
        omega = np.zeros((n, 2))
        phase = np.zeros((n, 2))
        sprites = []
        frame_size = np.array([cfg.width, cfg.height], float)
        hue0 = np.random.default_rng(obj_ss).uniform()
        for j, ss in enumerate(obj_ss.spawn(n)):
            rng = np.random.default_rng(ss)
            lo, hi = cfg.object_size_px
            sizes[j] = rng.integers(lo, hi + 1, 2)
            # Keep the whole box inside [0, W-1] x [0, H-1]: centre within +-max_amp of the middle.
            max_amp = (frame_size - 1 - sizes[j]) / 2
            amp[j] = max_amp * rng.uniform(0.6, 1.0, 2)
            center[j] = (frame_size - 1) / 2 + rng.uniform(-1.0, 1.0, 2) * (max_amp - amp[j])
            speed = rng.uniform(*cfg.object_speed_px_s)
            ratio = rng.uniform(0.6, 1.6)  # omega_y / omega_x: the shape of the Lissajous figure
            # RMS speed of a Lissajous path is sqrt((Ax wx)^2 + (Ay wy)^2) / sqrt(2).
            omega_x = speed * math.sqrt(2) / math.hypot(amp[j, 0], amp[j, 1] * ratio)
            omega[j] = (omega_x, omega_x * ratio)
            phase[j] = rng.uniform(0.0, 2 * np.pi, 2)
            hue = (hue0 + j / max(n, 1)) % 1.0
            sprites.append(_make_sprite(rng, int(sizes[j, 0]), int(sizes[j, 1]), hue))

        return _Segment(
            start_index=start,
            background=background,
            margin=margin,
            cam_amp=cam_amp,
            cam_omega=cam_omega,
            cam_phase=cam_phase,
            obj_sizes=sizes,
            obj_center=center,
            obj_amp=amp,
            obj_omega=omega,
            obj_phase=phase,
            sprites=tuple(sprites),
        )

    def _add_noise(self, frame: np.ndarray, index: int) -> np.ndarray:
        h, w = frame.shape[:2]
        # Binomial(16, 1/2) - 8 (std 2) from 16 random bits per sample, scaled to noise_std: a
        # close Gaussian approximation at a quarter of the cost of numpy normals. Every frame
        # draws fresh bits, since noise repeated between frames would correlate like texture.
        bits = np.random.default_rng([self.cfg.seed, _NOISE_STREAM, index]).integers(0, 256, (2, h, w * 3), np.uint8)
        counts = cv2.add(cv2.LUT(bits[0], _POPCOUNT), cv2.LUT(bits[1], _POPCOUNT)).reshape(h, w, 3)
        scale = self.cfg.noise_std / 2
        return cv2.addWeighted(frame, 1.0, counts, scale, -8 * scale, dtype=cv2.CV_8U)


def make_example() -> SyntheticScene:
    """A small (160x120) scene with camera motion, for docs and tests."""
    return SyntheticScene(
        SyntheticSceneConfig(
            width=160,
            height=120,
            object_size_px=(16, 40),
            object_speed_px_s=(20.0, 60.0),
            camera_motion=True,
            camera_speed_px_s=15.0,
        )
    )


def _view(background: np.ndarray, margin: int, offset: np.ndarray, width: int, height: int) -> np.ndarray:
    """The (height, width, 3) window of the background seen at camera offset ``offset``."""
    x, y = margin + float(offset[0]), margin + float(offset[1])
    if x.is_integer() and y.is_integer():
        return background[int(y) : int(y) + height, int(x) : int(x) + width].copy()
    matrix = np.array([[1.0, 0.0, x], [0.0, 1.0, y]])  # frame -> background coordinates
    return cv2.warpAffine(
        background,
        matrix,
        (width, height),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REFLECT,
    )


def _place(sprite: np.ndarray, center: np.ndarray, width: int, height: int):
    """Shifts ``sprite`` so its middle lands on ``center`` and clips it to the frame.

    Returns:
        ``(patch, rows, cols)``: the shifted sprite cut to the frame and the frame slices it
        covers, or None when it lies outside the frame.
    """
    sh, sw = sprite.shape[:2]
    ox, oy = center[0] - (sw - 1) / 2, center[1] - (sh - 1) / 2
    x0, y0 = math.floor(ox), math.floor(oy)
    # Forward translation by the fractional part; one extra row/column receives the spill.
    matrix = np.array([[1.0, 0.0, ox - x0], [0.0, 1.0, oy - y0]])
    shifted = cv2.warpAffine(sprite, matrix, (sw + 1, sh + 1), flags=cv2.INTER_LINEAR, borderValue=0)
    xa, ya = max(x0, 0), max(y0, 0)
    xb, yb = min(x0 + sw + 1, width), min(y0 + sh + 1, height)
    if xa >= xb or ya >= yb:
        return None
    patch = shifted[ya - y0 : yb - y0, xa - x0 : xb - x0]
    return patch, slice(ya, yb), slice(xa, xb)


def _paste(frame: np.ndarray, sprite: np.ndarray, center: np.ndarray) -> None:
    """Alpha-blends a premultiplied RGBA float sprite into ``frame`` in place."""
    placed = _place(sprite, center, frame.shape[1], frame.shape[0])
    if placed is None:
        return
    patch, rows, cols = placed
    roi = frame[rows, cols]
    alpha = patch[..., 3:]
    roi[:] = (roi * (1.0 - alpha) + patch[..., :3] + 0.5).astype(np.uint8)


def _octave_noise(rng: np.random.Generator, height: int, width: int, channels: int, cells, exponent: float):
    """Sum of bicubically upsampled Gaussian noise grids, normalised to unit standard deviation.

    Args:
        cells: grid cell sizes in px, one octave each.
        exponent: octave weight is ``cell ** exponent`` (larger = smoother, more 1/f-like).

    Returns:
        (height, width, channels) float32.
    """
    total = np.zeros((height, width, channels), np.float32)
    for cell in cells:
        gh, gw = height // cell + 3, width // cell + 3
        grid = rng.standard_normal((gh, gw, channels), np.float32)
        up = cv2.resize(grid, (gw * cell, gh * cell), interpolation=cv2.INTER_CUBIC).reshape(
            gh * cell, gw * cell, channels
        )
        dy, dx = rng.integers(0, cell, 2)  # random phase, so octaves do not share grid lines
        total += cell**exponent * up[dy : dy + height, dx : dx + width]
    return total / max(float(total.std()), 1e-6)


def _make_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Multi-scale coloured texture with antialiased shapes and fine grain, (H, W, 3) uint8 RGB."""
    lum = _octave_noise(rng, height, width, 1, (8, 16, 32, 64, 128), 0.7)
    chroma = _octave_noise(rng, height, width, 3, (32, 64, 128), 0.5)
    base = np.clip(125 + 40 * lum + 15 * chroma, 0, 255).astype(np.uint8)

    # Shapes give the scene edges and corners; count scales with the area.
    max_size = max(8.0, 0.1 * min(height, width))
    for _ in range(max(4, height * width // 4000)):
        # Muted colours, so the saturated objects stand out from the background.
        hsv = (rng.uniform(), rng.uniform(0.05, 0.45), rng.uniform(0.15, 0.9))
        colour = tuple(255 * c for c in colorsys.hsv_to_rgb(*hsv))
        kind = rng.integers(4)
        size = float(np.exp(rng.uniform(math.log(3), math.log(max_size))))
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        if kind == 0:
            cv2.circle(base, (int(cx), int(cy)), int(size), colour, -1, cv2.LINE_AA)
        elif kind == 1:
            w, h = size * rng.uniform(0.5, 2.0, 2)
            cv2.rectangle(base, (int(cx - w), int(cy - h)), (int(cx + w), int(cy + h)), colour, -1, cv2.LINE_AA)
        elif kind == 2:
            angle = rng.uniform(0, 2 * np.pi)
            end = (int(cx + 2 * size * math.cos(angle)), int(cy + 2 * size * math.sin(angle)))
            cv2.line(base, (int(cx), int(cy)), end, colour, int(rng.integers(1, 5)), cv2.LINE_AA)
        else:
            pts = np.array([cx, cy]) + rng.uniform(-size, size, (3, 2))
            cv2.fillPoly(base, [pts.astype(np.int32)], colour, cv2.LINE_AA)

    # Fine grain over everything so flat shapes are textured too (no aperture-only regions).
    grain = _octave_noise(rng, height, width, 1, (2, 4), 0.5)
    out = base.astype(np.float32) + 14 * grain
    out = cv2.GaussianBlur(out, (0, 0), _BAND_LIMIT_SIGMA)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _make_sprite(rng: np.random.Generator, width: int, height: int, hue: float) -> np.ndarray:
    """Textured object of a given hue with soft edges.

    Returns:
        (height + 2*pad, width + 2*pad, 4) float32 premultiplied sprite: RGB * alpha in grey
        levels and alpha in [0, 1]; the object's centre is the sprite's middle.
    """
    sh, sw = height + 2 * _SPRITE_PAD, width + 2 * _SPRITE_PAD
    xs = np.arange(sw, dtype=np.float32) - (sw - 1) / 2
    ys = np.arange(sh, dtype=np.float32) - (sh - 1) / 2
    x, y = np.meshgrid(xs, ys)
    a, b = width / 2, height / 2
    # Signed distance to the outline in px (negative inside) gives a one-pixel antialiased edge.
    if rng.uniform() < 0.5:
        r = np.sqrt((x / a) ** 2 + (y / b) ** 2)
        grad = np.sqrt((x / a**2) ** 2 + (y / b**2) ** 2) / np.maximum(r, 1e-6)
        sdf = (r - 1) / np.maximum(grad, 1e-6)
    else:
        radius = rng.uniform(0.1, 0.3) * min(a, b)
        qx, qy = np.abs(x) - (a - radius), np.abs(y) - (b - radius)
        sdf = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0) - radius
    alpha = np.clip(0.5 - sdf, 0.0, 1.0)

    colour = 255 * np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 0.95), rng.uniform(0.6, 0.95)))
    period = rng.uniform(6, 16)
    if rng.uniform() < 0.5:  # stripes at a random angle
        angle = rng.uniform(0, np.pi)
        pattern = np.sin(2 * np.pi * (x * math.cos(angle) + y * math.sin(angle)) / period)
    else:  # soft checkerboard
        pattern = np.tanh(3 * np.sin(2 * np.pi * x / period) * np.sin(2 * np.pi * y / period))
    texture = _octave_noise(rng, sh, sw, 1, (2, 4, 8, 16), 0.5)[..., 0]
    rim = np.clip(1 + sdf / 3, 0, 1)  # darker outline band, 3 px wide
    shade = (1 + 0.2 * pattern + 0.2 * texture) * (1 - 0.35 * rim)
    rgb = cv2.GaussianBlur(colour * shade[..., None], (0, 0), _BAND_LIMIT_SIGMA)
    rgb = np.clip(rgb, 0, 255).astype(np.float32)
    return np.concatenate([rgb * alpha[..., None], alpha[..., None]], axis=2).astype(np.float32)
