"""The ``fovea-vla`` command."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

from fovea_vla.sim_cli import parse_image_size

__all__ = ["main"]


def _cmd_doctor(args) -> int:
    from fovea_vla.doctor import doctor_report

    print(doctor_report(args.config))
    return 0


def _parse_launch_arguments(items: list[str]) -> dict[str, str]:
    from fovea_vla.bringup import LAUNCH_ARGUMENTS

    known = {a.name: a.default for a in LAUNCH_ARGUMENTS}
    values = dict(known)
    for item in items:
        name, sep, value = item.partition(":=")
        if not sep or name not in known:
            raise SystemExit(f"launch argument {item!r}: expected NAME:=VALUE with NAME one of {', '.join(known)}")
        values[name] = value
    return values


def _cmd_launch(args) -> int:
    from fovea_vla.bringup import node_graph
    from fovea_vla.launcher import GraphProcesses

    values = _parse_launch_arguments(args.arguments)
    graph = node_graph(**values)
    processes = GraphProcesses(graph, namespace=values["namespace"]).start()
    print(f"[fovea-vla launch] started {', '.join(processes.processes)}; Ctrl-C to stop", flush=True)
    stop = False

    def _request_stop(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, _request_stop)
    signal.signal(signal.SIGTERM, _request_stop)
    try:
        while not stop:
            exited = {n: c for n, c in processes.poll().items() if c is not None}
            if exited:
                print(f"[fovea-vla launch] node(s) exited: {exited}; stopping the rest", file=sys.stderr)
                break
            time.sleep(0.2)
    finally:
        codes = processes.stop()
    return 0 if all(c in (0, -signal.SIGINT) for c in codes.values()) else 1


def _cmd_demo(args) -> int:
    from fovea_vla.demo import run_demo

    config = args.config
    if config == "auto" and args.scene == "sim":
        config = "sim.yaml"
    elif config == "auto":
        import torch

        config = "desktop_gpu.yaml" if torch.cuda.is_available() else "cpu.yaml"
        print(f"[demo] config {config} (auto: {'a CUDA device' if config != 'cpu.yaml' else 'no CUDA device'})")
    summary = run_demo(args.duration, Path(args.out), config=config, domain_id=args.domain_id, scene=args.scene)
    if args.scene == "sim":
        print(
            f"[demo] {summary['successes']} of {len(summary['episodes'])} episodes solved; policy {summary['policy']}"
        )
    frames = summary["frames"]
    print(json.dumps({k: summary[k] for k in ("frames", "capture_to_fixation_ms", "backends")}, indent=2))
    print(
        f"[demo] processed {frames['processed']} of {frames['published']} frames published "
        f"in {summary['duration_s']:.1f} s"
    )
    for name, path in summary["files"].items():
        print(f"[demo] {name:<13} {path}")
    return 0 if frames["processed"] > 0 else 1


def _cmd_params(args) -> int:
    from fovea_vla.nodes.catalog import NODE_PARAMS, default_parameter_file
    from fovea_vla.nodes.params import format_table, format_yaml

    if args.format == "yaml":
        print(format_yaml(args.node, NODE_PARAMS[args.node]) if args.node else default_parameter_file(), end="")
    else:
        selected = [args.node] if args.node else list(NODE_PARAMS)
        print("\n\n".join(f"### {name}\n\n{format_table(NODE_PARAMS[name])}" for name in selected))
    return 0


def _report_bench(args, name: str, title: str, table: str, results: dict) -> int:
    """Print a benchmark's table, write its JSON (``--json``) and append it to docs/BENCHMARKS.md."""
    from fovea_vla.bench import common

    print(table)
    if getattr(args, "json", None):
        Path(args.json).write_text(json.dumps({"machine": common.machine(), **results}, indent=1))
        print(f"[bench] wrote {args.json}")
    if not args.no_append:
        command = f"fovea-vla bench {name} " + " ".join(sys.argv[3:])
        path = common.append_results(title, command.strip(), table, results)
        print(f"[bench] appended to {path}")
    return 0


def _cmd_bench(args) -> int:
    from fovea_vla.bench import pipeline_node

    results = pipeline_node.run(frames=args.frames, resolutions=args.resolutions, device=args.device)
    table = pipeline_node.format_table(results)
    return _report_bench(args, "pipeline", "Pipeline stages in process", table, results)


def _cmd_flow(args) -> int:
    from fovea_vla.flow_cli import cmd_flow

    return cmd_flow(args)


def _cmd_flow_eval(args) -> int:
    from fovea_vla.flow_cli import cmd_flow_eval

    return cmd_flow_eval(args)


def _cmd_slip_eval(args) -> int:
    from fovea_vla.slip_cli import cmd_slip_eval

    return cmd_slip_eval(args)


def _add_slip_parser(sub) -> None:
    """``slip-eval``; backend and preset names are validated by FlowConfig."""
    slip = sub.add_parser(
        "slip-eval",
        help="recall, false alarms and onset delay of the slip detector on generated sequences",
        description="Half of the sequences slip, half are no-slip controls; all have arm motion, camera "
        "shake, lighting flicker and sensor noise over a real background.",
    )
    slip.add_argument("--sequences", type=int, default=40, help="number of sequences (even: slip, odd: control)")
    slip.add_argument("--frames", type=int, default=60, help="frames per sequence (>= 20)")
    slip.add_argument("--backend", default="dis", help="flow backend (scale 1, grid 1): dis, torch, ...")
    slip.add_argument("--preset", default="slow", help="flow preset (dis slow = medium refined at full resolution)")
    slip.add_argument("--seed", type=int, default=0, help="seed of the first sequence")
    slip.add_argument(
        "--background",
        default=None,
        help="image or video for the backgrounds (default: bgslibrary video03 in ../shared/data, "
        "else a synthetic texture)",
    )
    slip.set_defaults(func=_cmd_slip_eval)


def _cmd_bench_flow(args) -> int:
    from fovea_vla.bench import flow_node

    try:
        results = flow_node.run(
            backends=args.backends,
            presets=args.presets,
            resolutions=args.resolutions,
            runs=args.runs,
            warmup=args.warmup,
            scale=args.scale,
            grid=args.grid,
            data=args.data or flow_node.DEFAULT_DATA,
        )
    except (ValueError, RuntimeError) as exc:
        print(f"[bench flow] error: {exc}", file=sys.stderr)
        return 2
    return _report_bench(args, "flow", "Optical flow backends", flow_node.format_table(results), results)


def _add_flow_parsers(sub) -> None:
    """``flow`` and ``flow-eval``; backend and preset names are validated by FlowConfig."""
    flow = sub.add_parser(
        "flow",
        help="optical flow of one image pair: backend, timing, magnitude, .flo and colour PNG",
        description="Flow from PREV to CUR. --out stores the backend's output grid as is (grid 4: one "
        "vector per 4x4 block, in full-resolution pixels).",
    )
    flow.add_argument("prev", help="first frame (time t)")
    flow.add_argument("cur", help="second frame (time t+1)")
    flow.add_argument("--backend", default="auto", help="auto, vpi, nvof, torch or dis")
    flow.add_argument("--preset", default="fast", help="ultrafast, fast, medium or slow")
    flow.add_argument("--scale", type=float, default=1.0, help="working scale, 0 < scale <= 1 (pipeline: 0.5)")
    flow.add_argument("--grid", type=int, default=1, choices=(1, 4), help="output grid step in pixels")
    flow.add_argument("--out", default=None, help="write the field to this .flo file")
    flow.add_argument("--vis", default=None, help="write a Middlebury colour-coded PNG")
    flow.set_defaults(func=_cmd_flow)

    flow_eval = sub.add_parser(
        "flow-eval",
        help="EPE and 3-px outliers of flow backends on every ground-truth pair under a folder",
        description="Finds Middlebury (flow10.flo), Sintel (frame_NNNN.flo) and KITTI (flow_occ/) "
        "pairs recursively; unavailable backends are skipped with their reason.",
    )
    flow_eval.add_argument("dir", help="folder searched recursively, e.g. ../shared/data")
    flow_eval.add_argument(
        "--backends", nargs="+", default=None, help="default: every backend auto could pick here (others: reason)"
    )
    flow_eval.add_argument("--presets", nargs="+", default=None, help="default: ultrafast fast medium slow")
    flow_eval.add_argument("--scale", type=float, default=1.0, help="working scale, 0 < scale <= 1")
    flow_eval.add_argument("--grid", type=int, default=1, choices=(1, 4), help="evaluate on this output grid")
    flow_eval.set_defaults(func=_cmd_flow_eval)


def _cmd_bench_encoder(args) -> int:
    from fovea_vla.bench import encoder_node

    results = encoder_node.run(
        resolutions=args.resolutions,
        backends=args.backends,
        device=args.device,
        architecture=args.architecture,
        runs=args.runs,
        dirty_fraction=args.dirty_fraction,
        video=None if args.video == "none" else Path(args.video) if args.video else encoder_node.DEFAULT_VIDEO,
        video_frames=args.video_frames,
        encoder_image=args.encoder_image,
        incremental_mips_max_fraction=args.incremental_mips_max_fraction,
    )
    table = encoder_node.format_table(results)
    return _report_bench(args, "encoder", "Vision stage: texture, encoder, token reuse", table, results)


def _cmd_bench_policy(args) -> int:
    from fovea_vla.bench import policy_node

    results = policy_node.run(
        device=args.device,
        architecture=args.architecture,
        runs=args.runs,
        frames=args.frames,
        resolution=args.resolution,
    )
    table = policy_node.format_table(results)
    return _report_bench(args, "policy", "Action path: action head and camera frame to first command", table, results)


def _add_bench_policy_parser(bench_sub) -> None:
    policy = bench_sub.add_parser(
        "policy", help="action-head latency at batch 1 and camera frame to first command through the pipeline"
    )
    policy.add_argument("--device", default="auto", help="auto, cpu or cuda")
    policy.add_argument("--architecture", default="vit_base_patch16", help="encoder, e.g. vit_tiny_patch16")
    policy.add_argument("--runs", type=int, default=1000, help="timed head calls per configuration (CPU: 50)")
    policy.add_argument("--frames", type=int, default=300, help="timed frames through the pipeline (CPU: 30)")
    policy.add_argument("--resolution", default="1920x1080", choices=["640x480", "1280x720", "1920x1080"])
    policy.add_argument("--json", default=None, help="also write the results as JSON here")
    policy.add_argument("--no-append", action="store_true", help="do not append to docs/BENCHMARKS.md")
    policy.set_defaults(func=_cmd_bench_policy)


def _add_bench_encoder_parser(bench_sub) -> None:
    encoder = bench_sub.add_parser(
        "encoder",
        help="texture stages per backend, foveated vs full-resolution ViT, token reuse on a static-camera video",
    )
    encoder.add_argument(
        "--resolutions", nargs="+", default=["1280x720", "1920x1080"], choices=["640x480", "1280x720", "1920x1080"]
    )
    encoder.add_argument("--backends", nargs="+", default=None, help="texture backends (default: every one here)")
    encoder.add_argument("--device", default="auto", help="auto, cpu or cuda")
    encoder.add_argument("--architecture", default="vit_base_patch16", help="encoder size, e.g. vit_tiny_patch16")
    encoder.add_argument("--runs", type=int, default=100, help="timed runs per stage (CPU encoder: 3)")
    encoder.add_argument("--dirty-fraction", type=float, default=0.1, help="share of 32-px tiles changed per frame")
    encoder.add_argument(
        "--video", default=None, help="static-camera video for token reuse (default: video03; none: skip)"
    )
    encoder.add_argument(
        "--encoder-image",
        type=parse_image_size,
        default=None,
        help="WxH: compare foveated and full-resolution tokens of one image of this size "
        "(default: foveated 1920x1080 against the 1024x1024 grid)",
    )
    encoder.add_argument("--video-frames", type=int, default=2000, help="frames of the video to run")
    encoder.add_argument(
        "--incremental-mips-max-fraction",
        type=float,
        default=None,
        help="the vision stage rebuilds the mips incrementally up to this dirty share, else whole "
        "(default: 0.02 on a GPU as config/desktop_gpu.yaml, 1 on the CPU)",
    )
    encoder.add_argument("--json", default=None, help="also write the results as JSON here")
    encoder.add_argument("--no-append", action="store_true", help="do not append to docs/BENCHMARKS.md")
    encoder.set_defaults(func=_cmd_bench_encoder)


def _add_bench_flow_parser(bench_sub) -> None:
    flow = bench_sub.add_parser(
        "flow", help="time per pair and EPE of every flow backend/preset (synthetic scene + ../shared/data)"
    )
    flow.add_argument("--backends", nargs="+", default=None, help="default: every available backend")
    flow.add_argument(
        "--presets", nargs="+", default=None, help="default: ultrafast and fast per backend, plus dis medium"
    )
    flow.add_argument(
        "--resolutions",
        nargs="+",
        default=["640x480", "1280x720", "1920x1080"],
        choices=["640x480", "1280x720", "1920x1080"],
    )
    flow.add_argument("--runs", type=int, default=50, help="timed runs per configuration (median)")
    flow.add_argument("--warmup", type=int, default=5, help="untimed runs first")
    flow.add_argument("--scale", type=float, default=0.5, help="working scale (pipeline default 0.5)")
    flow.add_argument("--grid", type=int, default=4, choices=(1, 4), help="output grid for timing (EPE: grid 1)")
    flow.add_argument(
        "--data", default=None, help="ground-truth folder for EPE (default: $FOVEA_SHARED_DATA or ../shared/data)"
    )
    flow.add_argument("--json", default=None, help="also write the results as JSON to this path")
    flow.add_argument("--no-append", action="store_true", help="do not append to docs/BENCHMARKS.md")
    flow.set_defaults(func=_cmd_bench_flow)


def _cmd_bench_decode(args) -> int:
    from fovea_vla.bench import decode_node

    results = decode_node.run(resolutions=args.resolutions, runs=args.runs, warmup=args.warmup)
    table = decode_node.format_table(results)
    return _report_bench(args, "decode", "Decode backends (JPEG, raw, H.264)", table, results)


def _cmd_bench_e2e(args) -> int:
    from fovea_vla.bench import e2e_graph

    try:
        results = e2e_graph.run(
            resolution=args.resolution,
            fps_list=args.fps,
            transports=args.transports,
            duration_s=args.duration,
            config=args.config,
            policy_rate_hz=args.policy_rate,
            sensor_reliability=args.sensor_reliability,
            warmup_s=args.warmup,
            log_dir=Path(args.log_dir),
            text_encoder=args.text_encoder,
            caption_model=args.captions_model,
        )
    except RuntimeError as exc:
        print(f"[bench e2e] error: {exc}", file=sys.stderr)
        return 2
    table = e2e_graph.format_table(results)
    return _report_bench(args, "e2e", "End to end over ROS: camera_replay -> vla_stack", table, results)


def _add_bench_ingest_parsers(bench_sub) -> None:
    """``bench decode`` and ``bench e2e``."""
    decode = bench_sub.add_parser(
        "decode", help="every decode backend in one run: nvJPEG vs cv2.imdecode, raw upload, H.264 packets"
    )
    decode.add_argument("--resolutions", nargs="+", default=["1920x1080"], choices=["640x480", "1280x720", "1920x1080"])
    decode.add_argument("--runs", type=int, default=200, help="timed decodes per row")
    decode.add_argument("--warmup", type=int, default=20, help="untimed decodes first")
    decode.add_argument("--json", default=None, help="also write the results as JSON here")
    decode.add_argument("--no-append", action="store_true", help="do not append to docs/BENCHMARKS.md")
    decode.set_defaults(func=_cmd_bench_decode)

    e2e = bench_sub.add_parser(
        "e2e", help="capture stamp -> fixation / action_chunk over ROS, camera_replay and vla_stack as processes"
    )
    e2e.add_argument("--resolution", type=parse_image_size, default=(640, 480), help="WxH of the camera")
    e2e.add_argument("--fps", type=float, nargs="+", default=[15.0], help="camera rates, one run each")
    e2e.add_argument("--transports", nargs="+", default=["raw"], choices=["raw", "jpeg"], help="one run each")
    e2e.add_argument("--duration", type=float, default=60.0, help="measured window per run [s]")
    e2e.add_argument("--warmup", type=float, default=5.0, help="unmeasured seconds after the first chunk")
    e2e.add_argument(
        "--config", default="auto", help="parameter file; auto: desktop_gpu.yaml with a CUDA device, else cpu.yaml"
    )
    e2e.add_argument("--policy-rate", type=float, default=200.0, help="policy_node timer [Hz] (polls new tokens)")
    e2e.add_argument(
        "--sensor-reliability", default="best_effort", choices=["best_effort", "reliable"], help="camera subscription"
    )
    e2e.add_argument("--log-dir", default="out/bench_e2e", help="node logs per run")
    e2e.add_argument(
        "--text-encoder",
        default="",
        help="policy_node text_encoder.path (a model folder, or a .json table from `fovea-vla policy embed`)",
    )
    e2e.add_argument(
        "--captions-model",
        default="",
        help="a SmolVLM-class model folder: measure the action path with caption_node off / on / off / on",
    )
    e2e.add_argument("--json", default=None, help="also write the results as JSON here")
    e2e.add_argument("--no-append", action="store_true", help="do not append to docs/BENCHMARKS.md")
    e2e.set_defaults(func=_cmd_bench_e2e)


def _cmd_track(args) -> int:
    from fovea_vla.track_cli import cmd_track

    return cmd_track(args)


def _add_track_parser(sub) -> None:
    """``track``; backend and preset names are validated by FlowConfig."""
    track = sub.add_parser(
        "track",
        help="pursue one target from an initial box; OTB precision/success against --gt",
        description="Starts the fixation at the centre of --init on frame 0 and lets the pipeline's pursuit "
        "follow it (saccades off). Boxes are OTB x,y,w,h with a 1-based top-left pixel. The fixation and a box "
        "of the initial size centred on it are scored against --gt.",
    )
    track.add_argument("source", help="video file, image folder, or OTB sequence folder (frames in img/)")
    track.add_argument("--init", default=None, help="initial box x,y,w,h (default: the first --gt box)")
    track.add_argument("--gt", default=None, help="OTB ground truth: x y w h per line, tab/comma/space separated")
    track.add_argument("--backend", default="auto", help="flow backend: auto, vpi, nvof, torch or dis")
    track.add_argument("--preset", default="medium", help="flow preset: ultrafast, fast, medium or slow")
    track.add_argument("--scale", type=float, default=1.0, help="flow working scale, 0 < scale <= 1")
    track.add_argument("--fps", type=float, default=30.0, help="frame rate of image folders [Hz]")
    track.add_argument("--out", default=None, help="write the per-frame trajectory to this CSV file")
    track.set_defaults(func=_cmd_track)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fovea-vla", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    doctor = sub.add_parser("doctor", help="accelerators, backends and what a config selects")
    doctor.add_argument("--config", default="fovea_vla.yaml", help="parameter file in config/ or a path")
    doctor.set_defaults(func=_cmd_doctor)

    launch = sub.add_parser(
        "launch",
        help="run the node graph as subprocesses (like ros2 launch fovea_vla fovea_vla.launch.py)",
        description="Arguments as for ros2 launch, e.g. config:=cpu.yaml camera_topic:=/camera/image_raw "
        "use_replay:=false",
    )
    launch.add_argument("arguments", nargs="*", metavar="NAME:=VALUE")
    launch.set_defaults(func=_cmd_launch)

    params = sub.add_parser("params", help="print every node parameter as a YAML file or markdown tables")
    params.add_argument("--format", choices=("yaml", "markdown"), default="markdown")
    params.add_argument(
        "--node", choices=("fovea_node", "policy_node", "camera_replay", "sim_bridge", "caption_node"), default=None
    )
    params.set_defaults(func=_cmd_params)

    from fovea_vla.policy_cli import add_policy_parser

    add_policy_parser(sub)

    from fovea_vla.train_cli import add_train_parser

    add_train_parser(sub)

    from fovea_vla.sim_cli import add_sim_parsers

    add_sim_parsers(sub)

    from fovea_vla.soak import add_soak_parser

    add_soak_parser(sub)

    bench = sub.add_parser("bench", help="benchmarks; print a table and append it to docs/BENCHMARKS.md")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    pipeline = bench_sub.add_parser("pipeline", help="per-stage time of the in-process pipeline")
    pipeline.add_argument("--frames", type=int, default=100)
    pipeline.add_argument(
        "--resolutions", nargs="+", default=["640x480", "1280x720"], choices=["640x480", "1280x720", "1920x1080"]
    )
    pipeline.add_argument("--device", default="auto", help="texture device: auto, cpu, cuda")
    pipeline.add_argument("--no-append", action="store_true", help="do not append to docs/BENCHMARKS.md")
    pipeline.set_defaults(func=_cmd_bench)
    _add_bench_flow_parser(bench_sub)
    _add_bench_encoder_parser(bench_sub)
    _add_bench_policy_parser(bench_sub)
    _add_bench_ingest_parsers(bench_sub)

    _add_flow_parsers(sub)
    _add_slip_parser(sub)
    _add_track_parser(sub)

    demo = sub.add_parser(
        "demo", help="run the closed loop in simulation (or the camera graph) and record video + summary"
    )
    demo.add_argument("--duration", type=float, default=20.0, help="recording time [s]")
    demo.add_argument("--out", default="out/demo", help="output folder")
    demo.add_argument(
        "--config",
        default="auto",
        help="parameter file in config/ or a path; auto: sim.yaml for the sim scene, else desktop_gpu.yaml with a "
        "CUDA device or cpu.yaml",
    )
    demo.add_argument(
        "--scene",
        choices=("sim", "camera"),
        default="sim",
        help="sim: the tabletop task in closed loop with the bundled policy; camera: the synthetic camera, no policy",
    )
    demo.add_argument("--domain-id", type=int, default=None, help="ROS_DOMAIN_ID (default: env or random)")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
