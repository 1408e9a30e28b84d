"""``nvdec`` video decoder: H.264 / H.265 on the GPU's video engine through PyNvVideoCodec.

Packets (Annex B, one access unit each) go to a ``PyNvVideoCodec`` decoder created on torch's
current stream of the device, with low display latency (a frame is returned as soon as it is
decoded, which streams without B-frames allow). Each NV12 frame is taken with DLPack (no copy)
and converted to ``(H, W, 3)`` RGB by :func:`~fovea_vla.core.decode._common.nv12_to_rgb` on the
device (BT.601 limited range); with ``download`` it is also copied into a pinned host buffer.
Video files (:meth:`NvdecDecoder.iter_file`) are demuxed by PyNvVideoCodec's own demuxer.
PyNvVideoCodec is imported only here; without it (or without CUDA) the backend says why.
"""

from __future__ import annotations

from collections.abc import Iterator

from fovea_vla.core import accel
from fovea_vla.core.decode._common import KeyframeGate, PinnedRing, check_size, nv12_to_rgb
from fovea_vla.core.decode.base import VIDEO_DECODERS, DecodeConfig, DecodedImage
from fovea_vla.core.frames import FrameError, _byte_view
from fovea_vla.core.registry import Availability

__all__ = ["NvdecDecoder"]


def _available() -> Availability:
    ok, why = accel.cuda()
    if not ok:
        return False, why
    try:
        import PyNvVideoCodec as nvc
    except Exception as exc:  # a missing libnvcuvid raises more than ImportError
        return False, f"PyNvVideoCodec not importable ({type(exc).__name__}: {exc})"
    return True, f"PyNvVideoCodec {getattr(nvc, '__version__', '?')} (NVDEC) on {why}"


@VIDEO_DECODERS.register("nvdec", is_available=_available)
class NvdecDecoder:
    """H.264 / H.265 packets decoded by NVDEC into CUDA tensors.

    Args:
        cfg: decode configuration; ``device`` must resolve to CUDA.

    Raises:
        ValueError: ``cfg.device`` is the CPU.
    """

    name = "nvdec"

    def __init__(self, cfg: DecodeConfig | None = None):
        import PyNvVideoCodec as nvc
        import torch

        cfg = cfg or DecodeConfig()
        device = cfg.resolved_device()
        if not device.startswith("cuda"):
            raise ValueError(
                f"decode.device={cfg.device!r}: the nvdec backend runs on CUDA; use video_backend 'ffmpeg'"
            )
        self._nvc = nvc
        self._torch = torch
        requested = torch.device(device)
        index = requested.index if requested.index is not None else torch.cuda.current_device()
        self._device = torch.device("cuda", index)
        self.device = str(self._device)
        self.max_pixels = cfg.max_pixels
        self._download = cfg.download
        self._downloads = PinnedRing(torch, cfg.pinned_slots)
        self._gate = KeyframeGate()
        self._decoder = None
        self._codec = ""

    def _create(self, codec: str):
        nvc = self._nvc
        stream = self._torch.cuda.current_stream(self._device)
        return nvc.CreateDecoder(
            gpuid=self._device.index,
            codec=nvc.cudaVideoCodec.H264 if codec == "h264" else nvc.cudaVideoCodec.HEVC,
            cudacontext=0,
            cudastream=stream.cuda_stream,
            usedevicememory=True,
            latency=nvc.DisplayDecodeLatencyType.LOW,
        )

    def reset(self) -> None:
        self._decoder = None
        self._gate.reset()

    def decode(self, data, codec: str, pts: int) -> list[tuple[int, DecodedImage]]:
        buf = _byte_view(data)
        self._gate.check(buf, codec)
        if self._decoder is None or codec != self._codec:
            self._decoder, self._codec = self._create(codec), codec
        packet = self._nvc.PacketData()
        packet.bsl_data = buf.ctypes.data  # ``buf`` (and the caller's data) outlive the call
        packet.bsl = buf.size
        packet.pts = int(pts)
        # One access unit per packet: without the end-of-picture flag the parser waits for the start of
        # the next picture, and low-latency mode returns each frame one packet late (none for the first).
        packet.decode_flag = self._nvc.VideoPacketFlag.ENDOFPICTURE
        try:
            frames = self._decoder.Decode(packet)
        except Exception as exc:  # the binding raises plain RuntimeError / ValueError on bad bitstreams
            self.reset()  # the reference frames may be broken: wait for the next keyframe
            raise FrameError("corrupt_compressed", f"{codec} packet ({buf.size} bytes): NVDEC failed: {exc}") from exc
        return [(int(frame.getPTS()), self._image(frame)) for frame in frames]

    def _image(self, frame) -> DecodedImage:
        torch = self._torch
        nv12 = torch.from_dlpack(frame)
        height, width = nv12.shape[0] * 2 // 3, nv12.shape[1]
        check_size(width, height, self.max_pixels)
        # A new tensor: the decoder reuses the surface behind ``nv12`` for later frames.
        device_rgb = nv12_to_rgb(nv12, height, width)
        if not self._download:
            return DecodedImage(None, device_rgb)
        stream = torch.cuda.current_stream(self._device)
        host = self._downloads.next(device_rgb.numel())
        host.copy_(device_rgb.view(-1), non_blocking=True)
        self._downloads.record(stream)
        stream.synchronize()
        return DecodedImage(host.numpy().reshape(device_rgb.shape), device_rgb)

    def iter_file(self, path: str) -> Iterator[DecodedImage]:
        nvc = self._nvc
        try:
            demuxer = nvc.CreateDemuxer(str(path))
        except Exception as exc:
            raise FrameError("bad_format", f"video {path}: PyNvVideoCodec cannot demux it: {exc}") from exc
        stream = self._torch.cuda.current_stream(self._device)
        decoder = nvc.CreateDecoder(
            gpuid=self._device.index,
            codec=demuxer.GetNvCodecId(),
            cudacontext=0,
            cudastream=stream.cuda_stream,
            usedevicememory=True,
        )
        for packet in demuxer:
            for frame in decoder.Decode(packet):
                yield self._image(frame)
        for frame in decoder.Decode(nvc.PacketData()):  # an empty packet flushes the reorder queue
            yield self._image(frame)
