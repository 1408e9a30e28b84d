"""RViz markers for the pipeline's state, in the camera's optical frame.

Image positions are placed on a plane ``depth_m`` in front of the camera through the camera
intrinsics, so RViz's Camera display overlays them exactly on the image, and the 3D view shows
them where the camera looks. Namespaces and ids are fixed so each marker replaces itself on the
next frame; lifetimes make them vanish when the node stops publishing.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np
from builtin_interfaces.msg import Duration
from geometry_msgs.msg import Point, Pose, Quaternion, Vector3
from std_msgs.msg import ColorRGBA, Header
from visualization_msgs.msg import Marker, MarkerArray

from fovea_vla.core.fixation import grid_centers
from fovea_vla.core.overlay import SOURCE_COLORS, level_colors
from fovea_vla.core.pipeline import PipelineOutput
from fovea_vla.nodes.messages import CameraModel

__all__ = ["MARKER_NAMESPACES", "MarkerBuilder", "delete_all"]

MARKER_NAMESPACES = ("fixation", "fovea", "window", "velocity", "flow", "patches", "label", "saccades", "slip")
_IDENTITY = Quaternion(x=0.0, y=0.0, z=0.0, w=1.0)


def _rgba(rgb: tuple[int, int, int], alpha: float = 1.0) -> ColorRGBA:
    return ColorRGBA(r=rgb[0] / 255.0, g=rgb[1] / 255.0, b=rgb[2] / 255.0, a=alpha)


def delete_all(header: Header) -> MarkerArray:
    """A MarkerArray that clears every marker this node published before."""
    return MarkerArray(markers=[Marker(header=header, action=Marker.DELETEALL)])


class MarkerBuilder:
    """Builds the MarkerArray for one pipeline output.

    Args:
        camera: intrinsics used to place pixels in 3D.
        depth_m: distance of the marker plane from the camera [m].
        lifetime_s: marker lifetime [s]; 0 keeps them until replaced.
        flow_spacing_px: spacing of flow arrows [px].
        show_patches: draw every patch footprint.
        max_fixations: fixations drawn (ids 0..max_fixations-1 always exist, unused ones deleted).
        saccade_trail: how many recent saccade targets the fading trail shows.
        max_levels: pyramid levels of the texture: patch outlines use ids 0..max_levels-1 on every
            frame (empty levels deleted), so ids stay stable.
    """

    def __init__(
        self,
        camera: CameraModel,
        *,
        depth_m: float = 1.0,
        lifetime_s: float = 0.5,
        flow_spacing_px: int = 48,
        show_patches: bool = True,
        max_fixations: int = 1,
        saccade_trail: int = 8,
        max_levels: int = 8,
    ):
        self.camera = camera
        self.depth_m = depth_m
        self.lifetime = Duration(sec=int(lifetime_s), nanosec=int((lifetime_s % 1.0) * 1e9))
        self.flow_spacing_px = flow_spacing_px
        self.show_patches = show_patches
        self._intrinsics = (1.0, 1.0, 0.0, 0.0)
        self.max_fixations = max_fixations
        self._trail: deque[tuple[float, float]] = deque(maxlen=saccade_trail)
        self.max_levels = max_levels

    def _point(self, x: float, y: float, out: PipelineOutput) -> Point:
        # Intrinsics of this frame, looked up once per build() (thousands of points per frame).
        fx, fy, cx, cy = self._intrinsics
        return Point(x=float((x - cx) / fx * self.depth_m), y=float((y - cy) / fy * self.depth_m), z=self.depth_m)

    def _marker(self, header: Header, ns: str, kind: int, scale: Vector3, color: ColorRGBA) -> Marker:
        return Marker(
            header=header,
            ns=ns,
            id=0,
            type=kind,
            action=Marker.ADD,
            pose=Pose(orientation=_IDENTITY),
            scale=scale,
            color=color,
            lifetime=self.lifetime,
        )

    def _metres_per_px(self, out: PipelineOutput) -> float:
        fx = self.camera.intrinsics(out.width, out.height)[0]
        return self.depth_m / fx

    def _circle(self, header, ns, out, cx, cy, radius_px, color, width_px) -> Marker:
        mpp = self._metres_per_px(out)
        marker = self._marker(header, ns, Marker.LINE_STRIP, Vector3(x=width_px * mpp), color)
        steps = 48
        marker.points = [
            self._point(
                cx + radius_px * math.cos(2 * math.pi * i / steps),
                cy + radius_px * math.sin(2 * math.pi * i / steps),
                out,
            )
            for i in range(steps + 1)
        ]
        return marker

    def build(self, out: PipelineOutput, header: Header) -> MarkerArray:
        """Markers for one frame; ``header`` carries the frame's capture stamp and camera frame."""
        fix = out.fixation
        self._intrinsics = self.camera.intrinsics(out.width, out.height)
        mpp = self._metres_per_px(out)
        color = SOURCE_COLORS[fix.source]
        markers = []

        # One sphere per fixation, sized by its share of the token budget; stable ids.
        for index in range(self.max_fixations):
            sphere = self._marker(header, "fixation", Marker.SPHERE, Vector3(), _rgba(color))
            sphere.id = index
            if index < len(out.fixations):
                state, weight = out.fixations[index], float(out.weights[index])
                size = (6.0 + 20.0 * weight) * mpp
                sphere.scale = Vector3(x=size, y=size, z=size)
                sphere.color = _rgba(SOURCE_COLORS[state.source], 1.0 if index == 0 else 0.6)
                sphere.pose = Pose(position=self._point(state.x, state.y, out), orientation=_IDENTITY)
            else:
                sphere.action = Marker.DELETE
            markers.append(sphere)

        if out.saccade is not None:
            self._trail.append((fix.x, fix.y))
        trail = self._marker(header, "saccades", Marker.LINE_STRIP, Vector3(x=1.5 * mpp), _rgba((255, 170, 0)))
        for age, (x, y) in enumerate(reversed(self._trail)):
            trail.points.insert(0, self._point(x, y, out))
            # Older targets fade out.
            trail.colors.insert(0, _rgba((255, 170, 0), max(0.15, 1.0 - age / max(len(self._trail), 1))))
        if len(trail.points) < 2:
            trail.action = Marker.DELETE
            trail.points, trail.colors = [], []
        markers.append(trail)

        fovea = out.layout
        markers.append(
            self._circle(
                header, "fovea", out, fovea.fixation[0], fovea.fixation[1], fovea.e0, _rgba((255, 255, 255), 0.8), 1.5
            )
        )
        markers.append(self._circle(header, "window", out, fix.x, fix.y, fix.window_radius, _rgba(color, 0.9), 2.0))

        velocity = self._marker(
            header, "velocity", Marker.ARROW, Vector3(x=2.0 * mpp, y=5.0 * mpp, z=5.0 * mpp), _rgba(color)
        )
        if abs(fix.vx) + abs(fix.vy) > 1.0:
            velocity.points = [
                self._point(fix.x, fix.y, out),
                self._point(fix.x + 0.25 * fix.vx, fix.y + 0.25 * fix.vy, out),
            ]
        else:
            velocity.action = Marker.DELETE
        markers.append(velocity)

        flow_marker = self._marker(header, "flow", Marker.LINE_LIST, Vector3(x=1.0 * mpp), _rgba((255, 60, 200), 0.9))
        if out.flow is not None:
            flow_marker.points = self._points(self._arrow_segments(out.flow.flow, out.flow_grid))
        if not flow_marker.points:
            flow_marker.action = Marker.DELETE
        markers.append(flow_marker)

        if self.show_patches:
            markers += self._patch_markers(fovea, header, mpp)

        markers += self._slip_markers(out, header, mpp)

        label = self._marker(header, "label", Marker.TEXT_VIEW_FACING, Vector3(z=14.0 * mpp), _rgba((255, 255, 255)))
        label.pose = Pose(position=self._point(fix.x, fix.y - fix.window_radius - 12.0, out), orientation=_IDENTITY)
        label.text = f"{fix.source.name.lower()} {fix.confidence:.2f}"
        markers.append(label)
        return MarkerArray(markers=markers)

    def _points(self, xy: np.ndarray) -> list[Point]:
        """(N, 2) pixel positions -> Points on the marker plane, converted in one vectorised step."""
        fx, fy, cx, cy = self._intrinsics
        xs = ((xy[:, 0] - cx) / fx * self.depth_m).tolist()
        ys = ((xy[:, 1] - cy) / fy * self.depth_m).tolist()
        return [Point(x=x, y=y, z=self.depth_m) for x, y in zip(xs, ys, strict=True)]

    def _arrow_segments(self, field: np.ndarray, grid: int) -> np.ndarray:
        """LINE_LIST end points (2 per segment) of flow arrows every ``flow_spacing_px``: a shaft
        three times the flow vector and a two-stroke head; vectors under 0.5 px are left out."""
        xs, ys = grid_centers(field.shape[:2], grid)
        step = max(1, self.flow_spacing_px // grid)
        rows, cols = np.arange(step // 2, field.shape[0], step), np.arange(step // 2, field.shape[1], step)
        uv = field[np.ix_(rows, cols)].reshape(-1, 2).astype(np.float64)
        x0 = np.repeat(np.asarray(xs, np.float64)[cols][None, :], len(rows), axis=0).reshape(-1)
        y0 = np.repeat(np.asarray(ys, np.float64)[rows][:, None], len(cols), axis=1).reshape(-1)
        keep = (uv**2).sum(axis=1) >= 0.25
        uv, x0, y0 = uv[keep], x0[keep], y0[keep]
        x1, y1 = x0 + 3 * uv[:, 0], y0 + 3 * uv[:, 1]
        angle = np.arctan2(y1 - y0, x1 - x0)
        head = 0.3 * np.hypot(x1 - x0, y1 - y0)
        tip = np.stack([x1, y1], axis=1)
        segments = [np.stack([x0, y0], axis=1), tip]
        for side in (-0.5, 0.5):
            barb = np.stack([x1 - head * np.cos(angle + side), y1 - head * np.sin(angle + side)], axis=1)
            segments += [tip, barb]
        # (A, 6, 2): per arrow the shaft's two ends, then each barb's two ends.
        return np.stack(segments, axis=1).reshape(-1, 2)

    def _patch_markers(self, layout, header: Header, mpp: float) -> list[Marker]:
        """Patch outlines, one LINE_LIST per pyramid level (a patch's level rounded; id = level) in
        that level's colour: a colour per marker instead of one per point halves the message objects."""
        half = 0.5 * layout.sizes.astype(np.float64)[:, None]
        offsets = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64)
        corners = layout.centers.astype(np.float64)[:, None, :] + half[..., None] * offsets  # (N, 4, 2)
        # Each edge i -> i + 1 of each square, as LINE_LIST point pairs.
        ends = corners[:, [0, 1, 1, 2, 2, 3, 3, 0], :]
        # Continuous mip level -> nearest level; the texture has no level past max_levels - 1.
        levels = np.minimum(np.rint(np.asarray(layout.levels)).astype(np.int64), self.max_levels - 1)
        colors = level_colors(np.arange(self.max_levels))
        markers = []
        for level in range(self.max_levels):
            color = _rgba(tuple(colors[level].tolist()), 0.8)
            marker = self._marker(header, "patches", Marker.LINE_LIST, Vector3(x=0.8 * mpp), color)
            marker.id = level
            chosen = levels == level
            if chosen.any():
                marker.points = self._points(ends[chosen].reshape(-1, 2))
            else:
                marker.action = Marker.DELETE
            markers.append(marker)
        return markers

    def _slip_markers(self, out: PipelineOutput, header: Header, mpp: float) -> list[Marker]:
        """Slip text (id 0) and arrow (id 1) at the held object while it slips; deleted otherwise."""
        red = _rgba((255, 40, 40))
        text = self._marker(header, "slip", Marker.TEXT_VIEW_FACING, Vector3(z=16.0 * mpp), red)
        arrow = self._marker(header, "slip", Marker.ARROW, Vector3(x=3.0 * mpp, y=8.0 * mpp, z=8.0 * mpp), red)
        arrow.id = 1
        event = out.slip
        if event is None or event.state.name == "CLEARED":
            text.action = arrow.action = Marker.DELETE
            return [text, arrow]
        x, y, w, h = event.region
        # The region holds pixel centres x .. x + w - 1.
        cx, cy = x + 0.5 * (w - 1), y + 0.5 * (h - 1)
        text.pose = Pose(position=self._point(cx, y - 10.0, out), orientation=_IDENTITY)
        text.text = f"SLIP {event.magnitude:.2f} px/frame"
        # The arrow shows 30 frames of the slip so sub-pixel motion is visible.
        length = 30.0 * event.magnitude
        arrow.points = [
            self._point(cx, cy, out),
            self._point(cx + length * event.direction[0], cy + length * event.direction[1], out),
        ]
        return [text, arrow]
