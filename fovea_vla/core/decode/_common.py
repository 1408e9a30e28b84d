"""Code shared by the decode backends: Annex B parsing, keyframe gating, pinned buffers, NV12 -> RGB."""

from __future__ import annotations

import numpy as np

from fovea_vla.core.frames import FrameError

__all__ = ["KeyframeGate", "PinnedRing", "check_size", "nal_unit_types", "nv12_to_rgb"]

_H264_KEYFRAME = frozenset({5})  # IDR slice
_HEVC_KEYFRAME = frozenset(range(16, 22))  # IRAP: BLA, IDR, CRA


def nal_unit_types(buf: np.ndarray, codec: str) -> list[int]:
    """NAL unit types of an Annex B packet, in order.

    Args:
        buf: (n,) uint8 packet bytes.
        codec: "h264" (type = first byte & 0x1F) or "hevc" (type = (first byte >> 1) & 0x3F).

    Raises:
        FrameError: ``bad_format`` when the packet holds no start code (e.g. AVCC length prefixes).

    Example:
        >>> nal_unit_types(np.frombuffer(b"\\0\\0\\0\\1\\x67xx\\0\\0\\1\\x65yy", np.uint8), "h264")
        [7, 5]
    """
    if buf.size < 4:
        raise FrameError("bad_format", f"{codec} packet of {buf.size} bytes holds no NAL unit")
    # A start code is 00 00 01; the NAL header is the byte after it.
    starts = np.flatnonzero((buf[:-3] == 0) & (buf[1:-2] == 0) & (buf[2:-1] == 1)) + 3
    if starts.size == 0:
        raise FrameError(
            "bad_format", f"{codec} packet ({buf.size} bytes) has no Annex B start code (length-prefixed AVCC/HVCC?)"
        )
    headers = buf[starts].astype(np.int64)
    types = headers & 0x1F if codec == "h264" else (headers >> 1) & 0x3F
    return types.tolist()


class KeyframeGate:
    """Lets packets through from the first one holding a keyframe on (after a start or a reset)."""

    def __init__(self):
        self.waiting = True

    def check(self, buf: np.ndarray, codec: str) -> None:
        """Raises ``FrameError`` (``bad_format`` or ``no_keyframe``) for a packet the decoder must not see."""
        types = nal_unit_types(buf, codec)
        if self.waiting:
            keyframe = _H264_KEYFRAME if codec == "h264" else _HEVC_KEYFRAME
            if not keyframe.intersection(types):
                raise FrameError("no_keyframe", f"{codec} packet before a keyframe (NAL types {types}): skipped")
            self.waiting = False

    def reset(self) -> None:
        self.waiting = True


def check_size(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise FrameError("too_large", f"decoded image {width}x{height} exceeds max_pixels={max_pixels}")


class PinnedRing:
    """A ring of pinned host buffers reused across frames, each refilled only after its last copy finished.

    Args:
        torch: the torch module.
        slots: buffers in the ring.
    """

    def __init__(self, torch, slots: int):
        self._torch = torch
        self._buffers: list = [None] * slots
        self._events: list = [None] * slots
        self._slot = 0

    def next(self, nbytes: int):
        """The next buffer as an ``(nbytes,)`` uint8 pinned CPU tensor, once its previous copy is done."""
        slot = self._slot
        self._slot = (slot + 1) % len(self._buffers)
        if self._events[slot] is not None:
            self._events[slot].synchronize()
        buffer = self._buffers[slot]
        if buffer is None or buffer.numel() < nbytes:
            # Grown to the largest frame seen; the old buffer is freed by torch's pinned allocator.
            buffer = self._buffers[slot] = self._torch.empty(max(nbytes, 64), dtype=self._torch.uint8, pin_memory=True)
        self._current = slot
        return buffer[:nbytes]

    def record(self, stream) -> None:
        """Mark the buffer last returned by :meth:`next` busy until ``stream`` reaches this point."""
        slot = self._current
        if self._events[slot] is None:
            self._events[slot] = self._torch.cuda.Event()
        self._events[slot].record(stream)


# BT.601 limited range (FFmpeg's default for streams that do not state their matrix): Y' in 16..235,
# Cb / Cr in 16..240 around 128.
_Y_SCALE = 255.0 / 219.0
_R_V = 1.596027
_G_U, _G_V = 0.391762, 0.812968
_B_U = 2.017232


def nv12_to_rgb(nv12, height: int, width: int):
    """NV12 -> RGB on the tensor's device (BT.601 limited range, chroma replicated 2x2).

    Args:
        nv12: torch.Tensor (H * 3 / 2, W) uint8: the luma plane, then interleaved Cb Cr at half
            resolution (what NVDEC writes); H and W even. Rows may be padded beyond W (the tensor
            is sliced to W columns).
        height, width: H, W [px].

    Returns:
        torch.Tensor (H, W, 3) uint8 RGB, C-contiguous, on the same device.

    Example:
        >>> import torch
        >>> grey = torch.cat([torch.full((2, 2), 126, dtype=torch.uint8), torch.full((1, 2), 128, dtype=torch.uint8)])
        >>> nv12_to_rgb(grey, 2, 2)[0, 0].tolist()
        [128, 128, 128]
    """
    import torch

    luma = nv12[:height, :width].to(torch.float32)
    chroma = nv12[height : height + height // 2, :width].to(torch.float32).view(height // 2, width // 2, 2)
    chroma = chroma.repeat_interleave(2, dim=0).repeat_interleave(2, dim=1) - 128.0
    u, v = chroma[..., 0], chroma[..., 1]
    y = (luma - 16.0) * _Y_SCALE
    rgb = torch.stack((y + _R_V * v, y - _G_U * u - _G_V * v, y + _B_U * u), dim=-1)
    return rgb.round_().clamp_(0.0, 255.0).to(torch.uint8)
