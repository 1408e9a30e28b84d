"""Tokens through ``on_tokens``: synchronous and asynchronous encoding (``PipelineConfig.async_encoder``)."""

from __future__ import annotations

import threading

import cv2
import numpy as np

from fovea_vla.core.coherence import CoherenceConfig
from fovea_vla.core.encoder import EncoderConfig
from fovea_vla.core.foveation import FoveationConfig
from fovea_vla.core.frames import Frame
from fovea_vla.core.pipeline import FoveaPipeline, PipelineConfig, TokenUpdate
from fovea_vla.core.texture import TextureConfig, make_texture

FRAME_NS = 33_333_333


def _pipeline(async_encoder: bool, on_tokens) -> FoveaPipeline:
    # Frame-level re-encoding: every delivered token set equals a full encode of its frame
    # (token-level reuse through the worker is tested in test_coherence).
    return FoveaPipeline(
        PipelineConfig(
            texture=TextureConfig(backend="torch", device="cpu"),
            coherence=CoherenceConfig(change_threshold=0.0, reencode="all"),
            foveation=FoveationConfig(num_tokens=64),
            encoder=EncoderConfig(architecture=None, embed_dim=64, depth=2, num_heads=4, device="cpu", dtype="float32"),
            async_encoder=async_encoder,
        ),
        on_tokens=on_tokens,
    )


def _frames(count: int, static_tail: int = 0) -> list[Frame]:
    rng = np.random.default_rng(4)
    noise = rng.uniform(0, 255, (30, 40, 3)).astype(np.float32)
    background = cv2.resize(noise, (320, 240), interpolation=cv2.INTER_CUBIC).clip(0, 255).astype(np.uint8)
    images = []
    for i in range(count):
        image = background.copy()
        image[100:140, 60 + 6 * i : 100 + 6 * i] = (230, 40, 30)
        images.append(image)
    images += [images[-1]] * static_tail
    return [Frame(rgb=img, stamp_ns=(i + 1) * FRAME_NS, frame_id="camera") for i, img in enumerate(images)]


class Updates:
    """Collects TokenUpdates from any thread; ``wait_for`` blocks until a condition holds."""

    def __init__(self):
        self.items: list[TokenUpdate] = []
        self._condition = threading.Condition()

    def __call__(self, update: TokenUpdate) -> None:
        with self._condition:
            self.items.append(update)
            self._condition.notify_all()

    def wait_for(self, predicate, timeout_s: float = 30.0) -> None:
        with self._condition:
            assert self._condition.wait_for(lambda: predicate(self.items), timeout_s), "token updates never came"


def _expected_tokens(pipeline: FoveaPipeline, frame: Frame, update: TokenUpdate):
    """The encoder run on a freshly uploaded texture of ``frame`` with the update's layout."""
    reference, _ = make_texture(TextureConfig(backend="torch", device="cpu"))
    reference.upload(frame.rgb)
    layout = update.layout
    patches = reference.sample(layout.centers, layout.sizes, layout.patch_size)
    return pipeline.encoder.encode(patches, layout.centers, layout.levels, (update.width, update.height)).tokens


def test_synchronous_updates_come_inside_process_one_per_frame():
    updates = Updates()
    pipeline = _pipeline(False, updates)
    frames = _frames(3, static_tail=2)
    for frame in frames:
        output = pipeline.process(frame)
        # Delivered before process() returned, for this very frame.
        update = updates.items[-1]
        assert update.stamp_ns == frame.stamp_ns and update.tokens is output.tokens
        assert update.tokens_stamp_ns == output.tokens_stamp_ns
        if output.tokens_reused:
            assert update.tokens_stamp_ns < update.stamp_ns and update.timing_ms == {}
        else:
            assert update.tokens_stamp_ns == update.stamp_ns and "encoder" in update.timing_ms
    assert len(updates.items) == len(frames)
    assert updates.items[-1].tokens_stamp_ns == frames[2].stamp_ns  # the static tail reused frame 3's tokens
    pipeline.close()


def test_asynchronous_tokens_match_the_encoder_on_the_frame_they_name():
    updates = Updates()
    pipeline = _pipeline(True, updates)
    frames = _frames(4)
    by_stamp = {f.stamp_ns: f for f in frames}
    for frame in frames:
        pipeline.process(frame)
    # The newest patches are always encoded in the end (older ones may be skipped).
    updates.wait_for(lambda items: any(u.stamp_ns == frames[-1].stamp_ns for u in items))
    pipeline.close()
    assert len(updates.items) + pipeline.encodes_skipped == len(frames)
    assert pipeline.encoder_errors == 0
    for update in updates.items:
        assert update.tokens_stamp_ns == update.stamp_ns and update.frame_id == "camera"
        assert "encoder" in update.timing_ms
        expected = _expected_tokens(pipeline, by_stamp[update.stamp_ns], update)
        assert (update.tokens - expected).abs().max().item() <= 1e-4


class BlockedEncoder:
    """Wraps an encoder; ``encode`` waits until released, or raises once when told to."""

    def __init__(self, encoder):
        self.encoder = encoder
        self.release = threading.Event()
        self.started = threading.Event()
        self.fail_next = False

    def encode(self, *args):
        self.started.set()
        self.release.wait(30.0)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("encoder failed")
        return self.encoder.encode(*args)


def test_asynchronous_frames_never_wait_for_the_encoder_and_superseded_patches_are_skipped():
    updates = Updates()
    pipeline = _pipeline(True, updates)
    blocked = BlockedEncoder(pipeline.encoder)
    pipeline._worker._encoder = blocked
    frames = _frames(6)
    first = pipeline.process(frames[0])
    assert first.tokens is None and first.tokens_stamp_ns == 0  # nothing encoded yet
    assert blocked.started.wait(30.0)
    # The encoder holds frame 1; the frame stages go on: frames 2..6 are processed meanwhile.
    outputs = [pipeline.process(frame) for frame in frames[1:]]
    assert all(o.tokens is None for o in outputs) and not updates.items
    blocked.release.set()
    updates.wait_for(lambda items: len(items) == 2)
    # Frame 1 (in hand) and frame 6 (the newest) were encoded; frames 2..5 were superseded.
    assert [u.stamp_ns for u in updates.items] == [frames[0].stamp_ns, frames[-1].stamp_ns]
    assert pipeline.encodes_skipped == 4
    later = pipeline.process(frames[-1])  # static: reuses frame 6's tokens, stamped with this frame
    assert later.tokens_reused and later.tokens is updates.items[-1].tokens
    assert later.tokens_stamp_ns == frames[-1].stamp_ns
    pipeline.close()


def test_asynchronous_static_frames_reuse_the_delivered_tokens_with_their_own_stamp():
    updates = Updates()
    pipeline = _pipeline(True, updates)
    frames = _frames(2)
    pipeline.process(frames[0])
    pipeline.process(frames[1])
    updates.wait_for(lambda items: any(u.stamp_ns == frames[1].stamp_ns for u in items))
    static = [Frame(rgb=frames[1].rgb, stamp_ns=frames[1].stamp_ns + k * FRAME_NS, frame_id="camera") for k in (1, 2)]
    count = len(updates.items)
    for frame in static:
        output = pipeline.process(frame)
        assert output.tokens_reused
        update = updates.items[-1]
        assert update.stamp_ns == frame.stamp_ns and update.tokens_stamp_ns == frames[1].stamp_ns
        assert update.timing_ms == {}
    assert len(updates.items) == count + 2
    pipeline.close()


def test_asynchronous_encoder_error_is_counted_and_the_next_frame_still_encodes():
    updates = Updates()
    pipeline = _pipeline(True, updates)
    blocked = BlockedEncoder(pipeline.encoder)
    blocked.fail_next = True
    pipeline._worker._encoder = blocked
    frames = _frames(2)
    pipeline.process(frames[0])
    assert blocked.started.wait(30.0)
    pipeline.process(frames[1])
    blocked.release.set()
    updates.wait_for(lambda items: len(items) == 1)
    assert pipeline.encoder_errors == 1 and updates.items[0].stamp_ns == frames[1].stamp_ns
    pipeline.close()
