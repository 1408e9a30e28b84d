"""``fovea-vla flow`` and ``fovea-vla flow-eval``: optical flow on image files and against ground truth.

``flow`` runs one backend on one image pair and writes the field (``.flo``) and a Middlebury
colour visualisation. ``flow-eval`` finds every frame pair with ground truth under a folder and
prints endpoint error (EPE) and the 3-pixel outlier rate per pair, backend and preset. Recognised
layouts (searched recursively; every frame folder that matches a ground-truth file gives a pair):

- Middlebury: ``flow10.flo`` with ``frame10.png``/``frame11.png`` in the same folder or in the
  same-named folder of a sibling tree (``other-gt-flow/<Seq>/flow10.flo`` +
  ``other-data[-gray]/<Seq>/frame1{0,1}.png``).
- MPI-Sintel: ``frame_%04d.flo`` with ``frame_%04d.png`` and the next frame beside its ``gt/``
  folder (``<seq>/gt/frame_0002.flo`` + ``<seq>/frame_0002.png``) or in sibling trees
  (``flow/<seq>/`` + ``clean/<seq>/``, ``final/<seq>/``).
- KITTI: ``flow_occ/%06d_10.png`` (16-bit) with ``image_2/`` (or ``colored_0/``, ``image_0/``)
  ``%06d_10.png`` and ``%06d_11.png``.

Nothing here imports rclpy: the commands work on machines without ROS.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from fovea_vla.core.flow.base import (
    FLOW_BACKENDS,
    FLOW_PRESETS,
    FLOW_UNKNOWN_THRESHOLD,
    FlowConfig,
    endpoint_error,
    flow_at_grid,
    make_flow,
)
from fovea_vla.core.flow.flo import read_flo, read_kitti_flow_png, write_flo
from fovea_vla.core.flow.visualize import flow_to_color

__all__ = [
    "FlowPair",
    "available_backends",
    "cmd_flow",
    "cmd_flow_eval",
    "evaluate",
    "find_pairs",
    "format_eval_table",
    "load_frame",
]

_MIDDLEBURY_GT = re.compile(r"flow(\d+)\.flo")
_SINTEL_GT = re.compile(r"frame_(\d+)\.flo")
_KITTI_GT = re.compile(r"(\d{6})_10\.png")
_KITTI_IMAGE_DIRS = ("image_2", "colored_0", "image_0")


def load_frame(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as a flow backend input.

    Args:
        path: image file (anything OpenCV reads; 16-bit images keep their top 8 bits).

    Returns:
        (H, W) uint8 for gray files, (H, W, 3) uint8 RGB otherwise (alpha dropped).

    Raises:
        FileNotFoundError: missing or unreadable file.
        ValueError: a sample type other than 8 or 16 bit unsigned.
    """
    # Checked first: OpenCV would log its own warning for a missing file.
    image = cv2.imread(os.fspath(path), cv2.IMREAD_UNCHANGED) if Path(path).is_file() else None
    if image is None:
        raise FileNotFoundError(f"{path}: missing or not a readable image")
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ValueError(f"{path}: unsupported image depth {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim == 3:
        code = cv2.COLOR_BGRA2RGB if image.shape[2] == 4 else cv2.COLOR_BGR2RGB
        image = cv2.cvtColor(image, code)
    return image


def _load_pair(prev_path: Path, cur_path: Path) -> tuple[np.ndarray, np.ndarray]:
    prev, cur = load_frame(prev_path), load_frame(cur_path)
    if prev.ndim != cur.ndim:
        # One gray, one colour: compare like with like.
        prev, cur = (cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) if f.ndim == 3 else f for f in (prev, cur))
    if prev.shape[:2] != cur.shape[:2]:
        raise ValueError(
            f"{prev_path} {prev.shape[1]}x{prev.shape[0]} and {cur_path} {cur.shape[1]}x{cur.shape[0]} differ in size"
        )
    return prev, cur


def _known(flow: np.ndarray) -> np.ndarray:
    return np.all(np.isfinite(flow) & (np.abs(flow) <= FLOW_UNKNOWN_THRESHOLD), axis=2)


# --- fovea-vla flow -------------------------------------------------------------------------


def cmd_flow(args) -> int:
    """``fovea-vla flow PREV CUR``: flow of one pair, timing, optional ``.flo`` and colour PNG.

    The backend runs twice on the pair: the first call allocates its buffers (and, on GPUs,
    compiles kernels); the second call's time is reported. ``--out`` stores exactly the backend's
    output grid: with ``--grid 4`` the ``.flo`` holds ceil(H/4) x ceil(W/4) vectors (one per 4x4
    block) in full-resolution pixels. ``--vis`` is drawn at the input size (grid cells repeated).

    Returns:
        0 on success, 1 when the backend is unavailable, 2 for bad arguments or unreadable images.
    """
    try:
        cfg = FlowConfig(backend=args.backend, preset=args.preset, scale=args.scale, grid=args.grid)
        prev, cur = _load_pair(Path(args.prev), Path(args.cur))
    except (ValueError, FileNotFoundError) as exc:
        print(f"[flow] error: {exc}", file=sys.stderr)
        return 2
    try:
        backend, selection = make_flow(cfg)
    except RuntimeError as exc:
        print(f"[flow] error: {exc}", file=sys.stderr)
        return 1
    try:
        first = backend.compute(prev, cur)
        result = backend.compute(prev, cur)
    except ValueError as exc:
        print(f"[flow] error: {exc}", file=sys.stderr)
        return 2
    h, w = prev.shape[:2]
    hg, wg = result.flow.shape[:2]
    print(
        f"[flow] backend {result.backend} ({selection.reason}); preset {cfg.preset}, scale {cfg.scale}, grid {cfg.grid}"
    )
    print(f"[flow] input {w}x{h} {'RGB' if prev.ndim == 3 else 'gray'}; field {wg}x{hg}")
    device = f", device {result.device_ms:.3f} ms" if result.device_ms is not None else ""
    print(f"[flow] time {result.timing_ms:.3f} ms (wall{device}); first call {first.timing_ms:.3f} ms")
    magnitude = np.linalg.norm(result.flow[_known(result.flow)], axis=1)
    print(f"[flow] magnitude mean {magnitude.mean():.4f} px, max {magnitude.max():.4f} px")
    if args.out:
        write_flo(args.out, result.flow)
        layout = "one vector per pixel" if cfg.grid == 1 else f"one vector per {cfg.grid}x{cfg.grid} block"
        print(f"[flow] wrote {args.out} ({wg}x{hg}, {layout}, full-resolution pixels)")
    if args.vis:
        color = flow_to_color(result.flow)
        if (hg, wg) != (h, w):
            color = np.repeat(np.repeat(color, cfg.grid, axis=0), cfg.grid, axis=1)[:h, :w]
        if not cv2.imwrite(args.vis, cv2.cvtColor(color, cv2.COLOR_RGB2BGR)):
            print(f"[flow] error: could not write {args.vis}", file=sys.stderr)
            return 2
        print(f"[flow] wrote {args.vis} (Middlebury colour coding, {w}x{h})")
    return 0


# --- ground-truth pairs ---------------------------------------------------------------------


@dataclass(frozen=True)
class FlowPair:
    """Two frames and the ground-truth flow from the first to the second.

    Attributes:
        name: short name, unique among the pairs found together (trailing path parts).
        layout: ``"middlebury"``, ``"sintel"`` or ``"kitti"``.
        prev: first frame file.
        cur: second frame file.
        gt: ``.flo`` file or KITTI 16-bit flow PNG.
    """

    name: str
    layout: str
    prev: Path
    cur: Path
    gt: Path

    def load(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """``(prev, cur, gt, valid)``: frames as :func:`load_frame`, (H, W, 2) float32 GT flow in
        pixels, and the (H, W) bool KITTI valid mask (None for ``.flo``, whose unknown values
        :func:`~fovea_vla.core.flow.base.endpoint_error` skips)."""
        prev, cur = _load_pair(self.prev, self.cur)
        if self.layout == "kitti":
            gt, valid = read_kitti_flow_png(self.gt)
        else:
            gt, valid = read_flo(self.gt), None
        if gt.shape[:2] != prev.shape[:2]:
            raise ValueError(f"{self.gt}: ground truth {gt.shape[1]}x{gt.shape[0]} does not match the frames")
        return prev, cur, gt, valid


def _frame_dirs(gt: Path) -> list[Path]:
    # Beside the GT, one level up (Sintel's gt/), and same-named folders of sibling trees.
    seq, tree = gt.parent, gt.parent.parent
    candidates = [seq, tree]
    if tree.parent.is_dir():
        candidates += [sibling / seq.name for sibling in sorted(tree.parent.iterdir()) if sibling != tree]
    return [d for d in candidates if d.is_dir()]


def _flo_pairs(gt: Path) -> list[tuple[str, Path, Path]]:
    if match := _MIDDLEBURY_GT.fullmatch(gt.name):
        layout, index, pattern = "middlebury", int(match.group(1)), "frame{:02d}.png"
    elif match := _SINTEL_GT.fullmatch(gt.name):
        layout, index, pattern = "sintel", int(match.group(1)), "frame_{:04d}.png"
    else:
        return []
    pairs = []
    for folder in _frame_dirs(gt):
        prev, cur = folder / pattern.format(index), folder / pattern.format(index + 1)
        if prev.is_file() and cur.is_file():
            pairs.append((layout, prev, cur))
    return pairs


def _kitti_pairs(gt: Path) -> list[tuple[str, Path, Path]]:
    match = _KITTI_GT.fullmatch(gt.name)
    if gt.parent.name != "flow_occ" or not match:
        return []
    pairs = []
    for image_dir in _KITTI_IMAGE_DIRS:
        folder = gt.parent.parent / image_dir
        prev, cur = folder / gt.name, folder / f"{match.group(1)}_11.png"
        if prev.is_file() and cur.is_file():
            pairs.append(("kitti", prev, cur))
    return pairs


def _short_names(paths: list[Path], root: Path) -> list[str]:
    """Per path, its shortest trailing parts (at least folder/stem) that no other path ends with."""
    parts = [p.relative_to(root).with_suffix("").parts for p in paths]
    names = []
    for i, own in enumerate(parts):
        depth = min(2, len(own))
        while depth < len(own) and any(o[-depth:] == own[-depth:] for j, o in enumerate(parts) if j != i):
            depth += 1
        names.append("/".join(own[-depth:]))
    return names


def find_pairs(root: str | os.PathLike) -> list[FlowPair]:
    """Every frame pair with ground truth under ``root`` (see the module docstring for layouts).

    Args:
        root: folder searched recursively.

    Returns:
        The pairs sorted by first-frame path; empty when none is found.
    """
    root = Path(root)
    found = []
    for dirpath, _, filenames in sorted(os.walk(root)):
        for filename in sorted(filenames):
            gt = Path(dirpath) / filename
            for layout, prev, cur in _flo_pairs(gt) if filename.endswith(".flo") else _kitti_pairs(gt):
                found.append((prev, layout, cur, gt))
    found.sort()
    names = _short_names([prev for prev, *_ in found], root)
    return [FlowPair(name, layout, prev, cur, gt) for name, (prev, layout, cur, gt) in zip(names, found, strict=True)]


# --- evaluation -----------------------------------------------------------------------------


def available_backends(names: list[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """Backends to run, and why the others are left out.

    Args:
        names: backend names asked for (``auto`` stands for the backend it resolves to); None =
            every registered backend that ``auto`` could pick here. Named backends get the
            registry's by-name check, so a backend usable only on request (e.g. a GPU backend's
            CPU path) runs when named.

    Returns:
        ``(available, skipped)``: names in order without repeats, and ``{name: reason}``.

    Raises:
        ValueError: an unknown backend name.
        RuntimeError: ``auto`` was asked for and no backend is available.
    """
    if names is None:
        report = FLOW_BACKENDS.report()
        return [n for n, (ok, _) in report.items() if ok], {n: why for n, (ok, why) in report.items() if not ok}
    for name in names:
        FLOW_BACKENDS.check_name(name, field="backends")
    resolved = dict.fromkeys(FLOW_BACKENDS.select("auto").name if n == "auto" else n for n in names)
    checks = {name: FLOW_BACKENDS.availability(name, named=True) for name in resolved}
    return [n for n, (ok, _) in checks.items() if ok], {n: why for n, (ok, why) in checks.items() if not ok}


def evaluate(
    pairs: list[FlowPair], backends: list[str], presets: list[str], scale: float = 1.0, grid: int = 1, log=None
) -> tuple[list[dict], dict[str, str]]:
    """EPE and 3-px outlier rate of each backend and preset on each pair.

    Unavailable backends are skipped with their reason. Only ``grid=1`` is compared pixel by
    pixel with the ground truth; a coarser grid is compared with the GT block-averaged onto it
    where every GT vector of the block is known.

    Args:
        pairs: from :func:`find_pairs`.
        backends: registered backend names (``auto`` is allowed and resolved once).
        presets: flow presets.
        scale: ``FlowConfig.scale``.
        grid: ``FlowConfig.grid``.
        log: optional callable receiving one progress line per skipped backend or failed pair.

    Returns:
        ``(rows, skipped)``: one row per (backend, preset, pair) with keys ``pair, layout, backend,
        preset, scale, grid, epe, outlier_3px`` (``epe`` in px, ``outlier_3px`` a fraction), and
        ``{backend: reason}`` for the skipped backends.

    Raises:
        ValueError: unknown backend name or invalid preset/scale/grid.
    """
    configs = [FlowConfig(backend=b, preset=p, scale=scale, grid=grid) for b in backends for p in presets]
    loaded = {}
    rows, skipped = [], {}
    for cfg in configs:
        if cfg.backend in skipped:
            continue
        try:
            backend, _ = make_flow(cfg)
        except RuntimeError as exc:
            skipped[cfg.backend] = str(exc)
            if log:
                log(f"skipped {cfg.backend}: {exc}")
            continue
        for pair in pairs:
            if pair not in loaded:
                loaded[pair] = pair.load()
            prev, cur, gt, valid = loaded[pair]
            try:
                flow = backend.compute(prev, cur).flow
            except ValueError as exc:  # e.g. a frame too small for the backend at this scale
                if log:
                    log(f"{backend.name}/{cfg.preset} failed on {pair.name}: {exc}")
                continue
            metrics = endpoint_error(flow, *_gt_at_grid(gt, valid, grid))
            rows.append(
                {
                    "pair": pair.name,
                    "layout": pair.layout,
                    "backend": backend.name,
                    "preset": cfg.preset,
                    "scale": cfg.scale,
                    "grid": cfg.grid,
                    **metrics,
                }
            )
    return rows, skipped


def _gt_at_grid(gt: np.ndarray, valid: np.ndarray | None, grid: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Ground truth and valid mask on the output grid: block means over fully known blocks."""
    if grid == 1:
        return gt, valid
    known = _known(gt) if valid is None else _known(gt) & valid
    known_pair = np.repeat(known[..., None], 2, axis=2).astype(np.float32)
    # A block mean of ones is exactly 1.0: the block has no unknown vector.
    block_known = flow_at_grid(known_pair, grid)[..., 0] == 1.0
    return flow_at_grid(np.where(known[..., None], gt, 0.0), grid), block_known


def mean_rows(rows: list[dict]) -> list[dict]:
    """Per (backend, preset): the mean EPE and outlier rate over the pairs, as rows with ``pair``
    ``"mean (N pairs)"``."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["backend"], row["preset"], row["scale"], row["grid"]), []).append(row)
    return [
        {
            "pair": f"mean ({len(group)} pairs)",
            "layout": "",
            "backend": backend,
            "preset": preset,
            "scale": scale,
            "grid": grid,
            "epe": float(np.mean([r["epe"] for r in group])),
            "outlier_3px": float(np.mean([r["outlier_3px"] for r in group])),
        }
        for (backend, preset, scale, grid), group in groups.items()
    ]


def format_eval_table(rows: list[dict]) -> str:
    """Markdown table of :func:`evaluate` rows followed by their per-backend/preset means."""
    lines = [
        "| pair | layout | backend | preset | scale | grid | EPE px | >3 px % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in [*rows, *mean_rows(rows)]:
        lines.append(
            f"| {row['pair']} | {row['layout']} | {row['backend']} | {row['preset']} | {row['scale']:g} | "
            f"{row['grid']} | {row['epe']:.3f} | {100 * row['outlier_3px']:.2f} |"
        )
    return "\n".join(lines)


def cmd_flow_eval(args) -> int:
    """``fovea-vla flow-eval DIR``: EPE table of backends x presets on every GT pair under DIR.

    Returns:
        0 when at least one evaluation ran, 1 when no pair or no available backend was found,
        2 for bad arguments.
    """
    pairs = find_pairs(args.dir)
    if not pairs:
        print(f"[flow-eval] no frame pair with ground truth under {args.dir}", file=sys.stderr)
        return 1
    presets = args.presets or list(FLOW_PRESETS)
    print(f"[flow-eval] {len(pairs)} pairs: " + ", ".join(f"{p.name} ({p.layout})" for p in pairs))
    try:
        backends, skipped = available_backends(args.backends)
        for name, reason in skipped.items():
            print(f"[flow-eval] skipped {name}: {reason}")
        rows, _ = evaluate(
            pairs, backends, presets, scale=args.scale, grid=args.grid, log=lambda m: print(f"[flow-eval] {m}")
        )
    except (ValueError, RuntimeError) as exc:
        print(f"[flow-eval] error: {exc}", file=sys.stderr)
        return 2
    if not rows:
        print("[flow-eval] nothing evaluated", file=sys.stderr)
        return 1
    print(format_eval_table(rows))
    return 0
