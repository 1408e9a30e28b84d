"""camera_replay: publishes frames from a video, an image folder, a rosbag2 bag or the built-in
synthetic scene as a camera would: ``image`` and/or ``image/compressed``, or ``image/video``
(fovea_vla_msgs/CompressedVideo, H.264 / H.265 packets), plus ``camera_info``, stamped with the
time each frame is published (its capture time, as far as the graph knows; compressed frames once
encoded, as a camera that delivers JPEG or H.264 stamps them).
"""

from __future__ import annotations

import math
import sys

from rclpy.node import Node
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import Header

from fovea_vla.core.frames import rgb_to_compressed
from fovea_vla.core.sources import open_source
from fovea_vla.core.synthetic import SyntheticSceneConfig
from fovea_vla.core.video_stream import VideoEncoder, VideoEncoderConfig
from fovea_vla.nodes import qos
from fovea_vla.nodes.messages import image_msg
from fovea_vla.nodes.params import ParamSpec, declare_all
from fovea_vla.nodes.runner import run_node
from fovea_vla_msgs.msg import CompressedVideo

PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec(
        "source",
        "synthetic",
        "`synthetic`, or a path: video file, image folder, or rosbag2 bag (folder with metadata.yaml, .mcap or .db3).",
    ),
    ParamSpec("bag_topic", "", "Image topic to read from a bag; empty = the first image topic."),
    ParamSpec(
        "rate_hz",
        0.0,
        "Publish rate; 0 = the source's own frame rate (30 Hz if it has none) [Hz].",
        range=(0.0, 1000.0),
    ),
    ParamSpec("loop", True, "Start again at the end of the source."),
    ParamSpec("max_frames", 0, "Stop after this many frames; 0 = no limit.", range=(0, 2**31 - 1)),
    ParamSpec("frame_id", "camera_optical_frame", "frame_id of the published images and CameraInfo."),
    ParamSpec(
        "transport",
        "raw",
        "Publish `image` (raw), `image/compressed`, both, or `image/video` (CompressedVideo packets).",
        choices=("raw", "compressed", "both", "video"),
    ),
    ParamSpec(
        "video_decoder",
        "auto",
        "Decoder of video-file sources: nvdec (GPU), ffmpeg or opencv (CPU); auto = nvdec if available, else opencv.",
        choices=("auto", "nvdec", "ffmpeg", "opencv"),
    ),
    ParamSpec("video.format", "h264", "Codec of `image/video`.", choices=("h264", "h265")),
    ParamSpec(
        "video.keyframe_interval",
        30,
        "Frames between keyframes of `image/video` (a late subscriber waits for one).",
        range=(1, 3600),
    ),
    ParamSpec("video.crf", 23, "Constant-rate-factor quality of `image/video` (0 = lossless).", range=(0, 51)),
    ParamSpec("encoding", "rgb8", "Encoding of raw images.", choices=("rgb8", "bgr8", "rgba8", "bgra8", "mono8")),
    ParamSpec("compressed_format", "jpeg", "Format of compressed images.", choices=("jpeg", "png")),
    ParamSpec("jpeg_quality", 90, "JPEG quality of compressed images.", range=(1, 100)),
    ParamSpec("fov_deg", 60.0, "Horizontal field of view written into CameraInfo [deg].", range=(1.0, 179.0)),
    ParamSpec("synthetic.width", 640, "Synthetic scene width [px].", range=(16, 8192)),
    ParamSpec("synthetic.height", 480, "Synthetic scene height [px].", range=(16, 8192)),
    ParamSpec(
        "synthetic.fps", 30.0, "Synthetic scene frame rate (sets object motion per frame) [Hz].", range=(1.0, 1000.0)
    ),
    ParamSpec("synthetic.num_objects", 3, "Moving textured objects in the synthetic scene.", range=(0, 32)),
    ParamSpec("synthetic.camera_motion", False, "Pan and shake the synthetic camera."),
    ParamSpec(
        "synthetic.scene_cut_every_s",
        0.0,
        "Cut to a new synthetic scene this often; 0 = never [s].",
        range=(0.0, 3600.0),
    ),
    ParamSpec("synthetic.seed", 0, "Seed of the synthetic scene.", range=(0, 2**31 - 1)),
)


def camera_info(width: int, height: int, fov_deg: float, header: Header) -> CameraInfo:
    """Ideal pinhole CameraInfo with the given horizontal field of view."""
    fx = 0.5 * width / math.tan(math.radians(fov_deg) / 2.0)
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    return CameraInfo(
        header=header,
        width=width,
        height=height,
        distortion_model="plumb_bob",
        d=[0.0] * 5,
        k=[fx, 0.0, cx, 0.0, fx, cy, 0.0, 0.0, 1.0],
        r=[1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
        p=[fx, 0.0, cx, 0.0, 0.0, fx, cy, 0.0, 0.0, 0.0, 1.0, 0.0],
    )


class CameraReplay(Node):
    """Publishes a frame source at a fixed rate."""

    NODE_NAME = "camera_replay"

    def __init__(self, **kwargs):
        super().__init__(self.NODE_NAME, **kwargs)
        p = self.params = declare_all(self, PARAMS)
        synthetic = SyntheticSceneConfig(
            width=p["synthetic.width"],
            height=p["synthetic.height"],
            fps=p["synthetic.fps"],
            num_objects=p["synthetic.num_objects"],
            camera_motion=p["synthetic.camera_motion"],
            scene_cut_every_s=p["synthetic.scene_cut_every_s"],
            seed=p["synthetic.seed"],
        )
        self.source = open_source(
            p["source"], synthetic=synthetic, bag_topic=p["bag_topic"] or None, video_decoder=p["video_decoder"]
        )
        rate = p["rate_hz"] or self.source.nominal_fps or 30.0
        self.get_logger().info(f"replaying {self.source.name} at {rate:.1f} Hz ({p['transport']})")
        sensor = qos.sensor("reliable", 5)
        transport = p["transport"]
        self.pub_image = self.create_publisher(Image, "image", sensor) if transport in ("raw", "both") else None
        self.pub_compressed = (
            self.create_publisher(CompressedImage, "image/compressed", sensor)
            if transport in ("compressed", "both")
            else None
        )
        self.pub_video = self.encoder = None
        if transport == "video":
            self.pub_video = self.create_publisher(CompressedVideo, "image/video", sensor)
            self.encoder = VideoEncoder(
                VideoEncoderConfig(
                    format=p["video.format"],
                    fps=rate,
                    keyframe_interval=p["video.keyframe_interval"],
                    crf=p["video.crf"],
                )
            )
        self.pub_info = self.create_publisher(CameraInfo, "camera_info", sensor)
        self.published = 0
        self._frames = iter(self.source)
        self.done = False
        self.timer = self.create_timer(1.0 / rate, self._tick)

    def _next_frame(self):
        try:
            return next(self._frames)
        except StopIteration:
            if not self.params["loop"]:
                return None
            self._frames = iter(self.source)
            return next(self._frames, None)

    def _tick(self) -> None:
        p = self.params
        if self.done:
            return
        frame = None if p["max_frames"] and self.published >= p["max_frames"] else self._next_frame()
        if frame is None:
            self.done = True
            self.timer.cancel()
            self.get_logger().info(f"source finished after {self.published} frames")
            return
        rgb = frame.rgb
        # Compressed frames are encoded before the stamp is taken, as by a camera that delivers JPEG or
        # H.264 itself (an MJPEG / UVC camera's driver stamps a buffer it dequeues already encoded):
        # this replay's software encoder stands in for the camera's hardware, not for the graph.
        data = packet = None
        if self.pub_compressed is not None:
            data = rgb_to_compressed(rgb, p["compressed_format"], quality=p["jpeg_quality"])
        if self.pub_video is not None:
            packet = self.encoder.encode(rgb)
        header = Header(stamp=self.get_clock().now().to_msg(), frame_id=p["frame_id"])
        if self.pub_image is not None:
            self.pub_image.publish(image_msg(rgb, header, p["encoding"]))
        if data is not None:
            self.pub_compressed.publish(CompressedImage(header=header, format=p["compressed_format"], data=data))
        if packet is not None:
            self.pub_video.publish(
                CompressedVideo(timestamp=header.stamp, frame_id=header.frame_id, data=packet, format=p["video.format"])
            )
        self.pub_info.publish(camera_info(rgb.shape[1], rgb.shape[0], p["fov_deg"], header))
        self.published += 1

    def destroy_node(self):
        self.source.close()
        return super().destroy_node()


def main(args=None) -> int:
    return run_node(CameraReplay, args)


if __name__ == "__main__":
    sys.exit(main())
