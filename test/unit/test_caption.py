"""Captions: the foveated view, event narration on generated scenes, the offline VLM path, the scheduler."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from fovea_vla.core.caption import (
    CaptionConfig,
    CaptionModelError,
    CaptionRequest,
    CaptionScheduler,
    EventNarrator,
    EventsCaptioner,
    GpuGaps,
    PipelineSnapshot,
    ViewCaptioner,
    ViewConfig,
    VlmCaptioner,
    VlmConfig,
    action_phase,
    compose_view,
    make_captioner,
    view_difference,
    view_signature,
)
from fovea_vla.core.caption.random_model import build_random_vlm
from fovea_vla.core.flow import FlowConfig
from fovea_vla.core.foveation import FoveationConfig
from fovea_vla.core.frames import Frame
from fovea_vla.core.pipeline import FoveaPipeline, PipelineConfig
from fovea_vla.core.synthetic import SyntheticScene, SyntheticSceneConfig
from fovea_vla.core.texture import TextureConfig

EE_NAMES = ("x", "y", "z", "roll", "pitch", "yaw", "gripper")


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory) -> Path:
    """A randomly initialised Idefics3 (SmolVLM family) saved like a downloaded model."""
    return build_random_vlm(tmp_path_factory.mktemp("vlm") / "tiny", "tiny", seed=0)


def _scene_frames(num_frames: int, **overrides) -> list[np.ndarray]:
    cfg = SyntheticSceneConfig(width=320, height=240, seed=5, **overrides)
    scene = SyntheticScene(cfg)
    return [scene.render(i)[0] for i in range(num_frames)]


# -- view -----------------------------------------------------------------------------------
def test_view_crops_a_square_at_the_fixation_and_keeps_it_inside_the_image():
    rgb = np.zeros((240, 320, 3), np.uint8)
    rgb[100:140, 200:240] = 255  # a white square around (219.5, 119.5)
    cfg = ViewConfig(fovea_fraction=0.5, fovea_size=64, periphery_size=80)
    view = compose_view(rgb, (219.5, 119.5), cfg)
    assert view.region == (160, 60, 120, 120)
    assert view.fovea.shape == (64, 64, 3) and view.periphery.shape == (60, 80, 3)
    assert view.fovea[24:40, 24:40].min() == 255 and view.fovea[:8].max() == 0  # the square sits in the middle
    assert view.source_size == (320, 240)
    corner = compose_view(rgb, (5.0, 300.0), cfg)
    assert corner.region == (0, 120, 120, 120)  # clamped into the image
    centre = compose_view(rgb, (float("nan"), float("nan")), cfg)
    assert centre.region == (100, 60, 120, 120)


def test_view_of_a_torch_tensor_equals_the_numpy_view():
    rgb = _scene_frames(1)[0]
    cfg = ViewConfig(fovea_size=96, periphery_size=128)
    a = compose_view(rgb, (100.0, 80.0), cfg)
    b = compose_view(torch.from_numpy(rgb), (100.0, 80.0), cfg)
    assert a.region == b.region
    np.testing.assert_array_equal(a.fovea, b.fovea)
    np.testing.assert_array_equal(a.periphery, b.periphery)


@pytest.mark.parametrize(
    ("field", "value"), [("fovea_fraction", 0.0), ("fovea_fraction", 1.5), ("fovea_size", 8), ("periphery_size", 2.5)]
)
def test_view_config_refuses_bad_values_naming_them(field, value):
    with pytest.raises(ValueError, match=f"{field}="):
        ViewConfig(**{field: value})


def test_view_difference_ignores_noise_and_gaze_and_sees_motion():
    """A still scene re-rendered with fresh sensor noise, or seen with the fovea elsewhere, stays far
    below the default threshold; objects that move by a few pixels exceed it."""
    still = _scene_frames(2, num_objects=0, noise_std=2.0)
    moving = _scene_frames(12, num_objects=2, object_speed_px_s=(200.0, 240.0), object_size_px=(30, 40))
    cfg = ViewConfig(fovea_size=128, periphery_size=160)
    default_threshold = CaptionConfig().change_threshold

    def signature(rgb, xy=(160.0, 120.0)):
        return view_signature(compose_view(rgb, xy, cfg))

    assert view_difference(signature(still[0]), signature(still[1])) < 0.25 * default_threshold
    assert view_difference(signature(still[0]), signature(still[0], (40.0, 40.0))) == 0.0  # a saccade is not news
    assert view_difference(signature(moving[0]), signature(moving[4])) > default_threshold


# -- event narration ------------------------------------------------------------------------
def test_action_phase_names_what_a_chunk_does():
    still = np.tile(np.array([0.5, 0.0, 0.3, 0, 0, 0, 0.0]), (16, 1))
    assert action_phase(still, EE_NAMES) == "holding still"
    lowering = still.copy()
    lowering[:, 2] = np.linspace(0.3, 0.2, 16)
    assert action_phase(lowering, EE_NAMES) == "lowering the arm"
    sideways = still.copy()
    sideways[:, 0] = np.linspace(0.5, 0.6, 16)
    sideways[:, 6] = np.linspace(0.0, 1.0, 16)
    assert action_phase(sideways, EE_NAMES) == "moving the arm, closing the gripper"
    joints = np.zeros((10, 8))
    joints[:, 3] = np.linspace(-2.0, -1.8, 10)
    joints[:, 7] = np.linspace(1.0, 0.0, 10)
    names = [f"joint{i}" for i in range(7)] + ["gripper"]
    assert action_phase(joints, names) == "moving the arm, opening the gripper"
    assert action_phase(np.full((4, 7), np.nan), EE_NAMES) == "unknown"
    assert action_phase(still, EE_NAMES[:3]) == "unknown"  # names do not fit the chunk


def _snapshots(frames: list[np.ndarray], pipeline: FoveaPipeline, fps: float = 30.0) -> list[PipelineSnapshot]:
    snapshots, last_cut = [], None
    for i, rgb in enumerate(frames):
        stamp = round(i * 1e9 / fps)
        out = pipeline.process(Frame(rgb=rgb, stamp_ns=stamp, frame_id="camera"))
        if out.decision == "cut":
            last_cut = stamp
        snapshots.append(
            PipelineSnapshot(
                stamp_ns=stamp,
                fixation_source=out.fixation.source.name.lower(),
                fixation_uv=(out.fixation.x / out.width, out.fixation.y / out.height),
                fixation_speed_px_s=float(np.hypot(out.fixation.vx, out.fixation.vy)),
                decision=out.decision,
                changed_fraction=out.motion.changed_fraction if out.motion else 0.0,
                seconds_since_cut=None if last_cut is None else (stamp - last_cut) * 1e-9,
                instruction="pick up the red block",
            )
        )
    return snapshots


@pytest.fixture(scope="module")
def cpu_pipeline_factory():
    def make():
        return FoveaPipeline(
            PipelineConfig(
                texture=TextureConfig(backend="torch", device="cpu"),
                flow=FlowConfig(backend="dis"),
                foveation=FoveationConfig(num_tokens=96),
            )
        )

    return make


def test_events_narrate_generated_scenes_from_pipeline_measurements(cpu_pipeline_factory):
    narrator = EventNarrator(cut_memory_s=0.2)
    still = _snapshots(_scene_frames(8, num_objects=0), cpu_pipeline_factory())
    text = narrator.narrate(still[-1])
    assert "Scene: the scene is still." in text and 'Task: "pick up the red block".' in text
    assert narrator.facts(still[-2]) == narrator.facts(still[-1])  # nothing new: no new caption

    moving = _snapshots(_scene_frames(40, num_objects=2, object_speed_px_s=(150.0, 200.0)), cpu_pipeline_factory())
    pursuits = [s for s in moving if s.fixation_source == "pursuit"]
    assert pursuits, "the pipeline never pursued the moving objects"
    assert "Gaze: following a moving target in the" in narrator.narrate(pursuits[-1])
    assert any("part of the scene is changing" in narrator.narrate(s) for s in moving)

    cut = _snapshots(_scene_frames(30, num_objects=1, scene_cut_every_s=0.5), cpu_pipeline_factory())
    cut_index = next(i for i, s in enumerate(cut) if s.decision == "cut")
    assert "scene cut" in narrator.narrate(cut[cut_index])
    assert narrator.facts(cut[cut_index - 1]) != narrator.facts(cut[cut_index])
    assert "scene cut" not in narrator.narrate(cut[cut_index + 8])  # 0.27 s later: beyond cut_memory_s


def test_events_narrate_slip_and_the_policy():
    narrator = EventNarrator()
    base = PipelineSnapshot(stamp_ns=1, policy_status="running", actions_enabled=True, action_phase="lowering the arm")
    assert "Robot: lowering the arm." in narrator.narrate(base)
    dry = PipelineSnapshot(stamp_ns=1, policy_status="running", actions_enabled=False, action_phase="moving the arm")
    assert "dry run" in narrator.narrate(dry)
    stopped = PipelineSnapshot(stamp_ns=1, policy_status="stopped: estop", actions_enabled=True)
    assert "Robot: stopped: estop." in narrator.narrate(stopped)
    assert "slipping" in narrator.narrate(PipelineSnapshot(stamp_ns=1, slip="onset"))
    assert narrator.narrate(PipelineSnapshot(stamp_ns=1, slip="cleared")) == "No pipeline data yet."


# -- the VLM through the real transformers path ------------------------------------------------
def test_vlm_loads_offline_and_captions_the_foveated_view(tiny_vlm):
    captioner = VlmCaptioner(VlmConfig(model_path=str(tiny_vlm), max_new_tokens=6))
    assert captioner.device.type == "cpu" and captioner.dtype == torch.float32
    view = compose_view(_scene_frames(1)[0], (160.0, 120.0), ViewConfig(fovea_size=96, periphery_size=128))
    prompt = captioner.prompt("push the red block", "Gaze: following a moving target.")
    assert prompt.count("<image>") == 2 and "push the red block" in prompt and "Gaze: following" in prompt
    text = captioner.caption(view.fovea, view.periphery, "push the red block", "Gaze: following a moving target.")
    assert isinstance(text, str)
    again = captioner.caption(view.fovea, view.periphery, "push the red block", "Gaze: following a moving target.")
    assert again == text  # greedy decoding: the same view gives the same caption
    assert set(captioner.last_timing_ms) == {"preprocess", "generate"}


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_gpu_gaps_open_within_the_window_after_a_frame_and_otherwise_wait_for_the_next():
    clock = FakeClock()
    gaps = GpuGaps(window_s=0.008, timeout_s=30.0, clock=clock)
    gaps.frame_done()
    clock.now += 0.005
    gaps.wait()  # inside the window: no frame needed
    clock.now += 0.010  # past the window: the next wait needs the next frame
    released = threading.Event()

    def waiter():
        gaps.wait()
        released.set()

    thread = threading.Thread(target=waiter)
    thread.start()
    assert not released.wait(0.2)  # still waiting: no frame yet
    gaps.frame_done()
    assert released.wait(30.0)
    thread.join()
    assert gaps.waits == 2 and gaps.timeouts == 0


def test_gpu_gaps_time_out_without_frames_so_captions_go_on():
    gaps = GpuGaps(window_s=0.008, timeout_s=0.01)
    gaps.wait()
    gaps.wait()
    assert gaps.waits == 2 and gaps.timeouts == 2
    with pytest.raises(ValueError):
        GpuGaps(window_s=-1.0, timeout_s=1.0)


def test_vlm_waits_for_a_gap_before_the_prefill_and_before_every_token(tiny_vlm):
    captioner = VlmCaptioner(VlmConfig(model_path=str(tiny_vlm), max_new_tokens=5), GpuGaps(0.008, 1.0))
    assert captioner.gaps is None  # on the CPU SCHED_IDLE already yields; gaps are for a shared GPU
    gaps = captioner.gaps = GpuGaps(window_s=60.0, timeout_s=1.0)  # as on a GPU, always open
    gaps.frame_done()
    view = compose_view(_scene_frames(1)[0], (160.0, 120.0), ViewConfig(fovea_size=96, periphery_size=128))
    plain = VlmCaptioner(VlmConfig(model_path=str(tiny_vlm), max_new_tokens=5))
    text = captioner.caption(view.fovea, view.periphery, "push the red block")
    assert text == plain.caption(view.fovea, view.periphery, "push the red block")  # gating changes no token
    # One wait for the prefill, one per decoding step (every step's logits; at least one, at most max_new_tokens).
    assert 2 <= gaps.waits <= 1 + 5


def test_missing_or_incomplete_model_folders_are_clear_errors(tmp_path):
    with pytest.raises(CaptionModelError, match="does not exist"):
        VlmCaptioner(VlmConfig(model_path=str(tmp_path / "nowhere")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CaptionModelError, match=r"lacks config\.json"):
        VlmCaptioner(VlmConfig(model_path=str(tmp_path / "empty")))


@pytest.mark.parametrize(
    ("field", "value"),
    [("model_path", ""), ("device", "tpu"), ("dtype", "int8"), ("max_new_tokens", 0), ("prompt", "no placeholder")],
)
def test_vlm_config_refuses_bad_values_naming_them(field, value):
    kwargs = {"model_path": "/models/smolvlm", field: value}
    with pytest.raises(ValueError, match=f"{field}="):
        VlmConfig(**kwargs)


def test_backend_selection_falls_back_to_events_with_a_reason(tiny_vlm, tmp_path):
    captioner, reason = make_captioner(CaptionConfig())
    assert isinstance(captioner, EventsCaptioner) and "no model folder" in reason
    missing = VlmConfig(model_path=str(tmp_path / "missing"))
    captioner, reason = make_captioner(CaptionConfig(backend="vlm", vlm=missing))
    assert isinstance(captioner, EventsCaptioner)
    assert str(tmp_path / "missing") in reason and "event narration" in reason
    captioner, reason = make_captioner(CaptionConfig(backend="auto", vlm=VlmConfig(model_path=str(tiny_vlm))))
    assert isinstance(captioner, ViewCaptioner) and "cpu" in reason
    captioner, _ = make_captioner(CaptionConfig(backend="events", vlm=VlmConfig(model_path=str(tiny_vlm))))
    assert isinstance(captioner, EventsCaptioner)
    with pytest.raises(ValueError, match="backend="):
        CaptionConfig(backend="gpt")


# -- scheduling -----------------------------------------------------------------------------
class _Collector:
    def __init__(self):
        self.results, self.errors = [], []
        self.done = threading.Event()

    def caption(self, result):
        self.results.append(result)
        self.done.set()

    def error(self, exc):
        self.errors.append(exc)
        self.done.set()

    def wait(self):
        assert self.done.wait(60.0)
        self.done.clear()


def _view_request(rgb, xy=(160.0, 120.0), instruction="push the red block", stamp_ns=1):
    view = compose_view(rgb, xy, ViewConfig(fovea_size=96, periphery_size=128))
    snapshot = PipelineSnapshot(stamp_ns=stamp_ns, fixation_source="pursuit", instruction=instruction)
    return CaptionRequest(snapshot=snapshot, view=view, view_stamp_ns=stamp_ns, frame_id="camera", fixation_xy=xy)


def test_an_unchanged_scene_gets_no_new_vlm_call(tiny_vlm):
    captioner, _ = make_captioner(CaptionConfig(vlm=VlmConfig(model_path=str(tiny_vlm), max_new_tokens=4)))
    collector = _Collector()
    scheduler = CaptionScheduler(captioner, collector.caption, collector.error)
    still = _scene_frames(3, num_objects=0, noise_std=2.0)
    assert scheduler.offer(_view_request(still[0], stamp_ns=10)) == "started"
    collector.wait()
    scheduler.wait_idle(10.0)
    # Fresh frames of the same still scene (new sensor noise): no new model call.
    assert scheduler.offer(_view_request(still[1], stamp_ns=20)) == "unchanged"
    assert scheduler.offer(_view_request(still[2], stamp_ns=30)) == "unchanged"
    assert scheduler.offer(_view_request(still[2], (40.0, 40.0), stamp_ns=35)) == "unchanged"  # only the gaze moved
    # A new instruction is news even in a still scene, and so is motion.
    assert scheduler.offer(_view_request(still[2], instruction="push the blue block", stamp_ns=40)) == "started"
    collector.wait()
    scheduler.wait_idle(10.0)
    moving = _scene_frames(5, num_objects=2, object_speed_px_s=(200.0, 240.0), object_size_px=(30, 40))
    assert scheduler.offer(_view_request(moving[4], instruction="push the blue block", stamp_ns=50)) == "started"
    collector.wait()
    scheduler.close()
    assert scheduler.counters["captions"] == 3 and scheduler.counters["unchanged"] == 3
    assert [r.stamp_ns for r in collector.results] == [10, 40, 50]  # each caption carries its frame's stamp
    assert {r.kind for r in collector.results} == {"vlm"} and collector.errors == []


class _GatedCaptioner(EventsCaptioner):
    """Event narration that waits for the test to let it finish, or fails when told to."""

    def __init__(self):
        super().__init__(EventNarrator())
        self.gate = threading.Event()
        self.fail = False

    def describe(self, request):
        self.gate.wait(60.0)
        if self.fail:
            raise RuntimeError("model crashed")
        return super().describe(request)


def test_scheduler_never_runs_two_captions_at_once_and_survives_errors():
    captioner = _GatedCaptioner()
    collector = _Collector()
    scheduler = CaptionScheduler(captioner, collector.caption, collector.error)
    first = CaptionRequest(snapshot=PipelineSnapshot(stamp_ns=1, decision="static"))
    second = CaptionRequest(snapshot=PipelineSnapshot(stamp_ns=2, decision="partial", changed_fraction=0.2))
    assert scheduler.offer(None) == "no_input"
    assert scheduler.offer(first) == "started"
    assert scheduler.offer(second) == "busy"  # the slow caption lowers the caption rate, nothing queues
    captioner.gate.set()
    collector.wait()
    scheduler.wait_idle(10.0)
    assert scheduler.offer(first) == "unchanged"
    captioner.fail = True
    assert scheduler.offer(second) == "started"
    collector.wait()
    scheduler.wait_idle(10.0)
    assert len(collector.errors) == 1 and scheduler.counters["errors"] == 1
    captioner.fail = False
    assert scheduler.offer(second) == "started"  # the failed request is retried
    collector.wait()
    scheduler.close()
    assert [r.stamp_ns for r in collector.results] == [1, 2]
    assert scheduler.last.text.startswith("Scene: part of the scene is changing")
