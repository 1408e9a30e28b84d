"""The newest encoded frame, handed from the vision pipeline to the policy inside one process.

The tokens stay where the encoder left them (on the GPU): the policy reads the same tensor, so
no serialisation or copy happens between the two. A slot holds only the newest frame; the
policy runs at its own rate and never queues behind the camera.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

__all__ = ["LatestTokens", "TokenFrame"]


@dataclass(frozen=True)
class TokenFrame:
    """One processed camera frame's tokens.

    Attributes:
        tokens: (N, T) image tokens on the encoder's device and dtype (a tensor no one mutates).
        stamp_ns: capture stamp of the camera frame [ns].
        frame_id: the camera's frame.
        tokens_stamp_ns: capture stamp of the frame the tokens were encoded from (older than
            ``stamp_ns`` when a static frame reused cached tokens).
        width: image width [px].
        height: image height [px].
    """

    tokens: torch.Tensor
    stamp_ns: int
    frame_id: str
    tokens_stamp_ns: int
    width: int
    height: int


class LatestTokens:
    """A thread-safe single-frame slot: :meth:`publish` replaces, :meth:`latest` reads."""

    def __init__(self):
        self._lock = threading.Lock()
        self._frame: TokenFrame | None = None
        self.published = 0

    def publish(self, frame: TokenFrame) -> None:
        with self._lock:
            self._frame = frame
            self.published += 1

    def latest(self) -> TokenFrame | None:
        with self._lock:
            return self._frame
