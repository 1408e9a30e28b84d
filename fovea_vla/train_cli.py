"""``fovea-vla train``: behaviour-clone the action head on a LeRobot v2.1 dataset.

The tokens come from the pipeline the robot runs: its configuration is built from the parameter
files exactly as fovea_node builds it (``--config`` on top of fovea_vla.yaml), with the encoder on.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fovea_vla.core.policy.checkpoint import ACTION_SPACES

__all__ = ["add_train_parser", "cmd_train", "pipeline_config_from_files"]


def pipeline_config_from_files(config: str):
    """The :class:`~fovea_vla.core.pipeline.PipelineConfig` fovea_node would run with ``config``
    applied on top of fovea_vla.yaml, with the encoder enabled.

    Raises:
        ConfigError: a value the core refuses (the message names the parameter).
    """
    from fovea_vla.bringup import node_values
    from fovea_vla.nodes import fovea_node

    values = node_values(config, fovea_node.PARAMS, "fovea_node")
    values["encoder.enabled"] = True
    return fovea_node.pipeline_config(values)


def _command_line(args) -> str:
    parts = ["fovea-vla train"]
    for name, value in vars(args).items():
        if name in ("func", "command") or value is None or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        parts.append(flag if value is True else f"{flag} {value}")
    return " ".join(parts)


def cmd_train(args) -> int:
    from fovea_vla.core.policy.dataset import DatasetError, LeRobotDataset
    from fovea_vla.core.policy.text import TextEncoderConfig, load_text_encoder
    from fovea_vla.core.policy.training import TrainConfig, extract_tokens, train

    try:
        cfg = TrainConfig(
            width=args.width,
            depth=args.depth,
            num_heads=args.heads,
            num_latents=args.latents,
            instruction_latents=args.instruction_latents,
            chunk_size=args.chunk_size,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            weight_decay=args.weight_decay,
            val_fraction=args.val_fraction,
            seed=args.seed,
            device=args.device,
            aux_weight=args.aux_weight,
            token_dropout=args.token_dropout,
        )
        pipeline_cfg = pipeline_config_from_files(args.config)
        dataset = LeRobotDataset(args.data)
        text_encoder = load_text_encoder(TextEncoderConfig(path=args.text_encoder))
    except (ValueError, DatasetError) as exc:
        print(f"[train] error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    cache = Path(args.cache) if args.cache else out / "token_cache"
    architecture = pipeline_cfg.encoder.architecture or "custom"
    print(
        f"[train] {dataset.root}: {dataset.num_episodes} episodes, {dataset.num_frames} frames at {dataset.fps:g} fps, "
        f"{len(dataset.tasks)} tasks; encoder {architecture} on {pipeline_cfg.encoder.device}, "
        f"{pipeline_cfg.foveation.num_tokens} tokens",
        flush=True,
    )

    def extracted(done: int, total: int) -> None:
        print(f"[train] tokens: episode {done}/{total}", flush=True)

    def epoch_done(stats) -> None:
        val = "-" if stats.val_loss is None else f"{stats.val_loss:.4f}"
        aux = "" if stats.val_aux_error is None else f" val aux error {stats.val_aux_error:.4g}"
        print(
            f"[train] epoch {stats.epoch}/{stats.epochs}: train {stats.train_loss:.4f} val {val}{aux} "
            f"lr {stats.lr:.2e} ({stats.seconds:.1f} s)",
            flush=True,
        )

    try:
        tokens = extract_tokens(dataset, pipeline_cfg, cache, progress=extracted, workers=args.workers)
        print(f"[train] token cache {tokens.folder}", flush=True)
        result = train(
            dataset,
            tokens,
            text_encoder,
            cfg,
            out,
            {
                "action_space": args.action_space,
                "encoder_architecture": architecture,
                "step_s": 1.0 / dataset.fps,
                # The checkpoint's spec names the architecture only; a head needs the same depth of tokens.
                "provenance": {"command": _command_line(args), "encoder_depth": pipeline_cfg.encoder.dims()[1]},
            },
            resume=args.resume,
            on_epoch=epoch_done,
        )
    except (ValueError, DatasetError, FileExistsError, FileNotFoundError) as exc:
        print(f"[train] error: {exc}", file=sys.stderr)
        return 2
    val = "-" if result.val_loss is None else f"{result.val_loss:.4f}"
    print(
        f"[train] {len(result.history)} epochs: first train loss {result.history[0].train_loss:.4f}, "
        f"final train {result.train_loss:.4f}, val {val} (held-out episodes {list(result.val_episodes)})"
    )
    if result.val_mae:
        print("[train] val MAE per step: " + ", ".join(f"{k} {v:.4g}" for k, v in result.val_mae.items()))
    print(f"[train] checkpoint {result.policy_dir}")
    print(f"[train] loss plot  {result.loss_plot}")
    print(f"[train] metrics    {result.metrics}")
    return 0


def add_train_parser(sub) -> None:
    defaults = _defaults()
    train = sub.add_parser(
        "train",
        help="behaviour-clone the action head on a LeRobot v2.1 dataset (tokens from the configured pipeline)",
        description="Extracts (and caches) the encoder tokens of every frame with the pipeline fovea_node runs "
        "for --config, then trains the action head; writes OUT/policy (checkpoint), OUT/loss.png, "
        "OUT/metrics.json and OUT/train_state.pt (each epoch; --resume continues it).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    train.add_argument("--data", required=True, help="LeRobot v2.1 dataset folder")
    train.add_argument("--out", required=True, help="output folder")
    train.add_argument("--config", default="fovea_vla.yaml", help="parameter file in config/ or a path")
    train.add_argument("--cache", default=None, help="token cache parent folder (default: OUT/token_cache)")
    train.add_argument("--action-space", default="ee_pose", choices=ACTION_SPACES)
    train.add_argument("--epochs", type=int, default=defaults.epochs)
    train.add_argument("--batch-size", type=int, default=defaults.batch_size)
    train.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate")
    train.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    train.add_argument("--chunk-size", type=int, default=defaults.chunk_size)
    train.add_argument("--width", type=int, default=defaults.width)
    train.add_argument("--depth", type=int, default=defaults.depth)
    train.add_argument("--heads", type=int, default=defaults.num_heads)
    train.add_argument(
        "--latents", type=int, default=defaults.num_latents, help="latents summarising the image tokens (0: none)"
    )
    train.add_argument(
        "--instruction-latents", action="store_true", help="condition the latents' queries on the instruction"
    )
    train.add_argument(
        "--aux-weight",
        type=float,
        default=defaults.aux_weight,
        help="weight of an auxiliary target: the head also predicts the dataset's observation.environment_state "
        "(record-sim: where the named block and square are); 0: none",
    )
    train.add_argument(
        "--token-dropout",
        type=float,
        default=defaults.token_dropout,
        help="share of each training frame's image tokens left out at random (0: none)",
    )
    train.add_argument("--workers", type=int, default=1, help="processes extracting tokens in parallel (one core each)")
    train.add_argument(
        "--text-encoder",
        default="",
        help="instruction embeddings: a sentence-transformers folder, an embedding table (.json, written by "
        "fovea_vla.core.policy.text.write_embedding_table) holding every task, or '' for the bundled all-MiniLM-L6-v2",
    )
    train.add_argument("--val-fraction", type=float, default=defaults.val_fraction, help="episodes held out")
    train.add_argument("--seed", type=int, default=defaults.seed)
    train.add_argument("--device", default=defaults.device, help="training device: auto, cpu or cuda[:N]")
    train.add_argument("--resume", action="store_true", help="continue OUT/train_state.pt")
    train.set_defaults(func=cmd_train)


def _defaults():
    from fovea_vla.core.policy.training import TrainConfig

    return TrainConfig()
