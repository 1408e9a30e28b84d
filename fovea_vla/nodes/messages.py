"""Conversions between ROS messages and core types (no algorithms here)."""

from __future__ import annotations

import math

import numpy as np
from builtin_interfaces.msg import Time
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, RegionOfInterest
from std_msgs.msg import Header

from fovea_vla.core.fixation import FixationState
from fovea_vla.core.frames import Frame, compressed_to_rgb, image_to_rgb, rgb_to_image_fields
from fovea_vla.core.pipeline import PipelineOutput
from fovea_vla.core.slip import SlipEvent as CoreSlipEvent
from fovea_vla.core.stats import LatencyTracker
from fovea_vla_msgs.msg import Fixation, FixationArray, SlipEvent, StageLatency

__all__ = [
    "CameraModel",
    "fixation_array_msg",
    "fixation_msg",
    "frame_from_compressed",
    "frame_from_image",
    "image_msg",
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


def frame_from_image(msg: Image, *, max_pixels: int) -> Frame:
    """Decode a sensor_msgs/Image; raises FrameError with a drop reason."""
    rgb = image_to_rgb(
        msg.data, msg.width, msg.height, msg.encoding, msg.step, bool(msg.is_bigendian), max_pixels=max_pixels
    )
    return Frame(rgb=rgb, stamp_ns=stamp_to_ns(msg.header.stamp), frame_id=msg.header.frame_id)


def frame_from_compressed(msg: CompressedImage, *, max_pixels: int) -> Frame:
    """Decode a sensor_msgs/CompressedImage; raises FrameError with a drop reason."""
    rgb = compressed_to_rgb(msg.data, msg.format, max_pixels=max_pixels)
    return Frame(rgb=rgb, stamp_ns=stamp_to_ns(msg.header.stamp), frame_id=msg.header.frame_id)


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


class CameraModel:
    """Pinhole intrinsics from CameraInfo, with a fallback for cameras that publish none.

    Args:
        default_fov_deg: horizontal field of view assumed until a CameraInfo arrives.
    """

    def __init__(self, default_fov_deg: float = 60.0):
        self.default_fov_deg = default_fov_deg
        self._info: CameraInfo | None = None

    def update(self, info: CameraInfo) -> None:
        if info.k[0] > 0 and info.k[4] > 0:
            self._info = info

    @property
    def known(self) -> bool:
        return self._info is not None

    def intrinsics(self, width: int, height: int) -> tuple[float, float, float, float]:
        """(fx, fy, cx, cy) [px] for an image of this size (scaled if CameraInfo is for another size)."""
        if self._info is not None and self._info.width and self._info.height:
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
