"""Optical-flow stage: ``make_flow(FlowConfig(...))`` returns a backend computing prev -> cur flow.

Backends (``auto`` order): ``vpi``, ``nvof``, ``torch``, ``dis`` (OpenCV, CPU). See
:mod:`fovea_vla.core.flow.base` for the pixel convention and output grid.
"""

from fovea_vla.core.flow.base import (
    FLOW_BACKENDS,
    FlowBackend,
    FlowConfig,
    FlowResult,
    endpoint_error,
    make_example,
    make_flow,
)

__all__ = [
    "FLOW_BACKENDS",
    "FlowBackend",
    "FlowConfig",
    "FlowResult",
    "endpoint_error",
    "make_example",
    "make_flow",
]
