"""fovea_node: camera frames in; fixation, markers, debug image and stats out.

Subscribes ``image`` (sensor_msgs/Image) or ``image/compressed`` (sensor_msgs/CompressedImage),
and ``camera_info``; runs :class:`fovea_vla.core.pipeline.FoveaPipeline` on each fresh frame and
publishes ``fixation``, ``fixations``, ``markers``, ``debug_image`` and ``stats``, every one
stamped with the capture stamp and frame_id of the frame it came from. Services
``set_fixation`` and ``set_instruction``; RViz's Publish Point tool on ``clicked_point``.
A managed (lifecycle) node: see :class:`FoveaNode` for what each transition does.
"""

from __future__ import annotations

import dataclasses
import socket
import sys
import threading
import time
from collections.abc import Callable

import cv2
import numpy as np
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PointStamped
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, JointState, RegionOfInterest
from std_msgs.msg import Bool, Header, String
from visualization_msgs.msg import MarkerArray

from fovea_vla.bringup import resolve_package_path
from fovea_vla.core.caption.view import ViewConfig, compose_view
from fovea_vla.core.coherence import CoherenceConfig
from fovea_vla.core.decode import DecodeConfig, make_image_decoder, make_video_decoder
from fovea_vla.core.diagnostics import DiagnosticsMonitor, StageSample
from fovea_vla.core.encoder import ARCHITECTURES, EncoderConfig
from fovea_vla.core.fixation import FixationConfig
from fovea_vla.core.flow import FlowConfig
from fovea_vla.core.flow.motion import MotionConfig
from fovea_vla.core.foveation import AdaptiveBudgetConfig, FoveationConfig
from fovea_vla.core.frames import FrameError
from fovea_vla.core.handoff import NewestQueue
from fovea_vla.core.overlay import draw_overlay
from fovea_vla.core.pipeline import FoveaPipeline, PipelineConfig, PipelineOutput, TokenUpdate
from fovea_vla.core.policy.observation import TokenFrame, token_positions
from fovea_vla.core.slip import SlipConfig, project_box
from fovea_vla.core.slip_stage import Grasp, SlipStageConfig
from fovea_vla.core.stats import DropCounter, LatencyTracker, RateMeter
from fovea_vla.core.texture import TextureConfig
from fovea_vla.nodes import qos
from fovea_vla.nodes.diagnostics import (
    diagnostic_array,
    diagnostics_config,
    diagnostics_params,
)
from fovea_vla.nodes.lifecycle import AUTOSTART, ManagedNode, lifecycle_statuses
from fovea_vla.nodes.markers import MarkerBuilder, delete_all
from fovea_vla.nodes.messages import (
    CameraModel,
    MessageError,
    fixation_array_msg,
    fixation_msg,
    frame_from_compressed,
    frame_from_image,
    frames_from_video,
    image_msg,
    joint_positions,
    ns_to_stamp,
    slip_msg,
    stage_latencies,
)
from fovea_vla.nodes.params import ConfigError, ParamSpec
from fovea_vla.nodes.runner import run_node
from fovea_vla_msgs.msg import (
    BackendChoice,
    CaptionView,
    CompressedVideo,
    DropCount,
    Fixation,
    FixationArray,
    PipelineStats,
    SlipEvent,
    StageLatency,
)
from fovea_vla_msgs.srv import SetFixation, SetInstruction

# The stages fovea_node reports on /diagnostics.
DIAGNOSED_STAGES = ("ingest", "flow", "texture", "encoder", "fixation", "slip")

PARAMS: tuple[ParamSpec, ...] = (
    AUTOSTART,
    ParamSpec(
        "image_transport",
        "raw",
        "Which camera topic to subscribe: `image` (raw), `image/compressed` (JPEG / PNG) or `image/video` "
        "(fovea_vla_msgs/CompressedVideo: H.264 / H.265 packets).",
        choices=("raw", "compressed", "video"),
    ),
    ParamSpec(
        "decode.backend",
        "auto",
        "Decoder of `image` and `image/compressed`: nvjpeg (JPEG on the GPU, raw frames through one pinned copy) "
        "or opencv (CPU); `auto` picks the best available.",
        choices=("auto", "nvjpeg", "opencv"),
    ),
    ParamSpec(
        "decode.video_backend",
        "auto",
        "Decoder of `image/video`: nvdec (the GPU's video engine) or ffmpeg (CPU); `auto` picks the best available.",
        choices=("auto", "nvdec", "ffmpeg"),
    ),
    ParamSpec(
        "decode.device",
        "auto",
        "Device of the GPU decoders: auto (the texture's device, so frames go to it without a copy), cpu or cuda[:N].",
    ),
    ParamSpec(
        "sensor_qos.reliability", "best_effort", "Reliability of the camera subscriptions.", choices=qos.RELIABILITIES
    ),
    ParamSpec(
        "sensor_qos.depth", 1, "Queue depth of the camera subscriptions (1 = always the newest frame).", range=(1, 100)
    ),
    ParamSpec(
        "max_frame_age_ms",
        500.0,
        "Frames older than this (capture stamp to arrival) are dropped and counted as `stale`; 0 disables the check.",
        range=(0.0, 60000.0),
        read_only=False,
    ),
    ParamSpec(
        "max_image_pixels", 16_777_216, "Larger frames are refused (counted as `too_large`).", range=(1, 268_435_456)
    ),
    ParamSpec(
        "default_fov_deg",
        60.0,
        "Horizontal field of view assumed until a CameraInfo arrives [deg].",
        range=(1.0, 179.0),
    ),
    ParamSpec(
        "instruction",
        "",
        "Instruction in force until one arrives on `instruction` or `set_instruction` (the policy follows it).",
    ),
    ParamSpec("flow.enabled", True, "Compute optical flow between consecutive frames (drives pursuit)."),
    ParamSpec(
        "flow.backend",
        "auto",
        "Optical-flow backend; `auto` picks the best available.",
        choices=("auto", "vpi", "nvof", "torch", "dis"),
    ),
    ParamSpec("flow.grid", 4, "Flow output grid [px]: 1 = dense, 4 = one vector per 4x4 block.", range=(1, 4)),
    ParamSpec("flow.preset", "ultrafast", "Flow quality preset.", choices=("ultrafast", "fast", "medium", "slow")),
    ParamSpec("flow.scale", 0.5, "Frames are resized by this factor before flow.", range=(0.05, 1.0)),
    ParamSpec("motion.tile_size", 32, "Tile side for changed-tile detection [px].", range=(4, 512)),
    ParamSpec(
        "motion.ego_model",
        "affine",
        "Camera-motion model fitted to the flow (RANSAC).",
        choices=("translation", "affine", "homography"),
    ),
    ParamSpec(
        "motion.photometric_threshold",
        8.0,
        "Mean absolute grey-level change that marks a tile changed even without motion.",
        range=(0.0, 255.0),
    ),
    ParamSpec(
        "motion.device",
        "cpu",
        "Where the motion analysis runs: cpu (NumPy/OpenCV) or cuda[:N] (torch on that GPU; the camera-motion fit "
        "stays on the CPU).",
    ),
    ParamSpec(
        "texture.backend",
        "auto",
        "Texture pyramid backend; `auto` picks the best available.",
        choices=("auto", "gl", "cupy", "torch"),
    ),
    ParamSpec("texture.device", "auto", "Torch device of the sampled patches: auto, cpu or cuda[:N]."),
    ParamSpec(
        "texture.cpu_threads",
        1,
        "Torch threads when the texture runs on the CPU (1 avoids oversubscribing shared cores); 0 = torch default.",
        range=(0, 1024),
    ),
    ParamSpec(
        "texture.max_levels",
        8,
        "Most mip levels kept (level 0 included); coarser footprints sample the top level.",
        range=(1, 16),
    ),
    ParamSpec(
        "texture.incremental_mips_max_fraction",
        1.0,
        "Rebuild the mips only over dirty tiles while they cover at most this share of the frame, else whole "
        "(on a fast GPU one whole rebuild costs less than many small ones).",
        range=(0.0, 1.0),
    ),
    ParamSpec("coherence.enabled", True, "Upload only dirty tiles and reuse tokens on static frames."),
    ParamSpec("coherence.tile_size", 32, "Dirty-tile side [px].", range=(4, 512)),
    ParamSpec(
        "coherence.change_threshold",
        3.0,
        "Mean absolute grey-level difference from the texture above which a tile is re-uploaded; 0 = any change.",
        range=(0.0, 255.0),
    ),
    ParamSpec(
        "coherence.full_upload_fraction",
        0.6,
        "Share of dirty tiles above which the whole frame is uploaded.",
        range=(0.01, 1.0),
    ),
    ParamSpec(
        "coherence.max_token_age_s",
        2.0,
        "The texture is fully refreshed when its last full upload is older than this [s].",
        range=(0.01, 3600.0),
    ),
    ParamSpec(
        "coherence.max_fixation_shift_px",
        0.5,
        "With reencode all: cached tokens are reused only while every fixation stays within this distance [px].",
        range=(0.0, 10000.0),
    ),
    ParamSpec(
        "coherence.reencode",
        "changed",
        "changed: sample and encode again only the tokens a texture update reached or the layout moved (the others "
        "keep their cached tokens; approximate until the next whole encode); all: encode every token of a frame "
        "that changed (exact).",
        choices=("changed", "all"),
    ),
    ParamSpec(
        "coherence.token_shift_fraction",
        0.25,
        "With reencode changed: a token keeps its cached position while the layout moves it by at most this share "
        "of its footprint.",
        range=(0.0, 0.5),
    ),
    ParamSpec(
        "coherence.max_reencode_fraction",
        0.75,
        "With reencode changed: share of changed tokens above which the whole frame is encoded.",
        range=(0.01, 1.0),
    ),
    ParamSpec(
        "coherence.max_partial_encodes",
        8,
        "With reencode changed: consecutive frames encoded only in part after which the next changed frame is "
        "encoded whole (bounds how stale the kept tokens get).",
        range=(1, 10000),
    ),
    ParamSpec("foveation.num_tokens", 273, "Foveated patches per frame (token budget).", range=(1, 16384)),
    ParamSpec(
        "foveation.adaptive.enabled",
        False,
        "Adapt the token budget to scene complexity and a latency target (else num_tokens on every frame).",
    ),
    ParamSpec("foveation.adaptive.min_tokens", 128, "Smallest adaptive budget.", range=(1, 16384)),
    ParamSpec("foveation.adaptive.max_tokens", 512, "Largest adaptive budget.", range=(1, 16384)),
    ParamSpec(
        "foveation.adaptive.step", 32, "Adaptive budgets are multiples of this (one CUDA graph each).", range=(1, 16384)
    ),
    ParamSpec(
        "foveation.adaptive.latency_target_ms",
        10.0,
        "Target time of sampling + encoding [ms]; slower frames shed tokens.",
        range=(0.1, 10000.0),
    ),
    ParamSpec("foveation.patch_size", 16, "Samples per patch side.", range=(2, 64)),
    ParamSpec(
        "foveation.e0_fraction",
        0.3,
        "Fovea size e0 as a fraction of the image half-diagonal (M(e) = M0 / (e + e0)).",
        range=(0.01, 4.0),
    ),
    ParamSpec(
        "foveation.e0_deg",
        0.0,
        "Fovea size e0 in degrees, used when CameraInfo is known; 0 = use e0_fraction.",
        range=(0.0, 89.0),
    ),
    ParamSpec("encoder.enabled", True, "Encode the foveated patches into tokens with the foveated ViT."),
    ParamSpec(
        "encoder.asynchronous",
        False,
        "Encode on a worker thread over the newest patches, so flow and fixation keep the camera rate where "
        "the encoder is slower than the camera (tokens then come at the encoder's rate).",
    ),
    ParamSpec(
        "encoder.architecture",
        "vit_base_patch16",
        "ViT size (timm dims); a checkpoint must match it.",
        choices=tuple(ARCHITECTURES),
    ),
    ParamSpec(
        "encoder.depth",
        0,
        "Transformer blocks run (a checkpoint with more keeps its first ones); 0 = the architecture's own.",
        range=(0, 64),
    ),
    ParamSpec(
        "encoder.checkpoint",
        "",
        "Local .safetensors ViT checkpoint (timm, Hugging Face or our own layout; a path or "
        "package://<package>/<path>); empty = seeded random init.",
    ),
    ParamSpec("encoder.checkpoint_format", "auto", "Checkpoint key layout.", choices=("auto", "timm", "hf")),
    ParamSpec(
        "encoder.dtype",
        "auto",
        "Encoder precision; auto = float16 on CUDA, float32 on the CPU.",
        choices=("auto", "float32", "float16", "bfloat16"),
    ),
    ParamSpec("encoder.device", "auto", "Torch device of the encoder: auto, cpu or cuda[:N]."),
    ParamSpec("encoder.cuda_graphs", True, "Replay one CUDA graph per token budget (CUDA only)."),
    ParamSpec(
        "fixation.window_fraction",
        0.15,
        "Pursuit window radius as a fraction of the image half-diagonal.",
        range=(0.01, 1.0),
    ),
    ParamSpec(
        "fixation.motion_threshold_px",
        0.6,
        "Flow inside the pursuit window counted as the target's motion [px/frame].",
        range=(0.01, 100.0),
    ),
    ParamSpec(
        "fixation.min_moving_fraction", 0.04, "Share of the window that must move for pursuit.", range=(0.001, 1.0)
    ),
    ParamSpec("fixation.alpha", 0.5, "Position gain of the pursuit alpha-beta filter.", range=(0.01, 1.0)),
    ParamSpec("fixation.beta", 0.05, "Velocity gain of the pursuit alpha-beta filter.", range=(0.0, 0.99)),
    ParamSpec(
        "fixation.velocity_gain",
        0.5,
        "Weight of the window's measured median flow in the velocity estimate.",
        range=(0.0, 1.0),
    ),
    ParamSpec(
        "fixation.coast_s", 0.5, "Time pursuit coasts on its prediction through an occlusion [s].", range=(0.0, 10.0)
    ),
    ParamSpec(
        "fixation.latency_s",
        0.0,
        "Pipeline latency compensated: the published fixation is predicted this far ahead of the capture time [s].",
        range=(0.0, 1.0),
    ),
    ParamSpec(
        "fixation.acquire_after_s", 0.4, "Idle time in the fovea before an `idle` saccade [s].", range=(0.0, 60.0)
    ),
    ParamSpec(
        "fixation.saccade_rate_hz",
        4.0,
        "Scheduled saccades per second while not pursuing; 0 = only on events.",
        range=(0.0, 30.0),
    ),
    ParamSpec(
        "fixation.saccade_events",
        "new_motion,cut,instruction,idle",
        "Comma-separated events that trigger a saccade (new_motion, cut, instruction, idle; empty = none).",
    ),
    ParamSpec(
        "fixation.min_saccade_interval_s",
        0.25,
        "Shortest time from a saccade to an event-triggered saccade [s].",
        range=(0.0, 60.0),
    ),
    ParamSpec(
        "fixation.ior_window_s",
        1.0,
        "Inhibition of return: a visited target is avoided this long [s].",
        range=(0.0, 60.0),
    ),
    ParamSpec(
        "fixation.ior_radius_fraction",
        0.15,
        "Inhibition-of-return radius as a fraction of the half-diagonal.",
        range=(0.0, 1.0),
    ),
    ParamSpec(
        "fixation.saliency_weight", 0.5, "Weight of image saliency in the saccade priority map.", range=(0.0, 100.0)
    ),
    ParamSpec(
        "fixation.motion_weight", 1.0, "Weight of independent motion in the saccade priority map.", range=(0.0, 100.0)
    ),
    ParamSpec("fixation.num_fixations", 1, "Simultaneous fixations sharing the token budget.", range=(1, 8)),
    ParamSpec(
        "fixation.primary_weight",
        0.5,
        "Budget share of the primary fixation when num_fixations > 1.",
        range=(0.05, 1.0),
    ),
    ParamSpec(
        "fixation.external_hold_s",
        3.0,
        "Hold time of set_fixation / clicked_point requests without their own [s].",
        range=(0.01, 3600.0),
    ),
    ParamSpec("slip.enabled", False, "Run grasp-slip detection (needs the regions and a gripper state)."),
    ParamSpec(
        "slip.gripper_region",
        (0, 0, 0, 0),
        "Gripper rectangle x, y, w, h in the image [px]; all 0 = use slip.gripper_box_m.",
        range=(0, 65535),
    ),
    ParamSpec(
        "slip.object_region",
        (0, 0, 0, 0),
        "Held-object rectangle x, y, w, h in the image [px]; all 0 = use slip.object_box_m.",
        range=(0, 65535),
    ),
    ParamSpec(
        "slip.gripper_box_m",
        (0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
        "Gripper box in the camera optical frame: centre x, y, z and size x, y, z [m], projected with camera_info.",
        range=(-100.0, 100.0),
    ),
    ParamSpec(
        "slip.object_box_m",
        (0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
        "Held-object box in the camera optical frame: centre x, y, z and size x, y, z [m], projected with camera_info.",
        range=(-100.0, 100.0),
    ),
    ParamSpec(
        "slip.gripper_joint",
        "",
        "JointState joint whose position tells the gripper state (topic "
        "gripper_joint_states); empty = only the Bool topic gripper_closed.",
    ),
    ParamSpec(
        "slip.closed_above",
        0.02,
        "The gripper counts as closed when the joint position exceeds this.",
        range=(-1000.0, 1000.0),
    ),
    ParamSpec(
        "slip.onset_threshold_px", 0.2, "Relative object motion that counts as slip [px/frame].", range=(0.01, 100.0)
    ),
    ParamSpec("slip.k_frames", 2, "Consecutive slipping frames before an onset event.", range=(1, 100)),
    ParamSpec(
        "slip.flow_backend",
        "dis",
        "Flow backend of the slip stage (dense, full resolution, on a crop).",
        choices=("auto", "vpi", "nvof", "torch", "dis"),
    ),
    ParamSpec(
        "slip.flow_preset", "slow", "Flow preset of the slip stage.", choices=("ultrafast", "fast", "medium", "slow")
    ),
    ParamSpec("debug_image.enabled", True, "Publish `debug_image` (the frame with overlays).", read_only=False),
    ParamSpec(
        "debug_image.max_rate_hz",
        15.0,
        "Upper bound on the debug image rate; 0 = every frame [Hz].",
        range=(0.0, 1000.0),
        read_only=False,
    ),
    ParamSpec(
        "debug_image.max_width",
        960,
        "Debug images wider than this are downscaled; 0 = full size [px].",
        range=(0, 16384),
        read_only=False,
    ),
    ParamSpec("markers.depth_m", 1.0, "Distance of the marker plane in front of the camera [m].", range=(0.01, 100.0)),
    ParamSpec("markers.lifetime_s", 0.5, "Marker lifetime; 0 = until replaced [s].", range=(0.0, 60.0)),
    ParamSpec(
        "markers.flow_spacing_px", 48, "Spacing of flow arrows in markers and debug image [px].", range=(4, 1024)
    ),
    ParamSpec("markers.show_patches", True, "Draw every foveated patch footprint."),
    ParamSpec(
        "markers.rate_hz",
        10.0,
        "Marker rate, only while `markers` is subscribed; 0 = every processed frame [Hz].",
        range=(0.0, 240.0),
        read_only=False,
    ),
    ParamSpec(
        "caption_view.rate_hz",
        2.0,
        "Rate of `caption_view` (fovea crop + periphery for caption_node), only while subscribed; 0 = off [Hz].",
        range=(0.0, 30.0),
        read_only=False,
    ),
    ParamSpec(
        "caption_view.fovea_fraction",
        0.4,
        "Side of the caption view's fovea crop as a fraction of the image's shorter side.",
        range=(0.05, 1.0),
    ),
    ParamSpec("caption_view.fovea_size", 384, "Side of the caption view's fovea image [px].", range=(16, 4096)),
    ParamSpec(
        "caption_view.periphery_size", 384, "Longest side of the caption view's periphery image [px].", range=(16, 4096)
    ),
)

PARAMS += diagnostics_params(DIAGNOSED_STAGES)

# Fixation parameters that map one to one onto FixationConfig fields.
_FIXATION_FIELDS = tuple(
    spec.name.removeprefix("fixation.")
    for spec in PARAMS
    if spec.name.startswith("fixation.") and spec.name != "fixation.saccade_events"
)

# How often the `stats` percentiles are recomputed [s].
_PERCENTILES_PERIOD_S = 0.25
# At most one log line per drop reason in this period [s] (every drop is counted).
_DROP_LOG_PERIOD_S = 2.0

_DECISIONS = {
    "first": PipelineStats.DECISION_FIRST,
    "static": PipelineStats.DECISION_STATIC,
    "partial": PipelineStats.DECISION_PARTIAL,
    "full": PipelineStats.DECISION_FULL,
    "cut": PipelineStats.DECISION_CUT,
    "refresh": PipelineStats.DECISION_REFRESH,
}


def decode_config(values: dict, texture_device: str) -> DecodeConfig:
    """The decode stage's core configuration from the ROS parameters (``decode.device: auto`` = the texture's device).

    Raises:
        ConfigError: a value the core refuses (the message names the parameter).
    """
    try:
        return DecodeConfig(
            backend=values["decode.backend"],
            video_backend=values["decode.video_backend"],
            device=texture_device if values["decode.device"] == "auto" else values["decode.device"],
            max_pixels=values["max_image_pixels"],
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def pipeline_config(values: dict) -> PipelineConfig:
    """The one mapping from ROS parameter values onto the core configuration.

    Raises:
        ConfigError: a value the core refuses (the message names the parameter).
    """
    try:
        return PipelineConfig(
            flow=FlowConfig(
                backend=values["flow.backend"],
                grid=values["flow.grid"],
                preset=values["flow.preset"],
                scale=values["flow.scale"],
            ),
            flow_enabled=values["flow.enabled"],
            motion=MotionConfig(
                tile_size=values["motion.tile_size"],
                ego_model=values["motion.ego_model"],
                photometric_threshold=values["motion.photometric_threshold"],
                device=values["motion.device"],
            ),
            texture=TextureConfig(
                backend=values["texture.backend"],
                device=values["texture.device"],
                cpu_threads=values["texture.cpu_threads"],
                max_levels=values["texture.max_levels"],
                incremental_mips_max_fraction=values["texture.incremental_mips_max_fraction"],
            ),
            coherence=CoherenceConfig(
                enabled=values["coherence.enabled"],
                tile_size=values["coherence.tile_size"],
                change_threshold=values["coherence.change_threshold"],
                full_upload_fraction=values["coherence.full_upload_fraction"],
                max_token_age_s=values["coherence.max_token_age_s"],
                max_fixation_shift_px=values["coherence.max_fixation_shift_px"],
                reencode=values["coherence.reencode"],
                token_shift_fraction=values["coherence.token_shift_fraction"],
                max_reencode_fraction=values["coherence.max_reencode_fraction"],
                max_partial_encodes=values["coherence.max_partial_encodes"],
            ),
            adaptive_budget=AdaptiveBudgetConfig(
                enabled=values["foveation.adaptive.enabled"],
                min_tokens=values["foveation.adaptive.min_tokens"],
                max_tokens=values["foveation.adaptive.max_tokens"],
                step=values["foveation.adaptive.step"],
                latency_target_ms=values["foveation.adaptive.latency_target_ms"],
            ),
            foveation=FoveationConfig(
                num_tokens=values["foveation.num_tokens"],
                patch_size=values["foveation.patch_size"],
                e0_fraction=values["foveation.e0_fraction"],
                e0_deg=values["foveation.e0_deg"] or None,
            ),
            encoder=EncoderConfig(
                architecture=values["encoder.architecture"],
                depth=values["encoder.depth"] or None,
                checkpoint=resolve_package_path(values["encoder.checkpoint"]) or None,
                checkpoint_format=values["encoder.checkpoint_format"],
                dtype=values["encoder.dtype"],
                device=values["encoder.device"],
                cuda_graphs=values["encoder.cuda_graphs"],
            )
            if values["encoder.enabled"]
            else None,
            async_encoder=values["encoder.asynchronous"],
            slip=None
            if not values["slip.enabled"]
            else SlipStageConfig(
                detector=SlipConfig(
                    onset_threshold_px=values["slip.onset_threshold_px"],
                    clear_threshold_px=0.5 * values["slip.onset_threshold_px"],
                    k_frames=values["slip.k_frames"],
                ),
                flow=FlowConfig(
                    backend=values["slip.flow_backend"], preset=values["slip.flow_preset"], grid=1, scale=1.0
                ),
            ),
            fixation=FixationConfig(
                **{name: values[f"fixation.{name}"] for name in _FIXATION_FIELDS},
                saccade_events=tuple(e.strip() for e in values["fixation.saccade_events"].split(",") if e.strip()),
            ),
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


class FoveaNode(ManagedNode):
    """The per-frame pipeline as a managed (lifecycle) ROS node.

    Lifecycle (see :mod:`fovea_vla.nodes.lifecycle`): **configure** reads and checks the parameters,
    builds the pipeline (flow, texture, encoder: weights loaded, CUDA graphs captured) and the
    decoder, and creates the publishers (lifecycle publishers: silent while inactive), the services
    and the subscriptions that steer the node (``camera_info``, ``instruction``, ``clicked_point``,
    gripper state); **activate** subscribes to the camera and starts the frame thread;
    **deactivate** unsubscribes, lets the frame in hand finish, drops the queued ones (not counted)
    and stops the thread, keeping the pipeline's state (texture, fixation history, token cache);
    **cleanup** releases the pipeline's GPU / GL resources and the decoder.

    Args:
        token_sink: called with a :class:`TokenFrame` after every frame that has tokens (the
            in-process hand-off to the policy; see ``vla_stack``).
        frame_thread: process frames on the node's own thread (the camera callback only hands the
            message over, so the executor stays free and never polls a busy callback);
            False processes them inside the callback (deterministic, for tests).
        kwargs: passed to ``rclpy.lifecycle.LifecycleNode``.
    """

    NODE_NAME = "fovea_node"

    def __init__(self, token_sink: Callable[[TokenFrame], None] | None = None, frame_thread: bool = True, **kwargs):
        super().__init__(PARAMS, DIAGNOSED_STAGES, **kwargs)
        self._token_sink = token_sink
        self._use_frame_thread = frame_thread
        # Serialises the pipeline between the frame thread and the callbacks that steer it.
        self._pipeline_lock = threading.Lock()
        self._inbox: NewestQueue[tuple[Callable[[], list], int]] = NewestQueue()
        self._frame_thread: threading.Thread | None = None
        self._accepting = False  # camera messages are taken only while active
        self._instruction_listeners: list[Callable[[str], None]] = []
        self.instruction = ""
        self._instruction_received = False  # the `instruction` parameter applies until one arrives
        self.pipeline: FoveaPipeline | None = None
        # /diagnostics in every state: a node that is not active says so.
        self.pub_diagnostics = self.create_publisher(DiagnosticArray, "/diagnostics", qos.outputs())
        self._hardware_id = socket.gethostname()
        rate_hz = self.get_parameter("diagnostics.rate_hz").value  # read-only, range-checked when declared
        if isinstance(rate_hz, int | float) and rate_hz > 0:
            self.create_timer(1.0 / rate_hz, self._publish_diagnostics)
        self.add_on_set_parameters_callback(self._on_set_parameters)

    # -- lifecycle --------------------------------------------------------------------------
    def _configure(self) -> None:
        try:
            self.params = p = self.read_parameters()
            cfg = pipeline_config(p)
            # Tokens reach policy_node through _on_tokens before process() returns (synchronous encoder:
            # the policy starts while this node publishes), or from the encoder's own thread.
            self.pipeline = FoveaPipeline(cfg, on_tokens=self._on_tokens if self._token_sink is not None else None)
            decode_cfg = decode_config(p, self.pipeline.device)
            # Only the decoder of the subscribed topic is made: the other's libraries need not be present.
            if p["image_transport"] == "video":
                self.decoder, decode_choice = make_video_decoder(decode_cfg)
            else:
                self.decoder, decode_choice = make_image_decoder(decode_cfg)
            self.diagnostics = DiagnosticsMonitor(diagnostics_config(p, DIAGNOSED_STAGES))
        except (ValueError, RuntimeError) as exc:
            raise ConfigError(f"fovea_node: invalid configuration: {exc}") from exc
        self.backends = {"decode": decode_choice, **self.pipeline.backends}
        for stage, choice in self.backends.items():
            self.get_logger().info(f"{stage} backend: {choice.name} ({choice.reason})")

        self.camera = CameraModel(p["default_fov_deg"])
        self.markers = MarkerBuilder(
            self.camera,
            depth_m=p["markers.depth_m"],
            lifetime_s=p["markers.lifetime_s"],
            flow_spacing_px=p["markers.flow_spacing_px"],
            show_patches=p["markers.show_patches"],
            max_fixations=p["fixation.num_fixations"],
            max_levels=p["texture.max_levels"],
        )
        self.latency = LatencyTracker()
        self.drops = DropCounter()
        self.input_rate = RateMeter()
        self.frames_received = 0
        self.frames_processed = 0
        self._last_debug_s = self._last_markers_s = self._last_percentiles_s = -1e9
        self._markers_cleared = False
        self._percentiles: list[StageLatency] = []
        self._last_drop_log_s: dict[str, float] = {}

        self._sensor_qos = qos.sensor(p["sensor_qos.reliability"], p["sensor_qos.depth"])
        self.configured(self.create_subscription(CameraInfo, "camera_info", self._on_camera_info, self._sensor_qos))
        self.configured(self.create_subscription(PointStamped, "clicked_point", self._on_clicked_point, qos.outputs()))
        self.configured(self.create_subscription(String, "instruction", self._on_instruction, qos.outputs()))
        self.gripper_closed = False
        if p["slip.enabled"]:
            self.configured(
                self.create_subscription(
                    JointState, "gripper_joint_states", self._on_joint_states, qos.sensor("best_effort", 5)
                )
            )
            self.configured(self.create_subscription(Bool, "gripper_closed", self._on_gripper_closed, qos.outputs()))

        out = qos.outputs()
        publisher = self.create_lifecycle_publisher
        self.pub_fixation = self.configured(publisher(Fixation, "fixation", out))
        self.pub_fixations = self.configured(publisher(FixationArray, "fixations", out))
        self.pub_markers = self.configured(publisher(MarkerArray, "markers", out))
        self.pub_debug = self.configured(publisher(Image, "debug_image", qos.sensor("reliable", 2)))
        self.pub_stats = self.configured(publisher(PipelineStats, "stats", out))
        self.pub_slip = self.configured(publisher(SlipEvent, "slip", out))
        self.pub_caption_view = self.configured(publisher(CaptionView, "caption_view", qos.sensor("reliable", 1)))
        self.caption_view_cfg = ViewConfig(
            fovea_fraction=p["caption_view.fovea_fraction"],
            fovea_size=p["caption_view.fovea_size"],
            periphery_size=p["caption_view.periphery_size"],
        )
        self._last_caption_view_s = -1e9
        self.configured(self.create_service(SetFixation, "set_fixation", self._on_set_fixation))
        self.configured(self.create_service(SetInstruction, "set_instruction", self._on_set_instruction))
        self._last_size: tuple[int, int] | None = None
        self._last_frame_id = ""
        self._last_arrival_s: float | None = None
        self._last_processed_s: float | None = None
        self._hardware_id = f"{socket.gethostname()} {self.pipeline.device}"
        if not self._instruction_received and p["instruction"] != self.instruction:
            self.instruction = p["instruction"]
            for listener in self._instruction_listeners:
                listener(self.instruction)

    def _activate(self) -> None:
        p = self.params
        # As deep as the camera subscription: a reliable deep queue asks for every frame, depth 1 for the newest.
        self._inbox = NewestQueue(p["sensor_qos.depth"])
        if self._use_frame_thread:
            self._frame_thread = threading.Thread(
                target=self._frame_loop, args=(self._inbox,), name="fovea_frames", daemon=True
            )
            self._frame_thread.start()
        camera_topic, message_type, callback = {
            "raw": ("image", Image, self._on_image),
            "compressed": ("image/compressed", CompressedImage, self._on_compressed),
            "video": ("image/video", CompressedVideo, self._on_video),
        }[p["image_transport"]]
        self._accepting = True
        self.activated(self.create_subscription(message_type, camera_topic, callback, self._sensor_qos))
        self.get_logger().info(f"listening on {self.resolve_topic_name(camera_topic)}")

    def _deactivate(self, reason: str) -> None:
        """Stop taking frames: the frame in hand finishes (and is published), queued ones are dropped."""
        self._accepting = False
        self._inbox.close()
        if self._frame_thread is not None:
            self._frame_thread.join(timeout=5.0)
            self._frame_thread = None

    def _release(self) -> None:
        if self.pipeline is not None:
            with self._pipeline_lock:
                self.pipeline.close()
            self.pipeline = None
        self.decoder = None
        self._hardware_id = socket.gethostname()

    # -- inputs -----------------------------------------------------------------------------
    def _on_image(self, msg: Image) -> None:
        self._handle(lambda: [frame_from_image(msg, self.decoder)])

    def _on_compressed(self, msg: CompressedImage) -> None:
        self._handle(lambda: [frame_from_compressed(msg, self.decoder)])

    def _on_video(self, msg: CompressedVideo) -> None:
        self._handle(lambda: frames_from_video(msg, self.decoder))

    def _handle(self, decode: Callable[[], list]) -> None:
        """Take one camera message (``decode`` returns the frames it completes): queue it for the frame
        thread (``sensor_qos.depth`` deep; a full queue drops its oldest, counted as ``superseded``),
        or process it now without a frame thread."""
        if not self._accepting:
            return  # not active (a message still in flight after deactivate): ignored, not counted
        arrival_ns = self.get_clock().now().nanoseconds
        self.frames_received += 1
        self._last_arrival_s = time.monotonic()
        self.input_rate.tick(self._last_arrival_s)
        if self._frame_thread is None:
            self._decode_and_process(decode, arrival_ns)
        elif self._inbox.put((decode, arrival_ns)):
            self._drop("superseded", "a newer frame arrived before the previous one was processed")

    def _frame_loop(self, inbox: NewestQueue) -> None:
        while not inbox.closed:
            item = inbox.take(timeout_s=0.5)
            if item is None:
                continue
            try:
                self._decode_and_process(*item)
            except Exception as exc:  # e.g. publishing while the context shuts down; the thread must live on
                if not inbox.closed:
                    self._drop("node_error", f"{type(exc).__name__}: {exc}")

    def _decode_and_process(self, decode: Callable[[], list], arrival_ns: int) -> None:
        t0 = time.perf_counter()
        try:
            frames = decode()
        except FrameError as exc:
            self._drop(exc.reason, str(exc))
            return
        decode_ms = (time.perf_counter() - t0) * 1e3
        for frame in frames:
            self._process(frame, arrival_ns, decode_ms)

    def _process(self, frame, arrival_ns: int, decode_ms: float) -> None:
        age_ms = (arrival_ns - frame.stamp_ns) * 1e-6
        limit = self.params["max_frame_age_ms"]
        if limit > 0 and age_ms > limit:
            self._drop("stale", f"frame is {age_ms:.0f} ms old (max_frame_age_ms={limit:.0f})")
            return
        if limit > 0 and -age_ms > limit:
            # A stamp from the future (a wrong camera clock) would pass for fresh until that time comes.
            self._drop("future_stamp", f"frame is stamped {-age_ms:.0f} ms ahead (max_frame_age_ms={limit:.0f})")
            return
        if not frame.frame_id:
            frame = dataclasses.replace(frame, frame_id="camera")
        if self._last_frame_id and frame.frame_id != self._last_frame_id:
            self.get_logger().info(f"camera changed ({self._last_frame_id} -> {frame.frame_id}): pipeline reset")
            with self._pipeline_lock:
                self.pipeline.reset()
        fx = self.camera.intrinsics(frame.rgb.shape[1], frame.rgb.shape[0])[0] if self.camera.known else None
        try:
            with self._pipeline_lock:
                output = self.pipeline.process(
                    frame, focal_px=fx, grasp=self._grasp(frame.rgb.shape[1], frame.rgb.shape[0])
                )
        except Exception as exc:  # a backend failure on one frame must not take the node down
            self._drop("pipeline_error", f"{type(exc).__name__}: {exc}")
            return
        self.frames_processed += 1
        self._last_processed_s = time.monotonic()
        timing = {"decode": decode_ms, **output.timing_ms}
        self.latency.add_all(timing)
        self._publish(output, age_ms, fx)

    def _on_tokens(self, update: TokenUpdate) -> None:
        if self.pipeline.cfg.async_encoder:
            # Synchronous encoder times are already in the frame's timing.
            self.latency.add_all(update.timing_ms)
        layout = update.layout
        self._token_sink(
            TokenFrame(
                tokens=update.tokens,
                positions=token_positions(layout.centers, layout.levels, update.width, update.height),
                stamp_ns=update.stamp_ns,
                frame_id=update.frame_id,
                tokens_stamp_ns=update.tokens_stamp_ns,
                width=update.width,
                height=update.height,
            )
        )

    def _drop(self, reason: str, detail: str, what: str = "frame") -> None:
        self.drops.add(reason)
        # Throttled here, not by the logger: rclpy looks up the caller's frame and file on every call,
        # throttled or not, and drops can come at the camera rate.
        now = time.monotonic()
        if now - self._last_drop_log_s.get(reason, -1e9) >= _DROP_LOG_PERIOD_S:
            self._last_drop_log_s[reason] = now
            self.get_logger().warning(f"dropped {what} ({reason}): {detail}")

    def _on_set_fixation(self, request: SetFixation.Request, response: SetFixation.Response):
        if request.clear:
            with self._pipeline_lock:
                self.pipeline.clear_external_fixation()
            response.success, response.message = True, "external fixation cleared"
            return response
        x, y = float(request.x), float(request.y)
        if not (np.isfinite(x) and np.isfinite(y)):
            response.success, response.message = False, "x and y must be finite"
            return response
        if request.normalized:
            if self._last_size is None:
                response.success, response.message = False, "no frame seen yet: normalized position has no size"
                return response
            # As Fixation.u / v define them: u = x / image_width.
            x, y = x * self._last_size[0], y * self._last_size[1]
        with self._pipeline_lock:
            self.pipeline.set_external_fixation(x, y, float(request.hold_s) if request.hold_s > 0 else None)
        response.success, response.message = True, f"fixation set to ({x:.1f}, {y:.1f}) px"
        return response

    def _on_clicked_point(self, msg: PointStamped) -> None:
        if self._last_size is None:
            self.get_logger().warning("clicked_point before any frame: ignored")
            return
        if msg.header.frame_id and msg.header.frame_id != self._last_frame_id:
            # No TF lookup here: the point must already be in the camera's optical frame.
            self.get_logger().warning(
                f"clicked_point in frame {msg.header.frame_id!r}, expected the camera frame "
                f"{self._last_frame_id!r} (set RViz's Fixed Frame to it): ignored"
            )
            return
        pixel = self.camera.project((msg.point.x, msg.point.y, msg.point.z), *self._last_size)
        if pixel is None or not np.isfinite(pixel).all():
            self.get_logger().warning("clicked_point is behind the camera or not finite (expects the optical frame)")
            return
        with self._pipeline_lock:
            self.pipeline.set_external_fixation(*pixel)

    def _on_camera_info(self, msg: CameraInfo) -> None:
        problem = self.camera.update(msg)
        if problem is not None:
            self._drop(f"camera_info_{problem.reason}", str(problem), "camera_info")

    def _on_joint_states(self, msg: JointState) -> None:
        try:
            positions = joint_positions(msg)
        except MessageError as exc:
            self._drop(f"gripper_joint_states_{exc.reason}", str(exc), "gripper_joint_states")
            return
        joint = self.params["slip.gripper_joint"]
        if joint and joint in positions:
            self.gripper_closed = positions[joint] > self.params["slip.closed_above"]

    def _on_gripper_closed(self, msg: Bool) -> None:
        self.gripper_closed = bool(msg.data)

    def _region(self, rect_param: str, box_param: str, width: int, height: int):
        """An image rectangle from its parameter, or from the 3-D box projected with camera_info."""
        rect = self.params[rect_param]
        if any(rect):
            return tuple(float(v) for v in rect)
        box = np.asarray(self.params[box_param], dtype=np.float64)
        if not box[3:].any():
            return None
        fx, fy, cx, cy = self.camera.intrinsics(width, height)
        corners = box[:3] + 0.5 * box[3:] * np.array(
            [[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)]
        )
        projected = project_box(corners, np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]]), (width, height))
        return None if projected is None else tuple(float(v) for v in projected)

    def _grasp(self, width: int, height: int) -> Grasp | None:
        if not self.params["slip.enabled"]:
            return None
        gripper = self._region("slip.gripper_region", "slip.gripper_box_m", width, height)
        held = self._region("slip.object_region", "slip.object_box_m", width, height)
        if gripper is None or held is None:
            return None
        return Grasp(gripper_regions=(gripper,), object_region=held, closed=self.gripper_closed)

    def _on_set_instruction(self, request: SetInstruction.Request, response: SetInstruction.Response):
        self._set_instruction(request.instruction)
        response.success, response.message = True, "instruction set"
        return response

    def _on_instruction(self, msg: String) -> None:
        self._set_instruction(msg.data)

    def add_instruction_listener(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(text)`` with the current instruction now and on every change."""
        self._instruction_listeners.append(listener)
        listener(self.instruction)

    def _set_instruction(self, text: str) -> None:
        self._instruction_received = True
        changed = text != self.instruction
        if changed:
            with self._pipeline_lock:
                self.pipeline.notify_instruction_change()
        self.instruction = text
        self.get_logger().info(f"instruction: {text!r}")
        if changed:
            for listener in self._instruction_listeners:
                listener(text)

    # -- health and run-time parameters ----------------------------------------------------------
    def _stage_samples(self) -> list[StageSample]:
        now = time.monotonic()
        arrived = None if self._last_arrival_s is None else now - self._last_arrival_s
        processed = None if self._last_processed_s is None else now - self._last_processed_s

        def p99(stage: str) -> float:
            return self.latency.percentile(stage, 99)

        backend = {stage: choice.name for stage, choice in self.backends.items()}
        drops = self.drops.as_dict()
        common = {"received": self.frames_processed, "age_s": processed}
        samples = [
            StageSample(
                name="ingest",
                rate_hz=self.input_rate.rate_hz(),
                latency_p99_ms=p99("decode"),
                received=self.frames_received,
                drops=sum(drops.values()),
                age_s=arrived,
                backend=backend.get("decode", ""),
                details={"frames_processed": self.frames_processed, **{f"drops.{k}": v for k, v in drops.items()}},
            ),
            StageSample(name="flow", latency_p99_ms=p99("flow"), backend=backend.get("flow", ""), **common),
            StageSample(
                name="texture",
                latency_p99_ms=p99("upload") + (p99("mips") if "mips" in self.latency.stages() else 0.0),
                backend=backend.get("texture", ""),
                **common,
            ),
            StageSample(
                name="fixation",
                latency_p99_ms=p99("fixation"),
                **common,
            ),
        ]
        pipeline = self.pipeline
        reuse = {
            "frames_reused": pipeline.frames_reused,
            "frames_partly_reused": pipeline.frames_partly_reused,
            "tokens_encoded_share": round(pipeline.tokens_updated / max(pipeline.tokens_total, 1), 4),
        }
        if self.pipeline.encoder is not None:
            gpu_mb = None
            if str(self.pipeline.device).startswith("cuda"):
                import torch

                gpu_mb = torch.cuda.memory_allocated(self.pipeline.device) / 2**20
            samples.append(
                StageSample(
                    name="encoder",
                    latency_p99_ms=p99("encoder"),
                    gpu_memory_mb=gpu_mb,
                    backend=self.params["encoder.architecture"] or "custom",
                    details=reuse,
                    **common,
                )
            )
        if self.params["slip.enabled"]:
            samples.append(StageSample(name="slip", latency_p99_ms=p99("slip"), **common))
        return samples

    def _diagnosed_stages(self) -> list[str]:
        values = self.params or {name: self.get_parameter(name).value for name in ("encoder.enabled", "slip.enabled")}
        off = {"encoder": values["encoder.enabled"] is not True, "slip": values["slip.enabled"] is not True}
        return [stage for stage in DIAGNOSED_STAGES if not off.get(stage, False)]

    def _publish_diagnostics(self) -> None:
        state = self.lifecycle_state
        if state == "active":
            statuses = self.diagnostics.update(self._stage_samples(), time.monotonic())
        else:
            statuses = lifecycle_statuses(state, self._diagnosed_stages())
        stamp = self.get_clock().now().to_msg()
        self.pub_diagnostics.publish(
            diagnostic_array(statuses, self.get_fully_qualified_name(), self._hardware_id, stamp)
        )

    # -- outputs ----------------------------------------------------------------------------
    def _publish(self, output: PipelineOutput, age_ms: float, focal_px: float | None) -> None:
        header = Header(stamp=ns_to_stamp(output.stamp_ns), frame_id=output.frame_id)
        self._last_size = (output.width, output.height)
        self._last_frame_id = output.frame_id
        self.pub_fixation.publish(fixation_msg(output.fixation, output, header, focal_px))
        self.pub_fixations.publish(fixation_array_msg(output, header, focal_px))
        self._publish_markers(output, header)
        self._publish_debug(output, header)
        self._publish_caption_view(output, header, focal_px)
        self.pub_stats.publish(self._stats(output, header, age_ms))
        if output.slip is not None:
            self.pub_slip.publish(slip_msg(output.slip, header))

    def _publish_markers(self, output: PipelineOutput, header: Header) -> None:
        # Building a MarkerArray costs milliseconds of Python per frame (thousands of points): only
        # for a subscriber, and no faster than RViz needs.
        if self.pub_markers.get_subscription_count() == 0:
            return
        now = time.monotonic()
        rate = self.params["markers.rate_hz"]
        if rate > 0 and now - self._last_markers_s < 1.0 / rate:
            return
        self._last_markers_s = now
        if not self._markers_cleared:
            self.pub_markers.publish(delete_all(header))
            self._markers_cleared = True
        self.pub_markers.publish(self.markers.build(output, header))

    def _publish_caption_view(self, output: PipelineOutput, header: Header, focal_px: float | None) -> None:
        rate = self.params["caption_view.rate_hz"]
        if rate <= 0 or self.pub_caption_view.get_subscription_count() == 0:
            return
        now = time.monotonic()
        if now - self._last_caption_view_s < 1.0 / rate:
            return
        self._last_caption_view_s = now
        view = compose_view(output.rgb, (output.fixation.x, output.fixation.y), self.caption_view_cfg)
        x, y, w, h = view.region
        self.pub_caption_view.publish(
            CaptionView(
                header=header,
                fixation=fixation_msg(output.fixation, output, header, focal_px),
                fovea=image_msg(view.fovea, header),
                fovea_region=RegionOfInterest(x_offset=x, y_offset=y, width=w, height=h),
                periphery=image_msg(view.periphery, header),
                instruction=self.instruction,
            )
        )

    def _publish_debug(self, output: PipelineOutput, header: Header) -> None:
        p = self.params
        if not p["debug_image.enabled"] or self.pub_debug.get_subscription_count() == 0:
            return
        now = time.monotonic()
        rate = p["debug_image.max_rate_hz"]
        if rate > 0 and now - self._last_debug_s < 1.0 / rate:
            return
        self._last_debug_s = now
        flow = None if output.flow is None else output.flow.flow
        label = f"{output.fixation.source.name.lower()}  {output.timing_ms['total']:.1f} ms"
        canvas = draw_overlay(
            output.rgb,
            output.fixation,
            output.layout,
            flow,
            output.flow_grid,
            arrow_spacing_px=p["markers.flow_spacing_px"],
            label=label,
            others=output.fixations[1:],
        )
        max_width = p["debug_image.max_width"]
        if max_width and canvas.shape[1] > max_width:
            scale = max_width / canvas.shape[1]
            canvas = cv2.resize(canvas, (max_width, round(canvas.shape[0] * scale)), interpolation=cv2.INTER_AREA)
        self.pub_debug.publish(image_msg(canvas, header))

    def _stats(self, output: PipelineOutput, header: Header, age_ms: float) -> PipelineStats:
        # Percentiles over the window cost ~0.1 ms per stage: refreshed at _PERCENTILES_PERIOD_S, the
        # latest value of each stage on every message.
        now = time.monotonic()
        known = len(self._percentiles) == len(self.latency.stages())
        if not known or now - self._last_percentiles_s >= _PERCENTILES_PERIOD_S:
            self._last_percentiles_s = now
            self._percentiles = stage_latencies(self.latency)
        stages = [
            StageLatency(stage=s.stage, last_ms=self.latency.last(s.stage), p50_ms=s.p50_ms, p99_ms=s.p99_ms)
            for s in self._percentiles
        ]
        return PipelineStats(
            header=header,
            frames_received=self.frames_received,
            frames_processed=self.frames_processed,
            drops=[DropCount(reason=r, count=c) for r, c in self.drops.items()],
            decision=_DECISIONS[output.decision],
            decision_counts=[self.pipeline.decision_counts[kind] for kind in sorted(_DECISIONS, key=_DECISIONS.get)],
            dirty_fraction=float(output.dirty_fraction),
            changed_fraction=float(output.motion.changed_fraction) if output.motion else 0.0,
            num_tokens=output.layout.num_tokens,
            tokens_reused=output.tokens_reused,
            frames_reused=self.pipeline.frames_reused,
            token_age_ms=(output.stamp_ns - output.tokens_stamp_ns) * 1e-6,
            stages=stages,
            backends=[BackendChoice(stage=s, backend=c.name, reason=c.reason) for s, c in self.backends.items()],
            input_rate_hz=float(self.input_rate.rate_hz()),
            frame_age_ms=float(age_ms),
        )


def main(args=None) -> int:
    return run_node(FoveaNode, args)


if __name__ == "__main__":
    sys.exit(main())
