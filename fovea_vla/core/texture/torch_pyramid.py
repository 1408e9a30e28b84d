"""``torch`` texture backend: an area-averaged pyramid sampled with ``grid_sample``.

Runs wherever torch runs (CPU or CUDA) and is the pipeline's CPU path.

Storage. The frame is cut into T x T tiles (T = 32 px). Level k is held padded to a whole number
of tiles of side ``T >> k`` (for the levels where that side is at least one texel), with the
padding kept equal to the level's last row and column. Tile (i, j) of level k is then exactly
the 2x2 box average of tile (i, j) of level k - 1, so a dirty tile is re-uploaded and its mips
rebuilt by batched gathers and scatters: a handful of launches per level, however many tiles
changed. Levels coarser than ``log2 T`` are a few texels wide and are rebuilt whole.
Sampling reads each level's valid region (a view without the padding).
"""

from __future__ import annotations

import numpy as np

from fovea_vla.core.registry import Availability
from fovea_vla.core.texture.base import TEXTURE_BACKENDS, TextureConfig, check_rects, level_sizes, patch_sample_offsets

# Tile side [px] of the incremental update; a power of two.
TILE = 32
_TILE_LEVELS = TILE.bit_length() - 1  # levels 1..5 of a 32-px tile grid are updated per tile


def _available() -> Availability:
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        return False, f"torch not importable: {exc}"
    return True, "torch importable (CPU or CUDA)"


@TEXTURE_BACKENDS.register("torch", is_available=_available)
class TorchPyramid:
    """Mip pyramid held as a list of (1, 3, H_k, W_k) float32 tensors in [0, 1]."""

    name = "torch"
    # upload / upload_rects also take the frame as a torch tensor on this texture's device.
    accepts_device_frames = True

    def __init__(self, cfg: TextureConfig | None = None):
        import torch

        cfg = cfg or TextureConfig()
        self._torch = torch
        self._max_levels = cfg.max_levels
        self.device = cfg.resolved_device()
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            # Fail at startup, not on every frame.
            raise RuntimeError(f"texture.device={cfg.device!r} but torch {torch.__version__} sees no CUDA device")
        if self.device == "cpu" and cfg.cpu_threads:
            torch.set_num_threads(cfg.cpu_threads)
        self._storage: list = []  # padded tensors, (1, 3, Hp_k, Wp_k)
        self.levels: list = []  # valid-region views of _storage, (1, 3, H_k, W_k)
        self.width = 0
        self.height = 0
        self._tiles_shape = (0, 0)

    @property
    def num_levels(self) -> int:
        return len(self.levels)

    def synchronize(self) -> None:
        if self.device.startswith("cuda"):
            self._torch.cuda.synchronize(self.device)

    def _allocate(self, width: int, height: int) -> None:
        torch = self._torch
        self.width, self.height = width, height
        tiles_y, tiles_x = -(-height // TILE), -(-width // TILE)
        self._tiles_shape = (tiles_y, tiles_x)
        self._storage, self.levels = [], []
        for k, (w_k, h_k) in enumerate(level_sizes(width, height, self._max_levels)):
            if k <= _TILE_LEVELS:
                side = TILE >> k
                padded = torch.empty((1, 3, tiles_y * side, tiles_x * side), device=self.device)
            else:
                padded = torch.empty((1, 3, h_k, w_k), device=self.device)
            self._storage.append(padded)
            self.levels.append(padded[..., :h_k, :w_k])

    def upload(self, rgb) -> None:
        """Args: rgb: (H, W, 3) uint8 NumPy array, or a torch tensor on this texture's device (no copy)."""
        torch = self._torch
        on_device = self._check_frame(rgb)
        height, width = rgb.shape[:2]
        if (width, height) != (self.width, self.height) or not self._storage:
            self._allocate(width, height)
        base = rgb if on_device else torch.from_numpy(np.ascontiguousarray(rgb)).to(self.device, non_blocking=True)
        self.levels[0].copy_(base.permute(2, 0, 1).unsqueeze(0))
        self.levels[0].div_(255.0)
        self._replicate_padding(0)
        self.rebuild_mips()

    def upload_rects(self, rgb, rects: np.ndarray) -> None:
        torch = self._torch
        if not self._storage:
            raise RuntimeError("upload_rects() before upload()")
        on_device = self._check_frame(rgb)
        if rgb.shape[:2] != (self.height, self.width):
            raise ValueError(f"upload_rects: frame {rgb.shape[1]}x{rgb.shape[0]}, texture {self.width}x{self.height}")
        tile_y, tile_x = self._dirty_tiles(check_rects(rects, self.width, self.height))
        if tile_y.size == 0:
            return
        # Clipped indices replicate the last row / column into edge tiles' padding.
        rows = np.minimum(tile_y[:, None] * TILE + np.arange(TILE), self.height - 1)
        cols = np.minimum(tile_x[:, None] * TILE + np.arange(TILE), self.width - 1)
        if on_device:
            tiles = rgb[self._index(rows)[:, :, None], self._index(cols)[:, None, :]]  # gathered on the device
        else:
            packed = rgb[rows[:, :, None], cols[:, None, :]]  # (M, T, T, 3) uint8, only the dirty pixels
            tiles = torch.from_numpy(packed).to(self.device, non_blocking=True)
        tiles = tiles.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
        self._tile_view(0)[self._index(tile_y), self._index(tile_x)] = tiles

    def rebuild_mips(self, rects: np.ndarray | None = None) -> None:
        """Recompute levels 1.. by 2x2 box averaging: all of them, or the tiles ``rects`` touch."""
        functional = self._torch.nn.functional
        if not self._storage:
            raise RuntimeError("rebuild_mips() before upload()")
        tile_levels = min(_TILE_LEVELS, self.num_levels - 1)
        if rects is None:
            for k in range(1, tile_levels + 1):
                self._storage[k].copy_(functional.avg_pool2d(self._storage[k - 1], 2))
                self._replicate_padding(k)
        else:
            tile_y, tile_x = self._dirty_tiles(check_rects(rects, self.width, self.height))
            if tile_y.size == 0:
                return
            index_y, index_x = self._index(tile_y), self._index(tile_x)
            for k in range(1, tile_levels + 1):
                finer = self._tile_view(k - 1)[index_y, index_x]  # (M, 3, t, t)
                self._tile_view(k)[index_y, index_x] = functional.avg_pool2d(finer, 2)
                self._replicate_padding(k)
        for k in range(tile_levels + 1, self.num_levels):
            finer = self.levels[k - 1]
            h, w = finer.shape[-2:]
            if h % 2 or w % 2:
                finer = functional.pad(finer, (0, w % 2, 0, h % 2), mode="replicate")
            self.levels[k].copy_(functional.avg_pool2d(finer, 2))

    def _check_frame(self, rgb) -> bool:
        """Refuses all but an (H, W, 3) uint8 array or such a tensor on this device; returns whether it is a tensor."""
        torch = self._torch
        if not isinstance(rgb, torch.Tensor):
            _check_frame(rgb)
            return False
        if not (
            rgb.ndim == 3
            and rgb.shape[2] == 3
            and rgb.dtype == torch.uint8
            and min(rgb.shape[:2]) >= 1
            and rgb.device == self._storage_device()
        ):
            raise ValueError(
                f"upload expects (H, W, 3) uint8 on {self.device}, got {tuple(rgb.shape)} {rgb.dtype} on {rgb.device}"
            )
        return True

    def _storage_device(self):
        torch = self._torch
        device = torch.device(self.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return device

    def _dirty_tiles(self, rects: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(tile rows, tile columns) of every tile the rectangles touch, each tile once."""
        mask = np.zeros(self._tiles_shape, dtype=bool)
        for x0, y0, x1, y1 in rects:
            mask[y0 // TILE : -(-y1 // TILE), x0 // TILE : -(-x1 // TILE)] = True
        return np.nonzero(mask)

    def _index(self, values: np.ndarray):
        return self._torch.from_numpy(values).to(self.device, non_blocking=True)

    def _tile_view(self, k: int):
        """Level k's padded storage as a (Ty, Tx, 3, t, t) view of its tiles (writes go through)."""
        side = TILE >> k
        tiles_y, tiles_x = self._tiles_shape
        return self._storage[k].view(3, tiles_y, side, tiles_x, side).permute(1, 3, 0, 2, 4)

    def _replicate_padding(self, k: int) -> None:
        padded, (h_k, w_k) = self._storage[k], self.levels[k].shape[-2:]
        if padded.shape[-1] > w_k:
            padded[..., :h_k, w_k:] = padded[..., :h_k, w_k - 1 : w_k]
        if padded.shape[-2] > h_k:
            padded[..., h_k:, :] = padded[..., h_k - 1 : h_k, :]

    def sample(self, centers: np.ndarray, sizes: np.ndarray, patch_size: int):
        torch = self._torch
        if not self.levels:
            raise RuntimeError("sample() before upload()")
        centers = np.asarray(centers, dtype=np.float64).reshape(-1, 2)
        sizes = np.asarray(sizes, dtype=np.float64).reshape(-1)
        count = centers.shape[0]
        top = len(self.levels) - 1
        lod = np.clip(np.log2(np.maximum(sizes, 1e-6) / patch_size), 0.0, top)
        lower = np.floor(lod).astype(np.int64)
        upper = np.minimum(lower + 1, top)
        blend = torch.from_numpy((lod - lower).astype(np.float32)).to(self.device).view(count, 1, 1, 1)

        offsets = patch_sample_offsets(patch_size)
        xs = centers[:, 0, None] + offsets[None, :] * sizes[:, None]  # (N, P)
        ys = centers[:, 1, None] + offsets[None, :] * sizes[:, None]
        out_lower = torch.empty((count, 3, patch_size, patch_size), device=self.device)
        out_upper = torch.empty_like(out_lower)
        for k in np.unique(np.concatenate([lower, upper])):
            for out, which in ((out_lower, lower), (out_upper, upper)):
                index = np.nonzero(which == k)[0]
                if index.size:
                    out[torch.from_numpy(index).to(self.device)] = self._sample_level(int(k), xs[index], ys[index])
        return torch.lerp(out_lower, out_upper, blend)

    def _sample_level(self, k: int, xs: np.ndarray, ys: np.ndarray):
        """Bilinear samples of level k at full-resolution coordinates; returns (n, 3, P, P)."""
        torch = self._torch
        level = self.levels[k]
        h_k, w_k = level.shape[-2:]
        scale = float(2**k)
        # Full-res x -> level-k texel coordinate -> grid_sample's [-1, 1] (align_corners=False).
        gx = ((xs + 0.5) / scale) / w_k * 2.0 - 1.0  # (n, P)
        gy = ((ys + 0.5) / scale) / h_k * 2.0 - 1.0
        n, p = gx.shape
        grid = np.empty((1, n * p, p, 2), dtype=np.float32)
        grid[0, :, :, 0] = np.repeat(gx, p, axis=0)
        grid[0, :, :, 1] = np.repeat(gy[:, :, None], p, axis=2).reshape(n * p, p)
        samples = torch.nn.functional.grid_sample(
            level,
            torch.from_numpy(grid).to(self.device),
            mode="bilinear",
            padding_mode="border",
            align_corners=False,
        )  # (1, 3, n * P, P)
        return samples.view(3, n, p, p).permute(1, 0, 2, 3)


def _check_frame(rgb: np.ndarray) -> None:
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8 or rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ValueError(f"upload expects (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
