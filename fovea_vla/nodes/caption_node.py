"""caption_node: captions in their own process, at their own rate, only when the scene changed.

Inputs: ``caption_view`` (fovea_vla_msgs/CaptionView from fovea_node: the fovea crop, the
low-resolution periphery and the instruction), and for the event narration ``fixation``, ``stats``,
``slip``, ``policy_stats`` and ``action_chunk``; ``camera_info`` places the marker.
Outputs: ``caption`` (fovea_vla_msgs/Caption, stamped with the described frame's capture time),
``caption_text`` (std_msgs/String; both latched: a late subscriber gets the standing caption) and a
TEXT_VIEW_FACING marker near the fixation on ``markers`` (namespace ``caption``).

The model runs on a worker thread of this process, niced (``caption.nice``) and with few CPU threads,
so neither the node's own callbacks nor the action path in the other processes wait for it.
"""

from __future__ import annotations

import os
import socket
import sys
import time

import numpy as np
from builtin_interfaces.msg import Duration
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import Point, Pose, Quaternion, Vector3
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, RegionOfInterest
from std_msgs.msg import ColorRGBA, Header, String
from visualization_msgs.msg import Marker, MarkerArray

from fovea_vla.bringup import resolve_package_path
from fovea_vla.core.caption import (
    BACKENDS,
    CaptionConfig,
    CaptionRequest,
    CaptionResult,
    CaptionScheduler,
    FoveatedView,
    GpuGaps,
    PipelineSnapshot,
    VlmConfig,
    action_phase,
    make_captioner,
)
from fovea_vla.core.caption.vlm import DEFAULT_PROMPT
from fovea_vla.core.diagnostics import DiagnosticsMonitor, StageSample
from fovea_vla.core.frames import image_to_rgb
from fovea_vla.core.stats import LatencyTracker
from fovea_vla.nodes import qos
from fovea_vla.nodes.diagnostics import diagnostic_array, diagnostics_config, diagnostics_params
from fovea_vla.nodes.messages import CameraModel, ns_to_stamp, stamp_to_ns
from fovea_vla.nodes.params import ConfigError, ParamSpec, declare_all
from fovea_vla.nodes.runner import run_node
from fovea_vla_msgs.msg import ActionChunk, Caption, CaptionView, Fixation, PipelineStats, PolicyStats, SlipEvent

# The stage caption_node reports on /diagnostics.
DIAGNOSED_STAGES = ("captions",)

PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec(
        "caption.backend",
        "auto",
        "Captioner: vlm (a local model; event narration if it cannot load), events, or auto (vlm when "
        "caption.model_path is set).",
        choices=BACKENDS,
    ),
    ParamSpec(
        "caption.model_path",
        "",
        "Local folder of a SmolVLM-class image-text-to-text model (save_pretrained layout; a path or "
        "package://<package>/<path>); never downloaded.",
    ),
    ParamSpec("caption.device", "auto", "Torch device of the model: auto, cpu or cuda[:N]."),
    ParamSpec(
        "caption.dtype",
        "auto",
        "Model precision; auto = bfloat16 on CUDA, float32 on CPU.",
        choices=("auto", "float32", "float16", "bfloat16"),
    ),
    ParamSpec("caption.rate_hz", 1.0, "Most captions per second [Hz].", range=(0.01, 30.0)),
    ParamSpec("caption.max_new_tokens", 40, "Longest model caption [tokens].", range=(1, 512)),
    ParamSpec("caption.num_threads", 1, "Torch CPU threads of the captioner process.", range=(1, 256)),
    ParamSpec(
        "caption.nice", 10, "Scheduling niceness of the captioner process (higher yields the CPU).", range=(0, 19)
    ),
    ParamSpec(
        "caption.sched_idle",
        True,
        "Run the captioner under SCHED_IDLE (Linux): only on CPU time the action path leaves free; captions "
        "slow down on a saturated CPU instead of the action path.",
    ),
    ParamSpec(
        "caption.change_threshold",
        3.0,
        "Mean grey-level difference of the view's thumbnails that counts as a changed scene.",
        range=(0.0, 255.0),
    ),
    ParamSpec(
        "caption.gpu_gaps.window_ms",
        8.0,
        "A model on a GPU starts its work (prefill, each token) only this long after fovea_node finished a frame, "
        "so it runs between the action path's frames; 0 = no gating [ms].",
        range=(0.0, 1000.0),
    ),
    ParamSpec(
        "caption.gpu_gaps.timeout_ms",
        200.0,
        "Longest wait for a frame before a GPU step goes anyway (no camera, no action path) [ms].",
        range=(1.0, 10000.0),
    ),
    ParamSpec("caption.cut_memory_s", 3.0, "How long the narration mentions a scene cut [s].", range=(0.1, 600.0)),
    ParamSpec("caption.prompt", DEFAULT_PROMPT, "Model prompt; {context} becomes the instruction and events."),
    ParamSpec("caption.marker_lifetime_s", 10.0, "Lifetime of the caption marker [s].", range=(0.1, 3600.0)),
    ParamSpec("markers.depth_m", 1.0, "Distance of the marker plane in front of the camera [m].", range=(0.01, 100.0)),
    ParamSpec("default_fov_deg", 60.0, "Horizontal field of view until camera_info arrives [deg].", range=(1.0, 179.0)),
)
PARAMS += diagnostics_params(DIAGNOSED_STAGES)

_FIXATION_SOURCES = {
    Fixation.SOURCE_DEFAULT: "default",
    Fixation.SOURCE_PURSUIT: "pursuit",
    Fixation.SOURCE_SACCADE: "saccade",
    Fixation.SOURCE_EXTERNAL: "external",
    Fixation.SOURCE_QUERY: "query",
}
_DECISIONS = {
    PipelineStats.DECISION_FIRST: "first",
    PipelineStats.DECISION_STATIC: "static",
    PipelineStats.DECISION_PARTIAL: "partial",
    PipelineStats.DECISION_FULL: "full",
    PipelineStats.DECISION_CUT: "cut",
    PipelineStats.DECISION_REFRESH: "refresh",
}
_SLIP_STATES = {SlipEvent.STATE_ONSET: "onset", SlipEvent.STATE_ONGOING: "ongoing", SlipEvent.STATE_CLEARED: "cleared"}
_KINDS = {"vlm": Caption.KIND_VLM, "events": Caption.KIND_EVENTS}
_MARKER_COLORS = {"vlm": ColorRGBA(r=1.0, g=1.0, b=1.0, a=0.95), "events": ColorRGBA(r=0.6, g=0.9, b=1.0, a=0.95)}


def caption_config(values: dict) -> CaptionConfig:
    """The captioner's configuration from the node's parameter values (errors name the parameter)."""
    try:
        vlm = None
        if values["caption.model_path"]:
            vlm = VlmConfig(
                model_path=resolve_package_path(values["caption.model_path"]),
                device=values["caption.device"],
                dtype=values["caption.dtype"],
                max_new_tokens=values["caption.max_new_tokens"],
                num_threads=values["caption.num_threads"],
                prompt=values["caption.prompt"],
            )
        return CaptionConfig(
            backend=values["caption.backend"],
            vlm=vlm,
            change_threshold=values["caption.change_threshold"],
            cut_memory_s=values["caption.cut_memory_s"],
        )
    except ValueError as exc:
        raise ConfigError(f"caption.{exc}") from exc


def _image_array(msg) -> np.ndarray:
    """RGB of a sensor_msgs/Image through the package's converter (raises FrameError, a ValueError)."""
    return image_to_rgb(msg.data, msg.width, msg.height, msg.encoding, msg.step, bool(msg.is_bigendian))


class CaptionNode(Node):
    """Schedules a captioner on the pipeline's views and events and publishes what it says."""

    NODE_NAME = "caption_node"

    def __init__(self, **kwargs):
        super().__init__(self.NODE_NAME, **kwargs)
        try:
            self.params = declare_all(self, PARAMS)
            cfg = caption_config(self.params)
            self.diagnostics = DiagnosticsMonitor(diagnostics_config(self.params, DIAGNOSED_STAGES))
        except ValueError as exc:
            raise ConfigError(f"caption_node: invalid configuration: {exc}") from exc
        p = self.params
        # Before the model's threads exist, so they inherit it: SCHED_IDLE runs the captioner only on CPU
        # time nothing else wants (a niced thread still takes its share on a saturated machine).
        os.nice(p["caption.nice"])
        if p["caption.sched_idle"] and hasattr(os, "SCHED_IDLE"):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        window_ms = p["caption.gpu_gaps.window_ms"]
        self.gaps = GpuGaps(window_ms * 1e-3, p["caption.gpu_gaps.timeout_ms"] * 1e-3) if window_ms > 0 else None
        captioner, reason = make_captioner(cfg, self.gaps)
        log = self.get_logger().error if cfg.backend == "vlm" and captioner.kind != "vlm" else self.get_logger().info
        log(f"caption backend: {captioner.name} ({reason})")
        self.scheduler = CaptionScheduler(captioner, self._publish, self._on_caption_error)
        self.camera = CameraModel(p["default_fov_deg"])

        self._view: CaptionView | None = None
        self._view_image: FoveatedView | None = None
        self._fixation: Fixation | None = None
        self._stats: PipelineStats | None = None
        self._last_cut_ns: int | None = None
        self._slip: SlipEvent | None = None
        self._policy: PolicyStats | None = None
        self._phase: str | None = None
        self.bad_views = 0

        sensor = qos.sensor("reliable", 1)
        self.create_subscription(CaptionView, "caption_view", self._on_view, sensor)
        self.create_subscription(Fixation, "fixation", self._on_fixation, qos.outputs(1))
        self.create_subscription(PipelineStats, "stats", self._on_stats, qos.outputs(5))
        self.create_subscription(SlipEvent, "slip", self._on_slip, qos.outputs(5))
        self.create_subscription(PolicyStats, "policy_stats", self._on_policy, qos.outputs(1))
        self.create_subscription(ActionChunk, "action_chunk", self._on_chunk, qos.outputs(1))
        self.create_subscription(CameraInfo, "camera_info", self.camera.update, qos.sensor())
        latched = QoSProfile(
            history=HistoryPolicy.KEEP_LAST,
            depth=1,
            reliability=ReliabilityPolicy.RELIABLE,
            durability=DurabilityPolicy.TRANSIENT_LOCAL,
        )
        # Latched: a late subscriber (RViz, a logger) gets the standing caption, which may be minutes old.
        self.pub_caption = self.create_publisher(Caption, "caption", latched)
        self.pub_text = self.create_publisher(String, "caption_text", latched)
        self.pub_markers = self.create_publisher(MarkerArray, "markers", qos.outputs())
        self.create_timer(1.0 / p["caption.rate_hz"], self._tick)
        self.latency = LatencyTracker()
        self._last_input_s: float | None = None
        self._backend_reason = reason
        model = getattr(captioner, "model", None)
        self._hardware_id = f"{socket.gethostname()} {model.device if model is not None else 'cpu'}"
        self.pub_diagnostics = self.create_publisher(DiagnosticArray, "/diagnostics", qos.outputs())
        if p["diagnostics.rate_hz"] > 0:
            self.create_timer(1.0 / p["diagnostics.rate_hz"], self._publish_diagnostics)

    # -- inputs -----------------------------------------------------------------------------
    def _on_view(self, msg: CaptionView) -> None:
        try:
            fovea, periphery = _image_array(msg.fovea), _image_array(msg.periphery)
        except ValueError as exc:
            self.bad_views += 1
            self.get_logger().warning(f"caption_view dropped: {exc}", throttle_duration_sec=5.0)
            return
        r = msg.fovea_region
        self._view = msg
        self._last_input_s = time.monotonic()
        self._view_image = FoveatedView(
            fovea=fovea,
            periphery=periphery,
            region=(r.x_offset, r.y_offset, r.width, r.height),
            source_size=(msg.fixation.image_width, msg.fixation.image_height),
        )

    def _on_fixation(self, msg: Fixation) -> None:
        # A fixation comes out when fovea_node has finished a frame's GPU work.
        if self.gaps is not None:
            self.gaps.frame_done()
        self._fixation = msg
        self._last_input_s = time.monotonic()

    def _on_stats(self, msg: PipelineStats) -> None:
        self._stats = msg
        if msg.decision == PipelineStats.DECISION_CUT:
            self._last_cut_ns = stamp_to_ns(msg.header.stamp)

    def _on_slip(self, msg: SlipEvent) -> None:
        self._slip = msg

    def _on_policy(self, msg: PolicyStats) -> None:
        self._policy = msg

    def _on_chunk(self, msg: ActionChunk) -> None:
        if msg.num_steps * msg.num_dims != len(msg.actions) or msg.num_dims != len(msg.dim_names):
            return
        actions = np.asarray(msg.actions, dtype=np.float64).reshape(msg.num_steps, msg.num_dims)
        self._phase = action_phase(actions, list(msg.dim_names))

    # -- scheduling ---------------------------------------------------------------------------
    def _snapshot(self) -> PipelineSnapshot | None:
        stamps = [stamp_to_ns(m.header.stamp) for m in (self._fixation, self._stats, self._view) if m is not None]
        if not stamps:
            return None
        stamp_ns = max(stamps)
        fixation = self._fixation or (self._view.fixation if self._view is not None else None)
        since_cut = None if self._last_cut_ns is None else max(0.0, (stamp_ns - self._last_cut_ns) * 1e-9)
        return PipelineSnapshot(
            stamp_ns=stamp_ns,
            fixation_source=None if fixation is None else _FIXATION_SOURCES.get(fixation.source, "default"),
            fixation_uv=None if fixation is None else (float(fixation.u), float(fixation.v)),
            fixation_speed_px_s=0.0
            if fixation is None
            else float(abs(complex(fixation.velocity_x, fixation.velocity_y))),
            decision=None if self._stats is None else _DECISIONS.get(self._stats.decision),
            changed_fraction=0.0 if self._stats is None else float(self._stats.changed_fraction),
            seconds_since_cut=since_cut,
            slip=None if self._slip is None else _SLIP_STATES.get(self._slip.state),
            policy_status=None if self._policy is None else self._policy.status,
            actions_enabled=None if self._policy is None else bool(self._policy.actions_enabled),
            action_phase=self._phase,
            instruction="" if self._view is None else self._view.instruction,
        )

    def _tick(self) -> None:
        snapshot = self._snapshot()
        request = None
        if snapshot is not None:
            view = self._view
            fixation = view.fixation if view is not None else self._fixation
            request = CaptionRequest(
                snapshot=snapshot,
                view=self._view_image,
                view_stamp_ns=None if view is None else stamp_to_ns(view.header.stamp),
                frame_id=(view or self._fixation or self._stats).header.frame_id,
                fixation_xy=None if fixation is None else (float(fixation.x), float(fixation.y)),
                tag=fixation,
            )
        self.scheduler.offer(request)
        if self.scheduler.last is not None:
            self.pub_markers.publish(MarkerArray(markers=[self._marker(self.scheduler.last)]))

    # -- outputs ----------------------------------------------------------------------------
    def _publish(self, result: CaptionResult) -> None:
        header = Header(stamp=ns_to_stamp(result.stamp_ns), frame_id=result.request.frame_id)
        request = result.request
        caption = Caption(
            header=header,
            text=result.text,
            kind=_KINDS[result.kind],
            backend=result.backend,
            latency_ms=float((self.get_clock().now().nanoseconds - result.stamp_ns) * 1e-6),
        )
        if result.kind == "vlm" and request.view is not None:
            x, y, w, h = request.view.region
            caption.region = RegionOfInterest(x_offset=x, y_offset=y, width=w, height=h)
        if request.tag is not None:
            caption.fixation = request.tag
        self.latency.add("caption", caption.latency_ms)
        self.pub_caption.publish(caption)
        self.pub_text.publish(String(data=result.text))
        self.pub_markers.publish(MarkerArray(markers=[self._marker(result)]))
        self.get_logger().info(f"caption ({result.backend}, {result.compute_ms:.0f} ms): {result.text}")

    def _on_caption_error(self, exc: Exception) -> None:
        self.get_logger().error(f"captioner failed ({type(exc).__name__}: {exc})", throttle_duration_sec=5.0)

    def _marker(self, result: CaptionResult) -> Marker:
        request = result.request
        width, height = request.view.source_size if request.view is not None else (0, 0)
        fixation = self._fixation
        if not width and fixation is not None:
            width, height = fixation.image_width, fixation.image_height
        x, y = request.fixation_xy or ((width - 1) / 2.0, (height - 1) / 2.0)
        depth = self.params["markers.depth_m"]
        lift_px = 0.12 * max(height, 1)  # above the fixation, clear of the fovea ring
        px, py, pz = self.camera.unproject(x, max(0.0, y - lift_px), max(width, 1), max(height, 1), depth)
        lifetime = self.params["caption.marker_lifetime_s"]
        return Marker(
            header=Header(stamp=ns_to_stamp(result.stamp_ns), frame_id=request.frame_id),
            ns="caption",
            id=0,
            type=Marker.TEXT_VIEW_FACING,
            action=Marker.ADD,
            pose=Pose(position=Point(x=px, y=py, z=pz), orientation=Quaternion(w=1.0)),
            scale=Vector3(z=0.04 * depth),
            color=_MARKER_COLORS[result.kind],
            text=result.text if result.kind == "vlm" else f"[events] {result.text}",
            lifetime=Duration(sec=int(lifetime), nanosec=int((lifetime % 1.0) * 1e9)),
        )

    def _publish_diagnostics(self) -> None:
        now = time.monotonic()
        counters = dict(self.scheduler.counters)
        sample = StageSample(
            name="captions",
            latency_p99_ms=self.latency.percentile("caption", 99),
            received=counters.get("captions", 0),
            drops=counters.get("errors", 0),
            age_s=None if self._last_input_s is None else now - self._last_input_s,
            backend=self.scheduler.captioner.name,
            details={"reason": self._backend_reason, "bad_views": self.bad_views, **counters},
        )
        statuses = self.diagnostics.update([sample], now)
        stamp = self.get_clock().now().to_msg()
        self.pub_diagnostics.publish(
            diagnostic_array(statuses, self.get_fully_qualified_name(), self._hardware_id, stamp)
        )

    def destroy_node(self):
        self.scheduler.close()
        return super().destroy_node()


def main(args=None) -> int:
    return run_node(CaptionNode, args)


if __name__ == "__main__":
    sys.exit(main())
