"""``fovea-vla track``: OTB scoring functions, and pursuit on the real OTB Crossing sequence."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest

from fovea_vla.cli import main
from fovea_vla.core.sources import ImageFolderSource
from fovea_vla.track_cli import (
    box_centers,
    box_iou,
    boxes_at,
    center_error,
    load_otb_groundtruth,
    precision_curve,
    run_track,
    success_curve,
    summarize,
    track_config,
)

CROSSING = "pyECO/sequences/Crossing"


def test_load_otb_groundtruth_any_separator(tmp_path):
    path = tmp_path / "gt.txt"
    path.write_text("205\t151\t17\t50\n202,150,19,49\n\n 1 2  3 4 \nNaN,NaN,NaN,NaN\n")
    boxes = load_otb_groundtruth(path)
    assert boxes.shape == (4, 4) and boxes.dtype == np.float64
    np.testing.assert_array_equal(boxes[:3], [[205, 151, 17, 50], [202, 150, 19, 49], [1, 2, 3, 4]])
    assert np.isnan(boxes[3]).all()


def test_load_otb_groundtruth_names_the_bad_line(tmp_path):
    path = tmp_path / "gt.txt"
    path.write_text("1,2,3,4\n1,2,3\n")
    with pytest.raises(ValueError, match=r"gt\.txt:2: expected 4 numbers"):
        load_otb_groundtruth(path)


def test_box_centres_are_zero_based_and_invert():
    boxes = np.array([[1.0, 1.0, 1.0, 1.0], [205.0, 151.0, 17.0, 50.0]])
    centres = box_centers(boxes)
    # A 1x1 box at the 1-based top-left pixel is the 0-based pixel (0, 0).
    np.testing.assert_array_equal(centres, [[0.0, 0.0], [212.0, 174.5]])
    np.testing.assert_allclose(boxes_at(centres, (17.0, 50.0))[1], boxes[1])


def test_center_error_and_missing_ground_truth():
    gt = np.array([[1.0, 1.0, 3.0, 5.0], [0.0, 0.0, 0.0, 0.0], [np.nan] * 4])
    errors = center_error(np.array([[4.0, 6.0], [1.0, 1.0], [1.0, 1.0]]), gt)
    assert errors[0] == pytest.approx(5.0)
    assert np.isnan(errors[1:]).all()


def test_box_iou():
    a = np.array([[0, 0, 2, 2], [0, 0, 2, 2], [0, 0, 2, 2], [0, 0, 2, 2]], dtype=float)
    b = np.array([[0, 0, 2, 2], [1, 0, 2, 2], [5, 5, 2, 2], [np.nan, 0, 2, 2]], dtype=float)
    iou = box_iou(a, b)
    np.testing.assert_allclose(iou[:3], [1.0, 1.0 / 3.0, 0.0])
    assert np.isnan(iou[3])


def test_precision_curve_counts_errors_at_most_the_threshold():
    errors = np.array([0.0, 20.0, 20.5, 60.0, np.nan])
    curve = precision_curve(errors)
    assert curve.shape == (51,)
    assert curve[0] == 0.25 and curve[20] == 0.5 and curve[21] == 0.75 and curve[50] == 0.75
    assert (np.diff(curve) >= 0).all()
    assert np.isnan(precision_curve(np.array([np.nan]))).all()


def test_success_curve_counts_overlaps_above_the_threshold():
    ious = np.array([0.5, 0.51, 1.0, 0.0])
    curve = success_curve(ious)
    assert curve.shape == (21,)
    assert curve[0] == 0.75 and curve[10] == 0.5 and curve[20] == 0.0
    assert (np.diff(curve) <= 0).all()


def test_summarize():
    summary = summarize(np.array([5.0, 25.0, np.nan]), np.array([0.6, 0.2, np.nan]))
    assert summary["precision_20"] == 0.5 and summary["success_50"] == 0.5 and summary["frames"] == 2
    assert summary["mean_error"] == 15.0
    assert summary["precision_auc"] == pytest.approx(precision_curve(np.array([5.0, 25.0])).mean())
    assert summary["success_auc"] == pytest.approx(success_curve(np.array([0.6, 0.2])).mean())


def test_pursuit_tracks_the_crossing_pedestrian(shared_data):
    """OTB Crossing (360x240, 120 frames, static camera; a pedestrian walks past a car): from the
    initial box alone, the pursuit keeps within 20 px of the centre on >= 80 % of the frames."""
    folder = shared_data / CROSSING
    gt = load_otb_groundtruth(folder / "groundtruth_rect.txt")
    with ImageFolderSource(folder / "img", fps=30.0) as source:
        result = run_track(source, tuple(gt[0]), track_config("dis"))
    assert result.backend == "dis" and len(result.centers) == len(gt) == 120
    errors = center_error(result.centers, gt)
    summary = summarize(errors, box_iou(boxes_at(result.centers, gt[0, 2:]), gt))
    assert summary["precision_20"] >= 0.80, summary
    assert summary["success_50"] >= 0.5, summary


def test_track_command_prints_scores_and_writes_csv(shared_data, tmp_path, capsys):
    folder = shared_data / CROSSING
    frames = tmp_path / "seq" / "img"
    frames.mkdir(parents=True)
    for index in range(1, 16):
        shutil.copy(folder / "img" / f"{index:04d}.jpg", frames)
    gt = tmp_path / "gt.txt"
    gt.write_text("\n".join((folder / "groundtruth_rect.txt").read_text().splitlines()[:15]))
    out = tmp_path / "trajectory.csv"
    code = main(["track", str(tmp_path / "seq"), "--gt", str(gt), "--backend", "dis", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0
    assert "flow backend dis" in text and "precision@20" in text and "success AUC" in text
    assert text.count("centre error") == 15
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 15 and rows[0]["mode"] == "pursue"
    assert float(rows[0]["center_error"]) == pytest.approx(0.0)


def test_track_command_needs_an_initial_box(tmp_path, capsys):
    assert main(["track", str(tmp_path), "--backend", "dis"]) == 2
    assert "--init" in capsys.readouterr().err
    assert main(["track", str(tmp_path), "--init", "1,2,0,4"]) == 2
