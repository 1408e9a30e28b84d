"""``ffmpeg`` video decoder: H.264 / H.265 on the CPU with FFmpeg's libavcodec through PyAV.

The CPU fallback of ``nvdec``, and what ``auto`` picks without a GPU. Packets are decoded with
slice threading only (frame threading would hold frames back by one per thread) and converted by
swscale to ``rgb24`` (BT.601 limited range unless the stream says otherwise). PyAV is imported
only here; without it the backend says why.
"""

from __future__ import annotations

from collections.abc import Iterator

from fovea_vla.core.decode._common import KeyframeGate, check_size
from fovea_vla.core.decode.base import VIDEO_DECODERS, DecodeConfig, DecodedImage
from fovea_vla.core.frames import FrameError, _byte_view
from fovea_vla.core.registry import Availability

__all__ = ["FfmpegDecoder"]


def _available() -> Availability:
    try:
        import av
    except Exception as exc:  # a broken FFmpeg build raises more than ImportError
        return False, f"PyAV not importable ({type(exc).__name__}: {exc}); pip install av"
    return (
        True,
        f"PyAV {av.__version__} (libavcodec {'.'.join(map(str, av.library_versions['libavcodec']))}) on the CPU",
    )


@VIDEO_DECODERS.register("ffmpeg", is_available=_available)
class FfmpegDecoder:
    """H.264 / H.265 packets decoded by libavcodec on the CPU."""

    name = "ffmpeg"
    device = "cpu"

    def __init__(self, cfg: DecodeConfig | None = None):
        import av

        self._av = av
        self.max_pixels = (cfg or DecodeConfig()).max_pixels
        self._gate = KeyframeGate()
        self._context = None
        self._codec = ""

    def reset(self) -> None:
        self._context = None
        self._gate.reset()

    def _create(self, codec: str):
        context = self._av.CodecContext.create(codec, "r")
        context.thread_type = "SLICE"
        return context

    def decode(self, data, codec: str, pts: int) -> list[tuple[int, DecodedImage]]:
        buf = _byte_view(data)
        self._gate.check(buf, codec)
        if self._context is None or codec != self._codec:
            self._context, self._codec = self._create(codec), codec
        packet = self._av.Packet(buf.tobytes())
        packet.pts = int(pts)
        try:
            frames = self._context.decode(packet)
        except self._av.FFmpegError as exc:
            self.reset()  # the reference frames may be broken: wait for the next keyframe
            raise FrameError(
                "corrupt_compressed", f"{codec} packet ({buf.size} bytes) failed to decode: {exc}"
            ) from exc
        return [(int(frame.pts), self._image(frame)) for frame in frames]

    def _image(self, frame) -> DecodedImage:
        check_size(frame.width, frame.height, self.max_pixels)
        return DecodedImage(frame.to_ndarray(format="rgb24"))

    def iter_file(self, path: str) -> Iterator[DecodedImage]:
        try:
            container = self._av.open(str(path))
        except self._av.FFmpegError as exc:
            raise FrameError("bad_format", f"video {path}: FFmpeg cannot open it: {exc}") from exc
        with container:
            for frame in container.decode(video=0):
                yield self._image(frame)
