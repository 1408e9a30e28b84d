"""Decode stage: camera messages (raw, JPEG / PNG, H.264 / H.265 packets) -> RGB frames.

``make_image_decoder(DecodeConfig(...))`` returns a backend for ``sensor_msgs/Image`` and
``CompressedImage`` (``auto`` order: ``nvjpeg``, ``opencv``); ``make_video_decoder`` one for
compressed-video packets (``auto`` order: ``nvdec``, ``ffmpeg``). GPU backends leave the frame on
the device for the texture (:attr:`DecodedImage.device_rgb`). See :mod:`fovea_vla.core.decode.base`.
"""

from fovea_vla.core.decode.base import (
    IMAGE_DECODERS,
    VIDEO_CODECS,
    VIDEO_DECODERS,
    DecodeConfig,
    DecodedImage,
    ImageDecoder,
    VideoDecoder,
    make_image_decoder,
    make_video_decoder,
    parse_video_format,
)

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
