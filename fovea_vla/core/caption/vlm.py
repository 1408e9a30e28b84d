"""Captions from a Hugging Face image-text-to-text model (SmolVLM / Idefics3 family), offline.

The model reads the foveated view as two images in one prompt (the fovea crop, then the whole frame
at low resolution) with the task instruction and the event narration as context. Image splitting is
left to the view: the fovea already gives the detail that splitting would buy with many more tokens.

On a GPU shared with the action path, :class:`GpuGaps` puts the model's GPU work into the idle time
after each camera frame: SCHED_IDLE keeps the captioner off the CPU the action path needs, but two
processes' kernels on one GPU are time-sliced, and a caption step that lands on a frame's flow,
encoder or action head delays it (measured on the H200: action p99 +20 % with captions at 1 Hz).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fovea_vla.core._validation import is_int

__all__ = ["CaptionModelError", "GpuGaps", "VlmCaptioner", "VlmConfig", "resolve_device_dtype"]

DEFAULT_PROMPT = (
    "The first image is a close-up of where the robot is looking; the second is its whole camera view. "
    "{context}Describe in one short sentence what is happening, mentioning the objects in the close-up."
)
_DTYPES = ("auto", "float32", "float16", "bfloat16")


class CaptionModelError(RuntimeError):
    """The caption model could not be loaded (missing folder, unreadable files, unsupported model)."""


@dataclass(frozen=True, kw_only=True)
class VlmConfig:
    """The VLM captioner.

    Attributes:
        model_path: local folder with the model and its processor (``save_pretrained`` layout). Never
            a hub id: the robot has no network, and a missing folder is an error, not a download.
        device: ``auto`` (CUDA when present, else CPU), ``cpu`` or ``cuda[:N]``.
        dtype: ``auto`` (bfloat16 on CUDA, float32 on CPU), ``float32``, ``float16`` or ``bfloat16``.
        max_new_tokens: longest caption [tokens].
        num_threads: torch CPU threads of this process; few, so captions never starve the action path.
        prompt: the question; ``{context}`` becomes the instruction and event narration sentences.
    """

    model_path: str
    device: str = "auto"
    dtype: str = "auto"
    max_new_tokens: int = 40
    num_threads: int = 1
    prompt: str = DEFAULT_PROMPT

    def __post_init__(self):
        if not self.model_path:
            raise ValueError("model_path='': name the local folder of a SmolVLM-class model")
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise ValueError(f"device={self.device!r}: must be auto, cpu or cuda[:N]")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: must be one of {_DTYPES}")
        if not (is_int(self.max_new_tokens) and 1 <= self.max_new_tokens <= 512):
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r}: must be an integer in [1, 512]")
        if not (is_int(self.num_threads) and 1 <= self.num_threads <= 256):
            raise ValueError(f"num_threads={self.num_threads!r}: must be an integer in [1, 256]")
        if "{context}" not in self.prompt:
            raise ValueError(f"prompt={self.prompt!r}: must contain {{context}}")


class GpuGaps:
    """When the captioner may put work on the GPU: within ``window_s`` after the action path finished
    a frame (``frame_done``, on each fixation), before the next frame's work starts.

    A caption is a prefill and one decoding step per token; :meth:`wait` is called before each, so
    every step starts right after a frame. Without frames (no action path running) a wait ends
    after ``timeout_s``, so captions never stop.

    Args:
        window_s: how long after a frame new GPU work may start [s]; keep it below the frame
            period minus the step's own time.
        timeout_s: longest wait for a frame [s].
        clock: monotonic seconds.
    """

    def __init__(self, window_s: float, timeout_s: float, clock: Callable[[], float] = time.monotonic):
        if not (window_s >= 0 and timeout_s > 0):
            raise ValueError(f"window_s={window_s!r} must be >= 0 and timeout_s={timeout_s!r} > 0")
        self.window_s = window_s
        self.timeout_s = timeout_s
        self._clock = clock
        self._condition = threading.Condition()
        self._frames = 0
        self._last_s: float | None = None
        self.waits = self.timeouts = 0

    def frame_done(self) -> None:
        with self._condition:
            self._frames += 1
            self._last_s = self._clock()
            self._condition.notify_all()

    def wait(self) -> None:
        """Return at once inside a frame's window, else when the next frame is done (or at the timeout)."""
        with self._condition:
            self.waits += 1
            if self._last_s is not None and self._clock() - self._last_s <= self.window_s:
                return
            seen = self._frames
            if not self._condition.wait_for(lambda: self._frames != seen, self.timeout_s):
                self.timeouts += 1


def _gated_steps(gaps: GpuGaps):
    """A logits processor that waits for a GPU gap before each next decoding step is launched."""
    from transformers import LogitsProcessor

    class GapGate(LogitsProcessor):
        def __call__(self, input_ids, scores):
            gaps.wait()
            return scores

    return GapGate()


def resolve_device_dtype(device: str, dtype: str):
    """``(torch.device, torch.dtype)`` for the config's ``auto`` values."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if dtype == "auto":
        dtype = "bfloat16" if resolved.type == "cuda" else "float32"
    return resolved, getattr(torch, dtype)


def _check_model_folder(path: str) -> Path:
    folder = Path(path).expanduser()
    if not folder.exists():
        raise CaptionModelError(f"caption model folder {str(folder)!r} does not exist (model_path)")
    if not folder.is_dir():
        raise CaptionModelError(f"caption model path {str(folder)!r} is not a folder (model_path)")
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not any((folder / name).is_file() for name in ("processor_config.json", "preprocessor_config.json")):
        missing.append("processor_config.json or preprocessor_config.json")
    if missing:
        raise CaptionModelError(
            f"caption model folder {str(folder)!r} lacks {', '.join(missing)}: save the model and its processor "
            "there with save_pretrained()"
        )
    return folder


class VlmCaptioner:
    """A local image-text-to-text model that captions foveated views.

    Raises:
        CaptionModelError: the folder is missing or the model cannot be loaded (the message says why).
    """

    name = "vlm"
    kind = "vlm"

    def __init__(self, cfg: VlmConfig, gaps: GpuGaps | None = None):
        self.cfg = cfg
        folder = _check_model_folder(cfg.model_path)
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.device, self.dtype = resolve_device_dtype(cfg.device, cfg.dtype)
        if self.device.type == "cpu":
            torch.set_num_threads(cfg.num_threads)
        try:
            self.processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
            model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True, dtype=self.dtype)
        except (OSError, ValueError, KeyError, ImportError) as exc:
            raise CaptionModelError(f"cannot load the caption model from {str(folder)!r}: {exc}") from exc
        self.model = model.to(self.device).eval()
        # Gaps only matter on a GPU: on the CPU, SCHED_IDLE already yields to the action path.
        self.gaps = gaps if self.device.type == "cuda" else None
        self.model_name = folder.name
        self.last_timing_ms: dict[str, float] = {}

    def prompt(self, instruction: str, context: str) -> str:
        parts = []
        if instruction:
            parts.append(f'The robot\'s task is "{instruction}".')
        if context:
            parts.append(f"Measured by its vision pipeline: {context}")
        text = self.cfg.prompt.format(context=" ".join(parts) + (" " if parts else ""))
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": text}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def caption(self, fovea: np.ndarray, periphery: np.ndarray, instruction: str = "", context: str = "") -> str:
        """One caption of the view; ``context`` is the event narration the prompt quotes."""
        import torch
        from PIL import Image as PilImage

        t0 = time.perf_counter()
        images = [PilImage.fromarray(np.ascontiguousarray(fovea)), PilImage.fromarray(np.ascontiguousarray(periphery))]
        inputs = self.processor(text=self.prompt(instruction, context), images=[images], return_tensors="pt")
        inputs = {
            key: value.to(self.device, self.dtype if value.is_floating_point() else None)
            for key, value in inputs.items()
        }
        t1 = time.perf_counter()
        steps = {}
        if self.gaps is not None:
            self.gaps.wait()  # the prefill (vision encoder + prompt) starts right after a frame too
            steps["logits_processor"] = [_gated_steps(self.gaps)]
        with torch.inference_mode():
            output = self.model.generate(**inputs, max_new_tokens=self.cfg.max_new_tokens, do_sample=False, **steps)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        text = self.processor.batch_decode(new_tokens, skip_special_tokens=True)[0]
        t2 = time.perf_counter()
        self.last_timing_ms = {"preprocess": (t1 - t0) * 1e3, "generate": (t2 - t1) * 1e3}
        return " ".join(text.split())
