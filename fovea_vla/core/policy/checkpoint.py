"""Policy checkpoints: a folder with ``config.json`` (schema-versioned) and ``model.safetensors``.

``config.json``::

    {
      "format": "fovea_vla.policy",
      "schema_version": 1,
      "head": {...ActionHeadConfig...},
      "action_space": "joint_position" | "ee_pose",
      "action_names": [...A names...],
      "state_names": [...S names...],
      "step_s": 0.1,
      "encoder": {"architecture": "vit_tiny_patch16", "embed_dim": 192},
      "text_encoder": {"name": "all-MiniLM-L6-v2", "dim": 384},
      "trained": false,
      "provenance": {...free-form: command, data, seed, steps...},
      "ensemble_size": 1
    }

With ``ensemble_size`` M > 1 the weights hold M heads of the same architecture (tensor names
``members.{i}.<name>``) whose chunks are averaged (:class:`~fovea_vla.core.policy.head.ActionHeadEnsemble`;
``fovea-vla policy ensemble`` makes one from separately trained checkpoints). A config without the
field is a single head.

Loading refuses, with the field and both values in the message, a different format or a newer
schema, a weights file whose tensor names or shapes differ from what the config describes, and
(when the caller states what it runs) an encoder, text encoder or action layout that does not
match the checkpoint.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fovea_vla.core._validation import is_int, is_real
from fovea_vla.core.policy.head import ActionHead, ActionHeadConfig, ActionHeadEnsemble

__all__ = [
    "ACTION_SPACES",
    "FORMAT",
    "SCHEMA_VERSION",
    "CheckpointError",
    "PolicySpec",
    "load_policy",
    "read_spec",
    "save_policy",
]

FORMAT = "fovea_vla.policy"
SCHEMA_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# joint_position: absolute joint targets [rad or m]; ee_pose: end-effector x y z [m] and
# roll pitch yaw [rad] in the robot's base frame. Either may end with a gripper dim in [0, 1].
ACTION_SPACES = ("joint_position", "ee_pose")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used here; the message says which field and why."""


@dataclass(frozen=True, kw_only=True)
class PolicySpec:
    """Everything in a checkpoint besides the weights.

    Attributes:
        head: the network's architecture.
        action_space: one of :data:`ACTION_SPACES`.
        action_names: A names of the action dims (joint names, or x y z roll pitch yaw; the
            gripper last).
        state_names: S names of the state dims, in the order the head expects them.
        step_s: time between consecutive actions of a chunk [s]. Action i of a chunk predicted
            from a frame captured at t is the target for t + (i + 1) * step_s (a demonstration's
            action is the command sent after observing a frame, reached one step later).
        encoder_architecture: the image encoder the head was trained on (token meaning differs
            between encoders of the same width).
        text_encoder: name of the instruction embedding model.
        trained: false for a random initialisation (the node warns loudly).
        provenance: how the weights were made (command, data, seed, steps); free-form.
        ensemble_size: heads whose chunks are averaged (1: a single head).
    """

    head: ActionHeadConfig
    action_space: str
    action_names: tuple[str, ...]
    state_names: tuple[str, ...]
    step_s: float
    encoder_architecture: str
    text_encoder: str
    trained: bool = False
    provenance: dict = field(default_factory=dict)
    ensemble_size: int = 1

    def __post_init__(self):
        if not is_int(self.ensemble_size) or self.ensemble_size < 1:
            raise ValueError(f"ensemble_size={self.ensemble_size!r}: must be an integer >= 1")
        if self.action_space not in ACTION_SPACES:
            raise ValueError(f"action_space={self.action_space!r}: must be one of {', '.join(ACTION_SPACES)}")
        if len(self.action_names) != self.head.action_dim:
            raise ValueError(
                f"action_names has {len(self.action_names)} names but head.action_dim={self.head.action_dim}"
            )
        if len(self.state_names) != self.head.state_dim:
            raise ValueError(f"state_names has {len(self.state_names)} names but head.state_dim={self.head.state_dim}")
        if not is_real(self.step_s) or not (0 < self.step_s <= 10 and math.isfinite(self.step_s)):
            raise ValueError(f"step_s={self.step_s!r}: must be a number in (0, 10] s")

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "head": self.head.to_dict(),
            "action_space": self.action_space,
            "action_names": list(self.action_names),
            "state_names": list(self.state_names),
            "step_s": self.step_s,
            "encoder": {"architecture": self.encoder_architecture, "embed_dim": self.head.token_dim},
            "text_encoder": {"name": self.text_encoder, "dim": self.head.instruction_dim},
            "trained": self.trained,
            "provenance": self.provenance,
            "ensemble_size": self.ensemble_size,
        }

    @classmethod
    def from_json(cls, document: dict, where: str = "config.json") -> PolicySpec:
        """Parse a config.json document.

        Raises:
            CheckpointError: wrong format, newer schema, missing or refused fields.
        """
        if document.get("format") != FORMAT:
            raise CheckpointError(f"{where}: format={document.get('format')!r}, expected {FORMAT!r}")
        version = document.get("schema_version")
        if version != SCHEMA_VERSION:
            newer = isinstance(version, int) and version > SCHEMA_VERSION
            raise CheckpointError(
                f"{where}: schema_version={version!r}, this fovea_vla reads version {SCHEMA_VERSION}"
                + (" (the checkpoint is newer: upgrade fovea_vla)" if newer else "")
            )
        try:
            head = ActionHeadConfig.from_dict(document["head"])
            text = document["text_encoder"]
            encoder = document["encoder"]
            if text.get("dim") != head.instruction_dim or encoder.get("embed_dim") != head.token_dim:
                raise ValueError("encoder/text_encoder dims disagree with the head's token_dim/instruction_dim")
            return cls(
                head=head,
                action_space=document["action_space"],
                action_names=tuple(document["action_names"]),
                state_names=tuple(document["state_names"]),
                step_s=document["step_s"],
                encoder_architecture=encoder["architecture"],
                text_encoder=text["name"],
                trained=bool(document.get("trained", False)),
                provenance=dict(document.get("provenance", {})),
                ensemble_size=document.get("ensemble_size", 1),
            )
        except KeyError as exc:
            raise CheckpointError(f"{where}: missing field {exc}") from exc
        except (TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"{where}: {exc}") from exc

    def check_compatible(
        self,
        *,
        encoder_architecture: str | None = None,
        token_dim: int | None = None,
        text_encoder: str | None = None,
        instruction_dim: int | None = None,
        action_space: str | None = None,
        action_names: tuple[str, ...] | None = None,
        state_names: tuple[str, ...] | None = None,
    ) -> None:
        """Refuse a checkpoint that does not fit what the caller runs (None = not checked).

        Raises:
            CheckpointError: naming the first mismatch with both values.
        """
        expected = {
            "encoder.architecture": (encoder_architecture, self.encoder_architecture),
            "encoder.embed_dim": (token_dim, self.head.token_dim),
            "text_encoder.name": (text_encoder, self.text_encoder),
            "text_encoder.dim": (instruction_dim, self.head.instruction_dim),
            "action_space": (action_space, self.action_space),
            "action_names": (tuple(action_names) if action_names is not None else None, self.action_names),
            "state_names": (tuple(state_names) if state_names is not None else None, self.state_names),
        }
        for name, (running, stored) in expected.items():
            if running is not None and running != stored:
                raise CheckpointError(f"checkpoint {name}={stored!r} but this node runs {name}={running!r}")


def save_policy(path: str | os.PathLike, model: ActionHead | ActionHeadEnsemble, spec: PolicySpec) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (float32) into the folder ``path``.

    Raises:
        CheckpointError: the model's architecture differs from ``spec.head``, or its number of
            members from ``spec.ensemble_size``.
    """
    from safetensors.torch import save_file

    if model.cfg != spec.head:
        raise CheckpointError(f"model config {model.cfg} differs from spec.head {spec.head}")
    members = len(model.members) if isinstance(model, ActionHeadEnsemble) else 1
    if members != spec.ensemble_size:
        raise CheckpointError(f"the model has {members} head(s) but spec.ensemble_size={spec.ensemble_size}")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(spec.to_json(), indent=2) + "\n")
    return folder


def read_spec(path: str | os.PathLike) -> PolicySpec:
    """The :class:`PolicySpec` of the checkpoint folder ``path`` (weights not read).

    Raises:
        CheckpointError: no such folder or file, unreadable JSON, or a refused config.
    """
    folder = Path(path)
    config = folder / CONFIG_FILE
    if not folder.is_dir():
        raise CheckpointError(f"policy checkpoint {str(folder)!r}: no such folder")
    if not config.is_file():
        raise CheckpointError(f"policy checkpoint {str(folder)!r}: no {CONFIG_FILE}")
    try:
        document = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config}: unreadable ({exc})") from exc
    return PolicySpec.from_json(document, where=str(config))


def load_policy(path: str | os.PathLike) -> tuple[ActionHead | ActionHeadEnsemble, PolicySpec]:
    """Load a checkpoint folder into a float32 CPU :class:`ActionHead` (an :class:`ActionHeadEnsemble`
    when ``ensemble_size`` > 1).

    Returns:
        ``(model, spec)``.

    Raises:
        CheckpointError: see :func:`read_spec`; weights missing, unexpected or of another shape
            than the config describes (every offending tensor listed).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    spec = read_spec(path)
    weights = Path(path) / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"policy checkpoint {str(path)!r}: no {WEIGHTS_FILE}")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{weights}: unreadable ({exc})") from exc
    if spec.ensemble_size == 1:
        model = ActionHead(spec.head)
    else:
        model = ActionHeadEnsemble([ActionHead(spec.head) for _ in range(spec.ensemble_size)])
    expected = model.state_dict()
    problems = [f"missing {k}" for k in expected if k not in tensors]
    problems += [f"unexpected {k}" for k in tensors if k not in expected]
    problems += [
        f"{k} has shape {tuple(tensors[k].shape)}, config.json implies {tuple(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tensors[k].shape != v.shape
    ]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... {len(problems) - 8} more" if len(problems) > 8 else "")
        raise CheckpointError(f"{weights} does not match {CONFIG_FILE}: {shown}")
    with torch.no_grad():
        model.load_state_dict({k: v.float() for k, v in tensors.items()})
    return model.eval(), spec
