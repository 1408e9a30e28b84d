"""The newest encoded frame, handed from the vision pipeline to the policy inside one process.

The tokens stay where the encoder left them (on the GPU): the policy reads the same tensor, so
no serialisation or copy happens between the two. A slot holds only the newest frame; the
policy runs at its own rate and never queues behind the camera.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["LEVEL_SCALE", "LatestTokens", "TokenFrame", "token_positions"]

# Mip levels are divided by this in token positions (levels run 0 .. texture.max_levels - 1 <= 7).
LEVEL_SCALE = 8.0


def token_positions(centers, levels, width: int, height: int) -> np.ndarray:
    """(N, 3) float32 token positions for the action head: x / W, y / H, level / 8.

    Args:
        centers: (N, 2) patch centres (x, y) [px, full resolution].
        levels: (N,) mip levels.
        width: image width W [px].
        height: image height H [px].

    >>> token_positions([[320.0, 240.0]], [2.0], 640, 480).tolist()
    [[0.5, 0.5, 0.25]]
    """
    centers = np.asarray(centers, dtype=np.float32).reshape(-1, 2)
    levels = np.asarray(levels, dtype=np.float32).reshape(-1, 1)
    return np.concatenate([centers / np.array([width, height], np.float32), levels / LEVEL_SCALE], axis=1)


@dataclass(frozen=True)
class TokenFrame:
    """One processed camera frame's tokens.

    Attributes:
        tokens: (N, T) image tokens on the encoder's device and dtype (a tensor no one mutates).
        positions: (N, 3) float32 where each token was sampled (:func:`token_positions`).
        stamp_ns: capture stamp of the camera frame [ns].
        frame_id: the camera's frame.
        tokens_stamp_ns: capture stamp of the frame the tokens were encoded from (older than
            ``stamp_ns`` when a static frame reused cached tokens).
        width: image width [px].
        height: image height [px].
    """

    tokens: torch.Tensor
    positions: np.ndarray
    stamp_ns: int
    frame_id: str
    tokens_stamp_ns: int
    width: int
    height: int


class LatestTokens:
    """A thread-safe single-frame slot: :meth:`publish` replaces, :meth:`latest` reads, :meth:`wait_for_new` waits."""

    def __init__(self):
        self._condition = threading.Condition()
        self._frame: TokenFrame | None = None
        self.published = 0

    def publish(self, frame: TokenFrame) -> None:
        with self._condition:
            self._frame = frame
            self.published += 1
            self._condition.notify_all()

    def latest(self) -> TokenFrame | None:
        with self._condition:
            return self._frame

    def wait_for_new(self, seen: int, timeout_s: float) -> int:
        """Block until more than ``seen`` frames were published, or ``timeout_s`` passed; returns
        the number published so far (pass it back as ``seen`` next time)."""
        with self._condition:
            self._condition.wait_for(lambda: self.published > seen, timeout_s)
            return self.published
