"""Per-frame orchestration: flow -> motion analysis -> fixation -> temporal coherence -> texture
pyramid -> foveated sampling -> encoder.

One :class:`FoveaPipeline` owns the stages' state (previous frame, fixation filter, texture, token
cache) and reports how long each stage took. It is ROS-free: the node feeds it decoded frames and
publishes what it returns; tests and benchmarks drive it directly.

The texture is updated as :mod:`fovea_vla.core.coherence` decides: fully, over dirty tiles only,
or not at all; then only the tokens whose footprint the update reached or whose position the
layout moved are sampled and encoded again (``tokens_updated``; the others keep their cached
patches and tokens), and when none are, the previous frame's patches and tokens are returned
again (``tokens_reused``).

Tokens reach their consumer through ``on_tokens`` (a :class:`TokenUpdate` per frame that has tokens).
With ``async_encoder`` the encoder runs on its own thread over the newest sampled patches, so the
frame stages (flow, fixation, texture, sampling) keep the camera's rate on a device where the
encoder alone is slower than the camera; tokens then arrive at the encoder's rate, each update
saying which frame it was encoded from, and patches superseded before the encoder took them are
counted (``encodes_skipped``), not queued.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np

from fovea_vla.core.coherence import (
    CoherenceConfig,
    TemporalCoherence,
    TextureDecision,
    dirty_tokens,
    keep_token_positions,
)
from fovea_vla.core.encoder import EncoderConfig, FoveatedEncoder
from fovea_vla.core.fixation import FixationConfig, FixationController, FixationState
from fovea_vla.core.flow import FlowConfig, FlowResult, make_flow
from fovea_vla.core.flow.motion import MotionAnalysis, MotionAnalyzer, MotionConfig
from fovea_vla.core.foveation import (
    AdaptiveBudget,
    AdaptiveBudgetConfig,
    FoveatedLayout,
    FoveationConfig,
    foveated_layout,
    foveated_layout_multi,
    scene_complexity,
)
from fovea_vla.core.frames import Frame, rgb_to_gray
from fovea_vla.core.handoff import NewestQueue
from fovea_vla.core.registry import BackendSelection
from fovea_vla.core.slip import SlipEvent
from fovea_vla.core.slip_stage import Grasp, SlipStage, SlipStageConfig
from fovea_vla.core.texture import TextureConfig, make_texture
from fovea_vla.core.texture.base import mip_rebuild_rects

__all__ = ["FoveaPipeline", "PipelineConfig", "PipelineOutput", "TokenUpdate", "make_example"]


@dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """Configuration of every stage the pipeline runs.

    Attributes:
        flow: optical-flow engine.
        flow_enabled: when false, no flow is computed: no pursuit and no motion events; the
            fixation moves on request and, with a saccade rate, to salient points.
        motion: motion analysis on top of the flow (changed tiles, camera motion, independent
            motion, scene cuts).
        texture: texture pyramid backend and device.
        foveation: sampling layout (token budget, e0).
        fixation: fixation controller; with ``num_fixations > 1`` the layout splits the token
            budget over all simultaneous fixations.
        slip: grasp-slip stage (its own full-resolution flow on a crop around the grasp), or
            None for off.
        coherence: what of the texture and the tokens is recomputed per frame.
        adaptive_budget: token budget from scene complexity and a latency target; when off,
            ``foveation.num_tokens`` on every frame.
        encoder: the foveated ViT that turns the patches into tokens, or None to stop at the
            patches.
        async_encoder: encode on a worker thread over the newest sampled patches instead of
            inside :meth:`FoveaPipeline.process` (for devices where the encoder is slower than
            the camera; see the module docstring).
    """

    flow: FlowConfig = field(default_factory=lambda: FlowConfig(grid=4, preset="ultrafast", scale=0.5))
    flow_enabled: bool = True
    motion: MotionConfig = field(default_factory=MotionConfig)
    texture: TextureConfig = field(default_factory=TextureConfig)
    foveation: FoveationConfig = field(default_factory=FoveationConfig)
    fixation: FixationConfig = field(default_factory=FixationConfig)
    slip: SlipStageConfig | None = None
    coherence: CoherenceConfig = field(default_factory=CoherenceConfig)
    adaptive_budget: AdaptiveBudgetConfig = field(default_factory=AdaptiveBudgetConfig)
    encoder: EncoderConfig | None = None
    async_encoder: bool = False

    def __post_init__(self):
        if self.encoder is not None and self.encoder.patch_size != self.foveation.patch_size:
            raise ValueError(
                f"encoder.patch_size={self.encoder.patch_size}: must equal foveation.patch_size="
                f"{self.foveation.patch_size}"
            )
        if self.motion.tile_size % self.flow.grid:
            raise ValueError(
                f"motion.tile_size={self.motion.tile_size}: must be a multiple of flow.grid={self.flow.grid}"
            )


@dataclass(frozen=True)
class PipelineOutput:
    """What one frame produced.

    Attributes:
        stamp_ns: capture stamp of the source frame [ns].
        frame_id: camera frame of the source frame.
        width, height: source image size [px].
        fixation: where the fovea points after this frame (the primary fixation). Its ``x, y``
            are the published, latency-compensated position; ``filtered_x, filtered_y`` the
            position at this frame's capture time, around which ``layout`` is built.
        fixations: every simultaneous fixation, the primary first.
        weights: their importance weights (sum 1), the layout's token shares.
        saccade: what triggered a saccade of the primary on this frame (``"schedule"``, ``"cut"``,
            ``"instruction"``, ``"new_motion"``, ``"idle"``), or None.
        layout: the sampling layout around those fixations.
        patches: torch.Tensor (N, 3, P, P) float32 in [0, 1] on the texture device.
        rgb: (H, W, 3) uint8 the decoded source frame (not copied).
        flow: flow from the previous frame, or None on the first frame / with flow off.
        motion: motion analysis of that flow, or None when there is no flow.
        flow_grid: block side [px] of ``flow``.
        timing_ms: per-stage wall time [ms], including "total".
        slip: the slip stage's event for this frame (onset / ongoing / cleared), or None.
        decision: the temporal-coherence decision for this frame (see
            :mod:`fovea_vla.core.coherence`).
        dirty_fraction: share of tiles that differed from the texture, in [0, 1].
        tokens_reused: ``layout`` and ``patches`` (and ``tokens``) are the cached ones of an
            earlier frame: nothing this frame changed reached them.
        tokens_updated: tokens sampled (and encoded) again on this frame: 0 when all were
            reused, ``layout.num_tokens`` for a whole encode, in between when only the changed
            ones were (``coherence.reencode="changed"``).
        tokens_stamp_ns: capture stamp [ns] of the frame ``patches`` were sampled on.
        tokens: torch.Tensor (N, D) encoder tokens in layout order on the encoder's device, or
            None without an encoder.
        cls_token: torch.Tensor (D,) the class token's output, or None.
    """

    stamp_ns: int
    frame_id: str
    width: int
    height: int
    fixation: FixationState
    fixations: list[FixationState]
    weights: list[float]
    saccade: str | None
    layout: FoveatedLayout
    patches: object
    rgb: np.ndarray
    flow: FlowResult | None
    motion: MotionAnalysis | None
    flow_grid: int
    timing_ms: dict[str, float]
    slip: SlipEvent | None = None
    decision: str = "first"
    dirty_fraction: float = 1.0
    tokens_reused: bool = False
    tokens_updated: int = 0
    tokens_stamp_ns: int = 0
    tokens: object = None
    cls_token: object = None


@dataclass(frozen=True)
class TokenUpdate:
    """Tokens that stand for one processed frame.

    Attributes:
        tokens: (N, D) encoder tokens in ``layout`` order on the encoder's device.
        cls_token: (D,) the class token's output.
        layout: the layout the tokens were sampled with.
        stamp_ns: capture stamp [ns] of the frame the tokens stand for: the encoded frame, or a
            later static frame that reused them.
        tokens_stamp_ns: capture stamp [ns] of the frame the patches were sampled on.
        frame_id: camera frame.
        width, height: image size [px].
        timing_ms: the encoder's stage times when these tokens were just encoded, else empty.
    """

    tokens: object
    cls_token: object
    layout: FoveatedLayout
    stamp_ns: int
    tokens_stamp_ns: int
    frame_id: str
    width: int
    height: int
    timing_ms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class _EncodeJob:
    patches: object
    layout: FoveatedLayout
    stamp_ns: int
    frame_id: str
    width: int
    height: int


class _EncoderWorker:
    """The encoder on its own thread, always on the newest job (older unstarted jobs are skipped)."""

    def __init__(
        self, encoder: FoveatedEncoder, done: Callable[[_EncodeJob, object], None], max_changed_fraction: float | None
    ):
        self._encoder = encoder
        self._done = done
        # Token level (a fraction): the worker skips jobs, so what changed is measured against what it
        # encoded last, not taken from the pipeline.
        self._max_changed_fraction = max_changed_fraction
        self._inbox: NewestQueue[_EncodeJob] = NewestQueue(1)
        self.skipped = 0
        self.errors = 0
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._run, name="fovea_encoder", daemon=True)
        self._thread.start()

    def submit(self, job: _EncodeJob) -> None:
        if self._inbox.put(job):
            self.skipped += 1

    def _run(self) -> None:
        while not self._inbox.closed:
            job = self._inbox.take(timeout_s=0.5)
            if job is None:
                continue
            try:
                inputs = (job.patches, job.layout.centers, job.layout.levels, (job.width, job.height))
                if self._max_changed_fraction is not None:
                    encoded = self._encoder.update(
                        *inputs,
                        changed=self._encoder.changed_tokens(*inputs),
                        max_changed_fraction=self._max_changed_fraction,
                    )
                else:
                    encoded = self._encoder.encode(*inputs)
            except Exception as exc:  # one bad frame must not end the thread: counted, the next job runs
                self.errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                continue
            self._done(job, encoded)

    def close(self) -> None:
        self._inbox.close()
        self._thread.join(timeout=5.0)


@dataclass(frozen=True)
class _TokenCache:
    """Sampling results kept for reuse on static frames."""

    centres: np.ndarray  # (K, 2) fixation positions [px] the layout was built around
    weights: tuple[float, ...]
    focal_px: float | None
    layout: FoveatedLayout
    patches: object
    tokens: object
    cls_token: object
    stamp_ns: int

    def serves(self, centres: np.ndarray, weights, focal_px: float | None, max_shift_px: float) -> bool:
        return (
            centres.shape == self.centres.shape
            and tuple(weights) == self.weights
            and focal_px == self.focal_px
            and float(np.abs(centres - self.centres).max()) <= max_shift_px
        )


def _encoder_timing(encoded) -> dict[str, float]:
    timing = {"encoder": encoded.timing_ms}
    if encoded.device_ms is not None:
        timing["encoder_gpu"] = encoded.device_ms
    return timing


class FoveaPipeline:
    """Runs the stages on each frame, keeping the state that spans frames."""

    def __init__(self, cfg: PipelineConfig | None = None, on_tokens: Callable[[TokenUpdate], None] | None = None):
        """
        Args:
            cfg: stage settings (defaults when None).
            on_tokens: called with a :class:`TokenUpdate` for every processed frame that has
                tokens (inside :meth:`process`, before it returns), or, with ``async_encoder``,
                from the encoder's thread when new tokens are ready and from :meth:`process` for
                static frames that reuse them.
        """
        self.cfg = cfg or PipelineConfig()
        self._on_tokens = on_tokens
        self.backends: dict[str, BackendSelection] = {}
        self._flow = None
        if self.cfg.flow_enabled:
            self._flow, self.backends["flow"] = make_flow(self.cfg.flow)
        self._motion = MotionAnalyzer(self.cfg.motion)
        self._slip = None
        if self.cfg.slip is not None:
            self._slip = SlipStage(self.cfg.slip)
            self.backends["slip_flow"] = self._slip.backend
        self._texture, self.backends["texture"] = make_texture(self.cfg.texture)
        self.encoder = FoveatedEncoder(self.cfg.encoder) if self.cfg.encoder is not None else None
        self._coherence = TemporalCoherence(self.cfg.coherence)
        # One helper thread for work that overlaps the flow stage (see process()).
        self._side = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="fovea_coherence") if self.cfg.flow_enabled else None
        )
        self._cache: _TokenCache | None = None
        # Guards _cache between process() and the encoder thread.
        self._cache_lock = threading.Lock()
        self._worker = None
        # The newest asynchronously encoded tokens, and the encoder's last time (for the adaptive budget).
        self._latest: _TokenCache | None = None
        self._last_encoder_ms = 0.0
        if self.encoder is not None and self.cfg.async_encoder:
            coherence = self.cfg.coherence
            token_level = coherence.max_reencode_fraction if coherence.reencode == "changed" else None
            self._worker = _EncoderWorker(self.encoder, self._encoded, token_level)
        # Frames per coherence decision; frames whose tokens all came from the cache, and those
        # where only some were sampled and encoded again; tokens sampled and encoded, of all.
        self.decision_counts: Counter[str] = Counter()
        self.frames_reused = 0
        self.frames_partly_reused = 0
        self.tokens_updated = 0
        self.tokens_total = 0
        self._partial_encodes = 0  # consecutive frames encoded in part since the last whole encode
        self._budget = None
        if self.cfg.adaptive_budget.enabled:
            self._budget = AdaptiveBudget(self.cfg.adaptive_budget, self.cfg.foveation.num_tokens)
        self._fixation: FixationController | None = None
        self._prev_gray: np.ndarray | None = None
        # A fixation request (kind, x, y, hold_s), applied at the next processed frame's time.
        self._pending_request: tuple[str, float, float, float | None] | None = None
        self._instruction_changed = False

    @property
    def device(self) -> str:
        return self._texture.device

    @property
    def encodes_skipped(self) -> int:
        """Sampled patch sets the asynchronous encoder never took because newer ones came (0 when synchronous)."""
        return 0 if self._worker is None else self._worker.skipped

    @property
    def encoder_errors(self) -> int:
        """Frames the asynchronous encoder failed on (0 when synchronous: process() raises instead)."""
        return 0 if self._worker is None else self._worker.errors

    def close(self) -> None:
        """Stop the encoder thread and release the texture's GPU / GL resources (a GL context, CUDA
        registrations); the pipeline is unusable afterwards. Backends without such resources have
        nothing to release."""
        if self._worker is not None:
            self._worker.close()
        if self._side is not None:
            self._side.shutdown(wait=True)
        close = getattr(self._texture, "close", None)
        if close is not None:
            close()

    def reset(self) -> None:
        """Forget the previous frame and the fixation history (e.g. after a camera switch)."""
        self._prev_gray = None
        self._fixation = None
        self._coherence.reset()
        with self._cache_lock:
            self._cache = self._latest = None
        self._motion.reset()
        if self._flow is not None:
            self._flow.reset()
        if self._slip is not None:
            self._slip.reset()

    def set_external_fixation(self, x: float, y: float, hold_s: float | None = None) -> None:
        """Override the fixation at (x, y) [px]; applied from the next processed frame's time."""
        self._pending_request = ("external", x, y, hold_s)

    def set_query_fixation(self, x: float, y: float, hold_s: float | None = None) -> None:
        """Fixate a language query's answer at (x, y) [px] (source QUERY), like an external one."""
        self._pending_request = ("query", x, y, hold_s)

    def start_pursuit(self, x: float, y: float) -> None:
        """Pursue what moves at (x, y) [px] from the next processed frame on."""
        self._pending_request = ("pursuit", x, y, None)

    def clear_external_fixation(self) -> None:
        self._pending_request = None
        if self._fixation is not None:
            self._fixation.clear_external()

    def notify_instruction_change(self) -> None:
        """The task instruction changed: the next frame may saccade (``instruction`` event)."""
        self._instruction_changed = True

    def process(
        self,
        frame: Frame,
        *,
        focal_px: float | None = None,
        relevance: np.ndarray | None = None,
        grasp: Grasp | None = None,
    ) -> PipelineOutput:
        """Run every stage on one frame.

        Args:
            frame: decoded frame with its capture stamp.
            focal_px: camera focal length [px] when known (for e0 in degrees).
            relevance: (H', W') float relevance map in [0, 1] over the whole frame (e.g. from
                the encoder) for the fixation priority map, or None.
            grasp: gripper and held-object regions and gripper state, for the slip stage.
        """
        timing: dict[str, float] = {}
        start = time.perf_counter()
        height, width = frame.rgb.shape[:2]
        now_s = frame.stamp_ns * 1e-9
        if self._fixation is None or (self._fixation.width, self._fixation.height) != (width, height):
            self.reset()  # a new size is a new camera: nothing of the old geometry carries over
            self._fixation = FixationController(self.cfg.fixation, width, height)

        flow_result = motion = gray = slip = measuring = None
        prev_gray = self._prev_gray
        if self._flow is not None or self._slip is not None:
            t = time.perf_counter()
            gray = rgb_to_gray(frame.rgb)
            if self._side is not None:
                # The texture-difference half of the coherence stage runs beside flow and motion (OpenCV
                # and the GPU wait release the GIL); its decision waits for the cut verdict below.
                measuring = self._side.submit(self._coherence.measure, gray)
            if self._flow is not None and prev_gray is not None:
                flow_result = self._flow.compute(self._prev_gray, gray)
                if flow_result.device_ms is not None:
                    timing["flow_gpu"] = flow_result.device_ms
                timing["flow"] = (time.perf_counter() - t) * 1e3
                t = time.perf_counter()
                motion = self._motion.analyze(self._prev_gray, gray, flow_result, self.cfg.flow.grid)
                timing["motion"] = (time.perf_counter() - t) * 1e3
                if motion.is_cut:
                    # Nothing carries over a cut: no temporal hints (the controller forgets too).
                    self._flow.reset()
            self._prev_gray = gray
        if self._slip is not None:
            if grasp is None or prev_gray is None or (motion is not None and motion.is_cut):
                # No evidence about the grasp on this frame: an active slip ends (CLEARED).
                slip = self._slip.release(now_s)
            else:
                ego = None if motion is None else motion.ego_motion
                slip = self._slip.update(prev_gray, gray, grasp, now_s, ego)
                timing.update(self._slip.timing_ms)

        t = time.perf_counter()
        controller = self._fixation
        if self._pending_request is not None:
            kind, x, y, hold_s = self._pending_request
            self._pending_request = None
            if kind == "pursuit":
                controller.start_pursuit(x, y, now_s)
            elif kind == "query":
                controller.set_query_target(x, y, now_s, hold_s)
            else:
                controller.set_external(x, y, now_s, hold_s)
        if self._instruction_changed:
            self._instruction_changed = False
            controller.notify_instruction_change()
        cut = motion is not None and motion.is_cut
        usable = flow_result is not None and not cut
        controller.update(
            flow_result.flow if usable else None,
            self.cfg.flow.grid,
            now_s,
            residual=motion.residual if usable else None,
            independent=motion.independent_mask if usable else None,
            confidence=flow_result.confidence if usable else None,
            gray=gray,
            relevance=relevance,
            is_cut=cut,
        )
        fixation_set = controller.fixations
        fixation = fixation_set.primary
        timing["fixation"] = (time.perf_counter() - t) * 1e3

        t = time.perf_counter()
        if gray is None:
            gray = rgb_to_gray(frame.rgb)
        measured = None if measuring is None else measuring.result()
        decision = self._coherence.decide(gray, now_s, is_cut=cut, measured=measured)
        self.decision_counts[decision.kind] += 1
        timing["coherence"] = (time.perf_counter() - t) * 1e3
        self._update_texture(self._texture_source(frame), decision, timing)

        # The layout samples this frame, so it is built around the capture-time positions.
        centres = np.array([(f.filtered_x, f.filtered_y) for f in fixation_set.fixations], dtype=np.float64)
        weights = tuple(float(w) for w in fixation_set.weights)
        with self._cache_lock:
            cache = self._cache
        foveation = self.cfg.foveation
        if self._budget is not None:
            foveation = replace(foveation, num_tokens=self._budget.tokens)
        coherence = self.cfg.coherence
        texture_kept = decision.kind in ("static", "partial")
        usable = (
            texture_kept
            and cache is not None
            and cache.layout.num_tokens == foveation.num_tokens
            and cache.focal_px == focal_px
            and len(cache.weights) == len(weights)
        )
        updated = None  # (N,) tokens to sample and encode again; None = all of them
        layout = None
        if coherence.reencode == "all":
            if (
                usable
                and decision.kind == "static"
                and cache.serves(centres, weights, focal_px, coherence.max_fixation_shift_px)
            ):
                updated = np.zeros(cache.layout.num_tokens, dtype=bool)
        else:
            built = layout = self._build_layout(foveation, width, height, centres, weights, focal_px, timing)
            if usable:
                layout, updated = keep_token_positions(built, cache.layout, coherence.token_shift_fraction)
                updated |= dirty_tokens(layout, decision.rects)
                stale = self._partial_encodes >= coherence.max_partial_encodes
                if updated.mean() > coherence.max_reencode_fraction or (stale and updated.any()):
                    # A whole encode takes the layout as built, without positions held from the cache.
                    layout, updated = built, None
        reuse = updated is not None and not updated.any()
        if reuse:
            self.frames_reused += 1
            layout, patches = cache.layout, cache.patches
            tokens_updated = 0
        else:
            if layout is None:
                layout = self._build_layout(foveation, width, height, centres, weights, focal_px, timing)
            t = time.perf_counter()
            if updated is None:
                patches = self._texture.sample(layout.centers, layout.sizes, layout.patch_size)
                tokens_updated = layout.num_tokens
                self._partial_encodes = 0
            else:
                patches = cache.patches.clone()
                rows = np.flatnonzero(updated)
                patches[rows] = self._texture.sample(layout.centers[rows], layout.sizes[rows], layout.patch_size)
                tokens_updated = len(rows)
                self.frames_partly_reused += 1
                self._partial_encodes += 1
            timing["sampling"] = (time.perf_counter() - t) * 1e3
            tokens = cls_token = None
            if self._worker is not None:
                # A copy: the texture may sample the next frame into the same buffer.
                self._worker.submit(_EncodeJob(patches.clone(), layout, frame.stamp_ns, frame.frame_id, width, height))
            elif self.encoder is not None:
                if coherence.reencode == "all":
                    encoded = self.encoder.encode(patches, layout.centers, layout.levels, (width, height))
                else:
                    encoded = self.encoder.update(
                        patches, layout.centers, layout.levels, (width, height), changed=updated
                    )
                tokens, cls_token = encoded.tokens, encoded.cls
                timing.update(_encoder_timing(encoded))
            cache = _TokenCache(centres, weights, focal_px, layout, patches, tokens, cls_token, frame.stamp_ns)
            with self._cache_lock:
                self._cache = cache
        self.tokens_updated += tokens_updated
        self.tokens_total += layout.num_tokens
        if self._budget is not None:
            encoder_ms = timing.get("encoder", self._last_encoder_ms)
            vision_ms = None if reuse else timing["sampling"] + encoder_ms
            self._budget.update(scene_complexity(gray, self.cfg.adaptive_budget.textured_std), vision_ms)
        if self._worker is None:
            delivered = cache if cache.tokens is not None else None
        else:
            with self._cache_lock:
                latest = self._latest
            # Synchronous tokens stand for this frame; asynchronous ones are the newest encoded.
            delivered = latest
        if self._on_tokens is not None and cache.tokens is not None and (self._worker is None or reuse):
            self._on_tokens(
                TokenUpdate(
                    tokens=cache.tokens,
                    cls_token=cache.cls_token,
                    layout=cache.layout,
                    stamp_ns=frame.stamp_ns,
                    tokens_stamp_ns=cache.stamp_ns,
                    frame_id=frame.frame_id,
                    width=width,
                    height=height,
                    timing_ms={} if reuse else {k: timing[k] for k in ("encoder", "encoder_gpu") if k in timing},
                )
            )
        timing["total"] = (time.perf_counter() - start) * 1e3
        return PipelineOutput(
            stamp_ns=frame.stamp_ns,
            frame_id=frame.frame_id,
            width=width,
            height=height,
            fixation=fixation,
            fixations=list(fixation_set.fixations),
            weights=list(fixation_set.weights),
            saccade=fixation_set.saccade,
            slip=slip,
            layout=layout,
            patches=patches,
            rgb=frame.rgb,
            flow=flow_result,
            motion=motion,
            flow_grid=self.cfg.flow.grid,
            timing_ms=timing,
            decision=decision.kind,
            dirty_fraction=decision.dirty_fraction,
            tokens_reused=reuse,
            tokens_updated=tokens_updated,
            tokens_stamp_ns=0 if delivered is None else delivered.stamp_ns,
            tokens=None if delivered is None else delivered.tokens,
            cls_token=None if delivered is None else delivered.cls_token,
        )

    @staticmethod
    def _build_layout(foveation, width, height, centres, weights, focal_px, timing) -> FoveatedLayout:
        t = time.perf_counter()
        if len(centres) > 1:
            layout = foveated_layout_multi(foveation, width, height, centres, weights, focal_px=focal_px)
        else:
            layout = foveated_layout(foveation, width, height, centres[0], focal_px=focal_px)
        timing["layout"] = (time.perf_counter() - t) * 1e3
        return layout

    def _encoded(self, job: _EncodeJob, encoded) -> None:
        """The encoder thread finished ``job``: fill the cache entry sampled for it, hand the tokens on."""
        timing = _encoder_timing(encoded)
        self._last_encoder_ms = encoded.timing_ms
        entry = _TokenCache(None, (), None, job.layout, job.patches, encoded.tokens, encoded.cls, job.stamp_ns)
        with self._cache_lock:
            cache = self._cache
            if cache is not None and cache.stamp_ns == job.stamp_ns:
                self._cache = replace(cache, tokens=encoded.tokens, cls_token=encoded.cls)
            self._latest = entry
        if self._on_tokens is not None:
            self._on_tokens(
                TokenUpdate(
                    tokens=encoded.tokens,
                    cls_token=encoded.cls,
                    layout=job.layout,
                    stamp_ns=job.stamp_ns,
                    tokens_stamp_ns=job.stamp_ns,
                    frame_id=job.frame_id,
                    width=job.width,
                    height=job.height,
                    timing_ms=timing,
                )
            )

    def _texture_source(self, frame: Frame):
        """``frame.device_rgb`` when the texture takes device frames and lives on that device, else ``frame.rgb``."""
        tensor = frame.device_rgb
        if tensor is None or not getattr(self._texture, "accepts_device_frames", False):
            return frame.rgb
        import torch

        device = torch.device(self._texture.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return tensor if tensor.device == device else frame.rgb

    def _update_texture(self, rgb, decision: TextureDecision, timing: dict[str, float]) -> None:
        """Upload ``rgb`` (a host array or a device tensor, see ``_texture_source``) as ``decision`` says."""
        t = time.perf_counter()
        if decision.uploads_all:
            self._texture.upload(rgb)
            timing["upload"] = (time.perf_counter() - t) * 1e3
        elif decision.kind == "partial":
            self._texture.upload_rects(rgb, decision.rects)
            timing["upload"] = (time.perf_counter() - t) * 1e3
            t = time.perf_counter()
            height, width = rgb.shape[:2]
            limit = self.cfg.texture.incremental_mips_max_fraction
            self._texture.rebuild_mips(mip_rebuild_rects(decision.rects, width, height, limit))
            timing["mips"] = (time.perf_counter() - t) * 1e3


def make_example() -> tuple[FoveaPipeline, list[Frame]]:
    """A CPU pipeline and three frames of a small moving-square scene."""
    rng = np.random.default_rng(0)
    background = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    frames = []
    for i in range(3):
        rgb = background.copy()
        rgb[40:70, 50 + 4 * i : 80 + 4 * i] = (250, 40, 40)
        frames.append(Frame(rgb=rgb, stamp_ns=i * 33_333_333, frame_id="camera"))
    return FoveaPipeline(PipelineConfig(texture=TextureConfig(backend="torch", device="cpu"))), frames
