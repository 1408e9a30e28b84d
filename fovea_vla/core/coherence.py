"""Temporal coherence: what of the texture and the tokens must be recomputed for a new frame.

Every frame gets one decision:

==========  ==============================================================================
``first``   no texture yet (first frame, or after a reset): full upload, sample, encode
``cut``     the flow's motion analysis saw a scene cut: full upload, sample, encode
``refresh`` the texture's last full upload is older than ``max_token_age_s``: full upload,
            sample, encode (bounds the drift that sub-threshold changes leave behind)
``full``    more than ``full_upload_fraction`` of the tiles are dirty: full upload (one copy
            beats many small ones), sample, encode
``partial`` some tiles are dirty: upload those tiles, rebuild the mips over them, sample, encode
``static``  no tile is dirty: nothing is uploaded
==========  ==============================================================================

What is then re-encoded depends on ``reencode``:

- ``"changed"`` (token-level reuse): a token keeps the position it was sampled at while the new
  layout puts it within ``token_shift_fraction`` of its footprint from there
  (:func:`keep_token_positions`), and keeps its patch while no dirty rectangle reaches its
  footprint (:func:`dirty_tokens`). Only the other tokens are sampled and re-encoded, against
  the cached keys and values of the rest (:meth:`FoveatedEncoder.update`; approximate for the
  tokens kept, whose outputs do not see the new ones until the next full encode); with more
  than ``max_reencode_fraction`` of them changed the frame is encoded whole; with none, the
  cached tokens are reused as they are.
- ``"all"`` (frame-level reuse, exact): a static frame whose fixations stayed within
  ``max_fixation_shift_px`` reuses the cached tokens; any other frame is sampled and encoded whole.

A tile is dirty when the mean absolute grey-level difference between the new frame and what
the texture holds for that tile exceeds ``change_threshold``. Comparing against the texture's
content, not the previous frame, means a slow change accumulates until it is uploaded instead
of slipping under the threshold frame after frame. With ``change_threshold`` 0 every tile whose
grey image changed at all is re-uploaded, so the texture equals a full upload of the frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import cv2
import numpy as np

from fovea_vla.core._validation import is_int, is_real
from fovea_vla.core.flow.motion import tile_sums
from fovea_vla.core.foveation import FoveatedLayout
from fovea_vla.core.texture.base import tiles_to_rects

__all__ = [
    "DECISIONS",
    "REENCODE_MODES",
    "CoherenceConfig",
    "TemporalCoherence",
    "TextureDecision",
    "dirty_tokens",
    "keep_token_positions",
]

DECISIONS = ("first", "static", "partial", "full", "cut", "refresh")
REENCODE_MODES = ("changed", "all")


@dataclass(frozen=True, kw_only=True)
class CoherenceConfig:
    """Temporal-coherence parameters.

    Attributes:
        enabled: when false every frame is a full upload, sample and encode (``full``).
        tile_size: dirty-tile side [px, full resolution].
        change_threshold: mean absolute grey-level difference [0-255] of a tile against the
            texture's content above which the tile is re-uploaded. 0 re-uploads every tile whose
            grey image changed at all.
        full_upload_fraction: share of dirty tiles, in (0, 1], above which the whole frame is
            uploaded instead.
        max_token_age_s: the texture is fully refreshed (and the tokens re-encoded) when its last
            full upload is older than this [s, capture time].
        max_fixation_shift_px: with ``reencode="all"``, cached tokens are reused only while every
            fixation stays within this distance [px] of where the cached layout was built.
        reencode: "changed" re-encodes only the tokens whose patch or position changed (token
            level, approximate for the others); "all" re-encodes every token of a frame that
            changed at all (frame level, exact).
        token_shift_fraction: with "changed", a token keeps its cached position while the
            layout moved it by at most this share of its footprint side (in [0, 0.5]; 0 = only
            unmoved tokens are kept).
        max_reencode_fraction: with "changed", share of changed tokens in (0, 1] above which the
            whole frame is encoded (a full encode also refreshes the kept tokens' outputs).
        max_partial_encodes: with "changed", consecutive frames encoded only in part after which
            the next changed frame is encoded whole, bounding how stale the kept tokens' outputs get.
    """

    enabled: bool = True
    tile_size: int = 32
    change_threshold: float = 3.0
    full_upload_fraction: float = 0.6
    max_token_age_s: float = 2.0
    max_fixation_shift_px: float = 0.5
    reencode: str = "changed"
    token_shift_fraction: float = 0.25
    max_reencode_fraction: float = 0.75
    max_partial_encodes: int = 8

    def __post_init__(self):
        if not isinstance(self.enabled, bool):
            raise ValueError(f"coherence.enabled={self.enabled!r}: must be a bool")
        if self.reencode not in REENCODE_MODES:
            raise ValueError(f"coherence.reencode={self.reencode!r}: must be one of {', '.join(REENCODE_MODES)}")
        if not is_int(self.max_partial_encodes) or not 1 <= self.max_partial_encodes <= 10_000:
            raise ValueError(
                f"coherence.max_partial_encodes={self.max_partial_encodes!r}: must be an integer in [1, 10000]"
            )
        if not is_int(self.tile_size) or not 4 <= self.tile_size <= 512:
            raise ValueError(f"coherence.tile_size={self.tile_size!r}: must be an integer in [4, 512]")
        checks = {
            "change_threshold": (0.0, 255.0, True),
            "full_upload_fraction": (0.0, 1.0, False),
            "max_token_age_s": (0.0, 3600.0, False),
            "max_fixation_shift_px": (0.0, 1e4, True),
            "token_shift_fraction": (0.0, 0.5, True),
            "max_reencode_fraction": (0.0, 1.0, False),
        }
        for name, (low, high, low_inclusive) in checks.items():
            value = getattr(self, name)
            above = value >= low if low_inclusive else value > low
            if not is_real(value) or not math.isfinite(value) or not above or value > high:
                bracket = "[" if low_inclusive else "("
                raise ValueError(f"coherence.{name}={value!r}: must be in {bracket}{low}, {high}]")


@dataclass(frozen=True)
class TextureDecision:
    """What the texture stage does with one frame.

    Attributes:
        kind: one of :data:`DECISIONS`.
        rects: (M, 4) int32 dirty rectangles (x0, y0, x1, y1) [px] to upload for ``partial``;
            empty otherwise.
        dirty_fraction: share of tiles that differ from the texture, in [0, 1] (1 for a full
            upload of any kind).
    """

    kind: str
    rects: np.ndarray
    dirty_fraction: float

    @property
    def uploads_all(self) -> bool:
        return self.kind in ("first", "cut", "refresh", "full")


_NO_RECTS = np.zeros((0, 4), np.int32)


class TemporalCoherence:
    """Decides per frame what to upload, keeping a grey copy of what the texture holds."""

    def __init__(self, cfg: CoherenceConfig | None = None):
        self.cfg = cfg or CoherenceConfig()
        self._held: np.ndarray | None = None  # (H, W) uint8 grey of the texture's content
        self._last_full_s = -math.inf
        self._tile_pixels: np.ndarray | None = None

    def reset(self) -> None:
        self._held = None
        self._last_full_s = -math.inf

    def measure(self, gray: np.ndarray) -> np.ndarray | None:
        """Per-tile mean absolute grey difference between ``gray`` and what the texture holds, or
        None when it holds nothing of that size. Reads the held copy only, so it may run on another
        thread (beside the flow stage) as long as :meth:`decide` is not running meanwhile."""
        held = self._held
        if held is None or held.shape != gray.shape:
            return None
        step = self.cfg.tile_size
        tile_pixels = self._tile_pixels
        if tile_pixels is None or tile_pixels.shape != (-(-gray.shape[0] // step), -(-gray.shape[1] // step)):
            tile_pixels = self._tile_pixels = tile_sums(np.ones(gray.shape, np.uint8), step)
        return tile_sums(cv2.absdiff(gray, held), step) / tile_pixels

    def decide(
        self, gray: np.ndarray, now_s: float, *, is_cut: bool = False, measured: np.ndarray | None = None
    ) -> TextureDecision:
        """Decide what to do with a frame and record that the texture will then hold it.

        Args:
            gray: (H, W) uint8 grey image of the new frame.
            now_s: its capture time [s].
            is_cut: the motion analysis saw a scene cut between the previous frame and this one.
            measured: :meth:`measure` of this ``gray`` against the current held copy, when the
                caller computed it already (else it is computed here).

        Returns:
            The decision. The caller must carry it out (the texture's content is assumed to
            follow it).
        """
        cfg = self.cfg
        if self._held is None or self._held.shape != gray.shape:
            kind = "first"
        elif is_cut:
            kind = "cut"
        elif not cfg.enabled:
            kind = "full"
        elif now_s - self._last_full_s > cfg.max_token_age_s:
            kind = "refresh"
        else:
            kind = ""
        if kind:
            self._held = gray.copy()
            self._last_full_s = now_s
            return TextureDecision(kind, _NO_RECTS, 1.0)

        height, width = gray.shape
        step = cfg.tile_size
        mean_difference = self.measure(gray) if measured is None else measured
        dirty = mean_difference > cfg.change_threshold
        fraction = float(dirty.mean())
        if not dirty.any():
            return TextureDecision("static", _NO_RECTS, 0.0)
        if fraction > cfg.full_upload_fraction:
            self._held = gray.copy()
            self._last_full_s = now_s
            return TextureDecision("full", _NO_RECTS, fraction)
        rects = tiles_to_rects(dirty, step, width, height)
        for x0, y0, x1, y1 in rects:
            self._held[y0:y1, x0:x1] = gray[y0:y1, x0:x1]
        return TextureDecision("partial", rects, fraction)


def keep_token_positions(
    layout: FoveatedLayout, previous: FoveatedLayout, shift_fraction: float
) -> tuple[FoveatedLayout, np.ndarray]:
    """Hold tokens at the positions they were sampled at while the new layout stays close.

    Token i keeps ``previous``'s centre, footprint and level when both layouts have the same
    number of tokens, token i belongs to the same fixation in both, and its centre moved by at
    most ``shift_fraction`` of its footprint side in x and in y and its footprint changed by at
    most that share. Its eccentricity is then measured from its fixation's new position.

    Args:
        layout: the layout built for the new frame.
        previous: the layout the cached tokens were sampled with.
        shift_fraction: tolerance as a share of each token's footprint side.

    Returns:
        ``(kept_layout, moved)``: ``layout`` with the kept tokens' positions restored, and the
        (N,) bool mask of tokens that take their new position (all when the layouts differ in
        size).
    """
    n = layout.num_tokens
    if previous.num_tokens != n:
        return layout, np.ones(n, dtype=bool)
    tolerance = shift_fraction * previous.sizes
    kept = (
        (layout.regions == previous.regions)
        & (np.abs(layout.sizes - previous.sizes) <= tolerance)
        & (np.abs(layout.centers - previous.centers).max(axis=1) <= tolerance)
    )
    if not kept.any():
        return layout, ~kept
    centers = np.where(kept[:, None], previous.centers, layout.centers)
    offsets = centers - layout.fixations[layout.regions]
    kept_layout = replace(
        layout,
        centers=centers,
        sizes=np.where(kept, previous.sizes, layout.sizes),
        levels=np.where(kept, previous.levels, layout.levels),
        eccentricity=np.hypot(offsets[:, 0], offsets[:, 1]).astype(np.float32),
    )
    return kept_layout, ~kept


def dirty_tokens(layout: FoveatedLayout, rects: np.ndarray) -> np.ndarray:
    """Tokens whose patch a texture update over ``rects`` may have changed.

    A patch's samples lie within its footprint; trilinear filtering reads texels of the two mip
    levels around its level, each up to 1.5 texels (2**level px) beyond a sample, and a mip texel
    changes only when the level-0 pixels under it do. A token is therefore dirty when its
    footprint, grown by 1.5 texels of its coarser level and 1 px, meets a dirty rectangle.

    Args:
        layout: the sampling layout.
        rects: (M, 4) dirty rectangles (x0, y0, x1, y1) [px], exclusive ends, as
            :class:`TextureDecision` gives them.

    Returns:
        (N,) bool.
    """
    if len(rects) == 0:
        return np.zeros(layout.num_tokens, dtype=bool)
    reach = layout.sizes / 2 + 1.5 * np.exp2(np.ceil(layout.levels)) + 1.0
    low = layout.centers - reach[:, None]
    high = layout.centers + reach[:, None]
    rects = np.asarray(rects, dtype=np.float64)
    overlaps = (
        (low[:, None, 0] < rects[None, :, 2])
        & (high[:, None, 0] > rects[None, :, 0])
        & (low[:, None, 1] < rects[None, :, 3])
        & (high[:, None, 1] > rects[None, :, 1])
    )
    return overlaps.any(axis=1)
