"""``torch`` texture backend: an area-averaged pyramid sampled with ``grid_sample``.

Runs wherever torch runs (CPU or CUDA) and is the reference the accelerated backends are
compared against.
"""

from __future__ import annotations

import numpy as np

from fovea_vla.core.registry import Availability
from fovea_vla.core.texture.base import TEXTURE_BACKENDS, TextureConfig, patch_sample_offsets


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

    def __init__(self, cfg: TextureConfig | None = None):
        import torch

        cfg = cfg or TextureConfig()
        self._torch = torch
        self.device = cfg.resolved_device()
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            # Fail at startup, not on every frame.
            raise RuntimeError(f"texture.device={cfg.device!r} but torch {torch.__version__} sees no CUDA device")
        if self.device == "cpu" and cfg.cpu_threads:
            torch.set_num_threads(cfg.cpu_threads)
        self.levels: list = []
        self.width = 0
        self.height = 0

    def upload(self, rgb: np.ndarray) -> None:
        torch = self._torch
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"upload expects (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
        self.height, self.width = rgb.shape[:2]
        base = torch.from_numpy(np.ascontiguousarray(rgb)).to(self.device, non_blocking=True)
        base = base.permute(2, 0, 1).unsqueeze(0).to(torch.float32).div_(255.0)
        self.levels = [base]
        self.rebuild_mips()

    def rebuild_mips(self) -> None:
        """Recompute every level above 0 from level 0 by 2x2 box averaging."""
        torch = self._torch
        functional = torch.nn.functional
        level = self.levels[0]
        self.levels = [level]
        while max(level.shape[-2:]) > 1:
            h, w = level.shape[-2:]
            if h % 2 or w % 2:
                level = functional.pad(level, (0, w % 2, 0, h % 2), mode="replicate")
            level = functional.avg_pool2d(level, 2)
            self.levels.append(level)

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

    @property
    def num_levels(self) -> int:
        return len(self.levels)
