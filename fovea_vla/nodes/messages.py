"""Conversions between ROS messages and core types (no algorithms here)."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
from builtin_interfaces.msg import Time
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, JointState, RegionOfInterest
from std_msgs.msg import Header

from fovea_vla.core.decode import ImageDecoder, VideoDecoder, parse_video_format
from fovea_vla.core.fixation import FixationState
from fovea_vla.core.frames import Frame, rgb_to_image_fields
from fovea_vla.core.pipeline import PipelineOutput
from fovea_vla.core.slip import SlipEvent as CoreSlipEvent
from fovea_vla.core.stats import LatencyTracker
from fovea_vla_msgs.msg import CompressedVideo, Fixation, FixationArray, SlipEvent, StageLatency

__all__ = [
    "CameraModel",
    "MessageError",
    "fixation_array_msg",
    "fixation_msg",
    "frame_from_compressed",
    "frame_from_image",
    "frames_from_video",
    "image_msg",
    "joint_positions",
    "ns_to_stamp",
    "slip_msg",
    "stage_latencies",
    "stamp_to_ns",
]


def stamp_to_ns(stamp: Time) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def ns_to_stamp(ns: int) -> Time:
    return Time(sec=int(ns // 1_000_000_000), nanosec=int(ns % 1_000_000_000))


def stage_latencies(tracker: LatencyTracker) -> list[StageLatency]:
    """One StageLatency (last, p50, p99 [ms]) per stage the tracker has seen."""
    return [
        StageLatency(
            stage=stage,
            last_ms=tracker.last(stage),
            p50_ms=tracker.percentile(stage, 50),
            p99_ms=tracker.percentile(stage, 99),
        )
        for stage in tracker.stages()
    ]


def frame_from_image(msg: Image, decoder: ImageDecoder) -> Frame:
    """Decode a sensor_msgs/Image; raises FrameError with a drop reason."""
    image = decoder.raw(msg.data, msg.width, msg.height, msg.encoding, msg.step, bool(msg.is_bigendian))
    return Frame(
        rgb=image.rgb, stamp_ns=stamp_to_ns(msg.header.stamp), frame_id=msg.header.frame_id, device_rgb=image.device_rgb
    )


def frame_from_compressed(msg: CompressedImage, decoder: ImageDecoder) -> Frame:
    """Decode a sensor_msgs/CompressedImage; raises FrameError with a drop reason."""
    image = decoder.compressed(msg.data, msg.format)
    return Frame(
        rgb=image.rgb, stamp_ns=stamp_to_ns(msg.header.stamp), frame_id=msg.header.frame_id, device_rgb=image.device_rgb
    )


def frames_from_video(msg: CompressedVideo, decoder: VideoDecoder) -> list[Frame]:
    """Feed one fovea_vla_msgs/CompressedVideo packet; the frames it completed, each stamped with the
    capture stamp of the packet it was encoded from. Raises FrameError with a drop reason."""
    decoded = decoder.decode(msg.data, parse_video_format(msg.format), stamp_to_ns(msg.timestamp))
    return [
        Frame(rgb=image.rgb, stamp_ns=stamp_ns, frame_id=msg.frame_id, device_rgb=image.device_rgb)
        for stamp_ns, image in decoded
    ]


def image_msg(rgb: np.ndarray, header: Header, encoding: str = "rgb8") -> Image:
    data, step = rgb_to_image_fields(rgb, encoding)
    return Image(
        header=header,
        height=int(rgb.shape[0]),
        width=int(rgb.shape[1]),
        encoding=encoding,
        is_bigendian=0,
        step=step,
        data=data,
    )


class MessageError(ValueError):
    """An input message refused by a conversion.

    Attributes:
        reason: short snake_case drop reason, used as a counter key (``not_finite``, ...).
    """

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def joint_positions(msg: JointState) -> dict[str, float]:
    """``{joint name: position}`` of a sensor_msgs/JointState (velocities and efforts are not read).

    Raises:
        MessageError: ``length_mismatch`` (not one position per name), ``duplicate_names`` or
            ``not_finite`` (a NaN or infinite position).
    """
    names, positions = list(msg.name), [float(v) for v in msg.position]
    if len(positions) != len(names):
        raise MessageError("length_mismatch", f"{len(names)} names but {len(positions)} positions")
    repeated = sorted(name for name, count in Counter(names).items() if count > 1)
    if repeated:
        # Which of the repeated values is the joint's would be a guess.
        raise MessageError("duplicate_names", f"repeated joint names {repeated[:5]}")
    bad = [name for name, value in zip(names, positions, strict=True) if not math.isfinite(value)]
    if bad:
        raise MessageError("not_finite", f"NaN or infinite position of {bad[:5]}")
    return dict(zip(names, positions, strict=True))


# Fields of view a pinhole CameraInfo may describe [deg]: outside them k is not in pixels (or not K).
_FOV_RANGE_DEG = (0.01, 179.0)


def _check_camera_info(info: CameraInfo) -> None:
    """Raises MessageError unless ``info`` holds a usable pinhole K for a known image size."""
    k = [float(v) for v in info.k]
    if not any(k):
        raise MessageError("uncalibrated", "k is all zeros (an uncalibrated camera)")
    if not info.width or not info.height:
        raise MessageError("zero_size", f"image size {info.width}x{info.height}")
    if not all(math.isfinite(v) for v in k):
        raise MessageError("not_finite", f"k={k} has NaN or infinite entries")
    fx, fy, cx, cy = k[0], k[4], k[2], k[5]
    # K = [fx s cx; 0 fy cy; 0 0 1]: a transposed or projective matrix fails this.
    if k[3] != 0.0 or k[6] != 0.0 or k[7] != 0.0 or k[8] != 1.0 or fx <= 0.0 or fy <= 0.0:
        raise MessageError("bad_intrinsics", f"k={k} is not a pinhole matrix [fx s cx; 0 fy cy; 0 0 1] with fx, fy > 0")
    fov = [math.degrees(2.0 * math.atan(0.5 * size / f)) for size, f in ((info.width, fx), (info.height, fy))]
    if not all(_FOV_RANGE_DEG[0] <= v <= _FOV_RANGE_DEG[1] for v in fov):
        raise MessageError(
            "bad_intrinsics", f"fx={fx:g}, fy={fy:g} give a field of view of {fov[0]:.3g} x {fov[1]:.3g} deg"
        )
    # Pixel centres sit at integers: the image spans -0.5 .. size - 0.5.
    if not (-0.5 <= cx <= info.width - 0.5 and -0.5 <= cy <= info.height - 0.5):
        raise MessageError(
            "bad_intrinsics", f"principal point ({cx:g}, {cy:g}) outside the {info.width}x{info.height} image"
        )


class CameraModel:
    """Pinhole intrinsics from CameraInfo, with a fallback for cameras that publish none.

    Args:
        default_fov_deg: horizontal field of view assumed until a CameraInfo arrives.
    """

    def __init__(self, default_fov_deg: float = 60.0):
        self.default_fov_deg = default_fov_deg
        self._info: CameraInfo | None = None

    def update(self, info: CameraInfo) -> MessageError | None:
        """Adopts ``info`` unless it is unusable; a refused one leaves the model as it was.

        Returns:
            None when adopted, else why not: a MessageError with reason ``uncalibrated``,
            ``zero_size``, ``not_finite`` or ``bad_intrinsics``, returned rather than raised so that
            this method can serve as a subscription callback directly.
        """
        try:
            _check_camera_info(info)
        except MessageError as exc:
            return exc
        self._info = info
        return None

    @property
    def known(self) -> bool:
        return self._info is not None

    def intrinsics(self, width: int, height: int) -> tuple[float, float, float, float]:
        """(fx, fy, cx, cy) [px] for an image of this size (scaled if CameraInfo is for another size)."""
        if self._info is not None:
            sx = width / self._info.width
            sy = height / self._info.height
            k = self._info.k
            # Pixel centres sit at integers, so the principal point scales about -0.5.
            return k[0] * sx, k[4] * sy, (k[2] + 0.5) * sx - 0.5, (k[5] + 0.5) * sy - 0.5
        fx = 0.5 * width / math.tan(math.radians(self.default_fov_deg) / 2.0)
        return fx, fx, (width - 1) / 2.0, (height - 1) / 2.0

    def unproject(self, x: float, y: float, width: int, height: int, depth_m: float) -> tuple[float, float, float]:
        """Pixel (x, y) -> point [m] at ``depth_m`` along the optical axis (optical frame)."""
        fx, fy, cx, cy = self.intrinsics(width, height)
        return (x - cx) / fx * depth_m, (y - cy) / fy * depth_m, depth_m

    def project(self, point_xyz: tuple[float, float, float], width: int, height: int) -> tuple[float, float] | None:
        """Point [m] in the optical frame -> pixel, or None when it is behind the camera."""
        fx, fy, cx, cy = self.intrinsics(width, height)
        x, y, z = point_xyz
        if not z > 1e-6:
            return None
        return fx * x / z + cx, fy * y / z + cy


def fixation_msg(
    state: FixationState, output: PipelineOutput, header: Header, focal_px: float | None = None
) -> Fixation:
    """Fixation message; e0 in degrees when the focal length is known, else normalized."""
    if focal_px:
        e0 = math.degrees(math.atan2(output.layout.e0, focal_px))
    else:
        e0 = output.layout.e0 / (0.5 * math.hypot(output.width, output.height))
    return Fixation(
        header=header,
        x=float(state.x),
        y=float(state.y),
        u=float(state.x / max(output.width, 1)),
        v=float(state.y / max(output.height, 1)),
        image_width=output.width,
        image_height=output.height,
        foveal_radius=float(output.layout.e0),
        e0=float(e0),
        velocity_x=float(state.vx),
        velocity_y=float(state.vy),
        confidence=float(state.confidence),
        source=int(state.source),
    )


def fixation_array_msg(output: PipelineOutput, header: Header, focal_px: float | None = None) -> FixationArray:
    """Every fixation of the frame with its share of the token budget (the primary first)."""
    fixations = [fixation_msg(state, output, header, focal_px) for state in output.fixations]
    return FixationArray(header=header, fixations=fixations, weights=[float(w) for w in output.weights])


def slip_msg(event: CoreSlipEvent, header: Header) -> SlipEvent:
    """fovea_vla_msgs/SlipEvent from the core event (same state values)."""
    x, y, w, h = (int(v) for v in event.region)
    return SlipEvent(
        header=header,
        state=int(event.state),
        magnitude=float(event.magnitude),
        direction_x=float(event.direction[0]),
        direction_y=float(event.direction[1]),
        region=RegionOfInterest(x_offset=x, y_offset=y, width=w, height=h),
        confidence=float(event.confidence),
    )
