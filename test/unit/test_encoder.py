"""Foveated ViT encoder: equivalence with a plain ViT (own reference, timm, Hugging Face) on the
native patch grid, checkpoint conversion and refusal, level embedding, CUDA precision and graphs.

Tiny models (D 64, 2 blocks, 4 heads) on a 64x48 image keep the CPU tests fast; the ``gpu`` tests
use ViT-B/16.
"""

from __future__ import annotations

import dataclasses
import doctest
import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from fovea_vla.core import encoder as encoder_module
from fovea_vla.core.encoder import (
    EncoderConfig,
    FoveatedEncoder,
    FoveatedViT,
    full_resolution_layout,
    load_checkpoint,
    make_example,
    resample_patch_kernel,
    resample_pos_grid,
)
from fovea_vla.core.texture.base import TextureConfig
from fovea_vla.core.texture.torch_pyramid import TorchPyramid

TINY = {"architecture": None, "embed_dim": 64, "depth": 2, "num_heads": 4, "device": "cpu"}
WIDTH, HEIGHT, GRID = 64, 48, (3, 4)  # a 4 x 3 grid of 16-px patches
# float32 equality bound for a 2-block ViT computed in another order (conv vs linear, SDPA vs
# explicit softmax); measured max |difference| ~1e-6 on a 2-core x86 CPU.
ATOL = 2e-5


def _encoder(**kwargs) -> FoveatedEncoder:
    return FoveatedEncoder(EncoderConfig(**{**TINY, **kwargs}))


def _image(batch: int = 1, seed: int = 0) -> torch.Tensor:
    """(B, 3, H, W) float32 in [0, 1]."""
    return torch.rand(batch, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(seed))


def _grid_patches(image: torch.Tensor, p: int = 16) -> torch.Tensor:
    """(B, 3, H, W) -> (B, N, 3, p, p) non-overlapping patches, row-major."""
    b = image.shape[0]
    tiles = image.unfold(2, p, p).unfold(3, p, p)  # (B, 3, gh, gw, p, p)
    return tiles.permute(0, 2, 3, 1, 4, 5).reshape(b, -1, 3, p, p)


def _grid_inputs(image: torch.Tensor):
    centers, _, levels = full_resolution_layout(image.shape[3], image.shape[2])
    b = image.shape[0]
    return (
        _grid_patches(image),
        torch.from_numpy(centers).expand(b, -1, -1),
        torch.from_numpy(levels).expand(b, -1),
        (image.shape[3], image.shape[2]),
    )


def _reference_vit(state: dict, pixels: torch.Tensor, num_heads: int, eps: float, patch: int = 16) -> torch.Tensor:
    """A plain ViT forward written out independently: (B, 3, H, W) normalised pixels ->
    (B, 1 + N, D) after the final LayerNorm, class token first."""
    x = F.conv2d(pixels, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat((state["cls_token"].expand(x.shape[0], -1, -1), x), dim=1) + state["pos_embed"]
    b, n, d = x.shape
    hd = d // num_heads
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    for i in range(depth):
        p = f"blocks.{i}."
        h = F.layer_norm(x, (d,), state[p + "norm1.weight"], state[p + "norm1.bias"], eps)
        qkv = (h @ state[p + "attn.qkv.weight"].T + state[p + "attn.qkv.bias"]).reshape(b, n, 3, num_heads, hd)
        q, k, v = (qkv[:, :, j].transpose(1, 2) for j in range(3))
        attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(hd), dim=-1) @ v
        x = x + attn.transpose(1, 2).reshape(b, n, d) @ state[p + "attn.proj.weight"].T + state[p + "attn.proj.bias"]
        h = F.layer_norm(x, (d,), state[p + "norm2.weight"], state[p + "norm2.bias"], eps)
        h = F.gelu(h @ state[p + "mlp.fc1.weight"].T + state[p + "mlp.fc1.bias"])
        x = x + h @ state[p + "mlp.fc2.weight"].T + state[p + "mlp.fc2.bias"]
    return F.layer_norm(x, (d,), state["norm.weight"], state["norm.bias"], eps)


def _normalise(model: FoveatedViT, image: torch.Tensor) -> torch.Tensor:
    return (image - model.mean) / model.std


def _timm_file(tmp_path, model: FoveatedViT, name="timm.safetensors", **changes) -> str:
    """``model``'s weights under timm names (no level embedding, no metadata), with a classifier
    head; ``changes`` replaces (tensor) or removes (None) keys."""
    state = {k: v.clone() for k, v in model.state_dict().items() if k != "level_embed"}
    state["head.weight"] = torch.zeros(10, model.embed_dim)
    state["head.bias"] = torch.zeros(10)
    for key, value in changes.items():
        if value is None:
            del state[key]
        else:
            state[key] = value
    path = str(tmp_path / name)
    save_file(state, path)
    return path


def test_doctests():
    assert doctest.testmod(encoder_module).failed == 0


# --- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"architecture": "vit_huge"}, "encoder.architecture='vit_huge'"),
        ({"architecture": None}, "encoder.embed_dim=None: required"),
        ({"embed_dim": 100}, "encoder.embed_dim=100: must be divisible by encoder.num_heads=12"),
        ({"depth": True}, "encoder.depth=True"),
        ({"mlp_ratio": 0}, "encoder.mlp_ratio=0"),
        ({"patch_size": 1}, "encoder.patch_size=1"),
        ({"pos_grid": (3, 0)}, "encoder.pos_grid=(3, 0)"),
        ({"num_levels": 0}, "encoder.num_levels=0"),
        ({"layer_norm_eps": 0.0}, "encoder.layer_norm_eps=0.0"),
        ({"mean": (0.5, 0.5)}, "encoder.mean=(0.5, 0.5)"),
        ({"std": (0.5, 0.0, 0.5)}, "encoder.std=(0.5, 0.0, 0.5)"),
        ({"checkpoint": "weights.pt"}, "encoder.checkpoint='weights.pt': must be a local .safetensors file"),
        ({"checkpoint": "/nonexistent/w.safetensors"}, "encoder.checkpoint='/nonexistent/w.safetensors': no such"),
        ({"checkpoint_format": "npz"}, "encoder.checkpoint_format='npz'"),
        ({"output": "pooled"}, "encoder.output='pooled'"),
        ({"dtype": "float64"}, "encoder.dtype='float64'"),
        ({"device": "tpu"}, "encoder.device='tpu'"),
        ({"cuda_graphs": 1}, "encoder.cuda_graphs=1"),
        ({"seed": -1}, "encoder.seed=-1"),
    ],
)
def test_config_errors_name_field_and_value(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        EncoderConfig(**kwargs)


def test_presets_and_overrides():
    assert EncoderConfig().dims() == (768, 12, 12, 3072)
    assert EncoderConfig(architecture="vit_large_patch16").dims() == (1024, 24, 16, 4096)
    assert EncoderConfig(architecture="vit_small_patch16", depth=4, mlp_ratio=2.0).dims() == (384, 4, 6, 768)
    assert EncoderConfig(device="cpu").resolved_dtype() == torch.float32
    assert EncoderConfig(device="cuda", dtype="auto").resolved_dtype() == torch.float16


# --- equivalence with a plain ViT on the native grid --------------------------------------------


def test_full_resolution_layout_centres_sample_the_patch_pixels():
    centers, sizes, levels = full_resolution_layout(WIDTH + 5, HEIGHT, 16)  # the 5-px remainder is left out
    assert centers.shape == (12, 2) and centers[:5].tolist() == [
        [7.5, 7.5],
        [23.5, 7.5],
        [39.5, 7.5],
        [55.5, 7.5],
        [7.5, 23.5],
    ]
    assert (sizes == 16).all() and (levels == 0).all()
    # The texture stage at these centres reads exactly the pixels a stride-16 conv sees.
    rgb = (np.random.default_rng(0).random((HEIGHT, WIDTH, 3)) * 255).astype(np.uint8)
    texture = TorchPyramid(TextureConfig(device="cpu", cpu_threads=0))
    texture.upload(rgb)
    centers, sizes, _ = full_resolution_layout(WIDTH, HEIGHT)
    sampled = texture.sample(centers, sizes, 16)
    image = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255.0
    torch.testing.assert_close(sampled, _grid_patches(image)[0], atol=1e-5, rtol=0)


def test_native_grid_embeddings_and_tokens_equal_the_plain_vit():
    """The property the encoder rests on: level 0, centres on the regular grid, native size."""
    enc = _encoder(pos_grid=GRID)
    model = enc.model
    image = _image(batch=2)
    patches, centers, levels, size = _grid_inputs(image)
    state = model.state_dict()
    with torch.no_grad():
        # Interpolated position embedding = the grid itself.
        torch.testing.assert_close(
            model.position_embedding(centers, size), state["pos_embed"][:, 1:].expand(2, -1, -1), atol=1e-7, rtol=0
        )
        conv = F.conv2d(
            _normalise(model, image), state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=16
        )
        expected = conv.flatten(2).transpose(1, 2) + state["pos_embed"][:, 1:]
        embedded = model.embed(patches, centers, levels, size)
    torch.testing.assert_close(embedded[:, 1:], expected, atol=1e-6, rtol=1e-5)
    reference = _reference_vit(state, _normalise(model, image), num_heads=4, eps=1e-6)
    out = enc.encode(patches, centers, levels, size)
    torch.testing.assert_close(out.tokens, reference[:, 1:], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.cls, reference[:, 0], atol=ATOL, rtol=0)
    # Each frame of the batch alone gives the same tokens.
    single = enc.encode(patches[1], centers[1].numpy(), levels[1].numpy(), size)
    torch.testing.assert_close(single.tokens, out.tokens[1], atol=ATOL, rtol=0)
    assert single.tokens.shape == (12, 64) and single.cls.shape == (64,) and single.device_ms is None


def test_matches_timm_vision_transformer(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    reference = timm.models.vision_transformer.VisionTransformer(
        img_size=(HEIGHT, WIDTH), patch_size=16, embed_dim=64, depth=2, num_heads=4, num_classes=10
    ).eval()
    path = str(tmp_path / "timm.safetensors")
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, path)
    # A 3 x 4 grid is not square: pos_grid says how to read the checkpoint's 12 position tokens.
    enc = _encoder(checkpoint=path, pos_grid=GRID)
    assert enc.load_report.format == "timm" and enc.load_report.dropped == ("head.bias", "head.weight")
    image = _image()
    with torch.no_grad():
        expected = reference.forward_features(_normalise(enc.model, image))
    out = enc.encode(*_grid_inputs(image))
    torch.testing.assert_close(out.tokens, expected[:, 1:], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.cls, expected[:, 0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("head", ["ViTModel", "ViTForImageClassification"])
def test_matches_hugging_face_vit(tmp_path, head):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, image_size=(HEIGHT, WIDTH)
    )
    torch.manual_seed(0)
    model = getattr(transformers, head)(config).eval()
    model.save_pretrained(tmp_path)  # model.safetensors + config.json, no download
    enc = _encoder(checkpoint=tmp_path / "model.safetensors")
    report = enc.load_report
    assert report.format == "hf" and enc.model.pos_grid == GRID
    assert report.dropped == (
        ("pooler.dense.bias", "pooler.dense.weight") if head == "ViTModel" else ("classifier.bias", "classifier.weight")
    )
    # HF ViT normalises with 0.5 / 0.5 and uses LayerNorm eps 1e-12 (from config.json).
    assert enc.model.mean.flatten().tolist() == [0.5] * 3 and enc.model.layer_norm_eps == 1e-12
    image = _image()
    vit = model if head == "ViTModel" else model.vit
    with torch.no_grad():
        expected = vit(pixel_values=(image - 0.5) / 0.5).last_hidden_state
    out = enc.encode(*_grid_inputs(image))
    torch.testing.assert_close(out.tokens, expected[:, 1:], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.cls, expected[:, 0], atol=1e-5, rtol=0)
    # A preprocessor config beside the weights overrides the 0.5 default (and the config's value).
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.4, 0.5, 0.6], "image_std": [0.2] * 3})
    )
    enc = _encoder(checkpoint=tmp_path / "model.safetensors", mean=(0.0, 0.0, 0.0))
    assert enc.model.mean.flatten().tolist() == pytest.approx([0.4, 0.5, 0.6])
    assert enc.model.std.flatten().tolist() == pytest.approx([0.2] * 3)


# --- checkpoints ----------------------------------------------------------------------------------


def test_save_round_trip_keeps_weights_level_embedding_and_settings(tmp_path):
    enc = _encoder(pos_grid=GRID, mean=(0.1, 0.2, 0.3), std=(0.3, 0.2, 0.1), num_levels=4, seed=3)
    with torch.no_grad():
        enc.model.level_embed.normal_(generator=torch.Generator().manual_seed(0))
    path = tmp_path / "encoder.safetensors"
    enc.save(path)
    back = _encoder(checkpoint=path, num_levels=4)  # another seed, no grid or mean/std configured
    assert back.load_report.format == "fovea" and back.load_report.metadata["schema_version"] == 1
    assert back.model.pos_grid == GRID and back.model.mean.flatten().tolist() == pytest.approx([0.1, 0.2, 0.3])
    inputs = make_example(num_tokens=40, width=WIDTH, height=HEIGHT)
    assert torch.equal(back.encode(*inputs).tokens, enc.encode(*inputs).tokens)
    with pytest.raises(ValueError, match=re.escape("encoder.num_heads=8 but checkpoint")):
        _encoder(checkpoint=path, num_heads=8, num_levels=4)


def test_timm_named_file_round_trips_and_drops_the_head(tmp_path):
    enc = _encoder(pos_grid=(4, 4))
    path = _timm_file(tmp_path, enc.model)
    back = _encoder(checkpoint=path, seed=5)
    assert back.load_report.format == "timm" and back.load_report.dropped == ("head.bias", "head.weight")
    assert back.model.pos_grid == (4, 4)  # square grid read from the token count
    assert not back.model.level_embed.any()
    inputs = make_example(num_tokens=40, width=WIDTH, height=HEIGHT)
    assert torch.equal(back.encode(*inputs).tokens, enc.encode(*inputs).tokens)
    with pytest.raises(ValueError, match=re.escape("encoder.checkpoint_format='hf' but")):
        _encoder(checkpoint=path, checkpoint_format="hf")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"blocks.1.norm1.weight": None}, "missing key 'blocks.1.norm1.weight' (model shape (64,)"),
        ({"blocks.0.ls1.gamma": torch.ones(64)}, "unexpected key 'blocks.0.ls1.gamma' (shape (64,)"),
        (
            {"blocks.0.mlp.fc1.weight": torch.zeros(128, 64)},
            "key 'blocks.0.mlp.fc1.weight' has shape (128, 64) but the model's 'blocks.0.mlp.fc1.weight' "
            "has shape (256, 64)",
        ),
        ({"cls_token": torch.zeros(1, 1, 32)}, "has shape (1, 1, 32) but the model's 'cls_token' has shape (1, 1, 64)"),
        ({"patch_embed.proj.weight": None}, "neither timm ('patch_embed.proj.weight') nor Hugging Face"),
        ({"pos_embed": torch.zeros(1, 1 + 7, 64)}, "pos_embed has 7 grid tokens, not a square"),
    ],
)
def test_bad_checkpoints_are_refused_naming_key_and_shapes(tmp_path, changes, message):
    path = _timm_file(tmp_path, _encoder(pos_grid=(4, 4)).model, **changes)
    with pytest.raises(ValueError, match=re.escape(message)):
        _encoder(checkpoint=path)


def test_hf_shape_mismatch_names_the_hugging_face_keys(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, image_size=64
    )
    transformers.ViTModel(config, add_pooling_layer=False).save_pretrained(tmp_path)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "key 'encoder.layer.0.intermediate.dense.bias' has shape (256,) but the model's 'blocks.0.mlp.fc1.bias' "
            "has shape (128,)"
        ),
    ):
        _encoder(checkpoint=tmp_path / "model.safetensors", mlp_ratio=2.0)


def test_shallower_model_keeps_the_checkpoints_first_blocks(tmp_path):
    deep = _encoder(pos_grid=GRID, depth=3, seed=2)
    path = _timm_file(tmp_path, deep.model)
    shallow = _encoder(checkpoint=path, pos_grid=GRID, depth=1, seed=7)
    assert shallow.load_report.adapted == ("blocks: kept the first 1 of 3 (encoder.depth)",)
    assert shallow.model.depth == 1
    for key, value in shallow.model.state_dict().items():
        assert torch.equal(value, deep.model.state_dict()[key]), key
    # The same tokens as the reference ViT run over the checkpoint's first block only.
    image = _image()
    state = {k: v for k, v in deep.model.state_dict().items() if not k.startswith(("blocks.1.", "blocks.2."))}
    expected = _reference_vit(state, _normalise(deep.model, image), 4, 1e-6)[:, 1:]
    torch.testing.assert_close(shallow.encode(*_grid_inputs(image)).tokens, expected, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match=re.escape("missing key 'blocks.3.attn.proj.bias'")):
        _encoder(checkpoint=path, pos_grid=GRID, depth=4)


@pytest.mark.parametrize("old_patch", [8, 32])
def test_patch_size_adaptation(tmp_path, old_patch):
    model = _encoder(pos_grid=(4, 4)).model
    kernel = torch.randn(64, 3, old_patch, old_patch, generator=torch.Generator().manual_seed(0)) * 0.02
    path = _timm_file(tmp_path, model, **{"patch_embed.proj.weight": kernel})
    enc = _encoder(checkpoint=path)
    assert enc.load_report.adapted == (f"patch_embed.proj.weight: patch {old_patch} -> 16 (pseudo-inverse)",)
    assert torch.isfinite(enc.encode(*make_example(num_tokens=30, width=WIDTH, height=HEIGHT)).tokens).all()
    if old_patch == 8:
        # Enlarging is exact: the new kernel on an upsampled patch answers as the old one did.
        x = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(1))
        up = F.interpolate(x, size=(16, 16), mode="bicubic", antialias=True)
        torch.testing.assert_close(
            F.conv2d(up, enc.model.patch_embed.proj.weight), F.conv2d(x, kernel), atol=1e-5, rtol=1e-4
        )


def test_pos_grid_resampling(tmp_path):
    model = _encoder(pos_grid=(4, 4)).model
    path = _timm_file(tmp_path, model)
    enc = _encoder(checkpoint=path, pos_grid=(6, 8))
    assert enc.load_report.adapted == ("pos_embed: grid 4x4 -> 6x8 (bicubic)",)
    expected = resample_pos_grid(model.pos_embed.detach(), (4, 4), (6, 8))
    assert torch.equal(enc.model.pos_embed, expected) and torch.equal(expected[:, :1], model.pos_embed[:, :1])
    # A grid resampled to the same function: the embedding at a few centres barely moves.
    centers = torch.tensor([[[20.0, 14.0], [33.0, 30.0], [40.5, 25.0]]])
    with torch.no_grad():
        moved = enc.model.position_embedding(centers, (WIDTH, HEIGHT)) - model.position_embedding(
            centers, (WIDTH, HEIGHT)
        )
    assert moved.abs().max() < 0.5 * model.pos_embed.std()
    # A square token count is read as a square grid, whatever grid is configured.
    assert _encoder(checkpoint=path, pos_grid=(2, 8)).load_report.adapted == ("pos_embed: grid 4x4 -> 2x8 (bicubic)",)
    # load_checkpoint fills an existing model, resampling to its grid.
    other = FoveatedViT(embed_dim=64, depth=2, num_heads=4, mlp_hidden=256, pos_grid=(2, 2))
    report = load_checkpoint(other, path)
    assert report.adapted == ("pos_embed: grid 4x4 -> 2x2 (bicubic)",)


def test_resample_patch_kernel_identity_and_square_check():
    kernel = torch.randn(2, 3, 16, 16)
    assert resample_patch_kernel(kernel, 16) is kernel
    with pytest.raises(ValueError, match="must be square"):
        resample_patch_kernel(torch.zeros(2, 3, 16, 8), 16)


# --- level embedding ------------------------------------------------------------------------------


def test_level_embedding_zero_init_then_interpolated():
    enc = _encoder(num_levels=5)
    patches, centers, _, size = make_example(num_tokens=24, width=WIDTH, height=HEIGHT)
    at = {lv: enc.encode(patches, centers, np.full(24, lv, np.float32), size).tokens for lv in (0.0, 3.0)}
    assert torch.equal(at[0.0], at[3.0])  # zero init: a pretrained ViT is unchanged
    table = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        enc.model.level_embed.copy_(table)
    assert not torch.allclose(enc.encode(patches, centers, np.zeros(24), size).tokens, at[0.0], atol=1e-3)
    levels = torch.tensor([[0.0, 2.25, 3.5, 4.0, -1.0, 9.0]])
    expected = torch.stack(
        [table[0], 0.75 * table[2] + 0.25 * table[3], 0.5 * (table[3] + table[4]), table[4], table[0], table[4]]
    )
    torch.testing.assert_close(enc.model.level_embedding(levels)[0], expected, atol=1e-6, rtol=0)


# --- inference API --------------------------------------------------------------------------------


def test_outputs_class_token_and_pre_norm():
    inputs = make_example(num_tokens=20, width=WIDTH, height=HEIGHT)
    normed = _encoder().encode(*inputs)
    raw = _encoder(output="pre_norm").encode(*inputs)
    torch.testing.assert_close(_encoder().model.norm(raw.tokens), normed.tokens, atol=1e-6, rtol=0)
    no_cls = _encoder(class_token=False).encode(*inputs)
    assert no_cls.cls is None and no_cls.tokens.shape == (20, 64) and not no_cls.graph and no_cls.timing_ms > 0


def test_half_module_keeps_float32_normalisation():
    enc = _encoder(dtype="bfloat16")
    assert enc.model.patch_embed.proj.weight.dtype == torch.bfloat16 and enc.model.mean.dtype == torch.float32
    assert enc.model.mean.flatten().tolist() == torch.tensor(encoder_module.IMAGENET_MEAN).tolist()
    out = enc.encode(*make_example(num_tokens=20, width=WIDTH, height=HEIGHT))
    assert out.tokens.dtype == torch.bfloat16 and torch.isfinite(out.tokens).all()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"patches": torch.zeros(20, 3, 8, 8)}, "patches must be ([B,] N, 3, 16, 16) float"),
        ({"patches": torch.zeros(20, 3, 16, 16, dtype=torch.uint8)}, "torch.uint8"),
        ({"patches": torch.zeros(2, 0, 3, 16, 16)}, "at least one token"),
        ({"centers": np.zeros((20, 3))}, "centers must be (20, 2)"),
        ({"levels": np.zeros(19)}, "levels must be (20,)"),
        ({"image_size": (64, 0)}, "image_size must be (W, H) > 0"),
    ],
)
def test_encode_input_errors(change, message):
    patches, centers, levels, size = make_example(num_tokens=20, width=WIDTH, height=HEIGHT)
    args = {"patches": patches, "centers": centers, "levels": levels, "image_size": size, **change}
    with pytest.raises(ValueError, match=re.escape(message)):
        _encoder().encode(**args)


# --- CUDA -----------------------------------------------------------------------------------------

# Relative error ||half - fp32|| / ||fp32|| of ViT-B/16 (random init, 273 tokens), measured on an
# H100 (torch 2.11+cu130): float16 1.2e-3, bfloat16 1.0e-2; the bounds leave 3-4x headroom.
HALF_BOUNDS = {"float16": 5e-3, "bfloat16": 3e-2}


def _vit_b(**kwargs) -> FoveatedEncoder:
    return FoveatedEncoder(EncoderConfig(architecture="vit_base_patch16", device="cuda", **kwargs))


@pytest.mark.gpu
def test_half_precision_close_to_float32():
    inputs = make_example()
    reference = _vit_b(dtype="float32", cuda_graphs=False).encode(*inputs).tokens
    for dtype, bound in HALF_BOUNDS.items():
        tokens = _vit_b(dtype=dtype).encode(*inputs).tokens
        assert tokens.dtype == getattr(torch, dtype)
        error = float((tokens.float() - reference).norm() / reference.norm())
        assert error <= bound, f"{dtype}: relative error {error:.2e} > {bound:.0e}"


@pytest.mark.gpu
def test_cuda_graph_replay_equals_eager():
    graphed, eager = _vit_b(), _vit_b(cuda_graphs=False)
    for num_tokens, batch, seed in ((273, 1, 0), (100, 2, 1), (273, 1, 2)):  # the last replays a kept graph
        patches, centers, levels, size = make_example(num_tokens=num_tokens, seed=seed)
        levels = levels + 0.3 * seed
        if batch > 1:
            patches, centers, levels = (
                patches.expand(batch, -1, -1, -1, -1),
                np.stack([centers] * batch),
                np.stack([levels] * batch),
            )
        patches = patches.cuda()
        got, want = graphed.encode(patches, centers, levels, size), eager.encode(patches, centers, levels, size)
        assert got.graph and not want.graph and got.device_ms > 0
        # Bitwise equal on an H100 (torch 2.11); the tolerance allows other kernel choices in capture.
        torch.testing.assert_close(got.tokens, want.tokens, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(got.cls, want.cls, atol=1e-3, rtol=1e-3)
    assert graphed.graph_shapes == [(1, 273), (2, 100)]


@pytest.mark.gpu
def test_matches_timm_vit_base_on_cuda(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    reference = timm.create_model("vit_base_patch16_224", pretrained=False).cuda().eval()
    path = tmp_path / "vit_base.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    enc = _vit_b(checkpoint=path, dtype="float32")
    assert enc.load_report.dropped == ("head.bias", "head.weight") and enc.model.pos_grid == (14, 14)
    image = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        expected = reference.forward_features(_normalise(enc.model, image))
    out = enc.encode(*_grid_inputs(image))
    torch.testing.assert_close(out.tokens, expected[:, 1:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.cls, expected[:, 0], atol=1e-4, rtol=1e-4)


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        EncoderConfig().seed = 1


# -- token-level re-encoding (FoveatedEncoder.update) ----------------------------------------------


def _small(depth: int = 2, **kwargs) -> FoveatedEncoder:
    return FoveatedEncoder(
        EncoderConfig(architecture=None, embed_dim=64, depth=depth, num_heads=4, dtype="float32", **kwargs)
    )


def _changed_inputs(inputs, rows, seed: int = 5):
    """``inputs`` with new patches at ``rows`` and one of them moved and rescaled a little."""
    patches, centers, levels, size = inputs
    rng = torch.Generator().manual_seed(seed)
    patches, centers, levels = patches.clone(), centers.copy(), levels.copy()
    patches[rows] = torch.rand((len(rows), *patches.shape[1:]), generator=rng).to(patches.device)
    centers[rows[0]] += (1.5, -2.0)
    levels[rows[0]] += 0.25
    return patches, centers, levels, size


def test_update_without_changes_is_the_full_encode_then_reuses_it():
    encoder = _small()
    inputs = make_example(num_tokens=48, seed=3)
    full = encoder.encode(*inputs)
    first = encoder.update(*inputs)
    assert first.reencoded == 48 and torch.equal(first.tokens, full.tokens) and torch.equal(first.cls, full.cls)
    again = encoder.update(*inputs, changed=np.zeros(48, bool))
    assert again.reencoded == 0 and torch.equal(again.tokens, full.tokens)
    assert not np.any(encoder.changed_tokens(*inputs))


def test_rows_given_again_unchanged_reproduce_the_full_encode():
    """Re-encoding rows against the cache of the same frame is the full encode (every row: all of it)."""
    encoder = _small()
    inputs = make_example(num_tokens=48, seed=4)
    full = encoder.update(*inputs)
    some = encoder.update(*inputs, changed=np.isin(np.arange(48), [0, 7, 30]))
    assert some.reencoded == 3
    torch.testing.assert_close(some.tokens, full.tokens, atol=1e-5, rtol=1e-5)
    every = encoder.update(*inputs, changed=np.ones(48, bool))
    assert every.reencoded == 48
    torch.testing.assert_close(every.tokens, full.tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(every.cls, full.cls, atol=1e-5, rtol=1e-5)


def test_one_block_rows_are_exact_and_the_rest_keep_their_outputs():
    """With one block the cached keys and values of the unchanged rows are exactly what a full
    encode computes, so the re-encoded rows (and the class token) equal the full encode; the
    other rows keep their earlier outputs, the approximation of token-level reuse."""
    encoder = _small(depth=1)
    before = make_example(num_tokens=40, seed=6)
    first = encoder.update(*before)
    rows = np.array([2, 9, 17, 33])
    after = _changed_inputs(before, rows)
    assert np.array_equal(np.flatnonzero(encoder.changed_tokens(*after)), rows)
    partial = encoder.update(*after, changed=encoder.changed_tokens(*after))
    full = encoder.encode(*after)
    assert partial.reencoded == 4
    torch.testing.assert_close(partial.tokens[rows], full.tokens[rows], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(partial.cls, full.cls, atol=1e-5, rtol=1e-5)
    kept = np.setdiff1d(np.arange(40), rows)
    assert torch.equal(partial.tokens[kept], first.tokens[kept])


def test_deeper_rows_move_toward_the_full_encode():
    encoder = _small(depth=4)
    before = make_example(num_tokens=64, seed=7)
    stale = encoder.update(*before).tokens
    rows = np.arange(0, 64, 9)
    after = _changed_inputs(before, rows, seed=8)
    partial = encoder.update(*after, changed=encoder.changed_tokens(*after)).tokens
    full = encoder.encode(*after).tokens
    assert (partial - full).norm() < 0.5 * (stale - full).norm()
    assert (partial[rows] - full[rows]).norm() < 0.1 * (stale[rows] - full[rows]).norm()


def test_update_falls_back_to_a_full_encode():
    encoder = _small()
    inputs = make_example(num_tokens=32, seed=9)
    assert encoder.changed_tokens(*inputs) is None  # nothing kept yet
    encoder.update(*inputs)
    changed = np.zeros(32, bool)
    changed[:20] = True
    assert encoder.update(*inputs, changed=changed, max_changed_fraction=0.5).reencoded == 32
    patches, centers, levels, _ = inputs
    assert encoder.changed_tokens(patches, centers, levels, (800, 600)) is None  # another image size
    assert encoder.update(patches, centers, levels, (800, 600), changed=np.zeros(32, bool)).reencoded == 32
    with pytest.raises(ValueError, match=r"changed must be \(32,\)"):
        encoder.update(*inputs, changed=np.zeros(31, bool))
    batch = (inputs[0][None], inputs[1][None], inputs[2][None], inputs[3])
    with pytest.raises(ValueError, match="update takes one frame"):
        encoder.update(*batch)


@pytest.mark.gpu
def test_cuda_graph_updates_equal_eager_updates():
    """Padded row buckets (spare row), packed host inputs and the full graph agree with eager updates."""
    graphed, eager = _vit_b(dtype="float32"), _vit_b(dtype="float32", cuda_graphs=False)
    inputs = make_example(num_tokens=273, seed=10)
    inputs = (inputs[0].cuda(), *inputs[1:])
    for encoder in (graphed, eager):
        encoder.update(*inputs)
    current = inputs
    for step, rows in enumerate((np.array([5]), np.arange(0, 273, 7), np.array([1, 2, 3]), np.arange(100, 130))):
        current = _changed_inputs(current, rows, seed=20 + step)
        current = (current[0].cuda(), *current[1:])
        changed = graphed.changed_tokens(*current)
        assert np.array_equal(np.flatnonzero(changed), rows)
        got, want = graphed.update(*current, changed=changed), eager.update(*current, changed=changed)
        assert got.reencoded == want.reencoded == len(rows) and got.graph
        torch.testing.assert_close(got.tokens, want.tokens, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got.cls, want.cls, atol=1e-4, rtol=1e-4)
    assert sorted(key[2] for key in graphed._graphs if key[0] == "rows") == [8, 32, 64]
