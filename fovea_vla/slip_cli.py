"""``fovea-vla slip-eval``: recall, false alarms and onset delay of the slip detector.

Generates slip and no-slip sequences (:mod:`fovea_vla.core.slip_sequences`: real background,
arm motion, camera shake, lighting flicker, sensor noise), runs a flow backend on a crop around
the gripper of every frame pair (:func:`~fovea_vla.core.slip.slip_crop`) and the
:class:`~fovea_vla.core.slip.SlipDetector` on its flow, and scores the events against the ground
truth:

- recall: share of slip sequences with an ONSET between the true onset and ``MATCH_TOLERANCE``
  frames after the slip ended;
- false alarms per 1,000 frames: every other ONSET, over the frames outside those windows
  (no-slip sequences, the frames before an onset and after a slip ended);
- onset delay: frames from the true onset (the first frame the object moved relative to the
  gripper) to the ONSET event, median and 90th percentile over the detected slips.

Measured with the default detector on the 8 default backgrounds (frames of video03), 60-frame
sequences, seed 1000, half slip (peak 0.3-1.5 px/frame), flow at scale 1 and grid 1 on a crop of
about 120x115 px, on a 2-core x86 Xeon (CPU only); time per frame pair is the median:

=========================  =========  ======  ================  =============  ==================
flow                       sequences  recall  false alarms      delay med/p90  flow + detector
=========================  =========  ======  ================  =============  ==================
dis ``slow``               200        1.000   0 in 10608 fr.    1 / 2          5.6 + 1.1 ms
torch ``medium`` (CPU)     100        1.000   0 in 5302 fr.     1.5 / 2        11.4 + 1.2 ms
dis ``medium``             100        0.760   6.8 per 1000 fr.  2 / 3          1.7 + 1.1 ms
=========================  =========  ======  ================  =============  ==================

DIS ``medium`` stops refining at half resolution, and its flow on the thin gripper parts takes
up part of the background's motion (|relative| p99 0.29 px/frame on still grasps, against 0.09
for ``slow`` and 0.13 for ``torch``), so it is not accurate enough for sub-pixel slip.

Nothing here imports rclpy.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np

from fovea_vla.core.flow.base import FlowConfig
from fovea_vla.core.slip import SlipConfig, SlipState
from fovea_vla.core.slip_sequences import SlipSequence, SlipSequenceConfig, make_sequence, synthetic_background
from fovea_vla.core.slip_stage import Grasp, SlipStage, SlipStageConfig

__all__ = [
    "DEFAULT_BACKGROUND",
    "MATCH_TOLERANCE",
    "SequenceResult",
    "cmd_slip_eval",
    "evaluate",
    "format_summary",
    "load_backgrounds",
    "run_sequence",
    "summarize",
]

REPO = Path(__file__).resolve().parents[1]
# Frames of the real roadside video (bgslibrary) in ../shared/data, or FOVEA_SHARED_DATA.
DEFAULT_BACKGROUND = (
    Path(os.environ.get("FOVEA_SHARED_DATA", REPO.parent / "shared" / "data")) / "bgslibrary/dataset/video03.avi"
)
# An ONSET up to this many frames after the slip stopped still counts as its detection.
MATCH_TOLERANCE = 2
# Context [px] around the gripper regions of the flow crop (DIS patches are 8 px, plus shake).
CROP_MARGIN = 16
# Frames taken from a background video, evenly spread.
VIDEO_BACKGROUNDS = 8
FPS = 30.0


@dataclass
class SequenceResult:
    """Events of one sequence and the timing of its frames.

    Attributes:
        onsets: frame indices with an ONSET event.
        clears: frame indices with a CLEARED event.
        truth_onset: true onset frame, None for a control.
        truth_end: first frame after the slip (the sequence length when it lasts to the end).
        frames: frame pairs evaluated (F - 1).
        background_magnitudes: |relative motion| [px/frame] on frames outside the slip window.
        flow_ms: flow time per pair [ms].
        detector_ms: detector time per pair [ms].
    """

    onsets: list[int]
    clears: list[int]
    truth_onset: int | None
    truth_end: int | None
    frames: int
    background_magnitudes: list[float]
    flow_ms: list[float]
    detector_ms: list[float]

    def in_window(self, frame: int) -> bool:
        """Frame lies in the slip's matching window ``[onset, end + MATCH_TOLERANCE)``."""
        return self.truth_onset is not None and self.truth_onset <= frame < self.truth_end + MATCH_TOLERANCE


def load_backgrounds(path: str | os.PathLike | None) -> tuple[list[np.ndarray], str]:
    """Grey background images from an image or a video file.

    Args:
        path: image (one background) or video (``VIDEO_BACKGROUNDS`` frames spread over it);
            None for :data:`DEFAULT_BACKGROUND`, or, when that is missing, the built-in
            synthetic texture.

    Returns:
        ``(backgrounds, description)``: (H, W) uint8 images and where they came from.

    Raises:
        FileNotFoundError: an explicit path that cannot be read.
    """
    if path is None:
        if not DEFAULT_BACKGROUND.is_file():
            return [synthetic_background(seed=k) for k in range(4)], (
                f"synthetic texture ({DEFAULT_BACKGROUND} not found; real backgrounds are more telling)"
            )
        path = DEFAULT_BACKGROUND
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: background not found")
    image = cv2.imread(os.fspath(path), cv2.IMREAD_GRAYSCALE)
    if image is not None:
        return [image], os.fspath(path)
    capture = cv2.VideoCapture(os.fspath(path))
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    frames = []
    # Evenly spread starts of VIDEO_BACKGROUNDS equal parts: the reported frame count of some
    # containers overshoots by one, so the last frame is not asked for.
    for index in np.arange(VIDEO_BACKGROUNDS) * total // VIDEO_BACKGROUNDS:
        capture.set(cv2.CAP_PROP_POS_FRAMES, int(index))
        ok, frame = capture.read()
        if ok:
            frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY))
    capture.release()
    if not frames:
        raise FileNotFoundError(f"{path}: neither an image nor a readable video")
    return frames, f"{path} ({len(frames)} frames)"


def run_sequence(seq: SlipSequence, stage: SlipStage) -> SequenceResult:
    """Run the pipeline's slip stage over one sequence (gripper closed throughout).

    Per pair, the stage computes flow on a crop around the regions of the first frame, with the
    ``cur`` crop brightness-matched to ``prev``, and runs the detector on it with both full frames
    for its texture and warp tests (:class:`~fovea_vla.core.slip_stage.SlipStage`). No camera
    motion is given: the generated shake is a translation, which the relative motion cancels.

    Args:
        seq: a generated sequence.
        stage: the slip stage (reset first); its config decides flow and events.

    Returns:
        The events and timings; frame indices are those of ``cur`` in each pair.
    """
    stage.reset()
    frames = seq.frames
    end = seq.stop if seq.stop is not None else len(frames)
    result = SequenceResult([], [], seq.onset, end if seq.onset is not None else None, len(frames) - 1, [], [], [])
    for i in range(1, len(frames)):
        grasp = Grasp(tuple(map(tuple, seq.gripper_regions[i - 1])), tuple(seq.object_region[i - 1]), True)
        event = stage.update(frames[i - 1], frames[i], grasp, stamp_s=i / FPS)
        result.detector_ms.append(stage.timing_ms.get("slip", 0.0))
        result.flow_ms.append(stage.timing_ms.get("slip_flow", 0.0))
        if event is not None and event.state != SlipState.ONGOING:
            (result.onsets if event.state == SlipState.ONSET else result.clears).append(i)
        m = stage.detector.last_measurement
        if m is not None and m.valid and not result.in_window(i):
            result.background_magnitudes.append(m.magnitude)
    return result


def summarize(results: list[SequenceResult]) -> dict:
    """Recall, false alarms per 1,000 frames and onset delays of a list of sequence results."""
    detected, delays, false_alarms, background_frames = 0, [], 0, 0
    slips = [r for r in results if r.truth_onset is not None]
    for r in results:
        matched = [f for f in r.onsets if r.in_window(f)]
        false_alarms += len(r.onsets) - len(matched)
        background_frames += sum(not r.in_window(i) for i in range(1, r.frames + 1))
        if r.truth_onset is not None and matched:
            detected += 1
            delays.append(matched[0] - r.truth_onset)
    magnitudes = np.concatenate([r.background_magnitudes for r in results] + [np.zeros(0)])
    flow_ms = np.concatenate([r.flow_ms for r in results])
    detector_ms = np.concatenate([r.detector_ms for r in results])
    return {
        "sequences": len(results),
        "slip_sequences": len(slips),
        "frames": int(sum(r.frames for r in results)),
        "recall": detected / len(slips) if slips else float("nan"),
        "detected": detected,
        "false_alarms": false_alarms,
        "background_frames": background_frames,
        "false_alarms_per_1000": 1000.0 * false_alarms / max(background_frames, 1),
        "delay_median": float(np.median(delays)) if delays else float("nan"),
        "delay_p90": float(np.percentile(delays, 90)) if delays else float("nan"),
        "delays": delays,
        "background_p99_px": float(np.percentile(magnitudes, 99)) if len(magnitudes) else float("nan"),
        "flow_ms_median": float(np.median(flow_ms)),
        "detector_ms_median": float(np.median(detector_ms)),
    }


def evaluate(
    sequences: int,
    frames: int,
    *,
    backend: str = "dis",
    preset: str = "slow",
    seed: int = 0,
    backgrounds: list[np.ndarray] | None = None,
    detector_cfg: SlipConfig | None = None,
    sequence_cfg: SlipSequenceConfig | None = None,
) -> dict:
    """Generate ``sequences`` sequences (half slip, half control) and score the detector.

    Args:
        sequences: number of sequences, >= 1 (even indices are slip sequences).
        frames: frames per sequence.
        backend: flow backend name (``FlowConfig.backend``); it runs at scale 1, grid 1.
        preset: flow preset.
        seed: seed of the first sequence (sequence k has seed ``seed + k``).
        backgrounds: (H, W) uint8 images; None loads :data:`DEFAULT_BACKGROUND`.
        detector_cfg: detector settings (defaults when None).
        sequence_cfg: generator template (defaults when None); ``frames`` overrides its length.

    Returns:
        :func:`summarize`'s dict plus ``backend``, ``preset``, ``backgrounds`` and ``results``
        (the :class:`SequenceResult` list).
    """
    description = "given"
    if backgrounds is None:
        backgrounds, description = load_backgrounds(None)
    stage = SlipStage(
        SlipStageConfig(
            detector=detector_cfg or SlipConfig(),
            flow=FlowConfig(backend=backend, preset=preset, scale=1.0, grid=1),
            crop_margin_px=CROP_MARGIN,
        )
    )
    template = replace(sequence_cfg or SlipSequenceConfig(), frames=frames)
    results = []
    # One sequence at a time (as make_sequences numbers them), so memory holds one sequence.
    for k in range(sequences):
        cfg = replace(template, slip=k % 2 == 0, seed=seed + k)
        results.append(run_sequence(make_sequence(backgrounds[k % len(backgrounds)], cfg), stage))
    return {
        **summarize(results),
        "backend": stage.backend.name,
        "preset": preset,
        "backgrounds": description,
        "results": results,
    }


def cmd_slip_eval(args) -> int:
    """``fovea-vla slip-eval``: print the detector's scores on generated sequences.

    Returns:
        0 on success, 1 when the flow backend is unavailable, 2 for bad arguments or files.
    """
    try:
        backgrounds, description = load_backgrounds(args.background)
        if args.sequences < 1:
            raise ValueError(f"--sequences={args.sequences}: must be >= 1")
        sequence_cfg = SlipSequenceConfig(frames=args.frames)
    except (ValueError, FileNotFoundError) as exc:
        print(f"[slip-eval] error: {exc}", file=sys.stderr)
        return 2
    print(f"[slip-eval] backgrounds: {description}")
    try:
        start = time.perf_counter()
        summary = evaluate(
            args.sequences,
            args.frames,
            backend=args.backend,
            preset=args.preset,
            seed=args.seed,
            backgrounds=backgrounds,
            sequence_cfg=sequence_cfg,
        )
    except ValueError as exc:
        print(f"[slip-eval] error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"[slip-eval] error: {exc}", file=sys.stderr)
        return 1
    print(format_summary(summary, time.perf_counter() - start))
    return 0


def format_summary(summary: dict, seconds: float) -> str:
    """The report printed by ``slip-eval``."""
    s = summary
    return "\n".join(
        [
            f"flow: {s['backend']} {s['preset']}, scale 1, grid 1, on a crop around the gripper",
            f"sequences: {s['sequences']} ({s['slip_sequences']} slip), {s['frames']} frame pairs",
            f"recall: {s['recall']:.3f} ({s['detected']}/{s['slip_sequences']} slips detected)",
            f"false alarms: {s['false_alarms_per_1000']:.2f} per 1000 frames "
            f"({s['false_alarms']} in {s['background_frames']} frames outside slips)",
            f"onset delay [frames]: median {s['delay_median']:g}, p90 {s['delay_p90']:g}",
            f"no-slip |relative motion| p99: {s['background_p99_px']:.3f} px/frame",
            f"time per frame: flow {s['flow_ms_median']:.2f} ms, detector {s['detector_ms_median']:.2f} ms "
            f"(median); total {seconds:.1f} s",
        ]
    )
