"""``fovea-vla record-sim`` and ``fovea-vla eval-sim``: demonstrations (the scripted expert's, or a
policy's rollouts labelled by the expert for DAgger) and closed-loop evaluation in the simulated tabletop
task, in process or over ROS."""

from __future__ import annotations

import argparse
import functools
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


def _env(args, start_offset: tuple[float, float, float] = (0.0, 0.0, 0.0)):
    from fovea_vla.core.sim.tabletop import TabletopConfig, TabletopEnv

    width, height = args.image_size
    return TabletopEnv(
        TabletopConfig(image_width=width, image_height=height, max_steps=args.max_steps, start_offset=start_offset)
    )


def parse_offset(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected X,Y,Z in metres, got {text!r}") from exc
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected X,Y,Z in metres, got {text!r}")
    return values


# observation.environment_state of record-sim: where the instructed block and square are (an auxiliary
# training target that makes the head say which objects the instruction names; never a policy input).
ENVIRONMENT_NAMES = ("block_x", "block_y", "square_x", "square_y")


def _environment_state(privileged: dict) -> np.ndarray:
    return np.concatenate([privileged["target_block_position"][:2], privileged["target_square_centre"]])


def _labels(env, observation, plan_horizon: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(the expert's action, its plan of ``plan_horizon`` steps or None when 0) for the present state."""
    from fovea_vla.core.sim.expert import PushExpert, expert_plan

    if plan_horizon:
        plan = expert_plan(env, observation, plan_horizon)
        return plan[0], plan
    return PushExpert().act(observation, env.privileged()), None


def _expert_episode(env, seed: int, index: int, goal, action_noise: float, plan_horizon: int) -> tuple[list, bool]:
    """The scripted expert acts (its commands perturbed by ``action_noise`` when > 0) and labels."""
    from fovea_vla.core.sim.expert import ActionNoise

    observation = env.reset(seed, goal=goal)
    noise = ActionNoise(action_noise, env.cfg.control_hz, (seed, index, 2))
    frames = []
    for _ in range(env.cfg.max_steps):
        action, plan = _labels(env, observation, plan_horizon)
        # The label is the clean command.
        frames.append((observation.rgb, env.state(), action, _environment_state(env.privileged()), plan))
        observation = env.step(noise(action))
        if env.success():
            break
    return frames, env.success()


def _policy_labeller(args):
    """DAgger: ``episode(env, seed, goal)`` runs the policy in closed loop (as eval-sim does) and labels
    every visited state with the expert's action; returns (frames, policy succeeded)."""
    from fovea_vla.core.sim.closed_loop import run_episode

    pipeline, runner, spec, text, settings = _policy_stack(args)

    def episode(env, seed: int, goal) -> tuple[list, bool]:
        frames = []

        def label(observation, state, command):
            action, plan = _labels(env, observation, args.plan_horizon)
            frames.append((observation.rgb, state, action, _environment_state(env.privileged()), plan))

        report = run_episode(env, seed, pipeline, runner, spec, text, **settings, goal=goal, on_step=label)
        return frames, report.success

    return episode


class _Recorder:
    """One process's simulator (and policy, for DAgger): records the episode of a (seed, index, goal) job."""

    def __init__(self, args):
        self.args = args
        self.env = _env(args, args.start_offset)
        self.policy_episode = _policy_labeller(args) if args.policy else None

    def __call__(self, job) -> tuple[list, bool, str]:
        seed, index, goal = job
        if self.policy_episode is not None:
            frames, success = self.policy_episode(self.env, seed, goal)
        else:
            frames, success = _expert_episode(
                self.env, seed, index, goal, self.args.action_noise, self.args.plan_horizon
            )
        return frames, success, self.env.instruction


_worker_recorder: _Recorder | None = None


def _start_worker() -> None:
    import torch

    torch.set_num_threads(1)  # one core per worker


def _record_in_worker(args, job) -> tuple[list, bool, str]:
    # Built by the first job, not by the pool's initializer: an error there (a missing config or
    # checkpoint) then reaches the parent and ends the command; a failing initializer makes the pool
    # respawn workers forever.
    global _worker_recorder
    if _worker_recorder is None:
        _worker_recorder = _Recorder(args)
    return _worker_recorder(job)


def _cmd_record(args) -> int:
    import multiprocessing

    from fovea_vla.core.policy.dataset import LeRobotWriter
    from fovea_vla.core.sim.tabletop import TabletopConfig, layout_goals

    if args.instructions_per_layout < 1:
        raise SystemExit(f"record-sim: --instructions-per-layout={args.instructions_per_layout}: must be >= 1")
    if args.workers < 1:
        raise SystemExit(f"record-sim: --workers={args.workers}: must be >= 1")
    if args.plan_horizon < 0:
        raise SystemExit(f"record-sim: --plan-horizon={args.plan_horizon}: must be >= 0")
    try:
        width, height = args.image_size
        cfg = TabletopConfig(
            image_width=width, image_height=height, max_steps=args.max_steps, start_offset=args.start_offset
        )
    except ValueError as exc:
        raise SystemExit(f"record-sim: {exc}") from exc
    jobs = [
        (seed, index, goal)
        for seed in range(args.seed, args.seed + args.episodes)
        for index, goal in enumerate(layout_goals(cfg, seed, args.instructions_per_layout))
    ]
    successes = attempts = 0
    start = time.perf_counter()
    names = ("x", "y", "z", "roll", "pitch", "yaw", "gripper")
    recording = {
        "tool": "fovea-vla record-sim",
        "first_seed": args.seed,
        "layouts": args.episodes,
        "instructions_per_layout": args.instructions_per_layout,
        "image_size": list(args.image_size),
        "max_steps": args.max_steps,
        "keep_failures": args.keep_failures,
        "action_noise_m": args.action_noise,
        "plan_horizon": args.plan_horizon,
        "start_offset_m": list(args.start_offset),
        "policy": None if args.policy is None else str(Path(args.policy).resolve()),
        "config": args.config if args.policy else None,
    }
    actor = "policy" if args.policy else "expert"
    if args.workers == 1:
        pool, recorder = None, _Recorder(args)
        episodes = map(recorder, jobs)
    else:
        # Episodes are simulated in parallel and written here in job order: the dataset does not
        # depend on the number of workers.
        pool = multiprocessing.get_context("spawn").Pool(args.workers, _start_worker)
        episodes = pool.imap(functools.partial(_record_in_worker, args), jobs)
    try:
        with LeRobotWriter(
            args.out,
            fps=cfg.control_hz,
            state_names=names,
            action_names=names,
            image_size=args.image_size,
            environment_names=ENVIRONMENT_NAMES,
            plan_horizon=args.plan_horizon or None,
            recording=recording,
            append=args.append,
        ) as writer:
            for (seed, _, _), (frames, success, instruction) in zip(jobs, episodes, strict=True):
                successes += success
                attempts += 1
                if success or args.keep_failures or args.policy:
                    for rgb, state, action, environment, plan in frames:
                        writer.add_frame(rgb, state, action, environment, plan)
                    writer.end_episode(instruction, success=success, extra={"layout": seed, "actor": actor})
                print(
                    f"seed {seed}: {actor} {'success' if success else 'failure'} in {len(frames)} steps "
                    f"({instruction})",
                    flush=True,
                )
    finally:
        if pool is not None:
            pool.terminate()
        else:
            recorder.env.close()
    print(f"{actor}: {successes}/{attempts} successes; wrote {args.out} in {time.perf_counter() - start:.0f} s")
    return 0


def _write_video(path: Path, frames: list[np.ndarray], fps: float) -> None:
    import cv2

    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    for rgb in frames:
        writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    writer.release()


def _policy_stack(args):
    """(pipeline, runner, spec, text encoder, run_episode keyword arguments) for ``args.policy``,
    with the checks policy_node makes."""
    from fovea_vla.core.pipeline import FoveaPipeline
    from fovea_vla.core.policy.checkpoint import load_policy
    from fovea_vla.core.policy.runner import ActionHeadRunner, RunnerConfig
    from fovea_vla.core.policy.text import SentenceEncoder
    from fovea_vla.nodes.policy_node import (
        executor_config_from_files,
        policy_rate_from_files,
        safety_limits_from_files,
    )
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
            f"{args.command}: {args.policy} was trained on tokens of {trained_depth} encoder blocks, "
            f"{args.config} runs {depth} (encoder.depth)"
        )
    pipeline = FoveaPipeline(pipeline_cfg)
    runner = ActionHeadRunner(model, RunnerConfig(device=args.device))
    settings = {
        "limits": safety_limits_from_files(args.config, spec),
        "executor_cfg": executor_config_from_files(args.config),
        "policy_rate_hz": policy_rate_from_files(args.config),
    }
    return pipeline, runner, spec, text, settings


def _eval_in_process(args, out: Path) -> dict:
    from fovea_vla.core.overlay import draw_overlay
    from fovea_vla.core.sim.closed_loop import run_episode, summarize_episodes

    pipeline, runner, spec, text, settings = _policy_stack(args)
    env = _env(args)

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
            **settings,
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
    record.add_argument(
        "--episodes", type=int, default=100, help="layouts (seeds) to record; each gives --instructions-per-layout"
    )
    record.add_argument("--seed", type=int, default=0, help="first seed (training seeds: keep evaluation seeds apart)")
    record.add_argument(
        "--instructions-per-layout",
        type=int,
        default=1,
        help="episodes per layout, each with another goal in the same scene: the seed's own first, then other "
        "feasible block/square pairs drawn from the seed (fewer where the layout has fewer); the same first "
        "image with different instructions and actions makes the policy read the instruction. episodes.jsonl "
        "gives each episode's layout (seed), info.json's recording these options",
    )
    record.add_argument("--image-size", type=parse_image_size, default=(640, 480))
    record.add_argument("--max-steps", type=int, default=150)
    record.add_argument(
        "--action-noise",
        type=float,
        default=0.0,
        help="std [m] of a smooth random offset (Ornstein-Uhlenbeck, 1 s) added to the executed tool position while "
        "the expert's clean command is recorded as the action (DART): demonstrations of recovering from drift; "
        "seeded by (seed, instruction, 2); the expert copes with about 0.01",
    )
    record.add_argument(
        "--start-offset",
        type=parse_offset,
        default=(0.0, 0.0, 0.0),
        help="X,Y,Z half-extents [m] of a random offset of the arm's start from home, drawn from the seed (all "
        "goals of a layout start alike): with a fixed start a cloned policy can tell where it is heading from where "
        "it is, without reading the instruction; e.g. 0.08,0.15,0.05",
    )
    record.add_argument(
        "--policy",
        default=None,
        help="DAgger: this policy checkpoint acts in closed loop (as in eval-sim, --config's pipeline) and the expert "
        "labels every state it visits; all its episodes are kept (success = the policy's)",
    )
    record.add_argument(
        "--plan-horizon",
        type=int,
        default=16,
        help="steps of the expert's plan stored per frame (action.plan: the expert takes over in a copy of the "
        "simulation; train uses it as the frame's chunk, so DAgger chunks say where the expert would go, not where "
        "the policy went); 0: none (chunks from consecutive actions)",
    )
    record.add_argument("--config", default="sim.yaml", help="with --policy: parameter file of the pipeline")
    record.add_argument("--device", default="auto", help="with --policy: action head device")
    record.add_argument(
        "--append", action="store_true", help="add the episodes to the dataset at --out (e.g. a DAgger round)"
    )
    record.add_argument("--keep-failures", action="store_true", help="also record the expert's failed episodes")
    record.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes simulating episodes in parallel (one core each); the dataset is the same for any number",
    )
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
