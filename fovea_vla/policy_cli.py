"""``fovea-vla policy init|info|embed|ensemble``: an untrained checkpoint for wiring tests, a description,
an instruction-embedding table, several trained checkpoints made into one that averages their chunks."""

from __future__ import annotations

import argparse
import dataclasses

from fovea_vla.core.encoder import ARCHITECTURES
from fovea_vla.core.policy.checkpoint import (
    ACTION_SPACES,
    CheckpointError,
    PolicySpec,
    load_policy,
    read_spec,
    save_policy,
)
from fovea_vla.core.policy.head import ActionHead, ActionHeadConfig, ActionHeadEnsemble
from fovea_vla.core.policy.spaces import PANDA_JOINTS, space_names
from fovea_vla.core.policy.text import DEFAULT_MODEL_NAME

__all__ = ["add_policy_parser", "describe"]

TEXT_DIM = 384  # all-MiniLM-L6-v2


def describe(spec: PolicySpec) -> str:
    """One paragraph about a checkpoint."""
    head = spec.head
    return (
        f"{spec.action_space}: {head.chunk_size} actions x {head.action_dim} dims ({', '.join(spec.action_names)}) "
        f"every {spec.step_s:g} s\n"
        f"head: width {head.width}, depth {head.depth}, heads {head.num_heads}, tokens of {head.token_dim} "
        f"from {spec.encoder_architecture}, instruction {spec.text_encoder} ({head.instruction_dim}-d)\n"
        + (f"ensemble of {spec.ensemble_size} heads (chunks averaged)\n" if spec.ensemble_size > 1 else "")
        + f"{'trained' if spec.trained else 'UNTRAINED (random weights: wiring tests only)'}; provenance "
        f"{spec.provenance or '-'}"
    )


def _cmd_init(args) -> int:
    names = space_names(args.action_space, args.joints, not args.no_gripper)
    arm = len(names) - (0 if args.no_gripper else 1)
    head = ActionHeadConfig(
        token_dim=ARCHITECTURES[args.encoder][0],
        instruction_dim=TEXT_DIM,
        state_dim=len(names),
        action_dim=len(names),
        chunk_size=args.chunk_size,
        width=args.width,
        depth=args.depth,
        num_heads=args.heads,
        # Arm dims relative to the state, the gripper absolute.
        delta_state_indices=(*range(arm), *(() if args.no_gripper else (-1,))),
    )
    spec = PolicySpec(
        head=head,
        action_space=args.action_space,
        action_names=names,
        state_names=names,
        step_s=args.step_s,
        encoder_architecture=args.encoder,
        text_encoder=DEFAULT_MODEL_NAME,
        trained=False,
        provenance={"made_by": "fovea-vla policy init", "seed": args.seed},
    )
    model = ActionHead.from_config(head, seed=args.seed)
    # Random weights give outputs of order 1 in normalised units; scale them to small offsets
    # so a dry run on a real robot shows plausible, gentle targets.
    model.set_normalization(
        [0.0] * len(names), [1.0] * len(names), [0.0] * len(names), [args.action_scale] * len(names)
    )
    save_policy(args.out, model, spec)
    print(f"wrote {args.out}\n{describe(spec)}")
    return 0


def _cmd_info(args) -> int:
    print(describe(read_spec(args.checkpoint)))
    return 0


def _cmd_embed(args) -> int:
    from fovea_vla.core.policy.text import SentenceEncoder, TextEncoderConfig, write_embedding_table

    encoder = SentenceEncoder(TextEncoderConfig(path=args.model))
    path = write_embedding_table(encoder, args.instructions, args.out)
    print(f"wrote {path}: {len(args.instructions)} instructions, {encoder.name} ({encoder.dim}-d)")
    return 0


def _cmd_ensemble(args) -> int:
    if len(args.checkpoints) < 2:
        raise SystemExit(f"policy ensemble: {len(args.checkpoints)} checkpoint(s) given; an ensemble needs at least 2")
    heads, specs = [], []
    for path in args.checkpoints:
        model, spec = load_policy(path)
        heads.extend(model.members if isinstance(model, ActionHeadEnsemble) else [model])
        specs.append(spec)
    # Members must read the same tokens and state and mean the same actions: every field agrees but the
    # provenance and the member count.
    compared = [f.name for f in dataclasses.fields(PolicySpec) if f.name not in ("provenance", "ensemble_size")]
    for path, spec in zip(args.checkpoints[1:], specs[1:], strict=True):
        for name in compared:
            if getattr(spec, name) != getattr(specs[0], name):
                raise CheckpointError(
                    f"policy ensemble: {path} has {name}={getattr(spec, name)!r}, "
                    f"{args.checkpoints[0]} has {getattr(specs[0], name)!r}"
                )
    # The encoder depth the tokens came from (eval-sim and record-sim check it) must agree too.
    depths = {spec.provenance.get("encoder_depth") for spec in specs}
    if len(depths) > 1:
        raise CheckpointError(
            f"policy ensemble: the members were trained on tokens of different encoder depths {depths}"
        )
    provenance = {
        "made_by": "fovea-vla policy ensemble",
        **({"encoder_depth": depths.pop()} if None not in depths else {}),
        "members": [
            {"checkpoint": str(path), **spec.provenance} for path, spec in zip(args.checkpoints, specs, strict=True)
        ],
    }
    spec = dataclasses.replace(specs[0], provenance=provenance, ensemble_size=len(heads))
    save_policy(args.out, ActionHeadEnsemble(heads), spec)
    print(f"wrote {args.out}\n{describe(spec)}")
    return 0


def add_policy_parser(sub) -> None:
    policy = sub.add_parser(
        "policy", help="policy checkpoints: write an untrained one, describe one, embed instructions, ensemble"
    )
    policy_sub = policy.add_subparsers(dest="policy_command", required=True)
    init = policy_sub.add_parser(
        "init",
        help="write an UNTRAINED (random) checkpoint for wiring and latency tests",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    init.add_argument("--out", required=True, help="checkpoint folder to write")
    init.add_argument("--action-space", default="joint_position", choices=ACTION_SPACES)
    init.add_argument("--joints", nargs="+", default=list(PANDA_JOINTS), help="joint names (joint_position)")
    init.add_argument("--no-gripper", action="store_true", help="no gripper dim")
    init.add_argument("--encoder", default="vit_tiny_patch16", choices=sorted(ARCHITECTURES))
    init.add_argument("--chunk-size", type=int, default=16)
    init.add_argument("--step-s", type=float, default=0.1, help="time between actions [s]")
    init.add_argument("--width", type=int, default=256)
    init.add_argument("--depth", type=int, default=4)
    init.add_argument("--heads", type=int, default=8)
    init.add_argument("--action-scale", type=float, default=0.02, help="output std in robot units")
    init.add_argument("--seed", type=int, default=0)
    init.set_defaults(func=_cmd_init)
    info = policy_sub.add_parser("info", help="describe a checkpoint")
    info.add_argument("checkpoint")
    info.set_defaults(func=_cmd_info)
    embed = policy_sub.add_parser(
        "embed",
        help="precompute instruction embeddings into a .json table (policy_node text_encoder.path), "
        "so a robot with fixed tasks runs without the text model",
    )
    embed.add_argument("--out", required=True, help="table file to write (.json)")
    embed.add_argument("--model", default="", help="sentence-transformers folder; empty = the bundled model")
    embed.add_argument("instructions", nargs="+", help="the instructions, exactly as they will be given")
    embed.set_defaults(func=_cmd_embed)
    ensemble = policy_sub.add_parser(
        "ensemble",
        help="one checkpoint whose chunk is the mean of several trained ones (same architecture, data layout "
        "and encoder; e.g. the same training with other --seed values)",
    )
    ensemble.add_argument("--out", required=True, help="checkpoint folder to write")
    ensemble.add_argument("checkpoints", nargs="+", help="checkpoint folders (an ensemble's members are taken apart)")
    ensemble.set_defaults(func=_cmd_ensemble)
