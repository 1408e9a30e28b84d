"""Texture protocol, configuration and backend registry.

A texture backend holds the current frame as a mip pyramid on some device and samples square
patches from it with trilinear filtering (bilinear within a level, linear between levels).

Level convention: level k halves the resolution k times; level k texel i covers full-resolution
pixels [i * 2**k, (i + 1) * 2**k). A full-resolution coordinate x maps to level k as
``(x + 0.5) / 2**k - 0.5``. Odd sizes are padded by edge replication before halving, so the
mapping is exact at every level. Coordinates outside the image clamp to the border texel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from fovea_vla.core.registry import BackendRegistry, BackendSelection

__all__ = ["TEXTURE_BACKENDS", "TextureBackend", "TextureConfig", "make_texture", "patch_sample_offsets"]

TEXTURE_BACKENDS = BackendRegistry(
    "texture",
    auto_order=("gl", "cupy", "torch"),
    modules=("fovea_vla.core.texture.torch_pyramid",),
)


@dataclass(frozen=True, kw_only=True)
class TextureConfig:
    """Texture stage parameters.

    Attributes:
        backend: "auto" or a registered backend name ("torch").
        device: torch device for the sampled patches: "auto" (CUDA when present, else CPU),
            "cpu" or "cuda[:N]".
        cpu_threads: torch intra-op threads when the texture runs on the CPU; 0 keeps torch's
            default (one per core). One thread avoids oversubscribing cores shared with DDS and
            other nodes: on a 2-core machine it cut the pipeline's p99 from ~200 ms to ~23 ms.
    """

    backend: str = "auto"
    device: str = "auto"
    cpu_threads: int = 1

    def __post_init__(self):
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise ValueError(f"texture.device={self.device!r}: must be 'auto', 'cpu' or 'cuda[:N]'")
        if not 0 <= self.cpu_threads <= 1024:
            raise ValueError(f"texture.cpu_threads={self.cpu_threads}: must be in [0, 1024]")

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


@runtime_checkable
class TextureBackend(Protocol):
    """A frame held as a mip pyramid, sampled into patches."""

    name: str
    device: str

    def upload(self, rgb: np.ndarray) -> None:
        """Replace the texture with a new frame and rebuild every mip level.

        Args:
            rgb: (H, W, 3) uint8 RGB frame.
        """

    def sample(self, centers: np.ndarray, sizes: np.ndarray, patch_size: int):
        """Sample square patches with trilinear filtering.

        Args:
            centers: (N, 2) float patch centres [px] (x, y) in the full-resolution image.
            sizes: (N,) float patch footprints [px]: the side of the image square each covers.
            patch_size: P, samples per side.

        Returns:
            torch.Tensor (N, 3, P, P) float32 in [0, 1] on the backend's device.
        """


def patch_sample_offsets(patch_size: int) -> np.ndarray:
    """Sample positions within a patch as fractions of its footprint, centred on 0.

    Returns:
        (P,) float64 in (-0.5, 0.5): sample j sits at ``centre + offsets[j] * size``.

    Example:
        >>> patch_sample_offsets(4)
        array([-0.375, -0.125,  0.125,  0.375])
    """
    return (np.arange(patch_size, dtype=np.float64) + 0.5) / patch_size - 0.5


def make_texture(cfg: TextureConfig) -> tuple[TextureBackend, BackendSelection]:
    """Select (``auto`` logs its pick once) and create the texture backend."""
    selection = TEXTURE_BACKENDS.select(cfg.backend, field="texture.backend")
    return TEXTURE_BACKENDS.create(selection.name, cfg), selection
