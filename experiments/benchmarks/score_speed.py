"""Scoring speed: all 8 organs of a 512×512×~80 abdominal case with a realistic prediction, ours against
DeepMind's ``surface-distance`` and MONAI's ``compute_surface_dice(use_subvoxels=True)``, in one process.

The case is TotalSegmentator's example segmentation (../shared/data/real/example_seg.nii.gz, remapped to
the 8 A-Eval organs, resampled by nearest neighbour to 512×512×80 with the spacing scaled to match), or a
synthetic phantom of ellipsoids when that file is absent. The prediction is the ground truth shifted by
(2, -1, 1) voxels with two stray voxels of every organ at random places, the thing that makes the
reference's bounding boxes (and distance transforms) span the whole volume.

    .venv/bin/python experiments/benchmarks/score_speed.py [--repeats 3] [--record results/score_speed.md]

All three compute the same rules (mode ``aeval``: the script's tolerances and the slice crop of classes 5
and 6); the printed max |ΔNSD| shows they agree.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
from scipy import ndimage

from aeval.labels import to_aeval8
from aeval.metrics import score_case, scoring_rules
from aeval.surface import surfel_area_table

REAL_SEG = Path(__file__).resolve().parents[3] / "shared/data/real/example_seg.nii.gz"
SHAPE = (512, 512, 80)


def load_case() -> tuple[np.ndarray, tuple[float, float, float], str]:
    """Ground truth in the 8-class space at 512×512×80, its spacing, and where it came from."""
    if REAL_SEG.exists():
        import nibabel as nib

        img = nib.load(str(REAL_SEG))
        labels = to_aeval8(np.asarray(img.dataobj), "totalseg_v2")
        zoom = np.array(SHAPE) / labels.shape
        spacing = tuple(float(s) for s in np.array(img.header.get_zooms()[:3], float) / zoom)
        return ndimage.zoom(labels, zoom, order=0), spacing, f"{REAL_SEG.name} resampled to {SHAPE}"
    grid = np.stack(np.meshgrid(*(np.linspace(-1, 1, n) for n in SHAPE), indexing="ij"))
    labels = np.zeros(SHAPE, np.uint8)
    organs = [((-0.3, -0.2, 0.1), (0.35, 0.3, 0.4)), ((-0.35, 0.45, -0.2), (0.1, 0.1, 0.25)),
              ((0.4, 0.35, 0.2), (0.15, 0.15, 0.3)), ((0.05, 0.1, -0.1), (0.25, 0.06, 0.1)),
              ((-0.15, -0.05, -0.05), (0.05, 0.05, 0.12)), ((0.0, 0.35, 0.5), (0.04, 0.04, 0.45)),
              ((0.3, -0.1, 0.2), (0.2, 0.15, 0.25)), ((0.35, 0.45, -0.2), (0.1, 0.1, 0.25))]
    for label, (center, radius) in enumerate(organs, start=1):
        inside = sum(((grid[a] - center[a]) / radius[a]) ** 2 for a in range(3)) <= 1
        labels[inside] = label  # smaller organs listed later carve into larger ones
    return labels, (0.78, 0.78, 2.5), f"synthetic phantom {SHAPE} (no {REAL_SEG})"


def realistic_prediction(gt: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pred = np.roll(gt, (2, -1, 1), axis=(0, 1, 2))
    for label in range(1, 9):
        for _ in range(2):
            pred[tuple(int(rng.integers(0, s)) for s in gt.shape)] = label
    return pred


def _rule_masks(pred, gt, rule):
    """The two masks one organ is scored on under the aeval rules (None when the rules decide alone)."""
    p, g = pred == rule.label, gt == rule.label
    if not g.any() or not p.any():
        return None
    if rule.slice_crop:
        z = np.flatnonzero(g.any(axis=(0, 1)))
        if z[-1] == z[0]:
            return None
        p, g = p[:, :, z[0]:z[-1]], g[:, :, z[0]:z[-1]]
    return p, g


def deepmind_scores(pred, gt, spacing) -> dict[str, float]:
    import surface_distance as sd

    out = {}
    for rule in scoring_rules("aeval"):
        masks = _rule_masks(pred, gt, rule)
        if masks:
            distances = sd.compute_surface_distances(masks[1], masks[0], spacing)
            sd.compute_dice_coefficient(masks[1], masks[0])
            out[rule.organ] = float(sd.compute_surface_dice_at_tolerance(distances, rule.tolerance_mm))
    return out


def monai_scores(pred, gt, spacing) -> dict[str, float]:
    import torch
    from monai.metrics import compute_surface_dice

    out = {}
    for rule in scoring_rules("aeval"):
        masks = _rule_masks(pred, gt, rule)
        if masks:
            p, g = (torch.from_numpy(np.stack([~m, m])[None]) for m in masks)
            value = compute_surface_dice(p, g, [rule.tolerance_mm], spacing=spacing, use_subvoxels=True)
            out[rule.organ] = float(value.item())
    return out


def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return f"{cpu}, {os.cpu_count()} cores, load average {load}, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of ours (median); the references run once")
    parser.add_argument("--skip-monai", action="store_true")
    parser.add_argument("--record", type=Path, help="also write the result as Markdown here")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    gt, spacing, source = load_case()
    pred = realistic_prediction(gt)
    surfel_area_table(spacing)  # the per-code geometry is built once per process, like the reference's table
    ours_time, ours = timed(lambda: score_case(pred, gt, spacing, "aeval"), args.repeats)
    deepmind_time, deepmind = timed(lambda: deepmind_scores(pred, gt, spacing), 1)
    lines = [
        f"case: {source}, spacing {tuple(round(s, 4) for s in spacing)} mm, prediction: GT shifted by (2,-1,1) "
        "voxels + 2 stray voxels per organ",
        f"machine: {machine()}; date {dt.date.today().isoformat()}",
        "",
        "| scorer | seconds (8 organs, DSC+NSD) | ratio to ours | max abs NSD difference to ours |",
        "|---|---:|---:|---:|",
        f"| aeval.metrics.score_case (median of {args.repeats}) | {ours_time:.3f} | 1.0 | – |",
        f"| DeepMind surface-distance | {deepmind_time:.3f} | {deepmind_time / ours_time:.1f} | "
        f"{max(abs(ours[o]['nsd'] - v) for o, v in deepmind.items()):.2e} |",
    ]
    if not args.skip_monai:
        monai_time, monai = timed(lambda: monai_scores(pred, gt, spacing), 1)
        lines.append(f"| MONAI compute_surface_dice(use_subvoxels=True) | {monai_time:.3f} | "
                     f"{monai_time / ours_time:.1f} | {max(abs(ours[o]['nsd'] - v) for o, v in monai.items()):.2e} |")
    text = "\n".join(lines)
    print(text)
    if args.record:
        args.record.parent.mkdir(parents=True, exist_ok=True)
        note = ("Wall-clock seconds in one process; other jobs may share the machine (see the load average), "
                "so read the ratios, which are measured side by side.")
        args.record.write_text(f"# Scoring speed\n\n`python experiments/benchmarks/{Path(__file__).name}`\n\n"
                               f"{text}\n\n{note}\n")


if __name__ == "__main__":
    main()
