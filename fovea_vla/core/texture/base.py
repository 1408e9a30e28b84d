"""Texture protocol, configuration and backend registry.

A texture backend holds the current frame as a mip pyramid on some device and samples square
patches from it with trilinear filtering (bilinear within a level, linear between levels).

Level convention: level k halves the resolution k times; level k texel i covers full-resolution
pixels [i * 2**k, (i + 1) * 2**k). A full-resolution coordinate x maps to level k as
``(x + 0.5) / 2**k - 0.5``. Odd sizes are padded by edge replication before halving, so the
mapping is exact at every level. Coordinates outside the image clamp to the border texel.
The pyramid stops at ``max_levels`` levels (or 1x1, whichever comes first); footprints coarser
than the top level sample the top level.

Incremental updates: a frame may replace only some rectangles of level 0 (``upload_rects``) and
rebuild only the parts of the coarser levels those rectangles touch (``rebuild_mips(rects)``).
A level-0 rectangle [x0, x1) covers [floor(x0 / 2**k), ceil(x1 / 2**k)) at level k
(:func:`level_rect`). After ``upload_rects(rgb, rects)`` + ``rebuild_mips(rects)`` the texture
equals a full ``upload(rgb)`` exactly whenever ``rects`` cover every pixel that changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from fovea_vla.core.registry import BackendRegistry, BackendSelection

__all__ = [
    "TEXTURE_BACKENDS",
    "TextureBackend",
    "TextureConfig",
    "level_rect",
    "level_sizes",
    "make_texture",
    "mip_rebuild_rects",
    "patch_sample_offsets",
    "tiles_to_rects",
]

# cupy before gl: on the H100 a partial update + mips + sampling took 0.74 ms with cupy and 1.50 ms
# with gl, whose GL -> CUDA hand-over alone costs ~0.33 ms per frame (docs/BENCHMARKS.md).
TEXTURE_BACKENDS = BackendRegistry(
    "texture",
    auto_order=("cupy", "gl", "torch"),
    modules=(
        "fovea_vla.core.texture.torch_pyramid",
        "fovea_vla.core.texture.cupy_texture",
        "fovea_vla.core.texture.gl",
    ),
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
        max_levels: most pyramid levels kept, level 0 included. 8 levels serve footprints up to
            128 patch sizes (2048 px for 16-px patches), more than a 4K frame's periphery needs.
        incremental_mips_max_fraction: the mips are rebuilt only over the dirty rectangles while
            these cover at most this share of the frame, else over the whole frame (see
            :func:`mip_rebuild_rects`): on a fast GPU one whole rebuild costs less than the host
            work of many small ones.
    """

    backend: str = "auto"
    device: str = "auto"
    cpu_threads: int = 1
    max_levels: int = 8
    incremental_mips_max_fraction: float = 1.0

    def __post_init__(self):
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise ValueError(f"texture.device={self.device!r}: must be 'auto', 'cpu' or 'cuda[:N]'")
        if not 0 <= self.cpu_threads <= 1024:
            raise ValueError(f"texture.cpu_threads={self.cpu_threads}: must be in [0, 1024]")
        if not 1 <= self.max_levels <= 16:
            raise ValueError(f"texture.max_levels={self.max_levels}: must be in [1, 16]")
        fraction = self.incremental_mips_max_fraction
        if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0.0 <= fraction <= 1.0:
            raise ValueError(f"texture.incremental_mips_max_fraction={fraction!r}: must be in [0, 1]")

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


@runtime_checkable
class TextureBackend(Protocol):
    """A frame held as a mip pyramid, sampled into patches.

    Attributes:
        name: registry name.
        device: torch device of the sampled patches ("cpu", "cuda:0", ...).
        width, height: size [px] of the frame uploaded last (0 before the first upload).
        num_levels: pyramid levels held, level 0 included.
    """

    name: str
    device: str
    width: int
    height: int

    @property
    def num_levels(self) -> int: ...

    def upload(self, rgb: np.ndarray) -> None:
        """Replace the texture with a new frame and rebuild every mip level.

        Args:
            rgb: (H, W, 3) uint8 RGB frame. A new size reallocates the pyramid.
        """

    def upload_rects(self, rgb: np.ndarray, rects: np.ndarray) -> None:
        """Replace the given rectangles of level 0 with the same rectangles of ``rgb``.

        A backend may round the rectangles out to its own tile grid (uploading more of ``rgb``
        than asked, never less). Coarser levels are left as they were until :meth:`rebuild_mips`.

        Args:
            rgb: (H, W, 3) uint8 RGB frame of the size uploaded last.
            rects: (M, 4) int rectangles (x0, y0, x1, y1) [px], half-open, inside the frame.

        Raises:
            RuntimeError: no full upload yet. ValueError: size or rectangles do not fit.
        """

    def rebuild_mips(self, rects: np.ndarray | None = None) -> None:
        """Recompute levels 1.. from level 0: everywhere (None) or only over level-0 ``rects``."""

    def synchronize(self) -> None:
        """Block until the backend's queued device work is done (for timing; the pipeline never waits)."""

    def sample(self, centers: np.ndarray, sizes: np.ndarray, patch_size: int):
        """Sample square patches with trilinear filtering.

        Args:
            centers: (N, 2) float patch centres [px] (x, y) in the full-resolution image.
            sizes: (N,) float patch footprints [px]: the side of the image square each covers.
            patch_size: P, samples per side.

        Returns:
            torch.Tensor (N, 3, P, P) float32 in [0, 1] on the backend's device.
        """


def level_sizes(width: int, height: int, max_levels: int) -> list[tuple[int, int]]:
    """(width, height) of each pyramid level under the edge-replication convention.

    Example:
        >>> level_sizes(5, 3, 8)
        [(5, 3), (3, 2), (2, 1), (1, 1)]
    """
    sizes = [(width, height)]
    while len(sizes) < max_levels and max(sizes[-1]) > 1:
        w, h = sizes[-1]
        sizes.append(((w + 1) // 2, (h + 1) // 2))
    return sizes


def level_rect(rect, level: int, width: int, height: int) -> tuple[int, int, int, int]:
    """The level-``level`` texels a level-0 rectangle touches, clipped to that level's size.

    Args:
        rect: (x0, y0, x1, y1) [px] half-open, level 0.
        level: pyramid level k.
        width, height: level-0 size [px].

    Example:
        >>> level_rect((5, 0, 9, 3), 1, 10, 6)
        (2, 0, 5, 2)
    """
    x0, y0, x1, y1 = (int(v) for v in rect)
    scale = 1 << level
    w_k = -(-width // scale)
    h_k = -(-height // scale)
    return x0 // scale, y0 // scale, min(-(-x1 // scale), w_k), min(-(-y1 // scale), h_k)


def tiles_to_rects(tiles: np.ndarray, tile_size: int, width: int, height: int) -> np.ndarray:
    """Rectangles covering the marked tiles: each row's runs of marked tiles become one rectangle.

    Args:
        tiles: (Ty, Tx) bool tile mask, tile (i, j) covering pixels [j*T, (j+1)*T) x [i*T, (i+1)*T).
        tile_size: T [px].
        width, height: frame size [px]; edge tiles are clipped to it.

    Returns:
        (M, 4) int32 rectangles (x0, y0, x1, y1), half-open, in row-major order.

    Example:
        >>> tiles_to_rects(np.array([[True, True, False], [False, False, True]]), 4, 10, 6).tolist()
        [[0, 0, 8, 4], [8, 4, 10, 6]]
    """
    tiles = np.asarray(tiles, dtype=bool)
    padded = np.zeros((tiles.shape[0], tiles.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = tiles
    edges = np.diff(padded, axis=1)
    rows, starts = np.nonzero(edges == 1)
    _, stops = np.nonzero(edges == -1)
    rects = np.stack(
        [
            starts * tile_size,
            rows * tile_size,
            np.minimum(stops * tile_size, width),
            np.minimum((rows + 1) * tile_size, height),
        ],
        axis=1,
    )
    return rects.astype(np.int32).reshape(-1, 4)


def check_rects(rects: np.ndarray, width: int, height: int) -> np.ndarray:
    """``rects`` as an (M, 4) int array, refused unless every rectangle is non-empty and inside the frame."""
    rects = np.asarray(rects).reshape(-1, 4)
    if rects.size and (
        not np.issubdtype(rects.dtype, np.integer)
        or (rects[:, 0] < 0).any()
        or (rects[:, 1] < 0).any()
        or (rects[:, 2] > width).any()
        or (rects[:, 3] > height).any()
        or (rects[:, 2] <= rects[:, 0]).any()
        or (rects[:, 3] <= rects[:, 1]).any()
    ):
        raise ValueError(
            f"rects must be non-empty integer (x0, y0, x1, y1) inside {width}x{height}, got {rects.tolist()}"
        )
    return rects.astype(np.int64)


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
    """Select (``auto`` logs its pick once) and create the texture backend.

    ``auto`` with a CPU device takes ``torch``: the other backends hold the texture on the GPU.
    """
    if cfg.backend == "auto" and cfg.resolved_device() == "cpu":
        TEXTURE_BACKENDS.select("torch", field="texture.backend")
        selection = BackendSelection("torch", "auto: texture.device is the CPU, where only torch runs")
    else:
        selection = TEXTURE_BACKENDS.select(cfg.backend, field="texture.backend")
    return TEXTURE_BACKENDS.create(selection.name, cfg), selection


def mip_rebuild_rects(rects: np.ndarray, width: int, height: int, max_fraction: float) -> np.ndarray | None:
    """The rectangles to pass to ``rebuild_mips`` after uploading ``rects``: themselves while they
    cover at most ``max_fraction`` of the (width x height) frame, else None (rebuild everywhere;
    the texels are the same either way)."""
    rects = np.asarray(rects)
    area = float(((rects[:, 2] - rects[:, 0]) * (rects[:, 3] - rects[:, 1])).sum()) if len(rects) else 0.0
    return rects if area <= max_fraction * width * height else None
