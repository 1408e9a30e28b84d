"""Foveated ViT encoder: a Vision Transformer over patches of any size and place in the image.

The encoder is a plain ViT (Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021)
whose parameter names and arithmetic are those of timm's ``VisionTransformer`` (pre-norm blocks,
LayerNorm eps 1e-6, erf GELU, fused attention), so a timm ``vit_*_patch16_*`` state_dict loads
with strict key matching and, on the regular patch grid at the checkpoint's native resolution,
gives timm's tokens. Two things change, both neutral on that grid:

- **Position.** The pretrained G_h x G_w position grid is treated as a continuous function over
  the image and sampled (bicubic, ``F.grid_sample`` with ``align_corners=False`` and border
  padding) at each patch's normalised centre ``((x + 0.5) / W, (y + 0.5) / H)``. A regular-grid
  centre ``x = P * i + (P - 1) / 2`` lands on grid cell ``i`` exactly (to float32 rounding), so
  the grid's own values come back there.
- **Scale.** A learnt ``level_embed`` (num_levels, D), initialised to zero so a pretrained ViT is
  unchanged until it is trained, is added to each patch token, linearly interpolated at the
  token's continuous mip level (the footprint is ``P * 2**level`` pixels).

The class token (``cls_token + pos_embed[:, 0]``, no level) leads the sequence by default.

Checkpoints are local ``.safetensors`` files in timm's layout (``patch_embed.proj``,
``blocks.{i}.attn.qkv``, ...; a classifier ``head`` is dropped), in Hugging Face ``ViTModel``
layout (``[vit.]embeddings...``, ``encoder.layer.{i}.attention.attention.query/key/value``, ...;
q/k/v are concatenated into ``qkv``, ``pooler``/``classifier`` are dropped), or written by
:meth:`FoveatedViT.save` (timm layout + ``level_embed`` + JSON metadata). A different checkpoint
patch size is adapted by resampling the patch-embedding kernel with the pseudo-inverse of the
resize (FlexiViT, Beyer et al., CVPR 2023; timm's ``resample_patch_embed``); a position grid of
another size is resampled bicubically like timm's ``resample_abs_pos_embed``; a model with fewer
blocks (``EncoderConfig.depth``) keeps the checkpoint's first ones. Any other difference (missing
or unknown keys, shapes) is refused with the key and both shapes named.

On CUDA, :class:`FoveatedEncoder` casts the module to float16/bfloat16 (no autocast) and replays
one CUDA graph per (batch, tokens) shape: at batch 1, eager PyTorch is launch-bound and costs
about the same whatever the token count, so token reduction pays only with graphs.

Pixel convention: x right, y down, the centre of the top-left pixel is (0, 0); a patch centred
at ``c`` with footprint ``s`` has its samples at ``c + patch_sample_offsets(P) * s``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fovea_vla.core import accel
from fovea_vla.core._validation import is_int, is_real
from fovea_vla.core.foveation import FoveationConfig, foveated_layout

__all__ = [
    "ARCHITECTURES",
    "HF_MEAN",
    "HF_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SCHEMA_VERSION",
    "Block",
    "EncoderConfig",
    "EncoderOutput",
    "FoveatedEncoder",
    "FoveatedViT",
    "LoadReport",
    "build_model",
    "convert_state_dict",
    "full_resolution_layout",
    "load_checkpoint",
    "make_example",
    "resample_patch_kernel",
    "resample_pos_grid",
]

_LOG = logging.getLogger(__name__)

# (embed_dim, depth, num_heads) of timm's vit_{tiny,small,base,large}_patch16_224; MLP ratio 4.
ARCHITECTURES: dict[str, tuple[int, int, int]] = {
    "vit_tiny_patch16": (192, 12, 3),
    "vit_small_patch16": (384, 12, 6),
    "vit_base_patch16": (768, 12, 12),
    "vit_large_patch16": (1024, 24, 16),
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HF_MEAN = (0.5, 0.5, 0.5)  # google/vit-* preprocessors
HF_STD = (0.5, 0.5, 0.5)
TIMM_LAYER_NORM_EPS = 1e-6
HF_LAYER_NORM_EPS = 1e-12  # transformers' ViTConfig default
SCHEMA_VERSION = 1
DEFAULT_POS_GRID = (14, 14)  # 224 px / 16 px

_METADATA_KEY = "fovea_vla.encoder"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_OUTPUTS = ("tokens", "pre_norm")
_FORMATS = ("auto", "timm", "hf")
# Classifier weights a checkpoint may carry; the encoder has no head, so they are dropped.
_TIMM_HEAD = re.compile(r"head\.(weight|bias)")
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.")
_HF_HEAD = re.compile(r"(pooler\.dense|classifier)\.(weight|bias)|embeddings\.mask_token")


# --- configuration ------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class EncoderConfig:
    """Encoder stage parameters.

    Attributes:
        architecture: a preset of :data:`ARCHITECTURES` (timm's dims/depth/heads, patch 16), or
            None to give ``embed_dim``, ``depth`` and ``num_heads`` explicitly.
        embed_dim: token width D; overrides the preset when set.
        depth: number of transformer blocks; overrides the preset when set. A checkpoint with more
            blocks loads its first ``depth`` (the others are dropped, as :class:`LoadReport` notes).
        num_heads: attention heads (must divide ``embed_dim``); overrides the preset when set.
        mlp_ratio: MLP hidden width / D (timm: ``int(D * mlp_ratio)``); None = 4.
        patch_size: P, samples per patch side; the texture stage samples (N, 3, P, P) patches.
        pos_grid: position-embedding grid as G or (G_h, G_w). None: 14x14 for random init, the
            checkpoint's own grid when loading (no resampling); set, a checkpoint's grid is
            resampled to it.
        class_token: put the class token first in the sequence and return its output.
        num_levels: rows of the level embedding; levels are clamped to [0, num_levels - 1].
        layer_norm_eps: LayerNorm epsilon; None = 1e-6 (timm), 1e-12 for Hugging Face
            checkpoints (their config.json's value when present).
        mean: per-channel RGB mean subtracted from [0, 1] patches; None = ImageNet's for timm
            checkpoints and random init, 0.5 for Hugging Face ones. Checkpoint metadata (our
            own save, a Hugging Face preprocessor_config.json beside the file) takes precedence.
        std: per-channel RGB std, same rules as ``mean``.
        checkpoint: path to a local ``.safetensors`` file, or None for a seeded random init.
        checkpoint_format: "auto" (from the key names), "timm" or "hf".
        output: "tokens" (after the final LayerNorm) or "pre_norm" (last block's output).
        dtype: "auto" (float16 on CUDA, float32 on CPU), "float32", "float16" or "bfloat16".
        device: "auto" (CUDA when present, else CPU), "cpu" or "cuda[:N]".
        cuda_graphs: replay a CUDA graph per (batch, tokens) shape on CUDA; ignored on CPU.
        seed: seed of the random init (weights absent from the checkpoint stay as initialised:
            only ``level_embed``, which is zero).
    """

    architecture: str | None = "vit_base_patch16"
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None
    patch_size: int = 16
    pos_grid: int | tuple[int, int] | None = None
    class_token: bool = True
    num_levels: int = 8
    layer_norm_eps: float | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    checkpoint: str | os.PathLike | None = None
    checkpoint_format: str = "auto"
    output: str = "tokens"
    dtype: str = "auto"
    device: str = "auto"
    cuda_graphs: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.architecture is not None and self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"encoder.architecture={self.architecture!r}: must be None or one of {', '.join(ARCHITECTURES)}"
            )
        for name in ("embed_dim", "depth", "num_heads"):
            value = getattr(self, name)
            if value is None:
                if self.architecture is None:
                    raise ValueError(f"encoder.{name}=None: required when encoder.architecture is None")
            elif not is_int(value) or not 1 <= value <= 65536:
                raise ValueError(f"encoder.{name}={value!r}: must be an integer in [1, 65536]")
        if self.mlp_ratio is not None and (not is_real(self.mlp_ratio) or not 0 < self.mlp_ratio <= 64):
            raise ValueError(f"encoder.mlp_ratio={self.mlp_ratio!r}: must be a number in (0, 64]")
        dim, _, heads, _ = self.dims()
        if dim % heads:
            raise ValueError(f"encoder.embed_dim={dim}: must be divisible by encoder.num_heads={heads}")
        if not is_int(self.patch_size) or not 2 <= self.patch_size <= 64:
            raise ValueError(f"encoder.patch_size={self.patch_size!r}: must be an integer in [2, 64]")
        if self.pos_grid is not None:
            grid = (self.pos_grid, self.pos_grid) if is_int(self.pos_grid) else self.pos_grid
            if not (isinstance(grid, Sequence) and len(grid) == 2 and all(is_int(g) and 1 <= g <= 1024 for g in grid)):
                raise ValueError(f"encoder.pos_grid={self.pos_grid!r}: must be None, G or (G_h, G_w) in [1, 1024]")
        if not isinstance(self.class_token, bool):
            raise ValueError(f"encoder.class_token={self.class_token!r}: must be a bool")
        if not is_int(self.num_levels) or not 1 <= self.num_levels <= 16:
            raise ValueError(f"encoder.num_levels={self.num_levels!r}: must be an integer in [1, 16]")
        if self.layer_norm_eps is not None and (not is_real(self.layer_norm_eps) or not 0 < self.layer_norm_eps < 1):
            raise ValueError(f"encoder.layer_norm_eps={self.layer_norm_eps!r}: must be a number in (0, 1)")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is None:
                continue
            ok = isinstance(value, Sequence) and len(value) == 3 and all(is_real(v) and math.isfinite(v) for v in value)
            if not ok or (name == "std" and min(value) <= 0):
                raise ValueError(f"encoder.{name}={value!r}: must be None or 3 finite numbers (std > 0)")
        if self.checkpoint is not None:
            path = os.fspath(self.checkpoint)
            if not path.endswith(".safetensors"):
                raise ValueError(f"encoder.checkpoint={path!r}: must be a local .safetensors file")
            if not os.path.isfile(path):
                raise ValueError(f"encoder.checkpoint={path!r}: no such file")
        if self.checkpoint_format not in _FORMATS:
            raise ValueError(
                f"encoder.checkpoint_format={self.checkpoint_format!r}: must be one of {', '.join(_FORMATS)}"
            )
        if self.output not in _OUTPUTS:
            raise ValueError(f"encoder.output={self.output!r}: must be one of {', '.join(_OUTPUTS)}")
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"encoder.dtype={self.dtype!r}: must be 'auto' or one of {', '.join(_DTYPES)}")
        if not isinstance(self.device, str) or not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise ValueError(f"encoder.device={self.device!r}: must be 'auto', 'cpu' or 'cuda[:N]'")
        if not isinstance(self.cuda_graphs, bool):
            raise ValueError(f"encoder.cuda_graphs={self.cuda_graphs!r}: must be a bool")
        if not is_int(self.seed) or self.seed < 0:
            raise ValueError(f"encoder.seed={self.seed!r}: must be an integer >= 0")

    def dims(self) -> tuple[int, int, int, int]:
        """(embed_dim, depth, num_heads, mlp_hidden) after applying the overrides to the preset."""
        preset = ARCHITECTURES.get(self.architecture, (None, None, None))
        dim = self.embed_dim if self.embed_dim is not None else preset[0]
        depth = self.depth if self.depth is not None else preset[1]
        heads = self.num_heads if self.num_heads is not None else preset[2]
        return dim, depth, heads, int(dim * (4.0 if self.mlp_ratio is None else self.mlp_ratio))

    def grid_hw(self) -> tuple[int, int] | None:
        """``pos_grid`` as (G_h, G_w), or None."""
        if self.pos_grid is None:
            return None
        return (self.pos_grid, self.pos_grid) if is_int(self.pos_grid) else tuple(self.pos_grid)

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_dtype(self) -> torch.dtype:
        if self.dtype != "auto":
            return _DTYPES[self.dtype]
        return torch.float16 if self.resolved_device().startswith("cuda") else torch.float32


# --- model --------------------------------------------------------------------------------------


class _PatchEmbed(nn.Module):
    """Holds timm's ``patch_embed.proj``; :meth:`FoveatedViT.embed_patches` applies it per patch."""

    def __init__(self, patch_size: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)


class _Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, qkv_cache: torch.Tensor | None = None, index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Self-attention over ``x``; with ``qkv_cache`` (B, S + 1, 3D), over the cached sequence.

        Without ``index`` the projections of the whole sequence are stored in the cache's first
        rows; with ``index`` (n,) sequence positions, ``x`` holds only those rows: their
        projections replace the cached ones and they attend to all S cached keys (the last
        cache row takes padding rows and is never attended to).
        """
        b, n, d = x.shape
        heads, head_dim = self.num_heads, d // self.num_heads
        qkv = self.qkv(x)
        if qkv_cache is None or index is None:
            if qkv_cache is not None:
                qkv_cache[:, :n].copy_(qkv)
            q, k, v = qkv.reshape(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            qkv_cache.index_copy_(1, index, qkv)
            q = qkv.reshape(b, n, 3, heads, head_dim)[:, :, 0].transpose(1, 2)
            length = qkv_cache.shape[1] - 1
            k, v = qkv_cache[:, :length].reshape(b, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4)[1:].unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (timm names: norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2)."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = _Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = _Mlp(dim, mlp_hidden)

    def forward(
        self, x: torch.Tensor, qkv_cache: torch.Tensor | None = None, index: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), qkv_cache, index)
        return x + self.mlp(self.norm2(x))


class FoveatedViT(nn.Module):
    """ViT over foveated patches, with timm ``VisionTransformer`` parameter names and math.

    Args:
        embed_dim: token width D.
        depth: number of blocks.
        num_heads: attention heads; divides D.
        mlp_hidden: MLP hidden width (timm: ``int(D * mlp_ratio)``).
        patch_size: P, samples per patch side (the patch-embedding kernel).
        pos_grid: (G_h, G_w) of the position grid; ``pos_embed`` is (1, 1 + G_h * G_w, D), class
            slot first, then the grid row-major.
        num_levels: rows of ``level_embed``.
        class_token: lead the sequence with the class token.
        layer_norm_eps: LayerNorm epsilon (timm 1e-6, Hugging Face 1e-12).
        mean: RGB mean subtracted from [0, 1] patches.
        std: RGB std the centred patches are divided by.
        output: "tokens" (after the final LayerNorm) or "pre_norm".
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_hidden: int,
        patch_size: int = 16,
        pos_grid: tuple[int, int] = DEFAULT_POS_GRID,
        num_levels: int = 8,
        class_token: bool = True,
        layer_norm_eps: float = TIMM_LAYER_NORM_EPS,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        output: str = "tokens",
    ):
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.mlp_hidden = mlp_hidden
        self.patch_size = patch_size
        self.pos_grid = (int(pos_grid[0]), int(pos_grid[1]))
        self.class_token = class_token
        self.layer_norm_eps = float(layer_norm_eps)
        self.output = output
        self.patch_embed = _PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.pos_grid[0] * self.pos_grid[1], embed_dim))
        self.level_embed = nn.Parameter(torch.zeros(num_levels, embed_dim))
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_hidden, layer_norm_eps) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=layer_norm_eps)
        # Not in the state_dict (timm has no such keys); they travel in the checkpoint metadata.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(3, 1, 1), persistent=False)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def num_levels(self) -> int:
        return self.level_embed.shape[0]

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """timm-like random init (truncated normal, std 0.02), ``level_embed`` zero.

        Args:
            generator: CPU generator for reproducible weights (the module must be on the CPU).
        """
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Conv2d)):
                    nn.init.trunc_normal_(module.weight, std=0.02, generator=generator)
                    nn.init.zeros_(module.bias)
                elif isinstance(module, nn.LayerNorm):
                    nn.init.ones_(module.weight)
                    nn.init.zeros_(module.bias)
            nn.init.trunc_normal_(self.pos_embed, std=0.02, generator=generator)
            nn.init.normal_(self.cls_token, std=1e-6, generator=generator)
            nn.init.zeros_(self.level_embed)

    # --- embeddings --------------------------------------------------------------------------

    def embed_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """Normalise and project patches: the 16x16/stride-16 conv, applied to each patch.

        Args:
            patches: (B, N, 3, P, P) float RGB in [0, 1], on the module's device.

        Returns:
            (B, N, D) tensor in the module's dtype.
        """
        weight = self.patch_embed.proj.weight
        x = ((patches.float() - self.mean) / self.std).to(weight.dtype)
        return F.linear(x.flatten(2), weight.flatten(1), self.patch_embed.proj.bias)

    def position_embedding(self, centers: torch.Tensor, image_size) -> torch.Tensor:
        """The position grid sampled bicubically at each patch centre.

        Args:
            centers: (B, N, 2) float patch centres (x, y) [px], full-resolution pixels.
            image_size: (W, H) [px] as a tuple or a (2,) float tensor on the module's device.

        Returns:
            (B, N, D) tensor in the module's dtype; computed in float32.
        """
        b, n, _ = centers.shape
        size = _size_tensor(image_size, centers.device)
        grid = (centers.float() + 0.5) / size * 2.0 - 1.0  # grid_sample's [-1, 1] over the image
        gh, gw = self.pos_grid
        table = self.pos_embed[:, 1:].float().reshape(gh, gw, self.embed_dim).permute(2, 0, 1)
        # grid_sample's CUDA kernel runs a thread per output point and loops over the channels:
        # for D = 768 that took 1.3 ms on an H100 at 273 or 4096 points. With the channels as the
        # batch (D, 1, G_h, G_w) and the points shared by all (an expanded view) it runs a thread
        # per (channel, point): 0.024 / 0.087 ms, the same arithmetic.
        out = F.grid_sample(
            table[:, None],
            grid.reshape(1, b * n, 1, 2).expand(self.embed_dim, -1, -1, -1),
            mode="bicubic",
            padding_mode="border",
            align_corners=False,
        )
        return out[:, 0, :, 0].t().reshape(b, n, self.embed_dim).to(self.pos_embed.dtype)

    def level_embedding(self, levels: torch.Tensor) -> torch.Tensor:
        """``level_embed`` linearly interpolated at continuous levels, clamped to [0, L - 1].

        Args:
            levels: (B, N) float mip levels (footprint = P * 2**level px).

        Returns:
            (B, N, D) tensor in the module's dtype; computed in float32.
        """
        top = self.num_levels - 1
        levels = levels.float().clamp(0.0, float(top))
        lower = levels.floor()
        frac = (levels - lower).unsqueeze(-1)
        lower = lower.long()
        upper = (lower + 1).clamp(max=top)
        table = self.level_embed.float()
        return (table[lower] * (1.0 - frac) + table[upper] * frac).to(self.level_embed.dtype)

    def embed(self, patches: torch.Tensor, centers: torch.Tensor, levels: torch.Tensor, image_size) -> torch.Tensor:
        """The token sequence entering the first block.

        Args:
            patches: (B, N, 3, P, P) float RGB in [0, 1].
            centers: (B, N, 2) float patch centres (x, y) [px].
            levels: (B, N) float continuous mip levels.
            image_size: (W, H) [px], tuple or (2,) float tensor.

        Returns:
            (B, 1 + N, D) with the class token first (``class_token``), else (B, N, D).
        """
        x = self.embed_patches(patches) + self.position_embedding(centers, image_size) + self.level_embedding(levels)
        if not self.class_token:
            return x
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        return torch.cat((cls, x), dim=1)

    def forward(
        self, patches: torch.Tensor, centers: torch.Tensor, levels: torch.Tensor, image_size
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encode a batch of foveated patches.

        Args:
            patches: (B, N, 3, P, P) float RGB in [0, 1] (the texture stage's output).
            centers: (B, N, 2) float patch centres (x, y) [px], pixel-centre convention.
            levels: (B, N) float continuous mip levels.
            image_size: (W, H) [px] of the full-resolution image, tuple or (2,) float tensor.

        Returns:
            ``(tokens, cls)``: (B, N, D) patch tokens and the (B, D) class-token output (None
            without a class token), in the module's dtype, after the final LayerNorm unless
            ``output == "pre_norm"``.
        """
        x = self.forward_sequence(patches, centers, levels, image_size)
        if self.class_token:
            return x[:, 1:], x[:, 0]
        return x, None

    def forward_sequence(
        self, patches: torch.Tensor, centers: torch.Tensor, levels: torch.Tensor, image_size, qkv_cache=None
    ) -> torch.Tensor:
        """:meth:`forward`'s whole output sequence, (B, S, D) with S = N (+ 1 class token first).

        Args:
            qkv_cache: optional (depth, B, S + 1, 3D) tensor in the module's dtype that receives
                every block's attention projections, for :meth:`forward_rows` on later frames.
        """
        x = self.embed(patches, centers, levels, image_size)
        for i, block in enumerate(self.blocks):
            x = block(x, None if qkv_cache is None else qkv_cache[i])
        return self.norm(x) if self.output == "tokens" else x

    def forward_rows(
        self,
        patches: torch.Tensor,
        centers: torch.Tensor,
        levels: torch.Tensor,
        image_size,
        rows: torch.Tensor,
        qkv_cache: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Re-encode some tokens of a sequence encoded earlier, the others taken from the cache.

        The given rows (and the class token) run through every block, attending to the cached
        keys and values of the rows not given; their new projections replace the cached ones.
        Exact for the given rows when the others did not change; the rows not given keep their
        earlier outputs, which no longer see the given rows' new content (the approximation of
        token-gated transformers, bounded by refreshing with a full encode).

        Args:
            patches, centers, levels: (B, M, ...) inputs of the rows to re-encode.
            image_size: (W, H) [px].
            rows: (M,) int64 token indices in [0, N]; index N marks a padding row (any inputs)
                whose results land in the cache's spare row.
            qkv_cache: (depth, B, S + 1, 3D) from :meth:`forward_sequence` (updated in place).

        Returns:
            ``(x, positions)``: (B, M', D) new outputs and their (M',) sequence positions (the
            class token first when present, M' = M + 1), to scatter into the sequence.
        """
        x = self.embed_patches(patches) + self.position_embedding(centers, image_size) + self.level_embedding(levels)
        positions = rows
        if self.class_token:
            cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
            x = torch.cat((cls, x), dim=1)
            positions = torch.cat((rows.new_zeros(1), rows + 1))
        for i, block in enumerate(self.blocks):
            x = block(x, qkv_cache[i], positions)
        return (self.norm(x) if self.output == "tokens" else x), positions

    # --- persistence -------------------------------------------------------------------------

    def metadata(self) -> dict:
        """Everything besides the weights needed to rebuild and run the module."""
        return {
            "schema_version": SCHEMA_VERSION,
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "mlp_hidden": self.mlp_hidden,
            "patch_size": self.patch_size,
            "pos_grid": list(self.pos_grid),
            "num_levels": self.num_levels,
            "class_token": self.class_token,
            "layer_norm_eps": self.layer_norm_eps,
            "mean": self.mean.flatten().tolist(),
            "std": self.std.flatten().tolist(),
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the weights (timm names + ``level_embed``, the module's dtype) to a safetensors
        file whose header metadata holds :meth:`metadata` as JSON under ``"fovea_vla.encoder"``."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, os.fspath(path), metadata={"format": "pt", _METADATA_KEY: json.dumps(self.metadata())})


def _size_tensor(image_size, device) -> torch.Tensor:
    if torch.is_tensor(image_size):
        return image_size.to(device=device, dtype=torch.float32)
    return torch.tensor([float(image_size[0]), float(image_size[1])], dtype=torch.float32, device=device)


# --- checkpoints --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadReport:
    """What loading a checkpoint did.

    Attributes:
        path: the file.
        format: "timm", "hf" or "fovea" (written by :meth:`FoveatedViT.save`).
        dropped: checkpoint keys not used (classifier heads, HF's pooler and mask token).
        adapted: human-readable notes on resampled tensors (patch kernel, position grid) and on
            blocks left out (a model shallower than the checkpoint).
        metadata: settings the checkpoint carried (mean, std, layer_norm_eps, ...).
    """

    path: str
    format: str
    dropped: tuple[str, ...]
    adapted: tuple[str, ...]
    metadata: dict


@dataclass
class _Checkpoint:
    path: str
    format: str
    tensors: dict[str, torch.Tensor]  # our names, float32
    sources: dict[str, str]  # our name -> checkpoint key(s), for messages
    dropped: tuple[str, ...]
    grid: tuple[int, int] | None  # None: not known from metadata
    metadata: dict


def _detect_format(keys) -> str | None:
    if "patch_embed.proj.weight" in keys:
        return "timm"
    if any(k.removeprefix("vit.") == "embeddings.patch_embeddings.projection.weight" for k in keys):
        return "hf"
    return None


_HF_LAYER = re.compile(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)")
_HF_RENAMES = {
    "layernorm_before": "norm1",
    "attention.output.dense": "attn.proj",
    "layernorm_after": "norm2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}


def convert_state_dict(
    tensors: dict[str, torch.Tensor], checkpoint_format: str
) -> tuple[dict[str, torch.Tensor], dict[str, str], tuple[str, ...]]:
    """Rename a timm or Hugging Face ViT state_dict to :class:`FoveatedViT` names.

    Args:
        tensors: checkpoint tensors by key.
        checkpoint_format: "timm" (names kept) or "hf" (``ViTModel`` layout, with or without the
            ``vit.`` prefix).

    Returns:
        ``(state, sources, dropped)``: tensors under our names; for each our key the checkpoint
        key(s) it came from; the keys dropped as classifier/pooler weights. Keys neither mapped
        nor dropped are kept under their own name, for :func:`load_checkpoint` to refuse.

    Raises:
        ValueError: an HF layer has some but not all of query/key/value.

    Example:
        >>> w = {f"encoder.layer.0.attention.attention.{n}.weight": torch.eye(2) for n in ("query", "key", "value")}
        >>> state, sources, dropped = convert_state_dict(w, "hf")
        >>> state["blocks.0.attn.qkv.weight"].shape, dropped
        (torch.Size([6, 2]), ())
    """
    if checkpoint_format == "timm":
        head = tuple(sorted(k for k in tensors if _TIMM_HEAD.fullmatch(k)))
        state = {k: v for k, v in tensors.items() if k not in head}
        return state, {k: k for k in state}, head
    state, sources, dropped = {}, {}, []
    qkv: dict[tuple[int, str], dict[str, tuple[str, torch.Tensor]]] = {}
    for key, value in tensors.items():
        name = key.removeprefix("vit.")
        if _HF_HEAD.fullmatch(name):
            dropped.append(key)
            continue
        ours = _HF_TOP.get(name)
        match = _HF_LAYER.fullmatch(name)
        if ours is None and match:
            index, inner, kind = match.groups()
            part = inner.removeprefix("attention.attention.")
            if part in ("query", "key", "value") and inner != part:
                qkv.setdefault((int(index), kind), {})[part] = (key, value)
                continue
            if inner in _HF_RENAMES:
                ours = f"blocks.{index}.{_HF_RENAMES[inner]}.{kind}"
        ours = ours or key
        state[ours], sources[ours] = value, key
    for (index, kind), parts in sorted(qkv.items()):
        missing = [p for p in ("query", "key", "value") if p not in parts]
        if missing:
            raise ValueError(f"checkpoint misses encoder.layer.{index}.attention.attention.{missing[0]}.{kind}")
        ours = f"blocks.{index}.attn.qkv.{kind}"
        state[ours] = torch.cat([parts[p][1] for p in ("query", "key", "value")], dim=0)
        sources[ours] = "+".join(parts[p][0] for p in ("query", "key", "value"))
    return state, sources, tuple(sorted(dropped))


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc


def _read_checkpoint(path: str | os.PathLike, checkpoint_format: str = "auto") -> _Checkpoint:
    """Tensors (float32, our names) and settings of a checkpoint, with no model involved."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = os.fspath(path)
    try:
        with safe_open(path, "pt") as f:
            header = f.metadata() or {}
        tensors = load_file(path)
    except (OSError, SafetensorError) as exc:
        raise ValueError(f"encoder.checkpoint={path!r}: not a readable safetensors file: {exc}") from exc
    detected = _detect_format(tensors)
    if detected is None:
        raise ValueError(
            f"encoder.checkpoint={path!r}: neither timm ('patch_embed.proj.weight') nor Hugging Face "
            f"('embeddings.patch_embeddings.projection.weight') ViT keys; first keys: {sorted(tensors)[:5]}"
        )
    if checkpoint_format != "auto" and checkpoint_format != detected:
        raise ValueError(f"encoder.checkpoint_format={checkpoint_format!r} but {path!r} has {detected} key names")
    metadata: dict = {}
    grid = None
    fmt = detected
    if _METADATA_KEY in header:
        fmt = "fovea"
        metadata = json.loads(header[_METADATA_KEY])
        if metadata.get("schema_version", 0) > SCHEMA_VERSION:
            raise ValueError(
                f"encoder.checkpoint={path!r}: schema_version {metadata['schema_version']} is newer than "
                f"this code's {SCHEMA_VERSION}"
            )
        grid = tuple(metadata["pos_grid"])
    elif detected == "hf":
        metadata = _hf_metadata(os.path.dirname(path))
        grid = metadata.pop("grid", None)
    state, sources, dropped = convert_state_dict({k: v.float() for k, v in tensors.items()}, detected)
    return _Checkpoint(path, fmt, state, sources, dropped, grid, metadata)


def _hf_metadata(folder: str) -> dict:
    """Settings from the config.json / preprocessor_config.json that ``save_pretrained`` writes."""
    metadata = {}
    config_path = os.path.join(folder, "config.json")
    if os.path.isfile(config_path):
        config = _read_json(config_path)
        act = config.get("hidden_act", "gelu")
        if act != "gelu":
            raise ValueError(f"{config_path}: hidden_act={act!r}; only 'gelu' (erf) is implemented")
        metadata["layer_norm_eps"] = float(config.get("layer_norm_eps", HF_LAYER_NORM_EPS))
        if "num_attention_heads" in config:
            metadata["num_heads"] = int(config["num_attention_heads"])
        if "image_size" in config and "patch_size" in config:
            size, patch = config["image_size"], config["patch_size"]
            size = (size, size) if isinstance(size, int) else size
            patch = (patch, patch) if isinstance(patch, int) else patch
            metadata["grid"] = (size[0] // patch[0], size[1] // patch[1])
    else:
        metadata["layer_norm_eps"] = HF_LAYER_NORM_EPS
    processor_path = os.path.join(folder, "preprocessor_config.json")
    if os.path.isfile(processor_path):
        processor = _read_json(processor_path)
        if "image_mean" in processor and "image_std" in processor:
            metadata["mean"] = [float(v) for v in processor["image_mean"]]
            metadata["std"] = [float(v) for v in processor["image_std"]]
    return metadata


def _checkpoint_grid(ckpt: _Checkpoint, configured: tuple[int, int] | None) -> tuple[int, int]:
    """(G_h, G_w) of the checkpoint's position grid: from its metadata, else a square (timm's
    default), else the configured grid if the token count fits it."""
    pos = ckpt.tensors.get("pos_embed")
    if pos is None or pos.ndim != 3:
        raise ValueError(f"encoder.checkpoint={ckpt.path!r}: missing key 'pos_embed' (1, 1 + G_h * G_w, D)")
    count = pos.shape[1] - 1
    if ckpt.grid is not None and ckpt.grid[0] * ckpt.grid[1] == count:
        return tuple(ckpt.grid)
    side = math.isqrt(count)
    if side * side == count:
        return side, side
    if configured is not None and configured[0] * configured[1] == count:
        return tuple(configured)
    raise ValueError(
        f"encoder.checkpoint={ckpt.path!r}: pos_embed has {count} grid tokens, not a square; "
        "set encoder.pos_grid to its (G_h, G_w)"
    )


def resample_patch_kernel(kernel: torch.Tensor, new_size: int) -> torch.Tensor:
    """Resample a patch-embedding kernel to another patch size, preserving its responses.

    With ``R`` the (new*new, old*old) matrix of bicubic antialiased resizing from the old patch
    size to the new one, the new kernel is ``pinv(R^T) w``, so ``<R x, w_new> = <x, w>`` for
    every old-size patch x when enlarging (exactly), and in the least-squares sense when
    shrinking (FlexiViT, Beyer et al. 2023; the same as timm's ``resample_patch_embed``).

    Args:
        kernel: (D, C, p, p) conv weight.
        new_size: the new patch side.

    Returns:
        (D, C, new_size, new_size) tensor of ``kernel``'s dtype; computed in float64.

    Example:
        >>> w = torch.randn(4, 3, 8, 8, dtype=torch.float64)
        >>> x = torch.randn(3, 8, 8, dtype=torch.float64)
        >>> up = F.interpolate(x[None], size=(16, 16), mode="bicubic", antialias=True)[0]
        >>> w16 = resample_patch_kernel(w, 16)
        >>> bool(torch.allclose((w16 * up).sum((1, 2, 3)), (w * x).sum((1, 2, 3))))
        True
    """
    old = kernel.shape[-1]
    if kernel.shape[-2] != old:
        raise ValueError(f"patch kernel must be square, got {tuple(kernel.shape)}")
    if old == new_size:
        return kernel
    basis = torch.eye(old * old, dtype=torch.float64).reshape(old * old, 1, old, old)
    resize = F.interpolate(basis, size=(new_size, new_size), mode="bicubic", antialias=True)
    resize = resize.reshape(old * old, new_size * new_size)  # R^T: old pixels -> new pixels
    flat = kernel.to(torch.float64).reshape(-1, old * old)
    return (flat @ torch.linalg.pinv(resize).T).reshape(*kernel.shape[:2], new_size, new_size).to(kernel.dtype)


def resample_pos_grid(pos_embed: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """Resample a (1, 1 + G_h * G_w, D) position embedding to another grid, class slot kept.

    Bicubic, ``align_corners=False``, antialiased when shrinking, in float32 (as timm's
    ``resample_abs_pos_embed``); returned unchanged when the grids are equal.

    Example:
        >>> resample_pos_grid(torch.zeros(1, 1 + 4 * 4, 8), (4, 4), (2, 3)).shape
        torch.Size([1, 7, 8])
    """
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    dim = pos_embed.shape[-1]
    grid = pos_embed[:, 1:].float().reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False, antialias=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim)
    return torch.cat((pos_embed[:, :1].float(), grid), dim=1).to(pos_embed.dtype)


def _apply_checkpoint(model: FoveatedViT, ckpt: _Checkpoint) -> LoadReport:
    """Adapt the checkpoint to ``model`` (patch size, position grid), check it and load it."""
    state = dict(ckpt.tensors)
    adapted = []
    heads = ckpt.metadata.get("num_heads")
    if heads is not None and heads != model.num_heads:
        raise ValueError(
            f"encoder.num_heads={model.num_heads} but checkpoint {ckpt.path!r} has {heads} attention heads"
        )
    kernel = state.get("patch_embed.proj.weight")
    if kernel is not None and kernel.ndim == 4 and kernel.shape[-1] != model.patch_size:
        state["patch_embed.proj.weight"] = resample_patch_kernel(kernel, model.patch_size)
        adapted.append(f"patch_embed.proj.weight: patch {kernel.shape[-1]} -> {model.patch_size} (pseudo-inverse)")
    # A shallower model (encoder.depth) runs the checkpoint's first blocks: early blocks of a ViT stay
    # close to the pixels, which a head trained on top may need more than the deep features.
    extra = {k for k in state if (m := _BLOCK_KEY.match(k)) and int(m.group(1)) >= model.depth}
    if extra:
        total = 1 + max(int(_BLOCK_KEY.match(k).group(1)) for k in extra)
        state = {k: v for k, v in state.items() if k not in extra}
        adapted.append(f"blocks: kept the first {model.depth} of {total} (encoder.depth)")
    grid = _checkpoint_grid(ckpt, model.pos_grid)
    if grid != model.pos_grid:
        state["pos_embed"] = resample_pos_grid(state["pos_embed"], grid, model.pos_grid)
        adapted.append(f"pos_embed: grid {grid[0]}x{grid[1]} -> {model.pos_grid[0]}x{model.pos_grid[1]} (bicubic)")
    expected = model.state_dict()
    # Only our own checkpoints carry a level embedding; others keep the zero init.
    optional = {"level_embed"}
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        key = unexpected[0]
        raise ValueError(
            f"encoder.checkpoint={ckpt.path!r}: unexpected key {ckpt.sources.get(key, key)!r} "
            f"(shape {tuple(state[key].shape)}; the model has no such parameter; {len(unexpected)} unexpected in all)"
        )
    missing = sorted(set(expected) - set(state) - optional)
    if missing:
        key = missing[0]
        raise ValueError(
            f"encoder.checkpoint={ckpt.path!r} ({ckpt.format} layout): missing key {key!r} "
            f"(model shape {tuple(expected[key].shape)}; {len(missing)} missing in all)"
        )
    for key in sorted(state):
        value = state[key]
        if value.shape != expected[key].shape:
            raise ValueError(
                f"encoder.checkpoint={ckpt.path!r}: key {ckpt.sources.get(key, key)!r} has shape "
                f"{tuple(value.shape)} but the model's {key!r} has shape {tuple(expected[key].shape)}"
            )
    model.load_state_dict(state, strict=False)  # strictness checked above, level_embed optional
    report = LoadReport(ckpt.path, ckpt.format, ckpt.dropped, tuple(adapted), ckpt.metadata)
    _LOG.info(
        "encoder: loaded %s (%s layout)%s%s",
        ckpt.path,
        ckpt.format,
        f"; dropped {', '.join(ckpt.dropped)}" if ckpt.dropped else "",
        f"; {'; '.join(adapted)}" if adapted else "",
    )
    return report


def load_checkpoint(model: FoveatedViT, path: str | os.PathLike, checkpoint_format: str = "auto") -> LoadReport:
    """Load a timm, Hugging Face or own safetensors checkpoint into an existing model.

    Keys are renamed to ours (:func:`convert_state_dict`); a different patch size is resampled
    (:func:`resample_patch_kernel`) and a different position grid too (:func:`resample_pos_grid`),
    both in float32 or wider; blocks beyond the model's depth are left out. ``level_embed`` keeps
    its value when the checkpoint has none.
    Normalisation and LayerNorm settings of the checkpoint are *not* applied to ``model``
    (they are reported in ``metadata``); :func:`build_model` applies them.

    Args:
        model: the module to fill (any device/dtype).
        path: local ``.safetensors`` file.
        checkpoint_format: "auto", "timm" or "hf".

    Returns:
        What was dropped and adapted.

    Raises:
        ValueError: unreadable file, unknown layout, a missing or unexpected key, or a shape that
            differs (the message names the key and both shapes).
    """
    return _apply_checkpoint(model, _read_checkpoint(path, checkpoint_format))


def _setting(name: str, configured, metadata: dict, default):
    """Checkpoint metadata, else the configured value, else the format's default."""
    if name in metadata:
        value = metadata[name]
        if configured is not None and tuple(np.atleast_1d(configured)) != tuple(np.atleast_1d(value)):
            _LOG.warning("encoder.%s=%s overridden by the checkpoint's %s", name, configured, value)
        return value
    return configured if configured is not None else default


def build_model(cfg: EncoderConfig) -> tuple[FoveatedViT, LoadReport | None]:
    """Build the float32 CPU module ``cfg`` describes: seeded random init, then the checkpoint.

    Returns:
        ``(model, report)``; report is None without a checkpoint.

    Raises:
        ValueError: see :func:`load_checkpoint`.
    """
    dim, depth, heads, hidden = cfg.dims()
    ckpt = _read_checkpoint(cfg.checkpoint, cfg.checkpoint_format) if cfg.checkpoint is not None else None
    meta = ckpt.metadata if ckpt else {}
    is_hf = ckpt is not None and ckpt.format == "hf"
    grid = cfg.grid_hw() or (_checkpoint_grid(ckpt, None) if ckpt else DEFAULT_POS_GRID)
    model = FoveatedViT(
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        mlp_hidden=hidden,
        patch_size=cfg.patch_size,
        pos_grid=grid,
        num_levels=cfg.num_levels,
        class_token=cfg.class_token,
        layer_norm_eps=_setting(
            "layer_norm_eps", cfg.layer_norm_eps, meta, HF_LAYER_NORM_EPS if is_hf else TIMM_LAYER_NORM_EPS
        ),
        mean=_setting("mean", cfg.mean, meta, HF_MEAN if is_hf else IMAGENET_MEAN),
        std=_setting("std", cfg.std, meta, HF_STD if is_hf else IMAGENET_STD),
        output=cfg.output,
    )
    model.init_weights(torch.Generator().manual_seed(cfg.seed))
    return model, (_apply_checkpoint(model, ckpt) if ckpt else None)


# --- inference stage ----------------------------------------------------------------------------


@dataclass
class EncoderOutput:
    """One :meth:`FoveatedEncoder.encode` call's result.

    Attributes:
        tokens: ([B,] N, D) patch tokens on the encoder's device, in its dtype; a new tensor each
            call (not the CUDA graph's buffer). B is present only when the input had it.
        cls: ([B,] D) class-token output, or None without a class token.
        timing_ms: wall time of ``encode`` [ms], input copies and (on CUDA) waiting for the
            result included.
        device_ms: CUDA: the encoder's GPU time [ms] from CUDA events; None on CPU (and when
            nothing was re-encoded).
        graph: whether a CUDA graph was replayed (captured first for a new shape).
        reencoded: tokens per frame that went through the blocks: N for a full encode, fewer
            when :meth:`FoveatedEncoder.update` re-encoded only the changed ones, 0 when it
            reused every token.
    """

    tokens: torch.Tensor
    cls: torch.Tensor | None
    timing_ms: float
    device_ms: float | None
    graph: bool
    reencoded: int = 0


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]  # the static input buffers
    outputs: tuple[torch.Tensor | None, ...]
    # Inputs that arrive on the CPU travel packed: per dtype one pinned host buffer and one copy to
    # the device buffer their static inputs are views of. A copy from pageable memory would make the
    # host wait for all queued GPU work (texture upload, sampling) before replaying, and one copy
    # per small input costs more than the packing.
    packed: list[tuple[torch.Tensor, torch.Tensor, list[tuple[int, torch.Tensor]]]]


@dataclass
class _Tracked:
    """What :meth:`FoveatedEncoder.update` keeps of the last frame of one token count."""

    qkv: torch.Tensor  # (depth, 1, S + 1, 3D) every block's attention projections
    sequence: torch.Tensor  # (1, S + 1, D) outputs; the last row takes padding rows
    patches: torch.Tensor  # (1, N + 1, 3, P, P) float32 inputs of those outputs (+ padding row)
    centers: torch.Tensor  # (1, N + 1, 2)
    levels: torch.Tensor  # (1, N + 1)
    image_size: tuple[float, float] | None = None  # None until a full encode filled the state


# Smallest padded row count of a partial re-encode; each power of two above it is one CUDA graph.
_MIN_ROW_BUCKET = 8


class FoveatedEncoder:
    """Inference stage: the configured :class:`FoveatedViT` on its device and dtype.

    On CUDA with ``cuda_graphs``, each new shape is captured once into a CUDA graph (after a
    warm-up on a side stream) whose static input buffers every later call of that shape copies
    into before replaying. On the CPU the module runs eagerly.

    :meth:`encode` encodes every token. :meth:`update` keeps the last frame's state (per token
    count, batch 1) and re-encodes only the tokens whose inputs changed (see
    :meth:`FoveatedViT.forward_rows`), the padded row count rounded up to a power of two so a
    handful of graphs serve every frame.

    Args:
        cfg: stage parameters; default :class:`EncoderConfig`.

    Raises:
        RuntimeError: a CUDA device is configured but absent.
        ValueError: see :func:`load_checkpoint`.
    """

    def __init__(self, cfg: EncoderConfig | None = None):
        cfg = cfg or EncoderConfig()
        self.cfg = cfg
        self.device = torch.device(cfg.resolved_device())
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"encoder.device={cfg.device!r} but torch {torch.__version__} sees no CUDA device")
        self.dtype = cfg.resolved_dtype()
        model, self.load_report = build_model(cfg)
        mean, std = model.mean, model.std
        self.model = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        # The normalisation stays float32: the cast above would have rounded it to the module's dtype.
        self.model.mean, self.model.std = mean.to(self.device), std.to(self.device)
        self._cuda = self.device.type == "cuda"
        self._use_graphs = cfg.cuda_graphs and self._cuda
        self._graphs: dict[tuple, _Graph] = {}
        self._tracked: dict[int, _Tracked] = {}
        self._events = (
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if self._cuda else None
        )

    @property
    def embed_dim(self) -> int:
        return self.model.embed_dim

    @property
    def graph_shapes(self) -> list[tuple[int, int]]:
        """(B, N) shapes of :meth:`encode` with a captured CUDA graph."""
        return sorted(key[1:] for key in self._graphs if key[0] == "encode")

    def reset(self) -> None:
        """Drop the captured CUDA graphs and the state of :meth:`update` (the next call starts afresh)."""
        self._graphs.clear()
        self._tracked.clear()

    def save(self, path: str | os.PathLike) -> None:
        """Save the module (:meth:`FoveatedViT.save`)."""
        self.model.save(path)

    def _inputs(self, patches, centers, levels, image_size):
        """Validated (B, N, ...) float32 tensors (on whatever device they came) and a flag for
        an unbatched input."""
        patches = torch.as_tensor(patches)
        centers = torch.as_tensor(centers, dtype=torch.float32)
        levels = torch.as_tensor(levels, dtype=torch.float32)
        p = self.model.patch_size
        batched = patches.ndim == 5
        if patches.ndim not in (4, 5) or tuple(patches.shape[-3:]) != (3, p, p) or not patches.is_floating_point():
            raise ValueError(f"patches must be ([B,] N, 3, {p}, {p}) float, got {tuple(patches.shape)} {patches.dtype}")
        lead = tuple(patches.shape[:-3])
        if 0 in lead:
            raise ValueError(f"patches must hold at least one token, got {tuple(patches.shape)}")
        if tuple(centers.shape) != (*lead, 2):
            raise ValueError(f"centers must be {(*lead, 2)} (x, y) px to match patches, got {tuple(centers.shape)}")
        if tuple(levels.shape) != lead:
            raise ValueError(f"levels must be {lead} to match patches, got {tuple(levels.shape)}")
        if len(image_size) != 2 or not all(is_real(s) and s > 0 for s in image_size):
            raise ValueError(f"image_size must be (W, H) > 0 px, got {image_size!r}")
        if not batched:
            patches, centers, levels = patches[None], centers[None], levels[None]
        size = torch.tensor([float(image_size[0]), float(image_size[1])], dtype=torch.float32)
        return (patches.float(), centers, levels, size), batched

    def _capture(self, run: Callable, inputs) -> _Graph:
        static: list[torch.Tensor | None] = [None] * len(inputs)
        packed = []
        for dtype in sorted({t.dtype for t in inputs if t.device.type == "cpu"}, key=str):
            members = [i for i, t in enumerate(inputs) if t.device.type == "cpu" and t.dtype == dtype]
            total = sum(inputs[i].numel() for i in members)
            device_buffer = torch.empty(total, dtype=dtype, device=self.device)
            host_buffer = torch.empty(total, dtype=dtype, pin_memory=True)
            views, offset = [], 0
            for i in members:
                count = inputs[i].numel()
                static[i] = device_buffer[offset : offset + count].view(inputs[i].shape)
                views.append((i, host_buffer[offset : offset + count].view(inputs[i].shape)))
                offset += count
            packed.append((device_buffer, host_buffer, views))
        for i, t in enumerate(inputs):
            if static[i] is None:
                static[i] = t.to(self.device, copy=True)
        entry = _Graph(torch.cuda.CUDAGraph(), tuple(static), (), packed)
        self._fill(entry, inputs)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            # Warm-up outside the graph: cuBLAS/attention kernels pick their algorithms and workspaces.
            for _ in range(3):
                run(*entry.inputs)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        # thread_local: another thread (the policy in vla_stack) may use the GPU while this one captures.
        with accel.collector_paused(), torch.cuda.graph(entry.graph, capture_error_mode="thread_local"):
            entry.outputs = run(*entry.inputs)
        return entry

    @staticmethod
    def _fill(entry: _Graph, inputs) -> None:
        """Copy a call's inputs into the graph's static buffers (the pinned ones are free again:
        every call waits for its result)."""
        for device_buffer, host_buffer, views in entry.packed:
            for i, view in views:
                view.copy_(inputs[i])
            device_buffer.copy_(host_buffer, non_blocking=True)
        for slot, value in zip(entry.inputs, inputs, strict=True):
            if value.device.type != "cpu":
                slot.copy_(value, non_blocking=True)

    def _run(self, key: tuple, run: Callable, inputs) -> tuple:
        """``run(*inputs)`` on the device: eagerly, or through the CUDA graph of ``key``, timed
        with the CUDA events. ``run`` must be idempotent (the capture warms it up on these inputs)."""
        if not self._use_graphs:
            inputs = tuple(t.to(self.device, non_blocking=True) for t in inputs)
            if self._events:
                self._events[0].record()
            outputs = run(*inputs)
            if self._events:
                self._events[1].record()
            return outputs
        entry = self._graphs.get(key)
        if entry is None:
            # Capturing records without running: the replay below computes these inputs.
            entry = self._graphs[key] = self._capture(run, inputs)
        else:
            self._fill(entry, inputs)
        self._events[0].record()
        entry.graph.replay()
        self._events[1].record()
        return entry.outputs

    def _finish(self, start: float, tokens, cls, batched: bool, reencoded: int) -> EncoderOutput:
        device_ms = None
        if self._events and reencoded:
            torch.cuda.current_stream(self.device).synchronize()
            device_ms = self._events[0].elapsed_time(self._events[1])
        if not batched:
            tokens, cls = tokens[0], (cls[0] if cls is not None else None)
        graph = self._use_graphs and reencoded > 0
        return EncoderOutput(tokens, cls, (time.perf_counter() - start) * 1e3, device_ms, graph, reencoded)

    def encode(self, patches, centers, levels, image_size: tuple[float, float]) -> EncoderOutput:
        """Encode one frame's (or a batch of frames') foveated patches.

        Args:
            patches: ([B,] N, 3, P, P) float RGB in [0, 1], torch tensor (any device; the texture
                stage's output) or numpy array.
            centers: ([B,] N, 2) patch centres (x, y) [px] in the full-resolution image (pixel
                centre convention), numpy or torch.
            levels: ([B,] N) continuous mip levels (``FoveatedLayout.levels``).
            image_size: (W, H) [px] of the full-resolution image, shared by the batch.

        Returns:
            :class:`EncoderOutput` with ([B,] N, D) tokens and ([B,] D) class output.

        Raises:
            ValueError: shapes or dtypes that do not fit.
        """
        start = time.perf_counter()
        inputs, batched = self._inputs(patches, centers, levels, image_size)
        with torch.no_grad():
            tokens, cls = self._run(("encode", *inputs[0].shape[:2]), self.model, inputs)
            # A graph overwrites its outputs on the next replay of this shape.
            tokens, cls = tokens.clone(), (cls.clone() if cls is not None else None)
        return self._finish(start, tokens, cls, batched, int(inputs[0].shape[0] * inputs[0].shape[1]))

    def update(
        self,
        patches,
        centers,
        levels,
        image_size: tuple[float, float],
        changed=None,
        *,
        max_changed_fraction: float = 1.0,
    ) -> EncoderOutput:
        """Encode one frame (batch 1), re-encoding only the tokens that changed since the last call.

        Keeps the state of the last call per token count. With ``changed`` given and a state of
        this image size, only the changed tokens are re-encoded against the others' cached keys
        and values (:meth:`FoveatedViT.forward_rows`), and none changed returns the last outputs
        again; otherwise (or above ``max_changed_fraction``) the whole frame is encoded, which
        also refreshes the state.

        Args:
            patches, centers, levels, image_size: as :meth:`encode`, unbatched (N tokens).
            changed: (N,) bool, the tokens whose patch, centre or level differ from the last
                call's (the caller's knowledge, or :meth:`changed_tokens`); None encodes all.
            max_changed_fraction: share of changed tokens in [0, 1] above which the whole frame
                is encoded instead.

        Returns:
            :class:`EncoderOutput`; ``reencoded`` says how many tokens went through the blocks.

        Raises:
            ValueError: shapes that do not fit, a batch, or ``changed`` of the wrong shape.
        """
        start = time.perf_counter()
        inputs, batched = self._inputs(patches, centers, levels, image_size)
        if batched:
            raise ValueError(f"update takes one frame, got a batch of patches {tuple(inputs[0].shape)}")
        n = int(inputs[0].shape[1])
        rows = None
        if changed is not None:
            mask = np.asarray(changed.cpu() if isinstance(changed, torch.Tensor) else changed, dtype=bool)
            if mask.shape != (n,):
                raise ValueError(f"changed must be ({n},) bool to match the tokens, got {mask.shape}")
            rows = np.flatnonzero(mask)
        size = (float(image_size[0]), float(image_size[1]))
        state = self._tracked.get(n)
        if state is None:
            state = self._tracked[n] = self._new_state(n)
        with torch.no_grad():
            if rows is None or state.image_size != size or len(rows) > max_changed_fraction * n:
                self._run(("full", n), lambda *x: self._encode_full(state, *x), inputs)
                state.image_size = size
                reencoded = n
            elif len(rows):
                self._encode_rows(state, inputs, rows)
                reencoded = len(rows)
            else:
                reencoded = 0
            first = 1 if self.model.class_token else 0
            tokens = state.sequence[:, first : first + n].clone()
            cls = state.sequence[:, 0].clone() if self.model.class_token else None
        return self._finish(start, tokens, cls, False, reencoded)

    def changed_tokens(self, patches, centers, levels, image_size: tuple[float, float]) -> np.ndarray | None:
        """(N,) bool: the tokens whose patch, centre or level differ from :meth:`update`'s last
        inputs (exact comparison; one small device-to-host copy), or None without a state of this
        token count and image size."""
        inputs, batched = self._inputs(patches, centers, levels, image_size)
        n = int(inputs[0].shape[1])
        state = self._tracked.get(n)
        if batched or state is None or state.image_size != (float(image_size[0]), float(image_size[1])):
            return None
        with torch.no_grad():
            patches, centers, levels, _ = (t.to(self.device, non_blocking=True) for t in inputs)
            differs = (patches[0] != state.patches[0, :n]).flatten(1).any(1)
            differs |= (centers[0] != state.centers[0, :n]).any(1) | (levels[0] != state.levels[0, :n])
            return differs.cpu().numpy()

    def _new_state(self, n: int) -> _Tracked:
        model, p = self.model, self.model.patch_size
        length = n + (1 if model.class_token else 0)
        zeros = {"device": self.device}
        return _Tracked(
            qkv=torch.zeros(model.depth, 1, length + 1, 3 * model.embed_dim, dtype=self.dtype, **zeros),
            sequence=torch.zeros(1, length + 1, model.embed_dim, dtype=self.dtype, **zeros),
            patches=torch.zeros(1, n + 1, 3, p, p, **zeros),
            centers=torch.zeros(1, n + 1, 2, **zeros),
            levels=torch.zeros(1, n + 1, **zeros),
        )

    def _encode_full(self, state: _Tracked, patches, centers, levels, size):
        n = patches.shape[1]
        state.patches[:, :n].copy_(patches)
        state.centers[:, :n].copy_(centers)
        state.levels[:, :n].copy_(levels)
        sequence = self.model.forward_sequence(patches, centers, levels, size, state.qkv)
        state.sequence[:, : sequence.shape[1]].copy_(sequence)

    def _encode_rows(self, state: _Tracked, inputs, rows: np.ndarray) -> None:
        patches, centers, levels, size = inputs
        n = patches.shape[1]
        bucket = max(_MIN_ROW_BUCKET, 1 << (len(rows) - 1).bit_length()) if self._use_graphs else len(rows)
        index = np.full(bucket, n, dtype=np.int64)
        index[: len(rows)] = rows
        # Padding rows repeat the first changed row's inputs; their results land in the spare row.
        gather = torch.from_numpy(np.where(index == n, rows[0], index))
        rows_in = (patches, centers[:, gather], levels[:, gather], size, torch.from_numpy(index), gather)

        def run(patches, centers, levels, size, index, gather):
            patches = patches.index_select(1, gather)
            state.patches.index_copy_(1, index, patches)
            state.centers.index_copy_(1, index, centers)
            state.levels.index_copy_(1, index, levels)
            x, positions = self.model.forward_rows(patches, centers, levels, size, index, state.qkv)
            state.sequence.index_copy_(1, positions, x)

        self._run(("rows", n, bucket), run, rows_in)


# --- layouts and examples -----------------------------------------------------------------------


def full_resolution_layout(width: int, height: int, patch_size: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The regular, non-overlapping patch grid of a plain ViT over the whole image.

    Columns ``i < W // P`` and rows ``j < H // P`` (a remainder narrower than a patch is left
    out, as a stride-P convolution does), row-major like timm's token order; patch (i, j) covers
    pixels [P*i, P*i + P) x [P*j, P*j + P), so its centre is ``P * i + (P - 1) / 2`` px and, at
    level 0, its texture samples fall on those pixels exactly.

    Args:
        width: image width W [px].
        height: image height H [px].
        patch_size: P [px].

    Returns:
        ``(centers, sizes, levels)``: (N, 2) float32 (x, y) [px], (N,) float32 footprints
        (= P) [px] and (N,) float32 zeros, N = (W // P) * (H // P).

    Raises:
        ValueError: the image is smaller than one patch.

    Example:
        >>> centers, sizes, levels = full_resolution_layout(1024, 1024)
        >>> centers.shape, centers[1].tolist(), float(sizes[0]), float(levels.max())
        ((4096, 2), [23.5, 7.5], 16.0, 0.0)
    """
    cols, rows = width // patch_size, height // patch_size
    if cols < 1 or rows < 1:
        raise ValueError(f"image {width}x{height} is smaller than one {patch_size}-px patch")
    ys, xs = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    centers = np.stack([xs.ravel(), ys.ravel()], axis=1) * patch_size + (patch_size - 1) / 2.0
    n = rows * cols
    return centers.astype(np.float32), np.full(n, patch_size, np.float32), np.zeros(n, np.float32)


def make_example(
    num_tokens: int = 273, width: int = 640, height: int = 480, patch_size: int = 16, seed: int = 0
) -> tuple[torch.Tensor, np.ndarray, np.ndarray, tuple[int, int]]:
    """Encoder input for a foveated layout fixating the image centre, with random patch pixels.

    Returns:
        ``(patches, centers, levels, image_size)``: (N, 3, P, P) float32 CPU tensor uniform in
        [0, 1], the layout's (N, 2) centres [px] and (N,) levels, and (W, H).

    Example:
        >>> patches, centers, levels, size = make_example(num_tokens=32, patch_size=8)
        >>> tuple(patches.shape), centers.shape, size
        ((32, 3, 8, 8), (32, 2), (640, 480))
    """
    layout = foveated_layout(
        FoveationConfig(num_tokens=num_tokens, patch_size=patch_size), width, height, (width / 2, height / 2)
    )
    patches = torch.rand(num_tokens, 3, patch_size, patch_size, generator=torch.Generator().manual_seed(seed))
    return patches, layout.centers, layout.levels, (width, height)
