"""``fovea-vla flow``, ``flow-eval`` and ``bench flow``, run as subprocesses on real files.

Real data: the Middlebury and Sintel pairs of ../shared/data (skipped when absent) and a small
KITTI-layout folder written here with a 16-bit ground-truth PNG.
"""

from __future__ import annotations

import doctest
import json
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from fovea_vla.core.flow import FLOW_BACKENDS, FlowConfig, endpoint_error, make_example, make_flow, visualize
from fovea_vla.core.flow.base import FLOW_UNKNOWN_THRESHOLD
from fovea_vla.core.flow.flo import read_flo, read_kitti_flow_png, write_flo
from fovea_vla.core.flow.visualize import colorwheel, flow_to_color
from fovea_vla.flow_cli import find_pairs, load_frame

REPO = Path(__file__).resolve().parents[2]
RUBBERWHALE = "VISION-Optical-Flow/data2/other-data-gray/RubberWhale"
SINTEL = "faldoi-ipol/example_data/clean/easy"
VPI_UNAVAILABLE = not FLOW_BACKENDS.availability("vpi")[0]


def _cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fovea_vla.cli", *map(str, args)], capture_output=True, text=True, cwd=REPO, timeout=240
    )


def _table(stdout: str) -> list[dict[str, str]]:
    """Rows of the first markdown table in ``stdout`` as {header: cell}."""
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True)) for line in lines[2:]]


def write_kitti_flow_png(path: Path, flow: np.ndarray, valid: np.ndarray) -> None:
    """KITTI flow GT: 16-bit PNG, R = u * 64 + 2**15, G = v * 64 + 2**15, B = valid (BGR on disk)."""
    image = np.zeros((*flow.shape[:2], 3), np.uint16)
    image[..., 2] = np.clip(np.rint(flow[..., 0] * 64 + 2**15), 0, 65535)
    image[..., 1] = np.clip(np.rint(flow[..., 1] * 64 + 2**15), 0, 65535)
    image[..., 0] = valid
    assert cv2.imwrite(str(path), image)


@pytest.fixture
def kitti_dir(tmp_path) -> Path:
    """KITTI 2015 layout with one 128x96 pair: a known (2.0, -1.0) px translation, a corner invalid."""
    root = tmp_path / "kitti" / "training"
    (root / "image_2").mkdir(parents=True)
    (root / "flow_occ").mkdir()
    prev, cur, gt = make_example(96, 128, shift=(2.0, -1.0), seed=3)
    for name, frame in (("000000_10.png", prev), ("000000_11.png", cur)):
        assert cv2.imwrite(str(root / "image_2" / name), cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR))
    valid = np.ones(gt.shape[:2], bool)
    valid[:20, :30] = False
    gt[~valid] = (50.0, 50.0)  # what an invalid pixel holds must not count
    write_kitti_flow_png(root / "flow_occ" / "000000_10.png", gt, valid)
    return tmp_path / "kitti"


# --- fovea-vla flow -------------------------------------------------------------------------


def test_flow_writes_flo_and_visualisation(shared_data, tmp_path):
    frames = shared_data / RUBBERWHALE
    out, vis = tmp_path / "rw.flo", tmp_path / "rw.png"
    proc = _cli("flow", frames / "frame10.png", frames / "frame11.png", "--backend", "dis", "--preset", "medium",
                "--out", out, "--vis", vis)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "backend dis (configured); preset medium, scale 1.0, grid 1" in proc.stdout
    assert re.search(r"time \d+\.\d+ ms \(wall\); first call \d+\.\d+ ms", proc.stdout)
    flow = read_flo(out)
    assert flow.shape == (388, 584, 2) and flow.dtype == np.float32
    # The file is the backend's field (DIS is deterministic).
    prev, cur = (load_frame(frames / f"frame{i}.png") for i in (10, 11))
    direct = make_flow(FlowConfig(backend="dis", preset="medium", scale=1.0))[0].compute(prev, cur).flow
    np.testing.assert_allclose(flow, direct, atol=1e-5)
    magnitude = np.linalg.norm(flow, axis=2)
    mean, peak = (float(x) for x in re.search(r"magnitude mean (\S+) px, max (\S+) px", proc.stdout).groups())
    assert mean == pytest.approx(magnitude.mean(), abs=1e-4) and peak == pytest.approx(magnitude.max(), abs=1e-4)
    image = cv2.imread(str(vis))
    np.testing.assert_array_equal(image, cv2.cvtColor(flow_to_color(flow), cv2.COLOR_RGB2BGR))


def test_flow_grid4_stores_the_block_field(shared_data, tmp_path):
    frames = shared_data / SINTEL
    out, vis = tmp_path / "al.flo", tmp_path / "al.png"
    proc = _cli("flow", frames / "frame_0002.png", frames / "frame_0003.png", "--backend", "dis", "--grid", "4",
                "--scale", "0.5", "--out", out, "--vis", vis)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "input 1024x436 RGB; field 256x109" in proc.stdout
    assert "(256x109, one vector per 4x4 block, full-resolution pixels)" in proc.stdout
    flow = read_flo(out)
    assert flow.shape == (109, 256, 2)
    gt_blocks = read_flo(frames / "gt/frame_0002.flo")[::4, ::4]
    assert np.abs(flow - gt_blocks).mean() < 2.0  # vectors in full-resolution pixels (mean |gt| ~ 3.6 px)
    assert cv2.imread(str(vis)).shape == (436, 1024, 3)  # drawn at the input size


def test_flow_errors_have_exit_codes(tmp_path):
    prev, cur, _ = make_example(64, 64)
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    cv2.imwrite(str(a), prev)
    cv2.imwrite(str(b), cur[:, :60])
    proc = _cli("flow", a, tmp_path / "missing.png")
    assert proc.returncode == 2 and "missing.png: missing or not a readable image" in proc.stderr
    proc = _cli("flow", a, b)
    assert proc.returncode == 2 and "differ in size" in proc.stderr
    proc = _cli("flow", a, a, "--backend", "diss")
    assert proc.returncode == 2 and "did you mean 'dis'" in proc.stderr
    proc = _cli("flow", a, a, "--preset", "turbo")
    assert proc.returncode == 2 and "flow.preset='turbo'" in proc.stderr


@pytest.mark.skipif(not VPI_UNAVAILABLE, reason="vpi is available here")
def test_flow_with_unavailable_backend_says_why(tmp_path):
    prev, _, _ = make_example(64, 64)
    cv2.imwrite(str(tmp_path / "a.png"), prev)
    proc = _cli("flow", tmp_path / "a.png", tmp_path / "a.png", "--backend", "vpi")
    assert proc.returncode == 1 and "flow backend 'vpi' is unavailable: VPI Python module" in proc.stderr


# --- pair discovery -------------------------------------------------------------------------


def test_find_pairs_on_shared_data(shared_data):
    pairs = {p.name: p for p in find_pairs(shared_data)}
    assert sorted(pairs) == ["Grove2/frame10", "RubberWhale/frame10", "easy/frame_0002"]
    assert pairs["RubberWhale/frame10"].layout == "middlebury"
    assert pairs["RubberWhale/frame10"].prev == shared_data / RUBBERWHALE / "frame10.png"
    assert pairs["easy/frame_0002"].layout == "sintel"
    assert pairs["easy/frame_0002"].cur == shared_data / SINTEL / "frame_0003.png"
    prev, _, gt, valid = pairs["easy/frame_0002"].load()
    assert prev.shape == (436, 1024, 3) and gt.shape == (436, 1024, 2) and valid is None


def test_find_pairs_official_layouts(tmp_path, kitti_dir):
    frame = np.zeros((40, 50), np.uint8)
    flow = np.zeros((40, 50, 2), np.float32)
    # Sintel training tree: flow/<seq>/ beside clean/<seq>/ and final/<seq>/.
    for folder in ("clean/alley_1", "final/alley_1", "flow/alley_1"):
        (tmp_path / "sintel" / folder).mkdir(parents=True)
    for name in ("frame_0001.png", "frame_0002.png"):
        for folder in ("clean", "final"):
            cv2.imwrite(str(tmp_path / "sintel" / folder / "alley_1" / name), frame)
    write_flo(tmp_path / "sintel/flow/alley_1/frame_0001.flo", flow)
    write_flo(tmp_path / "sintel/flow/alley_1/frame_0002.flo", flow)  # no frame_0003: no pair
    # Middlebury with frames and GT in one folder.
    (tmp_path / "mb/Venus").mkdir(parents=True)
    for name in ("frame10.png", "frame11.png"):
        cv2.imwrite(str(tmp_path / "mb/Venus" / name), frame)
    write_flo(tmp_path / "mb/Venus/flow10.flo", flow)

    pairs = find_pairs(tmp_path)
    assert [(p.name, p.layout) for p in pairs] == [
        ("image_2/000000_10", "kitti"),
        ("Venus/frame10", "middlebury"),
        ("clean/alley_1/frame_0001", "sintel"),
        ("final/alley_1/frame_0001", "sintel"),
    ]
    assert pairs[2].gt == tmp_path / "sintel/flow/alley_1/frame_0001.flo"
    assert find_pairs(tmp_path / "sintel" / "clean") == []  # frames without ground truth


def test_kitti_writer_round_trips(kitti_dir):
    flow, valid = read_kitti_flow_png(kitti_dir / "training/flow_occ/000000_10.png")
    assert valid.sum() == 96 * 128 - 20 * 30
    np.testing.assert_array_equal(flow[valid], np.tile([2.0, -1.0], (valid.sum(), 1)))


# --- fovea-vla flow-eval --------------------------------------------------------------------


def test_flow_eval_on_shared_data_matches_direct_epe(shared_data):
    proc = _cli("flow-eval", shared_data, "--backends", "dis", "--presets", "medium", "fast")
    assert proc.returncode == 0, proc.stderr
    rows = _table(proc.stdout)
    assert len(rows) == 3 * 2 + 2  # 3 pairs x 2 presets, then one mean per preset
    pairs = {p.name: p for p in find_pairs(shared_data)}
    for preset in ("medium", "fast"):
        backend = make_flow(FlowConfig(backend="dis", preset=preset, scale=1.0))[0]
        epes = []
        for name, pair in pairs.items():
            prev, cur, gt, valid = pair.load()
            expected = endpoint_error(backend.compute(prev, cur).flow, gt, valid)
            (row,) = [r for r in rows if r["pair"] == name and r["preset"] == preset]
            assert float(row["EPE px"]) == pytest.approx(expected["epe"], abs=5e-4)
            assert float(row[">3 px %"]) == pytest.approx(100 * expected["outlier_3px"], abs=5e-3)
            epes.append(expected["epe"])
        (mean,) = [r for r in rows if r["pair"] == "mean (3 pairs)" and r["preset"] == preset]
        assert float(mean["EPE px"]) == pytest.approx(np.mean(epes), abs=5e-4)


def test_flow_eval_on_kitti_layout_uses_the_valid_mask(kitti_dir):
    proc = _cli("flow-eval", kitti_dir, "--backends", "dis", "--presets", "medium")
    assert proc.returncode == 0, proc.stderr
    assert "1 pairs: image_2/000000_10 (kitti)" in proc.stdout
    (row, mean) = _table(proc.stdout)
    assert row["layout"] == "kitti" and mean["pair"] == "mean (1 pairs)"
    prev, cur, gt, valid = find_pairs(kitti_dir)[0].load()
    flow = make_flow(FlowConfig(backend="dis", preset="medium", scale=1.0))[0].compute(prev, cur).flow
    expected = endpoint_error(flow, gt, valid)["epe"]
    assert float(row["EPE px"]) == pytest.approx(expected, abs=5e-4)
    assert expected < 1.0  # a 2 px translation, with the invalid corner (GT 50 px) left out


def test_flow_eval_grid4_compares_block_means(kitti_dir):
    proc = _cli("flow-eval", kitti_dir, "--backends", "dis", "--presets", "medium", "--grid", "4")
    assert proc.returncode == 0, proc.stderr
    row = _table(proc.stdout)[0]
    assert row["grid"] == "4" and float(row["EPE px"]) < 1.0


@pytest.mark.skipif(not VPI_UNAVAILABLE, reason="vpi is available here")
def test_flow_eval_skips_unavailable_backends_with_reason(kitti_dir):
    proc = _cli("flow-eval", kitti_dir, "--backends", "vpi", "dis", "--presets", "ultrafast")
    assert proc.returncode == 0, proc.stderr
    assert "skipped vpi: VPI Python module is not installed" in proc.stdout
    assert [r["backend"] for r in _table(proc.stdout)] == ["dis", "dis"]


def test_flow_eval_errors(tmp_path, kitti_dir):
    proc = _cli("flow-eval", tmp_path / "nothing")
    assert proc.returncode == 1 and "no frame pair with ground truth" in proc.stderr
    proc = _cli("flow-eval", kitti_dir, "--backends", "diss")
    assert proc.returncode == 2 and "did you mean 'dis'" in proc.stderr


# --- fovea-vla bench flow -------------------------------------------------------------------


def test_bench_flow_with_dis_only(tmp_path, kitti_dir):
    benchmarks = REPO / "docs" / "BENCHMARKS.md"
    before = benchmarks.read_bytes() if benchmarks.exists() else None
    out = tmp_path / "bench.json"
    proc = _cli("bench", "flow", "--backends", "dis", "--presets", "ultrafast", "medium", "--resolutions", "640x480",
                "--runs", "3", "--warmup", "1", "--data", kitti_dir, "--json", out, "--no-append")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())
    assert {"machine", "settings", "skipped", "timing", "epe"} <= set(results)
    assert [(r["resolution"], r["backend"], r["preset"]) for r in results["timing"]] == [
        ("640x480", "dis", "ultrafast"),
        ("640x480", "dis", "medium"),
    ]
    for row in results["timing"]:
        assert row["wall"]["n"] == 3 and row["wall"]["p50_ms"] > 0 and row["device"] is None
    # No dis fast here: the first configuration is the baseline.
    assert results["settings"]["baseline"] == ["dis", "ultrafast"] and results["timing"][0]["speedup"] == 1.0
    assert "| x dis ultrafast |" in proc.stdout
    assert [r["pair"] for r in results["epe"]] == ["image_2/000000_10", "mean (1 pairs)"] * 2
    assert "| 640x480 | dis | ultrafast |" in proc.stdout and "| dis | medium | " in proc.stdout
    assert (benchmarks.read_bytes() if benchmarks.exists() else None) == before  # --no-append


def test_flow_commands_import_no_ros():
    code = (
        "import sys, fovea_vla.cli, fovea_vla.flow_cli, fovea_vla.bench.flow_node\n"
        "fovea_vla.cli.build_parser().parse_args(['bench', 'flow', '--runs', '1'])\n"
        "assert 'rclpy' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_bench_flow_default_configs_doctest():
    from fovea_vla.bench import flow_node

    assert doctest.testmod(flow_node).failed == 0


# --- colour coding --------------------------------------------------------------------------


def test_flow_to_color_middlebury_wheel():
    assert doctest.testmod(visualize).failed == 0
    wheel = colorwheel()
    assert wheel.shape == (55, 3) and wheel.min() == 0 and wheel.max() == 255
    flow = np.zeros((2, 3, 2), np.float32)
    flow[0, 1] = (3.0, 0.0)  # right: full red
    flow[0, 2] = (0.0, 3.0)  # down: yellow side of the wheel
    flow[1, 0] = (1.5, 0.0)  # half magnitude: half saturated
    flow[1, 1] = (2 * FLOW_UNKNOWN_THRESHOLD, 0.0)  # unknown: black, and not in the normalisation
    image = flow_to_color(flow)
    assert image.dtype == np.uint8 and image.shape == (2, 3, 3)
    assert image[0, 0].tolist() == [255, 255, 255]
    assert image[0, 1].tolist() == [255, 0, 0]
    r, g, b = image[0, 2].tolist()
    assert r == 255 and g > 200 and b == 0
    assert image[1, 0].tolist() == [255, 127, 127]
    assert image[1, 1].tolist() == [0, 0, 0]
    # Beyond max_magnitude colours are darkened to 75 %.
    assert flow_to_color(flow, max_magnitude=1.0)[0, 1].tolist() == [191, 0, 0]


def test_available_backends_selection():
    from fovea_vla.flow_cli import available_backends

    available, skipped = available_backends()
    assert "dis" in available and set(available).isdisjoint(skipped)
    assert set(available) | set(skipped) == set(FLOW_BACKENDS.names())
    assert all(reason for reason in skipped.values())
    # "auto" stands for its pick here (dis on a CPU-only machine); repeats collapse.
    if FLOW_BACKENDS.select("auto").name == "dis":
        assert available_backends(["auto", "dis"]) == (["dis"], {})
    with pytest.raises(ValueError, match="did you mean 'dis'"):
        available_backends(["diss"])
