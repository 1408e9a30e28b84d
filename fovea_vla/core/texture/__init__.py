"""Texture stage: the frame as a mip pyramid that foveated patches are sampled from."""

from fovea_vla.core.texture.base import TEXTURE_BACKENDS, TextureBackend, TextureConfig, make_texture

__all__ = ["TEXTURE_BACKENDS", "TextureBackend", "TextureConfig", "make_texture"]
