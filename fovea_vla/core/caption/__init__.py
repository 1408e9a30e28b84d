"""Captions: a foveated vision-language captioner and a grounded event narrator, scheduled off the action path.

- :mod:`~fovea_vla.core.caption.view`: the foveated view (fovea crop + low-resolution periphery) and
  when it changed.
- :mod:`~fovea_vla.core.caption.events`: event narration from pipeline measurements.
- :mod:`~fovea_vla.core.caption.vlm`: a local Hugging Face image-text-to-text model (SmolVLM class).
- :mod:`~fovea_vla.core.caption.captioner`: the backend protocol, ``auto`` selection, the scheduler.
"""

from fovea_vla.core.caption.captioner import (
    BACKENDS,
    CaptionConfig,
    Captioner,
    CaptionRequest,
    CaptionResult,
    CaptionScheduler,
    EventsCaptioner,
    ViewCaptioner,
    make_captioner,
)
from fovea_vla.core.caption.events import EventNarrator, PipelineSnapshot, action_phase
from fovea_vla.core.caption.view import FoveatedView, ViewConfig, compose_view, view_difference, view_signature
from fovea_vla.core.caption.vlm import CaptionModelError, GpuGaps, VlmCaptioner, VlmConfig

__all__ = [
    "BACKENDS",
    "CaptionConfig",
    "CaptionModelError",
    "CaptionRequest",
    "CaptionResult",
    "CaptionScheduler",
    "Captioner",
    "EventNarrator",
    "EventsCaptioner",
    "FoveatedView",
    "GpuGaps",
    "PipelineSnapshot",
    "ViewCaptioner",
    "ViewConfig",
    "VlmCaptioner",
    "VlmConfig",
    "action_phase",
    "compose_view",
    "make_captioner",
    "view_difference",
    "view_signature",
]
