"""``fovea-vla track``: the pipeline's smooth pursuit on one target from an initial box, scored OTB-style.

The fixation starts at the centre of the initial box on frame 0 (:meth:`FoveaPipeline.start_pursuit`)
and from then on only the pipeline's flow and fixation controller move it: no appearance model,
no ground truth after the initial box. Saccades are off (``saccade_rate_hz = 0``, no events), so
the fovea stays on the pursued target.

Scoring follows the OTB benchmark (Wu, Lim & Yang, CVPR 2013):

- centre error: distance [px] between the fixation (the capture-time estimate, ``filtered_x/y``)
  and the centre of the ground-truth box;
- precision curve: share of frames with centre error <= t for t = 0..50 px; precision@20 is the
  value at 20 px and its AUC the curve's mean (in [0, 1]);
- success curve: share of frames whose IoU exceeds t for t = 0, 0.05, ..., 1, for a box of the
  initial size centred on the fixation; success@0.5 is IoU > 0.5 and its AUC the curve's mean.

Frames whose ground truth is missing (NaN, or width or height <= 0) are left out of the scores.

Box convention (OTB): ``x y w h`` with (x, y) the top-left pixel, 1-based, so the box covers
0-based pixel columns ``x - 1 .. x + w - 2``; its centre in the 0-based pixel convention of the
pipeline (x right, y down, centre of the top-left pixel at (0, 0)) is ``(x - 1 + (w - 1) / 2,
y - 1 + (h - 1) / 2)``.

Nothing here imports rclpy.
"""

from __future__ import annotations

import csv
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "PRECISION_THRESHOLDS",
    "SUCCESS_THRESHOLDS",
    "TrackResult",
    "box_centers",
    "box_iou",
    "boxes_at",
    "center_error",
    "cmd_track",
    "load_otb_groundtruth",
    "precision_curve",
    "run_track",
    "success_curve",
    "summarize",
    "track_config",
]

PRECISION_THRESHOLDS = np.arange(0, 51, dtype=np.float64)
SUCCESS_THRESHOLDS = np.linspace(0.0, 1.0, 21)


def load_otb_groundtruth(path: str | Path) -> np.ndarray:
    """Read an OTB ground-truth file: one ``x y w h`` box per line.

    Args:
        path: text file; values separated by commas, tabs or spaces (OTB uses all three).

    Returns:
        (N, 4) float64 boxes (x, y, w, h), 1-based top-left pixel [px]; NaN where a line says
        ``NaN``.

    Raises:
        ValueError: a non-empty line without exactly 4 numbers (the message names the line).

    Example:
        >>> import tempfile, os
        >>> with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        ...     _ = f.write("205\\t151\\t17\\t50\\n202,150,19,49\\n")
        >>> load_otb_groundtruth(f.name)
        array([[205., 151.,  17.,  50.],
               [202., 150.,  19.,  49.]])
        >>> os.remove(f.name)
    """
    boxes = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        fields = [f for f in re.split(r"[,\s]+", line.strip()) if f]
        if not fields:
            continue
        try:
            values = [float(f) for f in fields]
        except ValueError:
            values = []
        if len(values) != 4:
            raise ValueError(f"{path}:{number}: expected 4 numbers 'x y w h', got {line.strip()!r}")
        boxes.append(values)
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def box_centers(boxes: np.ndarray) -> np.ndarray:
    """Centres of OTB boxes in the pipeline's 0-based pixel convention.

    Args:
        boxes: (N, 4) boxes (x, y, w, h), 1-based top-left [px].

    Returns:
        (N, 2) float64 centres (x, y) [px].

    Example:
        >>> box_centers(np.array([[1.0, 1.0, 3.0, 5.0]]))
        array([[1., 2.]])
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.stack([boxes[:, 0] - 1 + (boxes[:, 2] - 1) / 2, boxes[:, 1] - 1 + (boxes[:, 3] - 1) / 2], axis=1)


def boxes_at(centers: np.ndarray, size: tuple[float, float]) -> np.ndarray:
    """OTB boxes of one size centred on 0-based centres (the inverse of :func:`box_centers`).

    Args:
        centers: (N, 2) centres (x, y) [px].
        size: (w, h) box size [px].

    Returns:
        (N, 4) float64 boxes (x, y, w, h), 1-based top-left.

    Example:
        >>> boxes_at(np.array([[1.0, 2.0]]), (3.0, 5.0))
        array([[1., 1., 3., 5.]])
    """
    centers = np.asarray(centers, dtype=np.float64).reshape(-1, 2)
    w, h = size
    return np.column_stack(
        [centers[:, 0] + 1 - (w - 1) / 2, centers[:, 1] + 1 - (h - 1) / 2, np.full((len(centers), 2), (w, h))]
    )


def _valid(boxes: np.ndarray) -> np.ndarray:
    return np.isfinite(boxes).all(axis=1) & (boxes[:, 2] > 0) & (boxes[:, 3] > 0)


def center_error(centers: np.ndarray, gt_boxes: np.ndarray) -> np.ndarray:
    """Distance between predicted centres and ground-truth box centres.

    Args:
        centers: (N, 2) predicted centres (x, y) [px], 0-based.
        gt_boxes: (N, 4) ground-truth OTB boxes.

    Returns:
        (N,) float64 centre errors [px]; NaN where the ground truth is missing.

    Example:
        >>> center_error(np.array([[4.0, 6.0], [0.0, 0.0]]), np.array([[1, 1, 3, 5], [0, 0, 0, 0]]))
        array([ 5., nan])
    """
    gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    errors = np.linalg.norm(np.asarray(centers, dtype=np.float64) - box_centers(gt_boxes), axis=1)
    errors[~_valid(gt_boxes)] = np.nan
    return errors


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of OTB boxes, row by row (continuous areas, as OTB computes them).

    Args:
        a, b: (N, 4) boxes (x, y, w, h).

    Returns:
        (N,) float64 IoU in [0, 1]; NaN where either box is missing.

    Example:
        >>> box_iou(np.array([[0, 0, 2, 2]]), np.array([[1, 0, 2, 2]]))
        array([0.33333333])
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    width = np.minimum(a[:, 0] + a[:, 2], b[:, 0] + b[:, 2]) - np.maximum(a[:, 0], b[:, 0])
    height = np.minimum(a[:, 1] + a[:, 3], b[:, 1] + b[:, 3]) - np.maximum(a[:, 1], b[:, 1])
    inter = np.clip(width, 0, None) * np.clip(height, 0, None)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / (a[:, 2] * a[:, 3] + b[:, 2] * b[:, 3] - inter)
    iou[~(_valid(a) & _valid(b))] = np.nan
    return iou


def precision_curve(errors: np.ndarray, thresholds: np.ndarray = PRECISION_THRESHOLDS) -> np.ndarray:
    """Share of frames whose centre error is at most each threshold (NaN frames left out).

    Args:
        errors: (N,) centre errors [px].
        thresholds: (T,) thresholds [px]; OTB: 0..50.

    Returns:
        (T,) float64 in [0, 1]; all NaN when no frame has ground truth.

    Example:
        >>> precision_curve(np.array([1.0, 10.0, 30.0, np.nan]), np.array([0.0, 20.0, 50.0]))
        array([0.        , 0.66666667, 1.        ])
    """
    errors = np.asarray(errors, dtype=np.float64)
    errors = errors[np.isfinite(errors)]
    if errors.size == 0:
        return np.full(len(thresholds), np.nan)
    return (errors[None, :] <= np.asarray(thresholds, dtype=np.float64)[:, None]).mean(axis=1)


def success_curve(ious: np.ndarray, thresholds: np.ndarray = SUCCESS_THRESHOLDS) -> np.ndarray:
    """Share of frames whose IoU exceeds each threshold (NaN frames left out).

    Args:
        ious: (N,) IoU values in [0, 1].
        thresholds: (T,) overlap thresholds; OTB: 0, 0.05, ..., 1.

    Returns:
        (T,) float64 in [0, 1]; all NaN when no frame has ground truth.

    Example:
        >>> success_curve(np.array([0.2, 0.6, 0.9]), np.array([0.0, 0.5, 1.0]))
        array([1.        , 0.66666667, 0.        ])
    """
    ious = np.asarray(ious, dtype=np.float64)
    ious = ious[np.isfinite(ious)]
    if ious.size == 0:
        return np.full(len(thresholds), np.nan)
    return (ious[None, :] > np.asarray(thresholds, dtype=np.float64)[:, None]).mean(axis=1)


def summarize(errors: np.ndarray, ious: np.ndarray) -> dict[str, float]:
    """OTB summary numbers of one sequence.

    Returns:
        ``precision_20`` (share of frames with centre error <= 20 px), ``precision_auc`` (mean
        of the 0..50 px precision curve), ``success_50`` (share with IoU > 0.5),
        ``success_auc`` (mean of the success curve), ``mean_error`` [px] and ``frames`` (frames
        with ground truth).
    """
    precision = precision_curve(errors)
    success = success_curve(ious)
    finite = np.asarray(errors)[np.isfinite(errors)]
    return {
        "precision_20": float(precision[20]),
        "precision_auc": float(precision.mean()),
        "success_50": float(success_curve(ious, np.array([0.5]))[0]),
        "success_auc": float(success.mean()),
        "mean_error": float(finite.mean()) if finite.size else float("nan"),
        "frames": int(finite.size),
    }


@dataclass(frozen=True)
class TrackResult:
    """What :func:`run_track` produced.

    Attributes:
        centers: (N, 2) float64 capture-time fixation per frame (x, y) [px], 0-based.
        states: the primary :class:`~fovea_vla.core.fixation.FixationState` of every frame.
        backend: flow backend used.
        frame_ms: (N,) float64 pipeline wall time per frame [ms].
        fixation_ms: (N,) float64 fixation controller wall time per frame [ms].
    """

    centers: np.ndarray
    states: list
    backend: str
    frame_ms: np.ndarray
    fixation_ms: np.ndarray


def track_config(backend: str = "dis", preset: str = "medium", scale: float = 1.0):
    """The pipeline configuration of ``track``: pursuit only, 4-px flow grid.

    The defaults favour small slow targets: DIS ``medium`` at full resolution resolves a
    17-px-wide pedestrian walking 1 px/frame, which the pipeline's own ``ultrafast`` at half
    scale smooths away.
    """
    from fovea_vla.core.fixation import FixationConfig
    from fovea_vla.core.flow import FlowConfig
    from fovea_vla.core.pipeline import PipelineConfig

    return PipelineConfig(
        flow=FlowConfig(backend=backend, grid=4, preset=preset, scale=scale),
        fixation=FixationConfig(saccade_rate_hz=0.0, saccade_events=()),
    )


def run_track(frames, init_box: tuple[float, float, float, float], cfg=None, fps: float = 30.0) -> TrackResult:
    """Run the pipeline's pursuit over frames from an initial OTB box.

    Args:
        frames: iterable of (H, W, 3) uint8 RGB frames (or objects with an ``rgb`` attribute,
            such as :class:`~fovea_vla.core.sources.SourceFrame`).
        init_box: (x, y, w, h) OTB box on the first frame (1-based).
        cfg: pipeline configuration; :func:`track_config` when None.
        fps: frame rate giving the capture stamps [Hz].

    Returns:
        The per-frame fixations and timings.
    """
    from fovea_vla.core.frames import Frame
    from fovea_vla.core.pipeline import FoveaPipeline

    pipeline = FoveaPipeline(cfg or track_config())
    start = box_centers(np.asarray(init_box, dtype=np.float64))[0]
    pipeline.start_pursuit(float(start[0]), float(start[1]))
    centers, states, frame_ms, fixation_ms = [], [], [], []
    for index, item in enumerate(frames):
        rgb = getattr(item, "rgb", item)
        t = time.perf_counter()
        out = pipeline.process(Frame(rgb=rgb, stamp_ns=round(index * 1e9 / fps), frame_id="camera"))
        frame_ms.append((time.perf_counter() - t) * 1e3)
        fixation_ms.append(out.timing_ms["fixation"])
        states.append(out.fixation)
        centers.append((out.fixation.filtered_x, out.fixation.filtered_y))
    backend = pipeline.backends["flow"].name if "flow" in pipeline.backends else "none"
    return TrackResult(
        centers=np.asarray(centers, dtype=np.float64).reshape(-1, 2),
        states=states,
        backend=backend,
        frame_ms=np.asarray(frame_ms),
        fixation_ms=np.asarray(fixation_ms),
    )


def _open_frames(path: Path, fps: float):
    from fovea_vla.core.sources import IMAGE_SUFFIXES, ImageFolderSource, VideoSource

    if path.is_dir():
        has_images = any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir())
        # OTB sequence folders keep their frames in img/.
        folder = path / "img" if not has_images and (path / "img").is_dir() else path
        return ImageFolderSource(folder, fps=fps), fps
    source = VideoSource(path)
    return source, source.nominal_fps or fps


def _parse_box(text: str) -> tuple[float, float, float, float]:
    values = [float(v) for v in re.split(r"[,\s]+", text.strip()) if v]
    if len(values) != 4 or values[2] <= 0 or values[3] <= 0:
        raise ValueError(f"--init {text!r}: expected x,y,w,h with w, h > 0")
    return tuple(values)


def cmd_track(args) -> int:
    """The ``track`` subcommand (arguments: ``fovea_vla.cli``); returns the exit status."""
    try:
        gt = load_otb_groundtruth(args.gt) if args.gt else None
        if args.init:
            init = _parse_box(args.init)
        elif gt is not None and len(gt):
            init = tuple(gt[0])
        else:
            raise ValueError("--init x,y,w,h is needed without --gt")
        source, fps = _open_frames(Path(args.source), args.fps)
        cfg = track_config(args.backend, args.preset, args.scale)
    except (OSError, ValueError) as exc:
        print(f"[track] error: {exc}", file=sys.stderr)
        return 2
    with source:
        result = run_track(source, init, cfg, fps)
    count = len(result.centers)
    flow = f"flow backend {result.backend} (preset {args.preset}, scale {args.scale:g})"
    print(f"[track] {source.name}: {count} frames, {flow}")
    errors = ious = None
    if gt is not None:
        if len(gt) < count:
            print(f"[track] warning: ground truth has {len(gt)} boxes for {count} frames; scoring {len(gt)}")
        n = min(len(gt), count)
        errors = center_error(result.centers[:n], gt[:n])
        ious = box_iou(boxes_at(result.centers[:n], init[2:]), gt[:n])
        for index in range(n):
            state = result.states[index]
            print(
                f"frame {index + 1:4d}  centre error {errors[index]:6.1f} px  IoU {ious[index]:.2f}  "
                f"{state.mode.name.lower():7s} {state.source.name.lower()}"
            )
        summary = summarize(errors, ious)
        print(
            f"[track] precision@20 {summary['precision_20']:.3f}  "
            f"precision AUC (0-50 px) {summary['precision_auc']:.3f}  "
            f"success (IoU > 0.5) {summary['success_50']:.3f}  success AUC {summary['success_auc']:.3f}  "
            f"mean error {summary['mean_error']:.1f} px over {summary['frames']} frames"
        )
    print(
        f"[track] time per frame: pipeline median {np.median(result.frame_ms):.1f} ms, "
        f"fixation controller median {np.median(result.fixation_ms):.2f} ms"
    )
    if args.out:
        _write_csv(Path(args.out), result, errors, ious)
        print(f"[track] wrote {args.out}")
    return 0


def _write_csv(path: Path, result: TrackResult, errors, ious) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        header = ["frame", "x", "y", "published_x", "published_y", "vx", "vy", "mode", "source", "confidence"]
        writer.writerow(header + (["center_error", "iou"] if errors is not None else []))
        for index, state in enumerate(result.states):
            row = [index + 1, f"{state.filtered_x:.2f}", f"{state.filtered_y:.2f}", f"{state.x:.2f}", f"{state.y:.2f}"]
            row += [f"{state.vx:.2f}", f"{state.vy:.2f}", state.mode.name.lower(), state.source.name.lower()]
            row.append(f"{state.confidence:.3f}")
            if errors is not None:
                scored = index < len(errors)
                row += [f"{errors[index]:.2f}" if scored else "", f"{ious[index]:.3f}" if scored else ""]
            writer.writerow(row)
