"""Ground-truth flow file formats: Middlebury .flo and KITTI 16-bit PNG."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from fovea_vla.core.flow.flo import read_flo, read_kitti_flow_png, write_flo


def test_flo_round_trip_keeps_values_and_unknown_marker(tmp_path):
    rng = np.random.default_rng(0)
    flow = rng.normal(0.0, 5.0, (7, 11, 2)).astype(np.float32)
    flow[2, 3] = 1e10  # "unknown" marker of Middlebury/Sintel GT
    path = tmp_path / "f.flo"
    write_flo(path, flow)
    assert path.stat().st_size == 12 + 7 * 11 * 2 * 4
    back = read_flo(path)
    assert back.dtype == np.float32 and back.shape == (7, 11, 2)
    np.testing.assert_array_equal(back, flow)
    back[0, 0] = 0.0  # returned array is writable


def test_flo_header_layout(tmp_path):
    path = tmp_path / "f.flo"
    write_flo(path, np.zeros((3, 5, 2), np.float64))
    header = path.read_bytes()[:12]
    assert np.frombuffer(header, "<f4", count=1)[0] == np.float32(202021.25)
    assert np.frombuffer(header, "<i4", count=2, offset=4).tolist() == [5, 3]  # W, then H


def test_flo_bad_magic_raises(tmp_path):
    path = tmp_path / "bad.flo"
    write_flo(path, np.zeros((2, 2, 2), np.float32))
    data = bytearray(path.read_bytes())
    data[:4] = np.float32(1.0).tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="magic"):
        read_flo(path)


def test_flo_truncated_and_short_files_raise(tmp_path):
    path = tmp_path / "cut.flo"
    write_flo(path, np.zeros((4, 4, 2), np.float32))
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(ValueError, match=r"4x4 \.flo file has 140 bytes"):
        read_flo(path)
    path.write_bytes(b"PIEH")
    with pytest.raises(ValueError, match="too short"):
        read_flo(path)


def test_write_flo_rejects_wrong_shape(tmp_path):
    with pytest.raises(ValueError, match=r"\(H, W, 2\)"):
        write_flo(tmp_path / "x.flo", np.zeros((4, 4, 3), np.float32))


def test_kitti_png_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    h, w = 9, 13
    # KITTI resolution is 1/64 px, so quantise first to compare exactly.
    flow = np.round(rng.uniform(-100.0, 100.0, (h, w, 2)) * 64.0) / 64.0
    valid = rng.random((h, w)) > 0.3
    # KITTI stores RGB = (u, v, valid); OpenCV writes BGR, so channel 0 is valid.
    bgr = np.empty((h, w, 3), np.uint16)
    bgr[..., 0] = valid
    bgr[..., 1] = flow[..., 1] * 64.0 + 2**15
    bgr[..., 2] = flow[..., 0] * 64.0 + 2**15
    path = tmp_path / "000000_10.png"
    assert cv2.imwrite(str(path), bgr)

    back, back_valid = read_kitti_flow_png(path)
    assert back.dtype == np.float32 and back.shape == (h, w, 2)
    np.testing.assert_array_equal(back_valid, valid)
    np.testing.assert_array_equal(back[valid], flow[valid].astype(np.float32))
    assert not back[~valid].any()


def test_kitti_png_rejects_8bit_and_missing(tmp_path):
    path = tmp_path / "rgb8.png"
    cv2.imwrite(str(path), np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="16-bit"):
        read_kitti_flow_png(path)
    with pytest.raises(FileNotFoundError):
        read_kitti_flow_png(tmp_path / "missing.png")


def test_read_real_middlebury_gt(shared_data):
    flow = read_flo(shared_data / "VISION-Optical-Flow/data2/other-gt-flow/RubberWhale/flow10.flo")
    assert flow.shape == (388, 584, 2)
    known = np.all(np.abs(flow) <= 1e9, axis=2)
    # SOURCES.md: 98.4% valid, max 4.6 px.
    assert 0.98 < known.mean() < 0.99
    assert 4.0 < np.linalg.norm(flow[known], axis=1).max() < 5.0
