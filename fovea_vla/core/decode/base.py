"""Decode protocol, configuration and backend registries.

Two kinds of input, two registries:

* :data:`IMAGE_DECODERS` (``decode.backend``): ``sensor_msgs/Image`` (raw pixels) and
  ``sensor_msgs/CompressedImage`` (JPEG, PNG). ``auto`` order: ``nvjpeg`` (JPEG through nvJPEG into
  a CUDA tensor; raw frames through one pinned host-to-device copy), ``opencv`` (CPU).
* :data:`VIDEO_DECODERS` (``decode.video_backend``): packets of an H.264 / H.265 stream as
  ``fovea_vla_msgs/CompressedVideo`` carries them: one access unit per message, Annex B byte
  stream, parameter sets (SPS / PPS, and VPS for H.265) in-band before every keyframe. ``auto``
  order: ``nvdec`` (PyNvVideoCodec, frames stay on the GPU), ``ffmpeg`` (libavcodec through PyAV, CPU).

Every backend returns :class:`DecodedImage`: ``(H, W, 3)`` ``uint8`` RGB on the host, and for GPU
backends the same pixels as a CUDA tensor (``device_rgb``) that the texture uploads from without a
host round trip. Colour conventions are those of :mod:`fovea_vla.core.frames` (RGB, row 0 at the
top); video is converted with BT.601 limited-range coefficients when the stream does not say
otherwise, as FFmpeg does. Bad input raises :class:`~fovea_vla.core.frames.FrameError` whose
``reason`` is the drop counter key: those of ``frames`` plus ``no_keyframe`` (a video packet before
the first keyframe, or after a decode error, which cannot be decoded on its own).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from fovea_vla.core.frames import DEFAULT_MAX_PIXELS, FrameError
from fovea_vla.core.registry import BackendRegistry, BackendSelection

__all__ = [
    "IMAGE_DECODERS",
    "VIDEO_CODECS",
    "VIDEO_DECODERS",
    "DecodeConfig",
    "DecodedImage",
    "ImageDecoder",
    "VideoDecoder",
    "make_image_decoder",
    "make_video_decoder",
    "parse_video_format",
]

IMAGE_DECODERS = BackendRegistry(
    "decode",
    auto_order=("nvjpeg", "opencv"),
    modules=("fovea_vla.core.decode.opencv_cpu", "fovea_vla.core.decode.nvjpeg"),
)
VIDEO_DECODERS = BackendRegistry(
    "video_decode",
    auto_order=("nvdec", "ffmpeg"),
    modules=("fovea_vla.core.decode.ffmpeg_cpu", "fovea_vla.core.decode.nvdec"),
)

# CompressedVideo.format (Foxglove's names, plus FFmpeg's "hevc") -> canonical codec name.
VIDEO_CODECS = {"h264": "h264", "h265": "hevc", "hevc": "hevc"}


def parse_video_format(fmt: str) -> str:
    """``CompressedVideo.format`` -> ``"h264"`` or ``"hevc"``.

    Raises:
        FrameError: ``bad_format`` for another codec (VP9, AV1, ... are not decoded here).

    Example:
        >>> parse_video_format("H265")
        'hevc'
    """
    codec = VIDEO_CODECS.get(fmt.strip().lower())
    if codec is None:
        raise FrameError("bad_format", f"unknown video format {fmt!r}; expected one of {', '.join(VIDEO_CODECS)}")
    return codec


@dataclass(frozen=True, kw_only=True)
class DecodeConfig:
    """Decode stage parameters.

    Attributes:
        backend: image decoder: "auto", "nvjpeg" or "opencv".
        video_backend: video packet decoder: "auto", "nvdec" or "ffmpeg".
        device: torch device of GPU decoders: "auto" (CUDA when present), "cpu" (``auto`` then
            picks the CPU backends) or "cuda[:N]".
        max_pixels: largest accepted ``width * height``; larger frames raise ``too_large``.
        download: GPU backends also copy each frame to the host (``DecodedImage.rgb``), which the
            pipeline's CPU stages (flow, coherence, overlay) read; false leaves ``rgb`` None
            (decode benchmarks).
        pinned_slots: pinned host buffers per ring (GPU backends): a downloaded ``rgb`` is a view
            of one and stays valid until this many more frames were decoded (copy it to keep it).
    """

    backend: str = "auto"
    video_backend: str = "auto"
    device: str = "auto"
    max_pixels: int = DEFAULT_MAX_PIXELS
    download: bool = True
    pinned_slots: int = 4

    def __post_init__(self):
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise ValueError(f"decode.device={self.device!r}: must be 'auto', 'cpu' or 'cuda[:N]'")
        if isinstance(self.max_pixels, bool) or not (isinstance(self.max_pixels, int) and self.max_pixels >= 1):
            raise ValueError(f"decode.max_pixels={self.max_pixels!r}: must be an integer >= 1")
        if not 2 <= self.pinned_slots <= 64:
            raise ValueError(f"decode.pinned_slots={self.pinned_slots}: must be in [2, 64]")

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True, eq=False)
class DecodedImage:
    """One decoded frame.

    Attributes:
        rgb: ``(H, W, 3)`` ``uint8`` RGB on the host, C-contiguous; None only from a GPU backend
            with ``download=False``.
        device_rgb: torch tensor ``(H, W, 3)`` ``uint8`` C-contiguous on the decoder's CUDA device
            with the same pixels, or None from CPU backends.
    """

    rgb: np.ndarray | None
    device_rgb: object = None


@runtime_checkable
class ImageDecoder(Protocol):
    """Decodes ``sensor_msgs/Image`` and ``sensor_msgs/CompressedImage`` fields.

    Attributes:
        name: registry name.
        device: "cpu" or the CUDA device ("cuda:0") of ``device_rgb``.
    """

    name: str
    device: str

    def raw(self, data, width: int, height: int, encoding: str, step: int, is_bigendian: bool = False) -> DecodedImage:
        """A ``sensor_msgs/Image``; arguments and errors as :func:`fovea_vla.core.frames.image_to_rgb`."""

    def compressed(self, data, fmt: str) -> DecodedImage:
        """A ``sensor_msgs/CompressedImage``; arguments, errors as :func:`fovea_vla.core.frames.compressed_to_rgb`."""


@runtime_checkable
class VideoDecoder(Protocol):
    """Decodes a stream of H.264 / H.265 packets (one access unit each, Annex B).

    Attributes:
        name: registry name.
        device: "cpu" or the CUDA device of ``device_rgb``.
    """

    name: str
    device: str

    def decode(self, data, codec: str, pts: int) -> list[tuple[int, DecodedImage]]:
        """Feed one packet; returns the frames it completed as ``(pts, image)``, in display order.

        Args:
            data: the packet (bytes-like).
            codec: "h264" or "hevc" (:func:`parse_video_format`); a change of codec restarts the decoder.
            pts: the caller's key for the packet (e.g. its capture stamp [ns]), returned with the
                frame it becomes: with B-frames frames come out later and in another order.

        Raises:
            FrameError: ``bad_format`` (not Annex B), ``no_keyframe``, ``corrupt_compressed``,
                ``too_large``.
        """

    def reset(self) -> None:
        """Forget the stream (a new camera): the next packet must hold a keyframe."""

    def iter_file(self, path: str) -> Iterator[DecodedImage]:
        """Every frame of a video file (H.264 / H.265 in MP4, MKV, ...) in display order."""


def make_image_decoder(cfg: DecodeConfig) -> tuple[ImageDecoder, BackendSelection]:
    """Select (``auto`` logs its pick once) and create the image decoder.

    ``auto`` with a CPU device takes ``opencv``: the other backend decodes on the GPU.
    """
    return _make(IMAGE_DECODERS, cfg.backend, "decode.backend", "opencv", cfg)


def make_video_decoder(cfg: DecodeConfig) -> tuple[VideoDecoder, BackendSelection]:
    """Select (``auto`` logs its pick once) and create the video packet decoder (``ffmpeg`` on a CPU device)."""
    return _make(VIDEO_DECODERS, cfg.video_backend, "decode.video_backend", "ffmpeg", cfg)


def _make(registry: BackendRegistry, name: str, field: str, cpu_backend: str, cfg: DecodeConfig):
    if name == "auto" and cfg.resolved_device() == "cpu":
        registry.select(cpu_backend, field=field)
        selection = BackendSelection(cpu_backend, f"auto: decode.device is the CPU, where only {cpu_backend} runs")
    else:
        selection = registry.select(name, field=field)
    return registry.create(selection.name, cfg), selection
