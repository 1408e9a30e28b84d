"""``nvjpeg`` image decoder: JPEG through nvJPEG (``torchvision.io.decode_jpeg`` on CUDA) into a device tensor.

JPEG. The bitstream is copied into a pinned buffer (a reused ring) and handed to torchvision,
which decodes it with nvJPEG (the A100/H100 hardware JPEG engine where present, else the hybrid
CUDA decoder) into a ``(3, H, W)`` CUDA tensor; one permute gives ``(H, W, 3)``. Data without an
end-of-image marker (truncated) is refused before it reaches the GPU, as is a header above
``max_pixels``.

Raw frames and PNG. Converted to RGB on the CPU as the ``opencv`` backend does, copied into a
pinned buffer and sent to the device with one asynchronous host-to-device copy, the only copy the
frame makes on its way to the texture.

Host copy. With ``download`` (the default) each frame is also copied back into a pinned host
buffer (for raw frames the host array is the converted input itself): the pipeline's flow,
coherence and overlay stages run on the CPU. torchvision is imported only here, on first use: it
must never be installed next to the CPU torch wheel of the development machine (it breaks
transformers), where this backend reports itself unavailable.
"""

from __future__ import annotations

import numpy as np

from fovea_vla.core import accel
from fovea_vla.core.decode._common import PinnedRing, check_size
from fovea_vla.core.decode.base import IMAGE_DECODERS, DecodeConfig, DecodedImage
from fovea_vla.core.frames import FrameError, compressed_to_rgb, image_to_rgb, parse_compressed
from fovea_vla.core.registry import Availability

__all__ = ["NvjpegDecoder"]

_EOI = b"\xff\xd9"
_EOI_SEARCH = 64  # some encoders pad after the end-of-image marker


def _available() -> Availability:
    ok, why = accel.cuda()
    if not ok:
        return False, why
    try:
        import torchvision
        from torchvision.io import decode_jpeg  # noqa: F401
    except Exception as exc:  # a torchvision built for another torch raises more than ImportError
        return False, f"torchvision not importable ({type(exc).__name__}: {exc})"
    return True, f"torchvision {torchvision.__version__} decode_jpeg (nvJPEG) on {why}"


@IMAGE_DECODERS.register("nvjpeg", is_available=_available)
class NvjpegDecoder:
    """JPEG on the GPU with nvJPEG; raw and PNG frames uploaded through pinned buffers.

    Args:
        cfg: decode configuration; ``device`` must resolve to CUDA.

    Raises:
        ValueError: ``cfg.device`` is the CPU.
    """

    name = "nvjpeg"

    def __init__(self, cfg: DecodeConfig | None = None):
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        cfg = cfg or DecodeConfig()
        device = cfg.resolved_device()
        if not device.startswith("cuda"):
            raise ValueError(f"decode.device={cfg.device!r}: the nvjpeg backend runs on CUDA; use backend 'opencv'")
        self._torch = torch
        self._decode_jpeg = decode_jpeg
        self._rgb_mode = ImageReadMode.RGB
        requested = torch.device(device)
        index = requested.index if requested.index is not None else torch.cuda.current_device()
        self._device = torch.device("cuda", index)
        self.device = str(self._device)
        self.max_pixels = cfg.max_pixels
        self._download = cfg.download
        self._bitstreams = PinnedRing(torch, cfg.pinned_slots)
        self._uploads = PinnedRing(torch, cfg.pinned_slots)
        self._downloads = PinnedRing(torch, cfg.pinned_slots)

    def raw(self, data, width: int, height: int, encoding: str, step: int, is_bigendian: bool = False) -> DecodedImage:
        rgb = image_to_rgb(data, width, height, encoding, step, is_bigendian, max_pixels=self.max_pixels)
        return DecodedImage(rgb, self._upload(rgb))

    def compressed(self, data, fmt: str) -> DecodedImage:
        buf, ext, _ = parse_compressed(data, fmt, max_pixels=self.max_pixels)
        if ext != ".jpg":
            rgb = compressed_to_rgb(buf, fmt, max_pixels=self.max_pixels)
            return DecodedImage(rgb, self._upload(rgb))
        if _EOI not in bytes(buf[-_EOI_SEARCH:]):
            raise FrameError(
                "corrupt_compressed", f"jpeg data ({buf.size} bytes) has no end-of-image marker (truncated)"
            )
        torch = self._torch
        staged = self._bitstreams.next(buf.size)
        staged.numpy()[...] = buf
        stream = torch.cuda.current_stream(self._device)
        try:
            chw = self._decode_jpeg(staged, mode=self._rgb_mode, device=self._device)
        except RuntimeError as exc:
            raise FrameError("corrupt_compressed", f"jpeg data ({buf.size} bytes) failed to decode: {exc}") from exc
        finally:
            self._bitstreams.record(stream)
        check_size(chw.shape[2], chw.shape[1], self.max_pixels)
        device_rgb = chw.permute(1, 2, 0).contiguous()
        return DecodedImage(self._to_host(device_rgb, stream), device_rgb)

    def _upload(self, rgb: np.ndarray):
        """One host-to-device copy of ``rgb`` through a pinned buffer; returns the (H, W, 3) device tensor."""
        torch = self._torch
        staged = self._uploads.next(rgb.nbytes)
        np.copyto(staged.numpy().reshape(rgb.shape), rgb)
        stream = torch.cuda.current_stream(self._device)
        device_rgb = torch.empty(rgb.shape, dtype=torch.uint8, device=self._device)
        device_rgb.view(-1).copy_(staged, non_blocking=True)
        self._uploads.record(stream)
        return device_rgb

    def _to_host(self, device_rgb, stream) -> np.ndarray | None:
        """The frame in the next pinned download buffer (waits for the copy), or None without ``download``."""
        if not self._download:
            return None
        host = self._downloads.next(device_rgb.numel())
        host.copy_(device_rgb.view(-1), non_blocking=True)
        self._downloads.record(stream)
        stream.synchronize()
        return host.numpy().reshape(device_rgb.shape)
