"""Worst-case galleries: the k worst cases of every off-diagonal cell as overlays, also to W&B when a run is on."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from aeval.dataset import UnifiedDataset
from aeval.errors import CaseError
from aeval.evidence.bootstrap import Bootstrap
from aeval.keys import CellKey
from aeval.labels import remap
from aeval.metrics import CLASS_SPACES, parse_metric_key
from aeval.reporting.cells import (
    display,
)
from aeval.reporting.figures import pyplot, save_figure, slug
from aeval.reporting.tables import TextTable
from aeval.results import predictions_dir, read_summary


def off_diagonal(key: CellKey) -> bool:
    """A cell whose test set is none of its training sets (``joint`` trains on all, so all of its cells)."""
    return key.test not in key.train.split("+")


def worst_cases(boot: Bootstrap, cell: int, k: int) -> list[tuple[str, str, float, float]]:
    """The ``k`` cases of lowest mean DSC: ``(case, worst organ, case DSC, organ DSC)``."""
    s = boot.stratum_of[cell]
    i = s.row(cell)
    weights = s.weights(boot.rule)[i]
    if np.isnan(weights).any():
        weights = s.present[i].astype(np.float64)
    dsc = np.where(weights > 0, s.dsc[i], np.nan)
    with np.errstate(invalid="ignore"):
        case_mean = np.nansum(dsc, 1) / weights.sum(1)
    order = [j for j in np.argsort(np.where(np.isnan(case_mean), np.inf, case_mean), kind="stable")
             if not np.isnan(case_mean[j])][:k]
    return [(s.cases[j], s.organs[int(np.nanargmin(dsc[j]))], float(case_mean[j]), float(np.nanmin(dsc[j])))
            for j in order]


def _slice_with_most(mask: np.ndarray, axis: int) -> int:
    other = tuple(a for a in range(3) if a != axis)
    area = mask.sum(axis=other)
    return int(np.argmax(area)) if area.any() else mask.shape[axis] // 2


def overlay_figure(image: np.ndarray, gt: np.ndarray, pred: np.ndarray, spacing: Sequence[float], title: str,
                   path: Path) -> Path:
    """Axial and coronal slices through an organ (nibabel x, y, z order): ground truth green, prediction red."""
    plt = pyplot()
    union = gt | pred
    z, y = _slice_with_most(union, 2), _slice_with_most(union, 1)
    views = (("axial", image[:, :, z], gt[:, :, z], pred[:, :, z], spacing[1] / spacing[0], f"z={z}"),
             ("coronal", image[:, y, :], gt[:, y, :], pred[:, y, :], spacing[2] / spacing[0], f"y={y}"))
    fig, axes = plt.subplots(1, 2, figsize=(10, 5.4))
    for ax, (name, img, g, p, aspect, where) in zip(axes, views, strict=True):
        low, high = np.percentile(img, [0.5, 99.5])
        ax.imshow(img.T, cmap="gray", origin="lower", vmin=low, vmax=max(high, low + 1e-6), aspect=aspect)
        for mask, color in ((g, "lime"), (p, "red")):
            if mask.any():
                ax.contourf(mask.T.astype(float), levels=[0.5, 1.5], colors=[color], alpha=0.18, origin="lower")
                ax.contour(mask.T.astype(float), levels=[0.5], colors=[color], linewidths=1.0, origin="lower")
        ax.set_title(f"{name} ({where})", fontsize=9)
        ax.set_axis_off()
    fig.suptitle(title + "  —  ground truth: green, prediction: red", fontsize=9)
    save_figure(fig, path)
    plt.close(fig)
    return path


def _case_files(results_root: Path, data_root: Path, key: CellKey, case: str) -> tuple[Path, Path, Path]:
    dataset = UnifiedDataset.at(data_root, key.test)
    return (predictions_dir(results_root, key.run_key, key.test) / f"{case}.nii.gz",
            dataset.image(case, "test"), dataset.label(case, "test"))


def _label_systems(results_root: Path, data_root: Path, key: CellKey) -> tuple[str, str]:
    summary = read_summary(results_root, key) or {}
    gt_system = summary.get("gt_labels")
    if not gt_system:  # cells scored before the summary recorded it
        gt_system = UnifiedDataset.at(data_root, key.test).label_system
    return str(summary.get("pred_labels") or "flare22"), str(gt_system)


def worst_case_gallery(boot: Bootstrap, results_root: str | os.PathLike, data_root: str | os.PathLike, k: int,
                       out_dir: Path, problems: list[str]) -> tuple[TextTable | None, list[Path], dict[str, list]]:
    """Overlay PNGs of the ``k`` worst cases of every off-diagonal cell under ``out_dir/gallery``; a case whose
    files are missing or unreadable becomes a line in ``problems``. Returns the linking table, the files and
    the images per cell (for W&B)."""
    from aeval.nifti import read_image, read_label, spacing_of

    results_root, data_root = Path(results_root), Path(data_root)
    keys = boot.table.keys
    rows, files, images = [], [], {}
    for cell in sorted(boot.stratum_of):
        key = keys[cell]
        if not off_diagonal(key):
            continue
        name = slug(key.protocol, key.train, key.model, key.run, key.test, key.metric)
        try:
            pred_system, gt_system = _label_systems(results_root, data_root, key)
        except CaseError as err:
            problems.append(str(err))
            continue
        classes = parse_metric_key(key.metric)[1]
        organs = CLASS_SPACES.get(classes, CLASS_SPACES["aeval8"])
        for case, organ, case_dsc, organ_dsc in worst_cases(boot, cell, k):
            pred_path, image_path, gt_path = _case_files(results_root, data_root, key, case)
            try:
                pred, _ = read_label(pred_path)
                gt, gt_img = read_label(gt_path)
                image, _ = read_image(image_path)
                if not pred.shape == gt.shape == image.shape:
                    raise CaseError(pred_path, f"shape {pred.shape} differs from image {image.shape} / label "
                                               f"{gt.shape}")
                label = organs.index(organ) + 1
                gt_mask = remap(gt, gt_system, classes) == label
                pred_mask = remap(pred, pred_system, classes) == label
            except CaseError as err:
                problems.append(f"gallery: {err}")
                continue
            except ValueError as err:
                problems.append(f"gallery: {pred_path}: {err}")
                continue
            title = (f"{display(key.train)} → {display(key.test)} · {display(key.model)} · {case} · worst organ "
                     f"{organ} DSC {organ_dsc:.2f} (case {case_dsc:.2f})")
            path = overlay_figure(image, gt_mask, pred_mask, spacing_of(gt_img), title,
                                  out_dir / "gallery" / name / f"{case}.png")
            files.append(path)
            images.setdefault(name, []).append((path, title))
            rows.append([display(key.train), display(key.test), display(key.model), key.run, case, organ,
                         f"{case_dsc:.2f}", f"{organ_dsc:.2f}", f"[png]({path.relative_to(out_dir).as_posix()})"])
    if not rows:
        return None, files, images
    return TextTable(f"Worst cases (k = {k}) of the off-diagonal cells", [
        "Train", "Test", "Model", "Run", "Case", "Worst organ", "case DSC", "organ DSC", "Overlay"], rows,
        ["Cases by mean DSC over their scored organs; axial and coronal slices with the most of the worst organ."]
    ), files, images


def log_gallery_to_wandb(images: Mapping[str, list], start: bool, out_dir: Path) -> bool:
    """Log the overlays to the active W&B run (or to a new offline-unless-configured one when ``start``)."""
    if not images:
        return False
    try:
        import wandb
    except ImportError:
        return False
    started = False
    if wandb.run is None:
        if not start:
            return False
        from aeval.tracking import ensure_wandb_mode

        ensure_wandb_mode()
        wandb.init(project="aeval", job_type="report", dir=str(out_dir))
        started = True
    wandb.log({f"gallery/{slug}": [wandb.Image(str(p), caption=c) for p, c in found] for slug, found in images.items()})
    if started:
        wandb.finish()
    return True
