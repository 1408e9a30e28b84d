"""Inference stage of the action head: device, precision and one CUDA graph per token count.

At batch 1 an eager transformer is launch-bound (dozens of small kernels), so on CUDA each new
token count N is captured once into a CUDA graph whose static inputs later calls copy into
(the adaptive token budget changes N in a few steps, so a handful of graphs cover it). The
state arrives from the host every call; it goes through a pinned buffer so the copy does not
wait for unrelated GPU work, and the chunk comes back through a pinned buffer too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from fovea_vla.core import accel
from fovea_vla.core.policy.head import ActionHead, ActionHeadEnsemble

__all__ = ["ActionHeadRunner", "HeadOutput", "RunnerConfig"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MAX_GRAPHS = 16  # CUDA graphs kept (one per token count), least recently used dropped first


@dataclass(frozen=True, kw_only=True)
class RunnerConfig:
    """Where and how the action head runs.

    Attributes:
        device: "auto" (CUDA when present), "cpu" or "cuda[:N]".
        dtype: "auto" (float16 on CUDA, float32 on CPU), "float32", "float16" or "bfloat16".
        cuda_graphs: capture and replay a CUDA graph per token count (CUDA only).
    """

    device: str = "auto"
    dtype: str = "auto"
    cuda_graphs: bool = True

    def __post_init__(self):
        if not isinstance(self.device, str) or not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise ValueError(f"policy.device={self.device!r}: must be 'auto', 'cpu' or 'cuda[:N]'")
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"policy.dtype={self.dtype!r}: must be 'auto' or one of {', '.join(_DTYPES)}")
        if not isinstance(self.cuda_graphs, bool):
            raise ValueError(f"policy.cuda_graphs={self.cuda_graphs!r}: must be a bool")

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype != "auto":
            return _DTYPES[self.dtype]
        return torch.float16 if device.type == "cuda" else torch.float32


@dataclass
class HeadOutput:
    """One chunk.

    Attributes:
        actions: (K, A) float64 actions in robot units (host memory).
        timing_ms: wall time of :meth:`ActionHeadRunner.predict` [ms], copies included.
        device_ms: CUDA: the head's GPU time [ms] from CUDA events; None on CPU.
        graph: whether a CUDA graph was replayed.
    """

    actions: np.ndarray
    timing_ms: float
    device_ms: float | None
    graph: bool


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    tokens: torch.Tensor
    positions: torch.Tensor
    instruction: torch.Tensor
    state: torch.Tensor
    actions: torch.Tensor


class ActionHeadRunner:
    """The action head on its device, at batch 1.

    Args:
        model: a float32 CPU :class:`ActionHead` or :class:`ActionHeadEnsemble` (from :func:`load_policy`);
            moved and cast here.
        cfg: device, dtype and graph settings.

    Raises:
        RuntimeError: a CUDA device is configured but absent.
    """

    def __init__(self, model: ActionHead | ActionHeadEnsemble, cfg: RunnerConfig | None = None):
        cfg = cfg or RunnerConfig()
        self.cfg = cfg
        self.device = cfg.resolved_device()
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"policy.device={cfg.device!r} but torch {torch.__version__} sees no CUDA device")
        self.dtype = cfg.resolved_dtype(self.device)
        self.model = model.to(self.device).half_precision(self.dtype).eval().requires_grad_(False)
        self._cuda = self.device.type == "cuda"
        self._use_graphs = cfg.cuda_graphs and self._cuda
        self._graphs: dict[int, _Graph] = {}
        head = model.cfg
        self._state_host = torch.zeros(1, head.state_dim, pin_memory=self._cuda)
        self._actions_host = torch.zeros(head.chunk_size, head.action_dim, pin_memory=self._cuda)
        self._events = (
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if self._cuda else None
        )

    def warm_up(self, num_tokens: int) -> None:
        """Run (and on CUDA capture) the head once for ``num_tokens`` tokens, before the node spins:
        capturing later, in the policy thread, would do it while the encoder's thread works."""
        head = self.model.cfg
        self.predict(
            torch.zeros(num_tokens, head.token_dim, device=self.device),
            np.zeros((num_tokens, 3), np.float32),
            np.zeros(head.instruction_dim, np.float32),
            np.zeros(head.state_dim),
        )

    @property
    def graph_token_counts(self) -> list[int]:
        """Token counts N with a captured CUDA graph."""
        return sorted(self._graphs)

    def _capture(self, tokens, positions, instruction, state) -> _Graph:
        static = (tokens.clone(), positions.clone(), instruction.clone(), state.clone())
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(3):  # kernels pick algorithms and workspaces outside the graph
                self.model(*static)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the encoder's thread may allocate or synchronise while this thread captures.
        with accel.collector_paused(), torch.cuda.graph(graph, capture_error_mode="thread_local"):
            actions = self.model(*static)
        return _Graph(graph, *static, actions)

    def predict(self, tokens: torch.Tensor, positions, instruction, state) -> HeadOutput:
        """One chunk from one observation.

        Args:
            tokens: (N, T) image tokens, a torch tensor on any device (the encoder's output
                stays on the GPU), any float dtype.
            positions: (N, 3) token positions (:func:`~fovea_vla.core.policy.observation.token_positions`),
                numpy or torch.
            instruction: (L,) instruction embedding (numpy or torch).
            state: (S,) state in robot units (numpy or sequence), finite.

        Returns:
            :class:`HeadOutput` with (K, A) float64 actions.

        Raises:
            ValueError: wrong shapes, or a non-finite state.
        """
        start = time.perf_counter()
        head = self.model.cfg
        tokens = torch.as_tensor(tokens)
        if tokens.ndim != 2 or tokens.shape[1] != head.token_dim or tokens.shape[0] < 1:
            raise ValueError(f"tokens must be (N, {head.token_dim}) with N >= 1, got {tuple(tokens.shape)}")
        positions = torch.as_tensor(
            np.asarray(positions, dtype=np.float32) if not torch.is_tensor(positions) else positions
        )
        if tuple(positions.shape) != (tokens.shape[0], 3):
            raise ValueError(
                f"positions must be ({tokens.shape[0]}, 3) to match the tokens, got {tuple(positions.shape)}"
            )
        state_np = np.asarray(state, dtype=np.float32).reshape(-1)
        if state_np.shape != (head.state_dim,):
            raise ValueError(f"state must have {head.state_dim} values, got {state_np.shape[0]}")
        if not np.isfinite(state_np).all():
            raise ValueError("state holds NaN or inf")
        instruction = torch.tensor(np.asarray(instruction, dtype=np.float32)).reshape(1, -1)
        if instruction.shape[1] != head.instruction_dim:
            raise ValueError(
                f"instruction embedding must have {head.instruction_dim} values, got {instruction.shape[1]}"
            )
        self._state_host.copy_(torch.from_numpy(state_np)[None])
        tokens = tokens.to(self.device, self.dtype, non_blocking=True)[None]
        positions = positions.to(self.device, torch.float32, non_blocking=True)[None]
        instruction = instruction.to(self.device, non_blocking=True)
        state_dev = self._state_host.to(self.device, non_blocking=True)
        with torch.no_grad():
            if self._use_graphs:
                entry = self._graphs.pop(tokens.shape[1], None)
                if entry is None:
                    if len(self._graphs) >= MAX_GRAPHS:  # an adaptive budget makes many counts: drop the oldest
                        self._graphs.pop(next(iter(self._graphs)))
                    entry = self._capture(tokens, positions, instruction, state_dev)
                else:
                    entry.tokens.copy_(tokens)
                    entry.positions.copy_(positions)
                    entry.instruction.copy_(instruction)
                    entry.state.copy_(state_dev)
                self._graphs[tokens.shape[1]] = entry  # most recently used last
                self._events[0].record()
                entry.graph.replay()
                self._events[1].record()
                actions = entry.actions[0]
            else:
                if self._events:
                    self._events[0].record()
                actions = self.model(tokens, positions, instruction, state_dev)[0]
                if self._events:
                    self._events[1].record()
            self._actions_host.copy_(actions, non_blocking=self._cuda)
        device_ms = None
        if self._events:
            self._events[1].synchronize()
            torch.cuda.current_stream(self.device).synchronize()
            device_ms = self._events[0].elapsed_time(self._events[1])
        return HeadOutput(
            self._actions_host.numpy().astype(np.float64),
            (time.perf_counter() - start) * 1e3,
            device_ms,
            self._use_graphs,
        )
