"""Captioner backends behind one protocol, their selection, and the scheduler that keeps them off the action path.

The scheduler runs one caption at a time on its own worker thread (in the caption node's own
process), is offered the newest request at the caption rate, and starts a caption only when the
previous one is finished and the scene changed since the last caption; otherwise the last caption
stands. A slow model therefore lowers the caption rate, never the rate of anything else.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from fovea_vla.core._validation import is_real
from fovea_vla.core.caption.events import EventNarrator, PipelineSnapshot
from fovea_vla.core.caption.view import FoveatedView, view_difference, view_signature
from fovea_vla.core.caption.vlm import CaptionModelError, GpuGaps, VlmCaptioner, VlmConfig

__all__ = [
    "BACKENDS",
    "CaptionConfig",
    "CaptionRequest",
    "CaptionResult",
    "CaptionScheduler",
    "Captioner",
    "EventsCaptioner",
    "ViewCaptioner",
    "make_captioner",
]

BACKENDS = ("auto", "vlm", "events")


@dataclass(frozen=True)
class CaptionRequest:
    """What a caption may describe: the pipeline's newest measurements and, for a model, a view.

    Attributes:
        snapshot: the newest pipeline measurements (the events backend's input and the model's context).
        view: the newest foveated view, None until one arrived.
        view_stamp_ns: capture stamp of the frame the view was cut from.
        frame_id: the camera's optical frame.
        fixation_xy: [px] where the pipeline looked on the described frame, None when unknown.
        tag: anything the caller wants back with the result (e.g. its own record of the fixation).
    """

    snapshot: PipelineSnapshot
    view: FoveatedView | None = None
    view_stamp_ns: int | None = None
    frame_id: str = ""
    fixation_xy: tuple[float, float] | None = None
    tag: object = None


@dataclass(frozen=True)
class CaptionResult:
    """A finished caption.

    Attributes:
        text: the caption.
        kind: ``vlm`` (a model's description of the image) or ``events`` (event narration).
        backend: the backend's name.
        stamp_ns: capture stamp of the frame described.
        compute_ms: [ms] time the backend took.
        request: what was described.
    """

    text: str
    kind: str
    backend: str
    stamp_ns: int
    compute_ms: float
    request: CaptionRequest


class Captioner(Protocol):
    """A caption backend."""

    name: str
    kind: str

    def ready(self, request: CaptionRequest) -> bool:
        """The request holds what this backend needs (a model needs a view)."""

    def changed(self, previous: CaptionRequest | None, request: CaptionRequest) -> bool:
        """Whether ``request`` is worth a new caption after the one made of ``previous``."""

    def describe(self, request: CaptionRequest) -> str:
        """The caption text (may take seconds)."""

    def stamp_ns(self, request: CaptionRequest) -> int:
        """Capture stamp of the frame the caption describes."""


class EventsCaptioner:
    """Event narration (:class:`EventNarrator`): a new caption whenever the narrated facts change."""

    kind = "events"

    def __init__(self, narrator: EventNarrator):
        self.narrator = narrator
        self.name = narrator.name

    def ready(self, request: CaptionRequest) -> bool:
        return True

    def changed(self, previous: CaptionRequest | None, request: CaptionRequest) -> bool:
        return previous is None or self.narrator.facts(previous.snapshot) != self.narrator.facts(request.snapshot)

    def describe(self, request: CaptionRequest) -> str:
        return self.narrator.narrate(request.snapshot)

    def stamp_ns(self, request: CaptionRequest) -> int:
        return request.snapshot.stamp_ns


class ViewCaptioner:
    """A vision-language model on the foveated view, prompted with the instruction and the event narration.

    Args:
        model: the loaded model.
        narrator: supplies the context sentences.
        change_threshold: [grey levels] view difference (:func:`view_difference`) that counts as a change.
    """

    kind = "vlm"

    def __init__(self, model: VlmCaptioner, narrator: EventNarrator, change_threshold: float):
        self.model = model
        self.narrator = narrator
        self.change_threshold = change_threshold
        self.name = model.name

    def ready(self, request: CaptionRequest) -> bool:
        return request.view is not None

    def changed(self, previous: CaptionRequest | None, request: CaptionRequest) -> bool:
        if previous is None or previous.snapshot.instruction != request.snapshot.instruction:
            return True
        if previous.view is request.view:
            return False
        return view_difference(view_signature(previous.view), view_signature(request.view)) > self.change_threshold

    def describe(self, request: CaptionRequest) -> str:
        context = self.narrator.narrate(request.snapshot)
        return self.model.caption(
            request.view.fovea, request.view.periphery, instruction=request.snapshot.instruction, context=context
        )

    def stamp_ns(self, request: CaptionRequest) -> int:
        return request.view_stamp_ns if request.view_stamp_ns is not None else request.snapshot.stamp_ns


@dataclass(frozen=True, kw_only=True)
class CaptionConfig:
    """Which captioner runs and when it speaks.

    Attributes:
        backend: ``vlm`` (a model; falls back to ``events`` when it cannot load), ``events``, or ``auto``
            (``vlm`` when ``vlm`` is given, else ``events``).
        vlm: the model's settings; None when no model folder is configured.
        change_threshold: [grey levels] how much the view must differ from the last captioned one.
        cut_memory_s: [s] how long the narration mentions a scene cut.
    """

    backend: str = "auto"
    vlm: VlmConfig | None = None
    change_threshold: float = 3.0
    cut_memory_s: float = 3.0

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r}: must be one of {BACKENDS}")
        if not (is_real(self.change_threshold) and 0.0 <= self.change_threshold <= 255.0):
            raise ValueError(f"change_threshold={self.change_threshold!r}: must be in [0, 255] grey levels")
        if not (is_real(self.cut_memory_s) and self.cut_memory_s > 0):
            raise ValueError(f"cut_memory_s={self.cut_memory_s!r}: must be > 0")


def make_captioner(cfg: CaptionConfig, gaps: GpuGaps | None = None) -> tuple[Captioner, str]:
    """The configured captioner and why it was chosen (one line, for the log).

    A model that cannot be loaded is reported in the reason and replaced by event narration, so
    the node keeps captioning. ``gaps`` schedules a model on a CUDA device (see :class:`GpuGaps`).
    """
    narrator = EventNarrator(cut_memory_s=cfg.cut_memory_s)
    if cfg.backend == "events":
        return EventsCaptioner(narrator), "configured"
    if cfg.vlm is None:
        if cfg.backend == "vlm":
            return EventsCaptioner(narrator), "vlm requested but no model folder is configured: event narration"
        return EventsCaptioner(narrator), "auto: no model folder configured"
    try:
        model = VlmCaptioner(cfg.vlm, gaps)
    except CaptionModelError as exc:
        return EventsCaptioner(narrator), f"{exc}; falling back to event narration"
    reason = f"{model.model_name} on {model.device} ({str(model.dtype).removeprefix('torch.')})"
    if model.gaps is not None:
        reason += f", GPU work only within {model.gaps.window_s * 1e3:.0f} ms after each frame"
    return ViewCaptioner(model, narrator, cfg.change_threshold), reason


class CaptionScheduler:
    """Runs a captioner on one worker thread: never two captions at once, never an unchanged scene twice.

    Args:
        captioner: the backend.
        on_caption: called (on the worker thread) with each finished caption.
        on_error: called (on the worker thread) with an exception the backend raised; the next
            offer tries again.
        clock: seconds, for ``compute_ms``.
    """

    def __init__(
        self,
        captioner: Captioner,
        on_caption: Callable[[CaptionResult], None],
        on_error: Callable[[Exception], None],
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.captioner = captioner
        self.on_caption = on_caption
        self.on_error = on_error
        self.clock = clock
        self.counters: Counter[str] = Counter()
        self.last: CaptionResult | None = None
        self._last_request: CaptionRequest | None = None
        self._busy = False
        self._lock = threading.Lock()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="caption")

    @property
    def busy(self) -> bool:
        return self._busy

    def offer(self, request: CaptionRequest | None) -> str:
        """Start a caption of ``request`` if due; returns what happened: ``started``, ``busy``,
        ``no_input``, ``not_ready`` or ``unchanged`` (each also counted)."""
        with self._lock:
            if request is None:
                outcome = "no_input"
            elif self._busy:
                outcome = "busy"
            elif not self.captioner.ready(request):
                outcome = "not_ready"
            elif not self.captioner.changed(self._last_request, request):
                outcome = "unchanged"
            else:
                outcome = "started"
                self._busy = True
            self.counters[outcome] += 1
        if outcome == "started":
            self._worker.submit(self._run, request)
        return outcome

    def _run(self, request: CaptionRequest) -> None:
        start = self.clock()
        try:
            text = self.captioner.describe(request)
        except Exception as exc:  # a model failure must not end captioning; the next offer retries
            with self._lock:
                self.counters["errors"] += 1
                self._busy = False
            self.on_error(exc)
            return
        result = CaptionResult(
            text=text,
            kind=self.captioner.kind,
            backend=self.captioner.name,
            stamp_ns=self.captioner.stamp_ns(request),
            compute_ms=(self.clock() - start) * 1e3,
            request=request,
        )
        with self._lock:
            self._last_request, self.last = request, result
            self.counters["captions"] += 1
        try:
            self.on_caption(result)
        finally:
            with self._lock:
                self._busy = False

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until no caption is running (True) or ``timeout_s`` passed (False)."""
        deadline = time.monotonic() + timeout_s
        while self._busy and time.monotonic() < deadline:
            time.sleep(0.005)
        return not self._busy

    def close(self) -> None:
        """Stop taking offers and wait for a running caption to finish."""
        self._worker.shutdown(wait=True, cancel_futures=True)
