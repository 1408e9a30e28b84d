"""``fovea-vla record-sim`` and ``fovea-vla eval-sim``: demonstrations and closed-loop evaluation in
the simulated tabletop task, in process or over ROS."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

__all__ = ["add_sim_parsers", "parse_image_size"]


def parse_image_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {text!r}") from exc
    return width, height


def _env(args):
    from fovea_vla.core.sim.tabletop import TabletopConfig, TabletopEnv

    width, height = args.image_size
    return TabletopEnv(TabletopConfig(image_width=width, image_height=height, max_steps=args.max_steps))


def _cmd_record(args) -> int:
    from fovea_vla.core.policy.dataset import LeRobotWriter
    from fovea_vla.core.sim.expert import PushExpert

    env = _env(args)
    successes = 0
    start = time.perf_counter()
    names = ("x", "y", "z", "roll", "pitch", "yaw", "gripper")
    with LeRobotWriter(
        args.out, fps=env.cfg.control_hz, state_names=names, action_names=names, image_size=args.image_size
    ) as writer:
        for seed in range(args.seed, args.seed + args.episodes):
            observation = env.reset(seed)
            expert = PushExpert(env.task)
            frames = []
            for _ in range(env.cfg.max_steps):
                action = expert.act(observation, env.privileged())
                frames.append((observation.rgb, env.state(), action))
                observation = env.step(action)
                if env.success():
                    break
            success = env.success()
            successes += success
            if success or args.keep_failures:
                for rgb, state, action in frames:
                    writer.add_frame(rgb, state, action)
                writer.end_episode(env.instruction, success=success)
            print(f"seed {seed}: {'success' if success else 'failure'} in {len(frames)} steps ({env.instruction})")
    env.close()
    print(f"expert: {successes}/{args.episodes} successes; wrote {args.out} in {time.perf_counter() - start:.0f} s")
    return 0


def _write_video(path: Path, frames: list[np.ndarray], fps: float) -> None:
    import cv2

    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    for rgb in frames:
        writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    writer.release()


def _eval_in_process(args, out: Path) -> dict:
    from fovea_vla.core.overlay import draw_overlay
    from fovea_vla.core.pipeline import FoveaPipeline
    from fovea_vla.core.policy.checkpoint import load_policy
    from fovea_vla.core.policy.runner import ActionHeadRunner, RunnerConfig
    from fovea_vla.core.policy.text import SentenceEncoder
    from fovea_vla.core.sim.closed_loop import run_episode, summarize_episodes
    from fovea_vla.nodes.policy_node import executor_config_from_files, safety_limits_from_files
    from fovea_vla.train_cli import pipeline_config_from_files

    model, spec = load_policy(args.policy)
    pipeline_cfg = pipeline_config_from_files(args.config)  # the pipeline the policy was trained on
    text = SentenceEncoder()
    # The checks policy_node makes: the same encoder, token width and instruction embedding.
    spec.check_compatible(
        encoder_architecture=pipeline_cfg.encoder.architecture,
        token_dim=pipeline_cfg.encoder.dims()[0],
        text_encoder=text.name,
        instruction_dim=text.dim,
    )
    trained_depth, depth = spec.provenance.get("encoder_depth"), pipeline_cfg.encoder.dims()[1]
    if trained_depth is not None and trained_depth != depth:
        raise SystemExit(
            f"eval-sim: {args.policy} was trained on tokens of {trained_depth} encoder blocks, "
            f"{args.config} runs {depth} (encoder.depth)"
        )
    pipeline = FoveaPipeline(pipeline_cfg)
    runner = ActionHeadRunner(model, RunnerConfig(device=args.device))
    env = _env(args)
    limits, executor_cfg = safety_limits_from_files(args.config, spec), executor_config_from_files(args.config)

    def overlay(rgb, output):
        return draw_overlay(rgb, output.fixation, output.layout, None, output.flow_grid, label=env.instruction)

    reports = []
    for index, seed in enumerate(range(args.seed, args.seed + args.episodes)):
        report = run_episode(
            env,
            seed,
            pipeline,
            runner,
            spec,
            text,
            limits=limits,
            executor_cfg=executor_cfg,
            record=index < args.videos,
            overlay=overlay,
        )
        reports.append(report)
        if report.frames:
            _write_video(out / f"episode_{seed}.mp4", report.frames, env.cfg.control_hz)
        print(f"seed {seed}: {'success' if report.success else 'failure'} in {report.steps} steps")
    env.close()
    return summarize_episodes(reports)


def _eval_over_ros(args, out: Path) -> dict:
    import rclpy
    from std_msgs.msg import String

    from fovea_vla.bringup import node_graph
    from fovea_vla.demo import ros_environment
    from fovea_vla.launcher import GraphProcesses
    from fovea_vla.nodes import qos
    from fovea_vla_msgs.msg import PolicyStats

    env = ros_environment(None)
    graph = node_graph(config=args.config, use_replay=False, policy=True, sim=True, captions=args.captions)
    width, height = args.image_size
    parameters = {
        "sim_bridge": {
            "seed": args.seed,
            "episodes": args.episodes,
            "image_width": width,
            "image_height": height,
            "max_steps": args.max_steps,
        },
        "policy_node": {"policy.checkpoint": str(Path(args.policy).resolve())},
    }
    results, chunk_latency = [], []
    os.environ.update(env)  # this process's probe node joins the graph's domain
    rclpy.init()
    node = rclpy.create_node("fovea_eval_sim")
    node.create_subscription(String, "sim/episode", lambda m: results.append(json.loads(m.data)), qos.outputs(100))
    node.create_subscription(
        PolicyStats, "policy_stats", lambda m: chunk_latency.append(m.chunk_latency_ms), qos.outputs(100)
    )
    processes = GraphProcesses(graph, parameters=parameters, env=env, log_dir=out / "logs").start()
    try:
        deadline = time.monotonic() + args.episodes * (args.max_steps / 10.0 + 5.0) + 120.0
        while len(results) < args.episodes and time.monotonic() < deadline:
            rclpy.spin_once(node, timeout_sec=0.1)
            exited = {n: c for n, c in processes.poll().items() if c is not None}
            if exited:
                raise RuntimeError(f"node(s) exited: {exited} (logs in {out / 'logs'})")
    finally:
        codes = processes.stop()
        node.destroy_node()
        rclpy.try_shutdown()
    latencies = np.array([v for v in chunk_latency if np.isfinite(v)])
    times = [r["time_to_success_s"] for r in results if r["success"]]
    return {
        "episodes": len(results),
        "successes": sum(r["success"] for r in results),
        "success_rate": sum(r["success"] for r in results) / max(1, len(results)),
        "time_to_success_s_mean": float(np.mean(times)) if times else None,
        "capture_to_chunk_ms_p50": float(np.percentile(latencies, 50)) if latencies.size else None,
        "capture_to_chunk_ms_p99": float(np.percentile(latencies, 99)) if latencies.size else None,
        "exit_codes": codes,
        "timed_out": len(results) < args.episodes,
        "per_episode": results,
    }


def _cmd_eval(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = _eval_over_ros(args, out) if args.ros else _eval_in_process(args, out)
    summary |= {"mode": "ros" if args.ros else "in_process", "policy": str(args.policy), "seed": args.seed}
    if summary.get("timed_out"):
        print(f"eval-sim: only {summary['episodes']} of {args.episodes} episodes finished before the deadline")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(
        f"{summary['mode']}: {summary['successes']}/{summary['episodes']} successes "
        f"({100 * summary['success_rate']:.0f} %); summary in {out / 'summary.json'}"
    )
    return 1 if summary.get("timed_out") else 0


def add_sim_parsers(sub) -> None:
    record = sub.add_parser(
        "record-sim",
        help="record scripted-expert demonstrations of the tabletop task (LeRobot layout)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    record.add_argument("--out", required=True, help="dataset folder to write")
    record.add_argument("--episodes", type=int, default=100)
    record.add_argument("--seed", type=int, default=0, help="first seed (training seeds: keep evaluation seeds apart)")
    record.add_argument("--image-size", type=parse_image_size, default=(640, 480))
    record.add_argument("--max-steps", type=int, default=150)
    record.add_argument("--keep-failures", action="store_true", help="also record the expert's failed episodes")
    record.set_defaults(func=_cmd_record)

    evaluate = sub.add_parser(
        "eval-sim",
        help="closed-loop success rate of a policy in the tabletop task, in process or over ROS",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    evaluate.add_argument("--policy", required=True, help="policy checkpoint folder")
    evaluate.add_argument("--episodes", type=int, default=50)
    evaluate.add_argument("--seed", type=int, default=10_000, help="first held-out seed")
    evaluate.add_argument("--config", default="sim.yaml", help="parameter file of the pipeline (as the nodes use)")
    evaluate.add_argument("--image-size", type=parse_image_size, default=(640, 480))
    evaluate.add_argument("--max-steps", type=int, default=150)
    evaluate.add_argument("--device", default="auto", help="action head device (in process)")
    evaluate.add_argument("--videos", type=int, default=3, help="episodes recorded as video (in process)")
    evaluate.add_argument("--ros", action="store_true", help="over ROS: sim_bridge and vla_stack in separate processes")
    evaluate.add_argument("--captions", action="store_true", help="with --ros: also run caption_node")
    evaluate.add_argument("--out", default="out/eval_sim", help="folder for summary.json and videos")
    evaluate.set_defaults(func=_cmd_eval)
