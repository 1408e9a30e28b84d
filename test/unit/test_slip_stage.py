"""The pipeline's slip stage: crop flow + detector, and how it ends a slip when its input goes away."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fovea_vla.core.fixation import FixationConfig, FixationController
from fovea_vla.core.frames import Frame
from fovea_vla.core.pipeline import FoveaPipeline, PipelineConfig
from fovea_vla.core.slip import SlipState
from fovea_vla.core.slip_sequences import SlipSequenceConfig, make_sequence, synthetic_background
from fovea_vla.core.slip_stage import Grasp, SlipStage, SlipStageConfig
from fovea_vla.core.texture import TextureConfig


@pytest.fixture(scope="module")
def sequence():
    cfg = SlipSequenceConfig(frames=30, arm_speed_px=0.0, slip_speed_px=(0.8, 1.0), slip_stop_probability=0.0, seed=5)
    return make_sequence(synthetic_background(), cfg)


def grasp(sequence, index: int, closed: bool = True) -> Grasp:
    regions = tuple(tuple(r) for r in sequence.gripper_regions[index])
    return Grasp(regions, tuple(sequence.object_region[index]), closed)


def run_until_onset(stage: SlipStage, sequence) -> int:
    for i in range(1, len(sequence.frames)):
        event = stage.update(sequence.frames[i - 1], sequence.frames[i], grasp(sequence, i - 1), stamp_s=i / 30)
        if event is not None and event.state == SlipState.ONSET:
            return i
    raise AssertionError("no onset")


def test_stage_detects_the_onset(sequence):
    onset = run_until_onset(SlipStage(), sequence)
    assert 0 <= onset - sequence.onset <= 2


@pytest.mark.parametrize("how", ["gripper_open", "regions_off_image", "release"])
def test_an_active_slip_ends_with_cleared_when_its_input_goes_away(sequence, how):
    stage = SlipStage()
    i = run_until_onset(stage, sequence) + 1
    prev, cur = sequence.frames[i - 1], sequence.frames[i]
    if how == "gripper_open":
        event = stage.update(prev, cur, grasp(sequence, i - 1, closed=False), stamp_s=1.0)
    elif how == "regions_off_image":
        off = Grasp(((5000.0, 5000.0, 20.0, 20.0),), (5000.0, 5000.0, 10.0, 10.0), True)
        event = stage.update(prev, cur, off, stamp_s=1.0)
    else:
        event = stage.release(stamp_s=1.0)
    assert event is not None and event.state == SlipState.CLEARED
    assert not stage.detector.active
    assert stage.release(stamp_s=1.1) is None  # nothing left to clear


def test_pipeline_clears_the_slip_when_the_grasp_is_no_longer_given(sequence):
    pipeline = FoveaPipeline(
        PipelineConfig(slip=SlipStageConfig(), texture=TextureConfig(backend="torch", device="cpu"))
    )
    states = []
    for i, gray in enumerate(sequence.frames):
        given = grasp(sequence, max(i - 1, 0)) if i < 26 else None
        out = pipeline.process(Frame(rgb=np.dstack([gray] * 3), stamp_ns=i * 33_000_000, frame_id="c"), grasp=given)
        states.append(None if out.slip is None else out.slip.state)
    assert SlipState.ONSET in states[:26]
    assert states[26] == SlipState.CLEARED and states[27:] == [None] * (len(states) - 27)


def test_stage_config_requires_dense_full_resolution_flow():
    from fovea_vla.core.flow import FlowConfig

    with pytest.raises(ValueError, match="grid 1 and scale 1"):
        SlipStageConfig(flow=FlowConfig(backend="dis", grid=4, scale=1.0))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_fixation_requests_must_be_finite(bad):
    controller = FixationController(FixationConfig(), 320, 240)
    with pytest.raises(ValueError, match="finite"):
        controller.set_external(bad, 10.0, now_s=0.0)
    with pytest.raises(ValueError, match="finite"):
        controller.start_pursuit(10.0, bad, now_s=0.0)
