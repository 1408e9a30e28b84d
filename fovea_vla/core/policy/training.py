"""Behaviour cloning of the action head on a demonstration dataset (ROS-free).

Two stages:

1. :func:`extract_tokens` runs every episode's frames through a fresh :class:`FoveaPipeline` (the
   same stages and settings the robot runs) and caches the encoder's tokens on disk, so training
   never touches images.
2. :func:`train` fits an :class:`ActionHead` to the cached tokens, the instruction embedding and
   the state, and writes a checkpoint that :func:`~fovea_vla.core.policy.checkpoint.load_policy`
   reads.

Action semantics: ``action[t]`` is the command sent after observing frame t, the target the arm
should reach one step later. The chunk predicted from frame t is ``actions[t : t + K]`` (past the
episode's end: its last action repeated), and step i of it is due at ``capture_time(t) + (i + 1) /
fps``, which is what the policy node does with ``step_s = 1 / fps``.

Token cache (``<cache_dir>/<key>/``, key = hash of the dataset folder, its episode lengths, the
contents of its parquet files and the pipeline config's repr)::

    cache.json                      key inputs, token_dim, episodes
    episode_000000.tokens.npy       (sum_t N_t, T) float16: the frames' tokens one after another
    episode_000000.positions.npy    (sum_t N_t, 3) float32: where each token was sampled (x/W, y/H, level/8)
    episode_000000.offsets.npy      (T_e + 1,) int64: frame t's tokens are rows offsets[t]:offsets[t+1]

Tokens are stored per frame as the pipeline produced them (no padding or truncation): with the
adaptive budget N_t varies between frames (and with the machine's load, as the budget follows a
latency target), with the fixed budget (the runtime default, 273) it is constant. Training batches
only frames of equal N, so the head sees exactly the token sets it will see at run time. An
episode's files are written atomically (offsets last), so an interrupted extraction resumes at the
first missing episode. The key covers neither the videos (re-encoding them with the same states
and actions keeps the key) nor the contents of an encoder checkpoint file (only its path): delete
the cache after replacing either in place.

Training: L1 (or MSE) between :meth:`ActionHead.forward_normalized` and :meth:`ActionHead.targets`
in normalised units; normalisation statistics from the training episodes only; AdamW with linear
warmup and cosine decay per step; episodes (not frames) are held out for validation, whole layouts
where episodes.jsonl names them (``layout``: record-sim's several instructions per scene). Each epoch
writes ``train_state.pt`` (model, optimiser, scheduler, epoch, RNG, history); batches are drawn
from a generator seeded with (seed, epoch), so a resumed run repeats an uninterrupted one exactly
on the CPU (CUDA kernels are not bit-reproducible).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from fovea_vla.core._validation import is_int, is_real
from fovea_vla.core.policy.checkpoint import PolicySpec, save_policy
from fovea_vla.core.policy.dataset import LeRobotDataset
from fovea_vla.core.policy.head import ActionHead, ActionHeadConfig
from fovea_vla.core.policy.observation import token_positions
from fovea_vla.core.policy.spaces import GRIPPER_NAME

__all__ = [
    "EpochStats",
    "TokenCache",
    "TrainConfig",
    "TrainResult",
    "default_delta_indices",
    "draw_loss_plot",
    "extract_tokens",
    "token_cache_folder",
    "train",
]

CACHE_VERSION = 2
TRAIN_STATE_FORMAT = "fovea_vla.train_state"
TRAIN_STATE_FILE = "train_state.pt"
_LOSSES = ("l1", "mse")


# --------------------------------------------------------------------------------------------- tokens


@dataclass(frozen=True)
class TokenCache:
    """Cached encoder tokens of every frame of a dataset (see the module docstring for the files).

    Attributes:
        folder: the cache folder of this dataset + pipeline config.
        key: its hash.
        token_dim: T, token width.
        episode_indices: the dataset's episode indices, in order.
        episode_lengths: frames per episode.
    """

    folder: Path
    key: str
    token_dim: int
    episode_indices: tuple[int, ...]
    episode_lengths: tuple[int, ...]

    def episode(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Episode ``index``'s tokens: ``(tokens, positions, offsets)``.

        Returns:
            tokens: (sum_t N_t, T) float16, memory-mapped read-only.
            positions: (sum_t N_t, 3) float32 token positions (x / W, y / H, level / 8).
            offsets: (T_e + 1,) int64; frame t's tokens are ``tokens[offsets[t]:offsets[t + 1]]``.
        """
        stem = self.folder / f"episode_{index:06d}"
        return (
            np.load(f"{stem}.tokens.npy", mmap_mode="r"),
            np.load(f"{stem}.positions.npy"),
            np.load(f"{stem}.offsets.npy"),
        )

    def frame(self, index: int, t: int) -> tuple[np.ndarray, np.ndarray]:
        """((N_t, T) float16 tokens, (N_t, 3) positions) of frame ``t`` of episode ``index`` (copies)."""
        tokens, positions, offsets = self.episode(index)
        rows = slice(offsets[t], offsets[t + 1])
        return np.array(tokens[rows]), np.array(positions[rows])


def _config_of(pipeline_factory) -> tuple[Callable, object | None]:
    from fovea_vla.core.pipeline import FoveaPipeline, PipelineConfig

    if isinstance(pipeline_factory, PipelineConfig):
        cfg = pipeline_factory
        return (lambda: FoveaPipeline(cfg)), cfg
    if not callable(pipeline_factory):
        raise TypeError(f"pipeline_factory must be a PipelineConfig or a callable, got {type(pipeline_factory)}")
    return pipeline_factory, None


def _data_fingerprint(dataset: LeRobotDataset) -> str:
    """sha256 of every episode's parquet file (states, actions, tasks; cheap next to the videos)."""
    digest = hashlib.sha256()
    for index in dataset.episode_indices:
        path = dataset.data_path(index)
        digest.update(path.read_bytes() if path.is_file() else b"missing")
    return digest.hexdigest()


def _cache_key(dataset: LeRobotDataset, cfg) -> tuple[str, dict]:
    description = {
        "version": CACHE_VERSION,
        "dataset": str(Path(dataset.root).resolve()),
        "episodes": list(dataset.episode_indices),
        "lengths": list(dataset.episode_lengths),
        "data": _data_fingerprint(dataset),
        "pipeline": repr(cfg),
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16], description


def token_cache_folder(dataset: LeRobotDataset, pipeline_cfg, cache_dir: str | os.PathLike) -> Path:
    """The folder :func:`extract_tokens` uses for ``dataset`` and ``pipeline_cfg`` (a
    :class:`~fovea_vla.core.pipeline.PipelineConfig`) under ``cache_dir``; it may not exist yet.

    An episode's files depend only on its frames and the pipeline, so after appending episodes to a
    dataset (a DAgger round) the old cache's files of the unchanged episodes can be copied or
    hard-linked here instead of being computed again."""
    return Path(cache_dir) / _cache_key(dataset, pipeline_cfg)[0]


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as stream:
        np.save(stream, array)
    os.replace(tmp, path)


def _extract_episode(dataset: LeRobotDataset, index: int, factory: Callable, stem: Path) -> int:
    """Run episode ``index`` through a fresh pipeline and write its cache files; returns the token width."""
    from fovea_vla.core.frames import Frame

    episode = dataset.episode(index)
    pipeline = factory()
    pipeline.reset()
    per_frame, per_frame_positions = [], []
    for rgb, stamp_s in zip(episode.frames, episode.timestamps, strict=True):
        output = pipeline.process(Frame(rgb=rgb, stamp_ns=round(float(stamp_s) * 1e9), frame_id="camera"))
        if output.tokens is None:
            raise ValueError("extract_tokens: the pipeline returned no tokens (no encoder?)")
        per_frame.append(output.tokens.detach().to("cpu", torch.float16).numpy())
        per_frame_positions.append(
            token_positions(output.layout.centers, output.layout.levels, output.width, output.height)
        )
    offsets = np.zeros(len(per_frame) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(t) for t in per_frame])
    tokens = np.concatenate(per_frame)
    _save_npy_atomic(Path(f"{stem}.tokens.npy"), tokens)
    _save_npy_atomic(Path(f"{stem}.positions.npy"), np.concatenate(per_frame_positions))
    _save_npy_atomic(Path(f"{stem}.offsets.npy"), offsets)  # last: the episode is complete once this exists
    return int(tokens.shape[1])


_worker_job: tuple | None = None


def _start_extract_worker(root: str, image_key: str, cfg) -> None:
    global _worker_job
    from fovea_vla.core.pipeline import FoveaPipeline

    torch.set_num_threads(1)  # one core per worker
    _worker_job = (LeRobotDataset(root, image_key=image_key), lambda: FoveaPipeline(cfg))


def _extract_in_worker(job: tuple[int, str]) -> int:
    dataset, factory = _worker_job
    index, stem = job
    return _extract_episode(dataset, index, factory, Path(stem))


def extract_tokens(
    dataset: LeRobotDataset,
    pipeline_factory,
    cache_dir: str | os.PathLike,
    *,
    progress: Callable[[int, int], None] | None = None,
    workers: int = 1,
) -> TokenCache:
    """Encoder tokens of every frame, computed once per dataset and pipeline config.

    Each episode gets a fresh pipeline from the factory; its frames are fed in order as
    ``Frame(rgb, stamp_ns=round(timestamp * 1e9), frame_id="camera")`` and each output's
    ``tokens`` is kept as float16 (a static frame's reused tokens included, as at run time).

    Args:
        dataset: the demonstrations.
        pipeline_factory: a :class:`~fovea_vla.core.pipeline.PipelineConfig`, or a callable returning
            a new :class:`~fovea_vla.core.pipeline.FoveaPipeline` (called once more to read the
            config for the cache key). The pipeline needs an encoder.
        cache_dir: parent folder of the caches; the cache is ``cache_dir/<key>``.
        progress: called with (episodes done, episodes) after each episode, e.g. to print.
        workers: processes extracting episodes in parallel (one core each; each episode still gets
            its own pipeline, so the tokens do not depend on the number); > 1 needs a config, not a
            callable, as ``pipeline_factory``.

    Returns:
        The :class:`TokenCache`; episodes already cached are not recomputed.

    Raises:
        ValueError: the pipeline has no encoder, or ``workers`` is refused.
        DatasetError: an episode's files are missing or malformed.
    """
    import multiprocessing

    if not is_int(workers) or workers < 1:
        raise ValueError(f"workers={workers!r}: must be an integer >= 1")
    factory, given_cfg = _config_of(pipeline_factory)
    if workers > 1 and given_cfg is None:
        raise ValueError("extract_tokens: workers > 1 needs a PipelineConfig as pipeline_factory")
    cfg = given_cfg
    if cfg is None:
        cfg = factory().cfg
    if cfg.encoder is None:
        raise ValueError("extract_tokens needs a pipeline with an encoder (encoder.enabled: true)")
    key, description = _cache_key(dataset, cfg)
    folder = Path(cache_dir) / key
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "cache.json"
    token_dim = None
    if manifest.is_file():
        token_dim = json.loads(manifest.read_text()).get("token_dim")
    total = dataset.num_episodes
    done, missing = 0, []
    for index in dataset.episode_indices:
        stem = folder / f"episode_{index:06d}"
        if Path(f"{stem}.offsets.npy").is_file():
            if token_dim is None:
                token_dim = int(np.load(f"{stem}.tokens.npy", mmap_mode="r").shape[1])
            done += 1
        else:
            missing.append((index, str(stem)))
    if progress is not None and done:
        progress(done, total)
    if workers == 1 or len(missing) <= 1:
        widths = (_extract_episode(dataset, index, factory, Path(stem)) for index, stem in missing)
        pool = None
    else:
        context = multiprocessing.get_context("spawn")
        pool = context.Pool(workers, _start_extract_worker, (str(dataset.root), dataset.image_key, cfg))
        widths = pool.imap_unordered(_extract_in_worker, missing)
    try:
        for width in widths:
            token_dim = width
            done += 1
            if progress is not None:
                progress(done, total)
    finally:
        if pool is not None:
            pool.terminate()
    if token_dim is None:
        raise ValueError(f"{dataset.root}: the dataset has no episodes")
    document = {**description, "token_dim": token_dim}
    tmp = manifest.with_name("cache.json.tmp")
    tmp.write_text(json.dumps(document, indent=2) + "\n")
    os.replace(tmp, manifest)
    return TokenCache(folder, key, token_dim, tuple(dataset.episode_indices), tuple(dataset.episode_lengths))


# ------------------------------------------------------------------------------------------- config


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Behaviour-cloning settings.

    Attributes:
        width: W of the action head.
        depth: its transformer blocks.
        num_heads: its attention heads (divide ``width``).
        mlp_ratio: MLP hidden width / W.
        num_latents: L latents summarising the image tokens (0: all tokens in the blocks); see
            :class:`ActionHeadConfig`.
        instruction_latents: condition the latents' queries on the instruction (needs
            ``num_latents`` > 0); see :class:`ActionHeadConfig`.
        chunk_size: K, actions per predicted chunk.
        epochs: passes over the training frames.
        batch_size: frames per optimiser step.
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay (matrices only; biases, norms and vectors are not decayed).
        warmup_fraction: share of all steps with a linear warmup from lr / warmup steps to lr; a
            cosine decay to 0 follows.
        grad_clip_norm: gradient norm clip, 0 for none.
        loss: "l1" or "mse", in normalised units.
        val_fraction: share of the episodes held out for validation (at least one when > 0 and
            there are two or more episodes; at least one is always kept for training).
        seed: model init, episode split and batch order.
        device: "auto" (CUDA when present), "cpu" or "cuda[:N]".
        delta_state_indices: A state indices the action dims are offsets from (-1: absolute), ()
            for all absolute, or None: each action dim named like a state dim is relative to it,
            except the gripper (see :func:`default_delta_indices`).
        aux_weight: > 0 fits an auxiliary output of the head (``ActionHeadConfig.aux_dim``) to the
            dataset's ``observation.environment_state`` at each frame (e.g. where the objects the
            instruction names are) with this weight next to the action loss; 0: none.
        token_dropout: share of each training frame's image tokens left out at random, a
            regulariser (the head sees a set of tokens with their positions, so a subset is still a
            valid input); 0: none. Validation uses every token.
    """

    width: int = 256
    depth: int = 4
    num_heads: int = 8
    mlp_ratio: float = 4.0
    num_latents: int = 32
    instruction_latents: bool = False
    chunk_size: int = 16
    epochs: int = 100
    batch_size: int = 64
    lr: float = 3e-4
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.05
    grad_clip_norm: float = 1.0
    loss: str = "l1"
    val_fraction: float = 0.1
    seed: int = 0
    device: str = "auto"
    delta_state_indices: tuple[int, ...] | None = None
    aux_weight: float = 0.0
    token_dropout: float = 0.0

    def __post_init__(self):
        for name, top in (
            ("width", 8192),
            ("depth", 64),
            ("num_heads", 256),
            ("chunk_size", 1024),
            ("epochs", 1_000_000),
            ("batch_size", 1_000_000),
        ):
            value = getattr(self, name)
            if not is_int(value) or not 1 <= value <= top:
                raise ValueError(f"train.{name}={value!r}: must be an integer in [1, {top}]")
        if self.width % self.num_heads:
            raise ValueError(f"train.width={self.width}: must be divisible by train.num_heads={self.num_heads}")
        if not is_int(self.num_latents) or not 0 <= self.num_latents <= 4096:
            raise ValueError(f"train.num_latents={self.num_latents!r}: must be an integer in [0, 4096]")
        if not isinstance(self.instruction_latents, bool) or (self.instruction_latents and not self.num_latents):
            raise ValueError(
                f"train.instruction_latents={self.instruction_latents!r}: must be a bool (true needs num_latents > 0)"
            )
        for name, low, high, closed_low in (
            ("mlp_ratio", 0.0, 16.0, False),
            ("lr", 0.0, 1.0, False),
            ("weight_decay", 0.0, 1.0, True),
            ("warmup_fraction", 0.0, 1.0, True),
            ("grad_clip_norm", 0.0, 1e6, True),
            ("val_fraction", 0.0, 0.9, True),
            ("aux_weight", 0.0, 1e3, True),
            ("token_dropout", 0.0, 0.9, True),
        ):
            value = getattr(self, name)
            ok = is_real(value) and (low <= value if closed_low else low < value) and value <= high
            if not ok:
                bracket = "[" if closed_low else "("
                raise ValueError(f"train.{name}={value!r}: must be a number in {bracket}{low:g}, {high:g}]")
        if self.loss not in _LOSSES:
            raise ValueError(f"train.loss={self.loss!r}: must be one of {', '.join(_LOSSES)}")
        if not is_int(self.seed) or self.seed < 0:
            raise ValueError(f"train.seed={self.seed!r}: must be an integer >= 0")
        if not isinstance(self.device, str) or not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise ValueError(f"train.device={self.device!r}: must be 'auto', 'cpu' or 'cuda[:N]'")
        indices = self.delta_state_indices
        if indices is not None and not (isinstance(indices, tuple) and all(is_int(i) and i >= -1 for i in indices)):
            raise ValueError(f"train.delta_state_indices={indices!r}: must be None or a tuple of integers >= -1")

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def to_dict(self) -> dict:
        values = asdict(self)
        if self.delta_state_indices is not None:
            values["delta_state_indices"] = list(self.delta_state_indices)
        return values


def default_delta_indices(state_names, action_names) -> tuple[int, ...]:
    """Each action dim named like a state dim is an offset from it, the gripper stays absolute.

    >>> default_delta_indices(("x", "y", "gripper"), ("x", "y", "gripper"))
    (0, 1, -1)
    >>> default_delta_indices(("j1", "gripper"), ("x", "gripper"))
    ()
    """
    state_names = list(state_names)
    indices = tuple(
        state_names.index(name) if name in state_names and name != GRIPPER_NAME else -1 for name in action_names
    )
    return indices if any(i >= 0 for i in indices) else ()


@dataclass(frozen=True)
class EpochStats:
    """One epoch.

    Attributes:
        epoch: 1-based epoch number.
        epochs: epochs of the whole run.
        train_loss: mean loss over the training frames (normalised units).
        val_loss: mean loss over the validation frames, None without a validation split (the
            action loss alone, also with an auxiliary target).
        lr: learning rate at the end of the epoch.
        seconds: wall time of the epoch [s].
        val_aux_error: with an auxiliary target, its mean absolute error over the validation frames
            in the target's units, else None.
    """

    epoch: int
    epochs: int
    train_loss: float
    val_loss: float | None
    lr: float
    seconds: float
    val_aux_error: float | None = None


@dataclass
class TrainResult:
    """What :func:`train` produced.

    Attributes:
        history: every epoch so far (a resumed run includes the earlier ones).
        completed: all epochs ran (False when ``on_epoch`` stopped the run).
        policy_dir: the checkpoint folder (``out_dir/policy``), None unless completed.
        train_state: ``out_dir/train_state.pt``.
        loss_plot: ``out_dir/loss.png``, None unless completed.
        metrics: ``out_dir/metrics.json``, None unless completed.
        val_episodes: the held-out episode indices.
        val_mae: per action name, mean absolute error of the final model on the validation
            frames over the chunk, in robot units (empty without validation).
    """

    history: list[EpochStats]
    completed: bool
    policy_dir: Path | None
    train_state: Path
    loss_plot: Path | None
    metrics: Path | None
    val_episodes: tuple[int, ...]
    val_mae: dict[str, float] = field(default_factory=dict)

    @property
    def train_loss(self) -> float:
        return self.history[-1].train_loss

    @property
    def val_loss(self) -> float | None:
        return self.history[-1].val_loss


# ---------------------------------------------------------------------------------------------- data


@dataclass
class _Split:
    """Frames of some episodes, ready for batching (all host arrays)."""

    episodes: list[int]
    states: np.ndarray  # (F, S) float32
    chunks: np.ndarray  # (F, K, A) float32 target actions in robot units
    task_rows: np.ndarray  # (F,) row of the instruction table
    frames: np.ndarray  # (F, 2) int64 (position in `episodes`, t)
    counts: np.ndarray  # (F,) tokens per frame
    environment: np.ndarray | None = None  # (F, E) float32 auxiliary targets
    resident: dict | None = None  # the same on the training device (_Data.make_resident)

    def batches(self, batch_size: int, generator: np.random.Generator | None) -> list[np.ndarray]:
        """Sample indices grouped into batches of equal token count; shuffled when a generator is given."""
        order = generator.permutation(len(self.states)) if generator is not None else np.arange(len(self.states))
        batches = []
        for count in np.unique(self.counts):
            members = order[self.counts[order] == count]
            batches += [members[i : i + batch_size] for i in range(0, len(members), batch_size)]
        if generator is not None:
            batches = [batches[i] for i in generator.permutation(len(batches))]
        return batches


def _chunks(actions: np.ndarray, chunk_size: int) -> np.ndarray:
    """(T, K, A) chunk from each frame: actions t .. t + K - 1, the last action repeated past the end.

    >>> _chunks(np.arange(3.0)[:, None], 4)[:, :, 0].tolist()
    [[0.0, 1.0, 2.0, 2.0], [1.0, 2.0, 2.0, 2.0], [2.0, 2.0, 2.0, 2.0]]
    """
    t = np.arange(len(actions))
    return actions[np.minimum(t[:, None] + np.arange(chunk_size), len(actions) - 1)]


def _split_episodes(
    indices: tuple[int, ...], val_fraction: float, seed: int, layouts: Mapping[int, object] | None = None
) -> tuple[list[int], list[int]]:
    """(train, val) episode indices; episodes of one layout stay on one side.

    ``layouts`` maps an episode to its scene (``layout`` in episodes.jsonl); episodes without one are
    their own group. Holding out whole layouts keeps a scene seen in training (with another
    instruction) out of validation, which would otherwise flatter the validation loss. Without
    layouts the split is the plain per-episode one.

    >>> _split_episodes((0, 1, 2, 3), 0.5, 0, {0: 7, 1: 7, 2: 8, 3: 8})[1] in ([0, 1], [2, 3])
    True
    """
    layouts = layouts or {}
    groups: dict[object, list[int]] = {}
    for index in indices:
        key = ("layout", json.dumps(layouts[index])) if index in layouts else ("episode", index)
        groups.setdefault(key, []).append(index)
    members = list(groups.values())
    count = len(members)
    n_val = 0
    if val_fraction > 0 and count >= 2:
        n_val = min(count - 1, max(1, round(val_fraction * count)))
    order = np.random.default_rng(seed).permutation(count)
    val = sorted(index for i in order[:n_val] for index in members[i])
    return [i for i in indices if i not in val], val


class _Data:
    """Both splits, the instruction table and the token cache."""

    def __init__(self, dataset: LeRobotDataset, tokens: TokenCache, text_encoder, cfg: TrainConfig):
        if tuple(dataset.episode_indices) != tokens.episode_indices or tuple(dataset.episode_lengths) != (
            tokens.episode_lengths
        ):
            raise ValueError(
                f"the token cache {tokens.folder} was extracted from other episodes than {dataset.root} holds"
            )
        if dataset.plan_horizon is not None and dataset.plan_horizon < cfg.chunk_size:
            raise ValueError(
                f"train.chunk_size={cfg.chunk_size!r}: {dataset.root} plans {dataset.plan_horizon} steps per frame "
                "(action.plan); train chunks of at most that"
            )
        self.tokens = tokens
        self.with_environment = cfg.aux_weight > 0
        if self.with_environment and dataset.environment_names is None:
            raise ValueError(
                f"train.aux_weight={cfg.aux_weight!r}: {dataset.root} has no observation.environment_state to fit"
            )
        layouts = {
            index: extra["layout"]
            for index in dataset.episode_indices
            if "layout" in (extra := dataset.episode_extra(index))
        }
        train_ids, val_ids = _split_episodes(dataset.episode_indices, cfg.val_fraction, cfg.seed, layouts)
        self.tasks: list[str] = []
        episodes = {}
        for index in dataset.episode_indices:
            episode = dataset.episode(index, with_frames=False)  # the tokens are cached: no video needed
            if episode.task not in self.tasks:
                self.tasks.append(episode.task)
            episodes[index] = episode
        self.instructions = torch.from_numpy(
            np.stack([np.asarray(text_encoder.embed(task), dtype=np.float32) for task in self.tasks])
        )
        self._token_arrays = {index: tokens.episode(index) for index in dataset.episode_indices}
        self.train = self._split(train_ids, episodes, cfg.chunk_size)
        self.val = self._split(val_ids, episodes, cfg.chunk_size) if val_ids else None

    def _split(self, ids: list[int], episodes: dict, chunk_size: int) -> _Split:
        states, chunks, rows, frames, counts, environment = [], [], [], [], [], []
        for position, index in enumerate(ids):
            episode = episodes[index]
            length = len(episode)
            states.append(episode.states)
            if self.with_environment:
                environment.append(episode.environment_states)
            chunks.append(
                _chunks(episode.actions, chunk_size) if episode.plans is None else episode.plans[:, :chunk_size]
            )
            rows.append(np.full(length, self.tasks.index(episode.task)))
            frames.append(np.stack([np.full(length, position), np.arange(length)], axis=1))
            counts.append(np.diff(self._token_arrays[index][2]))
        return _Split(
            ids,
            np.concatenate(states).astype(np.float32),
            np.concatenate(chunks).astype(np.float32),
            np.concatenate(rows),
            np.concatenate(frames).astype(np.int64),
            np.concatenate(counts),
            np.concatenate(environment).astype(np.float32) if self.with_environment else None,
        )

    def make_resident(self, device: torch.device, budget_bytes: int) -> bool:
        """Copy both splits' tokens, positions and labels to ``device`` when their tokens fit in
        ``budget_bytes``: batches are then gathered there (on a GPU, several times faster than
        stacking memory-mapped rows on the host every step). Returns whether they were copied."""
        needed = sum(len(array) * array.shape[1] * 2 for array, _, _ in self._token_arrays.values())
        if needed > budget_bytes:
            return False
        for split in (self.train, self.val):
            if split is None:
                continue
            tokens, positions, starts, start = [], [], [], 0
            for index in split.episodes:
                array, places, offsets = self._token_arrays[index]
                tokens.append(torch.from_numpy(np.array(array)).to(device))  # a writable copy of the memory map
                positions.append(torch.from_numpy(places).to(device))
                starts.append(offsets[:-1] + start)
                start += int(offsets[-1])
            split.resident = {
                "tokens": torch.cat(tokens),
                "positions": torch.cat(positions),
                "starts": torch.from_numpy(np.concatenate(starts)).to(device),
                "task_rows": torch.from_numpy(split.task_rows).to(device),
                "states": torch.from_numpy(split.states).to(device),
                "chunks": torch.from_numpy(split.chunks).to(device),
                "environment": None if split.environment is None else torch.from_numpy(split.environment).to(device),
            }
        self.instructions = self.instructions.to(device)
        return True

    def batch(self, split: _Split, members: np.ndarray, device: torch.device):
        """(tokens (B, N, T) float16, positions (B, N, 3), instruction (B, I), state (B, S),
        actions (B, K, A), environment (B, E) or None) on ``device``."""
        if split.resident is not None:
            held = split.resident
            chosen = torch.from_numpy(members).to(device)
            rows = held["starts"][chosen][:, None] + torch.arange(int(split.counts[members[0]]), device=device)
            environment = held["environment"]
            return (
                held["tokens"][rows],
                held["positions"][rows],
                self.instructions[held["task_rows"][chosen]],
                held["states"][chosen],
                held["chunks"][chosen],
                None if environment is None else environment[chosen],
            )
        rows, places = [], []
        for position, t in split.frames[members]:
            array, positions, offsets = self._token_arrays[split.episodes[position]]
            rows.append(array[offsets[t] : offsets[t + 1]])
            places.append(positions[offsets[t] : offsets[t + 1]])
        tokens = torch.from_numpy(np.stack(rows))
        token_places = torch.from_numpy(np.stack(places))
        instruction = self.instructions[split.task_rows[members]]
        state = torch.from_numpy(split.states[members])
        actions = torch.from_numpy(split.chunks[members])
        environment = None if split.environment is None else torch.from_numpy(split.environment[members])
        return tuple(
            None if x is None else x.to(device, non_blocking=True)
            for x in (tokens, token_places, instruction, state, actions, environment)
        )


# ------------------------------------------------------------------------------------------ training


def _drop_tokens(tokens: torch.Tensor, positions: torch.Tensor, share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A random subset of each frame's tokens (the same count for every frame), with their positions."""
    b, n = tokens.shape[:2]
    keep = max(1, n - round(share * n))
    chosen = torch.rand(b, n, device=tokens.device).argsort(dim=1)[:, :keep]
    return (
        tokens.gather(1, chosen[..., None].expand(-1, -1, tokens.shape[2])),
        positions.gather(1, chosen[..., None].expand(-1, -1, positions.shape[2])),
    )


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to 0 at ``total``.

    >>> [round(_lr_factor(s, 10, 2), 3) for s in (0, 1, 2, 6, 10)]
    [0.5, 1.0, 1.0, 0.5, 0.0]
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _loss(prediction: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "l1":
        return torch.nn.functional.l1_loss(prediction, target)
    return torch.nn.functional.mse_loss(prediction, target)


def _git_sha() -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = result.stdout.strip()
    return sha if result.returncode == 0 and sha else None


def _normalization(split: _Split, delta: tuple[int, ...], action_dim: int) -> tuple[np.ndarray, ...]:
    """state mean/std and target mean/std (offsets from the state for delta dims), float64."""
    offsets = np.zeros((len(split.states), 1, action_dim))
    if delta:
        index = np.array(delta)
        offsets = (split.states[:, np.maximum(index, 0)] * (index >= 0))[:, None].astype(np.float64)
    targets = (split.chunks - offsets).reshape(-1, action_dim)
    return split.states.mean(0), split.states.std(0), targets.mean(0), targets.std(0)


def _check_resume(saved: dict, cfg: TrainConfig, data_key: dict, path: Path) -> None:
    if saved.get("format") != TRAIN_STATE_FORMAT:
        raise ValueError(f"{path}: format={saved.get('format')!r}, expected {TRAIN_STATE_FORMAT!r}")
    current = {k: v for k, v in cfg.to_dict().items() if k != "device"}
    stored = {k: v for k, v in saved["config"].items() if k != "device"}
    changed = sorted(k for k in set(current) | set(stored) if current.get(k) != stored.get(k))
    if changed:
        shown = ", ".join(f"{k}: saved {stored.get(k)!r}, now {current.get(k)!r}" for k in changed)
        raise ValueError(f"{path}: cannot resume with another config ({shown})")
    if saved["data"] != data_key:
        raise ValueError(f"{path}: cannot resume on other data (saved {saved['data']}, now {data_key})")


def train(
    dataset: LeRobotDataset,
    tokens: TokenCache,
    text_encoder,
    cfg: TrainConfig,
    out_dir: str | os.PathLike,
    spec_fields: Mapping,
    resume: bool = False,
    *,
    on_epoch: Callable[[EpochStats], bool | None] | None = None,
) -> TrainResult:
    """Behaviour-clone an :class:`ActionHead` and write its checkpoint.

    Args:
        dataset: the demonstrations (states, actions, tasks; frames are not read).
        tokens: their cached tokens (:func:`extract_tokens`).
        text_encoder: a :class:`~fovea_vla.core.policy.text.TextEncoder` (``name``, ``dim``,
            ``embed(text) -> (L,) float32``); each task is embedded once.
        cfg: training settings.
        out_dir: written: ``train_state.pt`` every epoch; at the end ``policy/`` (the checkpoint),
            ``loss.png`` and ``metrics.json``.
        spec_fields: checkpoint fields training does not decide: ``action_space`` and
            ``encoder_architecture`` (required); optional ``step_s`` (default 1 / fps),
            ``action_names`` / ``state_names`` (default: the dataset's) and ``provenance`` (extra
            entries, e.g. ``command``).
        resume: continue from ``out_dir/train_state.pt`` (same config and data; ``device`` may
            differ).
        on_epoch: called after each epoch (after its state is saved); returning False stops the run
            there (``completed`` False, nothing else written; resume later).

    Returns:
        :class:`TrainResult`.

    Raises:
        ValueError: unknown or missing ``spec_fields``, a token cache of other episodes, a resume
            with another config or data, or values the checkpoint refuses.
        FileExistsError: ``out_dir`` holds a training state and ``resume`` is False.
        FileNotFoundError: ``resume`` without a training state.
    """
    allowed = {"action_space", "encoder_architecture", "step_s", "action_names", "state_names", "provenance"}
    unknown = sorted(set(spec_fields) - allowed)
    if unknown:
        raise ValueError(f"spec_fields: unknown {unknown} (allowed: {', '.join(sorted(allowed))})")
    missing = sorted({"action_space", "encoder_architecture"} - set(spec_fields))
    if missing:
        raise ValueError(f"spec_fields: missing {missing}")
    out = Path(out_dir)
    state_path = out / TRAIN_STATE_FILE
    if resume and not state_path.is_file():
        raise FileNotFoundError(f"{state_path}: no training state to resume from")
    if not resume and state_path.exists():
        raise FileExistsError(f"{state_path}: a training run is there (resume it, or choose another out_dir)")
    out.mkdir(parents=True, exist_ok=True)

    state_names = tuple(spec_fields.get("state_names", dataset.state_names))
    action_names = tuple(spec_fields.get("action_names", dataset.action_names))
    delta = cfg.delta_state_indices
    if delta is None:
        delta = default_delta_indices(state_names, action_names)
    head_cfg = ActionHeadConfig(
        token_dim=tokens.token_dim,
        instruction_dim=int(text_encoder.dim),
        state_dim=len(dataset.state_names),
        action_dim=len(dataset.action_names),
        chunk_size=cfg.chunk_size,
        width=cfg.width,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        delta_state_indices=tuple(delta),
        num_latents=cfg.num_latents,
        instruction_latents=cfg.instruction_latents,
        aux_dim=len(dataset.environment_names) if cfg.aux_weight > 0 and dataset.environment_names else 0,
    )
    spec_base = dict(
        head=head_cfg,
        action_space=spec_fields["action_space"],
        action_names=action_names,
        state_names=state_names,
        step_s=float(spec_fields.get("step_s", 1.0 / dataset.fps)),
        encoder_architecture=str(spec_fields["encoder_architecture"]),
        text_encoder=str(text_encoder.name),
    )
    PolicySpec(**spec_base)  # refuse bad fields before spending time on training

    data = _Data(dataset, tokens, text_encoder, cfg)
    device = cfg.resolved_device()
    if device.type == "cuda":
        data.make_resident(device, torch.cuda.mem_get_info(device)[0] // 2)
    model = ActionHead.from_config(head_cfg, seed=cfg.seed)
    model.set_normalization(*_normalization(data.train, head_cfg.delta_state_indices, head_cfg.action_dim))
    if head_cfg.aux_dim:
        model.set_aux_normalization(data.train.environment.mean(0), data.train.environment.std(0))
    model.to(device)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    steps_per_epoch = len(data.train.batches(cfg.batch_size, None))
    total_steps = steps_per_epoch * cfg.epochs
    warmup = round(cfg.warmup_fraction * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, total_steps, warmup))
    val_episodes = tuple(data.val.episodes) if data.val is not None else ()
    data_key = {"dataset": str(Path(dataset.root).resolve()), "tokens": tokens.key, "val_episodes": list(val_episodes)}

    history: list[EpochStats] = []
    start_epoch = 0
    if resume:
        saved = torch.load(state_path, map_location="cpu", weights_only=True)
        _check_resume(saved, cfg, data_key, state_path)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"]["torch"])
        if saved["rng"].get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
        history = [EpochStats(**h) for h in saved["history"]]
        start_epoch = int(saved["epoch"])

    completed = True
    for epoch in range(start_epoch, cfg.epochs):
        started = time.perf_counter()
        model.train()
        generator = np.random.default_rng([cfg.seed, epoch])
        total, count = 0.0, 0
        for members in data.train.batches(cfg.batch_size, generator):
            tokens_b, positions_b, instruction, state, actions, environment = data.batch(data.train, members, device)
            if cfg.token_dropout > 0:
                tokens_b, positions_b = _drop_tokens(tokens_b, positions_b, cfg.token_dropout)
            prediction, aux = model.forward_normalized_with_aux(tokens_b, positions_b, instruction, state)
            loss = _loss(prediction, model.targets(actions, state), cfg.loss)
            if aux is not None:
                aux_target = (environment - model.aux_mean) / model.aux_std
                loss = loss + cfg.aux_weight * _loss(aux, aux_target, cfg.loss)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip_norm)
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(members)
            count += len(members)
        val_loss = val_aux = None
        if data.val is not None:
            val_loss, _, val_aux = _evaluate(model, data, cfg, device)
        stats = EpochStats(
            epoch=epoch + 1,
            epochs=cfg.epochs,
            train_loss=total / count,
            val_loss=val_loss,
            lr=float(scheduler.get_last_lr()[0]),
            seconds=time.perf_counter() - started,
            val_aux_error=None if val_aux is None else float(val_aux.mean()),
        )
        history.append(stats)
        _save_state(state_path, model, optimizer, scheduler, epoch + 1, history, cfg, data_key)
        if on_epoch is not None and on_epoch(stats) is False and epoch + 1 < cfg.epochs:
            completed = False
            break

    if not completed:
        return TrainResult(history, False, None, state_path, None, None, val_episodes)
    val_mae, val_aux_mae = {}, {}
    if data.val is not None:
        _, mae, aux_mae = _evaluate(model, data, cfg, device)
        val_mae = dict(zip(action_names, mae.tolist(), strict=True))
        if aux_mae is not None:
            val_aux_mae = dict(zip(dataset.environment_names, aux_mae.tolist(), strict=True))
    final = history[-1]
    provenance = {
        "command": "fovea_vla.core.policy.training.train",
        "dataset": str(Path(dataset.root).resolve()),
        "num_episodes": dataset.num_episodes,
        "train_episodes": len(data.train.episodes),
        "val_episodes": list(val_episodes),
        "seed": cfg.seed,
        "epochs": cfg.epochs,
        "final_train_loss": final.train_loss,
        "final_val_loss": final.val_loss,
        "loss": cfg.loss,
        "token_cache": tokens.key,
        "aux_names": list(dataset.environment_names) if head_cfg.aux_dim else [],
        "aux_weight": cfg.aux_weight,
        "git_sha": _git_sha(),
        **dict(spec_fields.get("provenance", {})),
    }
    policy_dir = save_policy(
        out / "policy", model.to("cpu").eval(), PolicySpec(**spec_base, trained=True, provenance=provenance)
    )
    loss_plot = draw_loss_plot(history, out / "loss.png")
    metrics = out / "metrics.json"
    metrics.write_text(
        json.dumps(
            {
                "config": cfg.to_dict(),
                "history": [asdict(h) for h in history],
                "final_train_loss": final.train_loss,
                "final_val_loss": final.val_loss,
                "val_mae": val_mae,
                "val_aux_mae": val_aux_mae,
                "train_episodes": list(data.train.episodes),
                "val_episodes": list(val_episodes),
                "train_frames": len(data.train.states),
                "val_frames": 0 if data.val is None else len(data.val.states),
                "tasks": data.tasks,
                "policy": str(policy_dir),
                "provenance": provenance,
            },
            indent=2,
        )
        + "\n"
    )
    return TrainResult(history, True, policy_dir, state_path, loss_plot, metrics, val_episodes, val_mae)


def _evaluate(
    model: ActionHead, data: _Data, cfg: TrainConfig, device: torch.device
) -> tuple[float, np.ndarray, np.ndarray | None]:
    """(mean validation action loss, (A,) mean absolute error in robot units, (E,) mean absolute
    error of the auxiliary output in its units or None) of ``model``."""
    model.eval()
    total, count = 0.0, 0
    error = torch.zeros(model.cfg.action_dim, dtype=torch.float64)
    aux_error = torch.zeros(model.cfg.aux_dim, dtype=torch.float64)
    with torch.no_grad():
        for members in data.val.batches(cfg.batch_size, None):
            tokens_b, positions_b, instruction, state, actions, environment = data.batch(data.val, members, device)
            prediction, aux = model.forward_normalized_with_aux(tokens_b, positions_b, instruction, state)
            target = model.targets(actions, state)
            total += float(_loss(prediction, target, cfg.loss)) * len(members)
            count += len(members)
            error += ((prediction - target).abs() * model.action_std).sum((0, 1)).double().cpu()
            if aux is not None:
                aux_error += (aux * model.aux_std + model.aux_mean - environment).abs().sum(0).double().cpu()
    model.train()
    aux_mae = (aux_error / count).numpy() if model.cfg.aux_dim else None
    return total / count, (error / (count * model.cfg.chunk_size)).numpy(), aux_mae


def _save_state(path: Path, model, optimizer, scheduler, epoch: int, history, cfg: TrainConfig, data_key) -> None:
    state = {
        "format": TRAIN_STATE_FORMAT,
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        },
        "history": [asdict(h) for h in history],
        "config": cfg.to_dict(),
        "data": data_key,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ plotting


def draw_loss_plot(history: list[EpochStats], path: str | os.PathLike, size: tuple[int, int] = (640, 400)) -> Path:
    """Draw the train and validation loss per epoch into a PNG with OpenCV (no matplotlib).

    Args:
        history: the epochs, in order.
        path: the PNG to write.
        size: (W, H) of the image [px].

    Returns:
        ``path``.
    """
    import cv2

    width, height = size
    left, right, top, bottom = 70, 20, 40, 50
    image = np.full((height, width, 3), 255, np.uint8)
    epochs = [h.epoch for h in history]
    series = [("train", [h.train_loss for h in history], (200, 90, 30))]
    if any(h.val_loss is not None for h in history):
        series.append(("val", [h.val_loss for h in history], (30, 120, 230)))
    values = [v for _, ys, _ in series for v in ys if v is not None and math.isfinite(v)]
    y_max = max(values) * 1.05 if values else 1.0
    y_max = y_max if y_max > 0 else 1.0
    x_lo, x_hi = (min(epochs), max(epochs)) if epochs else (0, 1)
    x_span = max(1, x_hi - x_lo)
    font = cv2.FONT_HERSHEY_SIMPLEX
    black, grey = (0, 0, 0), (210, 210, 210)

    def point(x: float, y: float) -> tuple[int, int]:
        px = left + (x - x_lo) / x_span * (width - left - right)
        py = height - bottom - y / y_max * (height - top - bottom)
        return round(px), round(py)

    for i in range(6):  # horizontal grid and y labels
        y = y_max * i / 5
        _, py = point(x_lo, y)
        cv2.line(image, (left, py), (width - right, py), grey, 1)
        cv2.putText(image, f"{y:.3g}", (5, py + 4), font, 0.4, black, 1, cv2.LINE_AA)
    for i in range(min(x_span, 5) + 1):  # x labels
        x = x_lo + round(x_span * i / min(x_span, 5))
        px, _ = point(x, 0)
        cv2.putText(image, str(x), (px - 6, height - bottom + 18), font, 0.4, black, 1, cv2.LINE_AA)
    cv2.line(image, (left, height - bottom), (width - right, height - bottom), black, 1)
    cv2.line(image, (left, top), (left, height - bottom), black, 1)
    cv2.putText(image, "epoch", (width // 2 - 20, height - 12), font, 0.5, black, 1, cv2.LINE_AA)
    cv2.putText(image, "behaviour-cloning loss (normalised)", (left, 25), font, 0.55, black, 1, cv2.LINE_AA)
    for row, (name, ys, colour) in enumerate(series):
        points = [point(x, y) for x, y in zip(epochs, ys, strict=True) if y is not None and math.isfinite(y)]
        if len(points) > 1:
            cv2.polylines(image, [np.array(points, np.int32)], False, colour, 2, cv2.LINE_AA)
        for p in points if len(points) == 1 else ():
            cv2.circle(image, p, 3, colour, -1)
        legend_y = top + 15 + 20 * row
        cv2.line(image, (width - right - 110, legend_y), (width - right - 85, legend_y), colour, 2)
        last = f" {ys[-1]:.3g}" if ys and ys[-1] is not None else ""
        cv2.putText(image, f"{name}{last}", (width - right - 80, legend_y + 4), font, 0.45, black, 1, cv2.LINE_AA)
    out = Path(path)
    if not cv2.imwrite(str(out), image):
        raise OSError(f"{out}: cv2.imwrite failed")
    return out
