"""The action head: a transformer over foveated tokens, an instruction embedding and the robot state.

The sequence is ``[K action queries | instruction | state | N image tokens]``; every position
attends to every other (pre-norm blocks, as in the encoder), and the K query outputs are read out as
a chunk of K actions x A dims. With ``num_latents`` L > 0 the N image tokens are first summarised by
L learned latents through one cross-attention block (as in Perceiver / Flamingo's resampler), so the
blocks run over K + 2 + L positions instead of K + 2 + N: the head's cost no longer grows with the
token budget (about 6x less compute at N = 273, L = 32). With ``instruction_latents`` the latents'
queries also get the instruction's projection, so the resampler can look for what the instruction
names (a colour, say) wherever it is, instead of summarising every object for the blocks to choose
from. Inputs and outputs are normalised with statistics stored in the module (``state_mean`` ...
``action_std``), so a checkpoint carries everything needed to turn robot units into network units and
back. With ``delta_state_indices`` the network predicts each action dim as an offset from one state
dim (targets near the current pose are the common case, so offsets are easier to learn than absolute
values), and the head adds the state back.

With ``aux_dim`` E > 0 one more query position is read out as E auxiliary values (normalised with
``aux_mean`` / ``aux_std``): during training it is fitted to privileged labels of the scene, such as
where the objects the instruction names are (``observation.environment_state``). The action queries
attend to it, so the blocks learn to find those objects first; at run time it costs one position and
its output is only informative (:meth:`ActionHead.forward_aux`).

Every image token also gets where it was sampled: its centre (x / W, y / H) and mip level / 8 (see
:func:`fovea_vla.core.policy.observation.token_positions`), as Fourier features projected to W and
added to the token. The encoder embeds positions too, but the head should not depend on how well a
given (possibly random or fine-tuned) encoder preserved them.

:class:`ActionHeadEnsemble` averages the chunks of several heads of one architecture trained apart
(other seeds): a behaviour-cloned head's errors away from the demonstrations differ from seed to
seed, and the mean keeps what they agree on (deep ensembles, Lakshminarayanan et al., NeurIPS 2017).

Shapes: B batch, N image tokens, T = token_dim, I = instruction_dim, S = state_dim, K = chunk_size,
A = action_dim, W = width.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fovea_vla.core._validation import is_int, is_real
from fovea_vla.core.encoder import Block

__all__ = ["ActionHead", "ActionHeadConfig", "ActionHeadEnsemble"]

# Rows of ActionHead.type_embed: which part of the sequence a position belongs to.
_QUERY, _INSTRUCTION, _STATE, _IMAGE = range(4)
# Fourier frequencies (pi * 2**k) per token-position coordinate.
POSITION_FREQUENCIES = 6


@dataclass(frozen=True, kw_only=True)
class ActionHeadConfig:
    """Architecture of :class:`ActionHead` (stored in every checkpoint's config.json).

    Attributes:
        token_dim: T, width of the encoder's image tokens (192 ViT-Ti, 384 ViT-S, 768 ViT-B).
        instruction_dim: I, width of the instruction embedding (384 for all-MiniLM-L6-v2).
        state_dim: S, proprioception values (joint positions or end-effector pose, gripper).
        action_dim: A, values per action (joint targets or end-effector pose, gripper).
        chunk_size: K, actions per chunk.
        width: W, the transformer's width.
        depth: transformer blocks.
        num_heads: attention heads (divide ``width``).
        mlp_ratio: MLP hidden width / W.
        delta_state_indices: empty for absolute actions, or A state indices: action dim a is
            ``state[delta_state_indices[a]]`` plus the network's output (use -1 for a dim that
            stays absolute, e.g. the gripper).
        num_latents: L > 0 summarises the image tokens into L latents by cross-attention first;
            0 puts every image token into the blocks.
        instruction_latents: add a projection of the instruction to the latents' queries (needs
            ``num_latents`` > 0).
        aux_dim: E > 0 adds a query position read out as E auxiliary values (0: none).
    """

    token_dim: int = 192
    instruction_dim: int = 384
    state_dim: int = 8
    action_dim: int = 8
    chunk_size: int = 16
    width: int = 256
    depth: int = 4
    num_heads: int = 8
    mlp_ratio: float = 4.0
    delta_state_indices: tuple[int, ...] = ()
    num_latents: int = 0
    instruction_latents: bool = False
    aux_dim: int = 0

    def __post_init__(self):
        for name, top in (
            ("token_dim", 8192),
            ("instruction_dim", 8192),
            ("state_dim", 1024),
            ("action_dim", 1024),
            ("chunk_size", 1024),
            ("width", 8192),
            ("depth", 64),
            ("num_heads", 256),
        ):
            value = getattr(self, name)
            if not is_int(value) or not 1 <= value <= top:
                raise ValueError(f"policy.{name}={value!r}: must be an integer in [1, {top}]")
        if not is_int(self.num_latents) or not 0 <= self.num_latents <= 4096:
            raise ValueError(f"policy.num_latents={self.num_latents!r}: must be an integer in [0, 4096]")
        if not is_int(self.aux_dim) or not 0 <= self.aux_dim <= 1024:
            raise ValueError(f"policy.aux_dim={self.aux_dim!r}: must be an integer in [0, 1024]")
        if self.width % self.num_heads:
            raise ValueError(f"policy.width={self.width}: must be divisible by policy.num_heads={self.num_heads}")
        if not isinstance(self.instruction_latents, bool) or (self.instruction_latents and not self.num_latents):
            raise ValueError(
                f"policy.instruction_latents={self.instruction_latents!r}: must be a bool (true needs num_latents > 0)"
            )
        if not is_real(self.mlp_ratio) or not 0 < self.mlp_ratio <= 16:
            raise ValueError(f"policy.mlp_ratio={self.mlp_ratio!r}: must be a number in (0, 16]")
        indices = self.delta_state_indices
        if indices and (
            len(indices) != self.action_dim or not all(is_int(i) and -1 <= i < self.state_dim for i in indices)
        ):
            raise ValueError(
                f"policy.delta_state_indices={list(indices)!r}: must be empty or {self.action_dim} state indices "
                f"in [-1, {self.state_dim - 1}]"
            )

    def to_dict(self) -> dict:
        values = asdict(self)
        values["delta_state_indices"] = list(self.delta_state_indices)
        return values

    @classmethod
    def from_dict(cls, values: dict) -> ActionHeadConfig:
        """The config a checkpoint's ``head`` section describes.

        Raises:
            ValueError: unknown or missing fields, or refused values (named).
        """
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown action-head fields {unknown}")
        # Checkpoints written before instruction_latents / aux_dim existed do not name them.
        missing = sorted(known - set(values) - {"instruction_latents", "aux_dim"})
        if missing:
            raise ValueError(f"missing action-head fields {missing}")
        fields = dict(values)
        fields["delta_state_indices"] = tuple(fields["delta_state_indices"])
        return cls(**fields)


class _CrossAttention(nn.Module):
    """Pre-norm cross-attention + MLP block: latents attend to the image tokens."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm_q = nn.LayerNorm(dim, eps=1e-6)
        self.norm_kv = nn.LayerNorm(dim, eps=1e-6)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_hidden), nn.GELU(), nn.Linear(mlp_hidden, dim))

    def forward(self, latents: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        b, n_q, d = latents.shape
        h = self.num_heads
        q = self.q(self.norm_q(latents)).reshape(b, n_q, h, d // h).transpose(1, 2)
        k, v = self.kv(self.norm_kv(tokens)).reshape(b, tokens.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n_q, d)
        latents = latents + self.proj(attended)
        return latents + self.mlp(self.norm_mlp(latents))


class ActionHead(nn.Module):
    """Chunk-of-actions transformer. Build with :meth:`from_config`; load with
    :func:`fovea_vla.core.policy.checkpoint.load_policy`.

    The four normalisation buffers are float32 and stay float32 when the module is cast to
    half precision (see :meth:`half_precision`), so robot units never round through fp16.
    """

    def __init__(self, cfg: ActionHeadConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.token_norm = nn.LayerNorm(cfg.token_dim)
        self.token_proj = nn.Linear(cfg.token_dim, w)
        self.position_proj = nn.Linear(3 * 2 * POSITION_FREQUENCIES, w)
        self.register_buffer(
            "_frequencies", math.pi * 2.0 ** torch.arange(POSITION_FREQUENCIES, dtype=torch.float32), persistent=False
        )
        self.instruction_proj = nn.Linear(cfg.instruction_dim, w)
        self.state_proj = nn.Sequential(nn.Linear(cfg.state_dim, w), nn.GELU(), nn.Linear(w, w))
        self.queries = nn.Parameter(torch.zeros(cfg.chunk_size, w))
        self.type_embed = nn.Parameter(torch.zeros(4, w))
        self.latents = nn.Parameter(torch.zeros(cfg.num_latents, w)) if cfg.num_latents else None
        self.resampler = _CrossAttention(w, cfg.num_heads, int(w * cfg.mlp_ratio)) if cfg.num_latents else None
        self.latent_instruction = nn.Linear(cfg.instruction_dim, w) if cfg.instruction_latents else None
        self.blocks = nn.ModuleList(Block(w, cfg.num_heads, int(w * cfg.mlp_ratio), 1e-6) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(w)
        self.action_out = nn.Linear(w, cfg.action_dim)
        self.aux_query = nn.Parameter(torch.zeros(1, w)) if cfg.aux_dim else None
        self.aux_out = nn.Linear(w, cfg.aux_dim) if cfg.aux_dim else None
        if cfg.aux_dim:
            self.register_buffer("aux_mean", torch.zeros(cfg.aux_dim))
            self.register_buffer("aux_std", torch.ones(cfg.aux_dim))
        self.register_buffer("state_mean", torch.zeros(cfg.state_dim))
        self.register_buffer("state_std", torch.ones(cfg.state_dim))
        self.register_buffer("action_mean", torch.zeros(cfg.action_dim))
        self.register_buffer("action_std", torch.ones(cfg.action_dim))
        delta = torch.tensor(cfg.delta_state_indices or [-1] * cfg.action_dim, dtype=torch.long)
        self.register_buffer("_delta_index", delta.clamp(min=0), persistent=False)
        self.register_buffer("_delta_mask", (delta >= 0).float(), persistent=False)

    @classmethod
    def from_config(cls, cfg: ActionHeadConfig, seed: int = 0) -> ActionHead:
        """A float32 CPU module with a seeded random init (truncated normal, std 0.02)."""
        model = cls(cfg)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.Linear):
                    nn.init.trunc_normal_(module.weight, std=0.02, generator=generator)
                    nn.init.zeros_(module.bias)
            nn.init.trunc_normal_(model.queries, std=0.02, generator=generator)
            nn.init.trunc_normal_(model.type_embed, std=0.02, generator=generator)
            if model.latents is not None:
                nn.init.trunc_normal_(model.latents, std=0.02, generator=generator)
            if model.aux_query is not None:
                nn.init.trunc_normal_(model.aux_query, std=0.02, generator=generator)
        return model

    def set_normalization(self, state_mean, state_std, action_mean, action_std) -> None:
        """Set the normalisation statistics (robot units; stds are floored at 1e-6).

        Args:
            state_mean: (S,) mean of the state in the training data.
            state_std: (S,) its standard deviation.
            action_mean: (A,) mean of the network's targets: the actions, or with
                ``delta_state_indices`` the offsets from the state.
            action_std: (A,) their standard deviation.
        """
        with torch.no_grad():
            for name, value in (
                ("state_mean", state_mean),
                ("state_std", state_std),
                ("action_mean", action_mean),
                ("action_std", action_std),
            ):
                buffer = getattr(self, name)
                tensor = torch.as_tensor(value, dtype=torch.float32).reshape(buffer.shape)
                if name.endswith("std"):
                    tensor = tensor.clamp(min=1e-6)
                buffer.copy_(tensor)

    def set_aux_normalization(self, aux_mean, aux_std) -> None:
        """Set the auxiliary targets' statistics (their units; stds floored at 1e-6); needs ``aux_dim`` > 0."""
        if not self.cfg.aux_dim:
            raise ValueError("set_aux_normalization: the head has no auxiliary outputs (aux_dim = 0)")
        with torch.no_grad():
            self.aux_mean.copy_(torch.as_tensor(aux_mean, dtype=torch.float32).reshape(self.aux_mean.shape))
            std = torch.as_tensor(aux_std, dtype=torch.float32).reshape(self.aux_std.shape)
            self.aux_std.copy_(std.clamp(min=1e-6))

    def _float_buffers(self) -> tuple[str, ...]:
        names = ("state_mean", "state_std", "action_mean", "action_std")
        return names + (("aux_mean", "aux_std") if self.cfg.aux_dim else ())

    def half_precision(self, dtype: torch.dtype) -> ActionHead:
        """Cast weights to ``dtype`` keeping the normalisation buffers float32."""
        kept = {name: getattr(self, name).clone() for name in self._float_buffers()}
        self.to(dtype)
        for name, value in kept.items():
            setattr(self, name, value.to(self.queries.device))
        self._delta_mask = self._delta_mask.float()
        return self

    def forward_normalized(
        self, tokens: torch.Tensor, positions: torch.Tensor, instruction: torch.Tensor, state: torch.Tensor
    ) -> torch.Tensor:
        """The network's raw output, (B, K, A) float32 in normalised units (train against
        :meth:`targets`). Arguments as :meth:`forward`."""
        return self.forward_normalized_with_aux(tokens, positions, instruction, state)[0]

    def forward_normalized_with_aux(
        self, tokens: torch.Tensor, positions: torch.Tensor, instruction: torch.Tensor, state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """((B, K, A) actions, (B, E) auxiliary values or None), float32 in normalised units.
        Arguments as :meth:`forward`."""
        dtype = self.queries.dtype
        b = tokens.shape[0]
        normalized_state = ((state.float() - self.state_mean) / self.state_std).to(dtype)
        angles = positions.float()[..., None] * self._frequencies  # (B, N, 3, F)
        fourier = torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(2).to(dtype)
        image = (
            self.token_proj(self.token_norm(tokens.to(dtype))) + self.position_proj(fourier) + self.type_embed[_IMAGE]
        )
        if self.resampler is not None:
            queries = self.latents.expand(b, -1, -1) + self.type_embed[_IMAGE]
            if self.latent_instruction is not None:
                queries = queries + self.latent_instruction(instruction.to(dtype))[:, None]
            image = self.resampler(queries, image)
        parts = [
            self.queries.expand(b, -1, -1) + self.type_embed[_QUERY],
            (self.instruction_proj(instruction.to(dtype)) + self.type_embed[_INSTRUCTION])[:, None],
            (self.state_proj(normalized_state) + self.type_embed[_STATE])[:, None],
            image,
        ]
        if self.aux_query is not None:
            parts.append((self.aux_query + self.type_embed[_QUERY]).expand(b, -1, -1))
        x = torch.cat(parts, dim=1)
        for block in self.blocks:
            x = block(x)
        actions = self.action_out(self.norm(x[:, : self.cfg.chunk_size])).float()
        aux = self.aux_out(self.norm(x[:, -1])).float() if self.aux_out is not None else None
        return actions, aux

    def forward_aux(
        self, tokens: torch.Tensor, positions: torch.Tensor, instruction: torch.Tensor, state: torch.Tensor
    ) -> torch.Tensor:
        """(B, E) float32 auxiliary values in their units (e.g. where the named objects are).

        Raises:
            ValueError: the head has no auxiliary outputs (``aux_dim`` = 0).
        """
        if self.aux_out is None:
            raise ValueError("forward_aux: the head has no auxiliary outputs (aux_dim = 0)")
        aux = self.forward_normalized_with_aux(tokens, positions, instruction, state)[1]
        return aux * self.aux_std + self.aux_mean

    def forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, instruction: torch.Tensor, state: torch.Tensor
    ) -> torch.Tensor:
        """Predict one chunk per batch element.

        Args:
            tokens: (B, N, T) image tokens (the encoder's output, any float dtype).
            positions: (B, N, 3) float where each token was sampled: x / W, y / H, level / 8.
            instruction: (B, I) instruction embedding.
            state: (B, S) float32 state in robot units.

        Returns:
            (B, K, A) float32 actions in robot units.
        """
        out = self.forward_normalized(tokens, positions, instruction, state)
        return out * self.action_std + self.action_mean + self._state_offset(state)

    def targets(self, actions: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """What :meth:`forward_normalized` should output for ground-truth ``actions``.

        Args:
            actions: (B, K, A) actions in robot units.
            state: (B, S) state at the observation.

        Returns:
            (B, K, A) float32 normalised targets (absolute values or offsets from the state).
        """
        return (actions.float() - self._state_offset(state) - self.action_mean) / self.action_std

    def _state_offset(self, state: torch.Tensor) -> torch.Tensor:
        """(B, 1, A) the state values the delta dims are relative to (0 for absolute dims)."""
        return (state.float()[:, self._delta_index] * self._delta_mask)[:, None]


class ActionHeadEnsemble(nn.Module):
    """Heads of one architecture whose chunk (and auxiliary output) is the mean of theirs, in robot
    units: each member keeps its own normalisation statistics. Runs wherever an :class:`ActionHead`
    does (same ``cfg``, ``forward``, ``forward_aux``, ``half_precision``)."""

    def __init__(self, members: list[ActionHead]):
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"ActionHeadEnsemble: {len(members)} member(s); an ensemble needs at least 2")
        for index, member in enumerate(members[1:], start=1):
            if member.cfg != members[0].cfg:
                raise ValueError(
                    f"ActionHeadEnsemble: member {index} has config {member.cfg}, member 0 {members[0].cfg}"
                )
        self.members = nn.ModuleList(members)

    @property
    def cfg(self) -> ActionHeadConfig:
        return self.members[0].cfg

    def half_precision(self, dtype: torch.dtype) -> ActionHeadEnsemble:
        """Cast every member's weights to ``dtype`` (normalisation buffers stay float32)."""
        for member in self.members:
            member.half_precision(dtype)
        return self

    def forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, instruction: torch.Tensor, state: torch.Tensor
    ) -> torch.Tensor:
        """(B, K, A) float32: the members' mean chunk in robot units (see :meth:`ActionHead.forward`)."""
        return torch.stack([member(tokens, positions, instruction, state) for member in self.members]).mean(0)

    def forward_aux(
        self, tokens: torch.Tensor, positions: torch.Tensor, instruction: torch.Tensor, state: torch.Tensor
    ) -> torch.Tensor:
        """(B, E) float32: the members' mean auxiliary output (see :meth:`ActionHead.forward_aux`)."""
        outputs = [member.forward_aux(tokens, positions, instruction, state) for member in self.members]
        return torch.stack(outputs).mean(0)
