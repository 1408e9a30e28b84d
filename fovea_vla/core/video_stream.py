"""RGB frames -> H.264 / H.265 packets as ``fovea_vla_msgs/CompressedVideo`` carries them (camera_replay, tests).

A robot camera that streams video sends one access unit per message, in Annex B, without B-frames
(each packet decodes into its own frame at once), with the parameter sets repeated before every
keyframe so that a subscriber can join at any keyframe. :class:`VideoEncoder` produces exactly
that with FFmpeg's libx264 / libx265 through PyAV (imported on first use): ``zerolatency`` tuning,
a keyframe every ``keyframe_interval`` frames, constant quality ``crf``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fovea_vla.core.decode.base import parse_video_format

__all__ = ["VideoEncoder", "VideoEncoderConfig"]

_ENCODERS = {"h264": "libx264", "hevc": "libx265"}


@dataclass(frozen=True, kw_only=True)
class VideoEncoderConfig:
    """Attributes:
    format: "h264" or "h265" (CompressedVideo.format).
    fps: frame rate the rate control assumes [Hz].
    keyframe_interval: frames from one keyframe to the next (>= 1).
    crf: constant-rate-factor quality, 0 (lossless) .. 51; 23 is x264's default.
    """

    format: str = "h264"
    fps: float = 30.0
    keyframe_interval: int = 30
    crf: int = 23

    def __post_init__(self):
        parse_video_format(self.format)
        if not 0 < self.fps <= 1000:
            raise ValueError(f"fps={self.fps}: must be in (0, 1000]")
        if self.keyframe_interval < 1:
            raise ValueError(f"keyframe_interval={self.keyframe_interval}: must be >= 1")
        if not 0 <= self.crf <= 51:
            raise ValueError(f"crf={self.crf}: must be in [0, 51]")


class VideoEncoder:
    """Encodes RGB frames one by one into Annex B packets (one per frame, none held back).

    Args:
        cfg: encoder settings.

    Raises:
        RuntimeError: PyAV, or its libx264 / libx265, is missing.
    """

    def __init__(self, cfg: VideoEncoderConfig | None = None):
        try:
            import av
        except ImportError as exc:
            raise RuntimeError(f"video encoding needs PyAV (pip install av): {exc}") from exc
        self.cfg = cfg or VideoEncoderConfig()
        self.codec = parse_video_format(self.cfg.format)
        self._av = av
        self._context = None
        self._size: tuple[int, int] | None = None
        self._index = 0

    def _open(self, width: int, height: int):
        from fractions import Fraction

        cfg = self.cfg
        name = _ENCODERS[self.codec]
        try:
            context = self._av.CodecContext.create(name, "w")
        except (self._av.FFmpegError, ValueError) as exc:
            raise RuntimeError(f"FFmpeg in this PyAV has no {name} encoder: {exc}") from exc
        context.width, context.height = width, height
        context.pix_fmt = "yuv420p"
        context.time_base = Fraction(1, 1000)
        context.framerate = Fraction(round(cfg.fps * 1000), 1000)
        context.gop_size = cfg.keyframe_interval
        context.max_b_frames = 0
        options = {"preset": "ultrafast", "tune": "zerolatency", "crf": str(cfg.crf)}
        if self.codec == "h264":
            # Parameter sets before every IDR, so a late subscriber can start at any keyframe.
            options["x264-params"] = (
                f"keyint={cfg.keyframe_interval}:min-keyint={cfg.keyframe_interval}:repeat-headers=1"
            )
        else:
            options["x265-params"] = (
                f"keyint={cfg.keyframe_interval}:min-keyint={cfg.keyframe_interval}:repeat-headers=1:log-level=error"
            )
        context.options = options
        context.open()
        return context

    def encode(self, rgb: np.ndarray) -> bytes:
        """One frame -> its packet (Annex B; starts with SPS/PPS on keyframes).

        Args:
            rgb: (H, W, 3) uint8 RGB, H and W even (4:2:0); a new size starts a new stream with a keyframe.
        """
        height, width = rgb.shape[:2]
        if width % 2 or height % 2:
            raise ValueError(f"video frames need an even width and height (4:2:0), got {width}x{height}")
        if self._context is None or self._size != (width, height):
            self._context, self._size, self._index = self._open(width, height), (width, height), 0
        frame = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        frame.pts = round(self._index * 1000 / self.cfg.fps)
        if self._index % self.cfg.keyframe_interval == 0:
            frame.pict_type = self._av.video.frame.PictureType.I
        self._index += 1
        packets = self._context.encode(frame)
        return b"".join(bytes(p) for p in packets)
