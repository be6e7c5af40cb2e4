"""Planning (nnU-Net v2 style): a fingerprint of the training data, then a plan derived from it.

The fingerprint (``fingerprint.json``) records, per training case, the spacing and shape in RAS axis order,
the shape after cropping and the original orientation, plus CT foreground intensity statistics sampled from
the labelled voxels exactly as nnU-Net samples them (:mod:`aeval.data.intensity`), so the CT normalisation
equals ``nnUNetv2_plan_and_preprocess``'s on the same files. The plan (``plans.json``) fixes what
preprocessing and the network need: target spacing, normalisation, patch size and STU-Net's pool kernels,
and carries a content hash that the cache checks. A plan over several datasets is computed over the union
of their cases.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from nibabel.orientations import aff2axcodes

from aeval.data.geometry import ANISOTROPY_THRESHOLD, crop_bbox, ras_order, ras_transform, to_ras
from aeval.data.intensity import NNUNET_SEED, NNUNET_TOTAL_SAMPLES, foreground_samples, pooled_statistics
from aeval.data.label_codes import NUM_CLASSES
from aeval.dataset import DATASET_JSON, UnifiedDataset
from aeval.errors import FailureLog
from aeval.labels import FLARE22_ORGANS
from aeval.nifti import (
    check_same_geometry,
    file_stamp,
    read_image,
    read_label,
    spacing_of,
    write_text_atomic,
)
from aeval.parallel import failures_of, map_cases
from aeval.plan import CT_BODY_THRESHOLD, Plan

log = logging.getLogger(__name__)

PLAN_VERSION = 1
FINGERPRINT_VERSION = 2        # 2: nnU-Net's intensity sampling (order, seed, count); older fingerprints are redone
VOXEL_BUDGET = 128**3          # voxels per patch: STU-Net's 128^3 (the published models' patch)
NUM_POOLS = 5                  # STU-Net: six stages, downsampling in stages 1-5
MIN_BOTTLENECK = 4             # an axis is not halved below this many voxels


# --- fingerprint ---------------------------------------------------------------------------------------

def sources_digest(dataset_dirs: Sequence[Path]) -> str:
    """A hash of every training file's name, size and mtime: a fingerprint is reused while it matches."""
    entries = []
    for dataset_dir in dataset_dirs:
        dataset_dir = Path(dataset_dir)
        entries.append((str(dataset_dir.resolve()), (dataset_dir / DATASET_JSON).read_text()))
        dataset = UnifiedDataset(dataset_dir)
        for case in dataset.cases("train"):
            image, label = dataset.case_files(case)
            entries.append((case, file_stamp(image), file_stamp(label)))
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


def _fingerprint_case(job: tuple[Path, str, str, int, int]) -> tuple[dict[str, Any], np.ndarray | None]:
    dataset_dir, case, modality, n_samples, seed = job
    image_path, label_path = UnifiedDataset(dataset_dir).case_files(case)
    data, img = read_image(image_path)
    transform = ras_transform(img.affine)
    ras = to_ras(data, transform)
    bbox = crop_bbox(ras, modality, CT_BODY_THRESHOLD)
    record = {
        "dataset": UnifiedDataset(dataset_dir).name, "case": case,
        "spacing": [float(s) for s in ras_order(spacing_of(img), transform)],
        "shape": [int(n) for n in ras.shape],
        "shape_after_crop": [hi - lo for lo, hi in bbox],
        "orientation": "".join(aff2axcodes(img.affine)),
    }
    samples = None
    if label_path is not None and modality == "CT" and n_samples > 0:
        labels, label_img = read_label(label_path)
        check_same_geometry(img, label_img, label_path)
        samples = foreground_samples(data, labels, n_samples, seed)
    return record, samples


def fingerprint_datasets(dataset_dirs: list[Path], *, num_workers: int = 1,
                         max_intensity_samples: int = NNUNET_TOTAL_SAMPLES, seed: int = NNUNET_SEED
                         ) -> dict[str, Any]:
    """Spacing/shape/orientation of every training case of the unified datasets, and CT foreground
    intensity statistics pooled over their labelled CT cases (``max_intensity_samples // cases`` voxels
    per case, drawn with replacement with one seed, pooled in dataset then case-name order: nnU-Net's rule).

    Raises ``RuntimeError`` listing every unreadable case."""
    dataset_dirs = [Path(d) for d in dataset_dirs]
    datasets, jobs = [], []
    for dataset_dir in dataset_dirs:
        dataset = UnifiedDataset(dataset_dir)
        cases = dataset.cases("train")
        labelled = [c for c in cases if dataset.case_files(c)[1] is not None]
        datasets.append({**dataset.info(), "dir": str(dataset_dir.resolve()),
                         "num_cases": len(cases), "num_labelled": len(labelled)})
        jobs += [(dataset_dir, case, dataset.modality, 0, 0) for case in cases]
    labelled_ct = sum(d["num_labelled"] for d in datasets if d["modality"] == "CT")
    per_case = int(max_intensity_samples) // labelled_ct if labelled_ct else 0
    jobs = [(d, c, m, per_case, seed) for d, c, m, _, _ in jobs]
    results = map_cases(_fingerprint_case, jobs, num_workers=num_workers, context="spawn",
                        path_of=lambda job: UnifiedDataset(job[0]).image(job[1]), description="fingerprint")
    failures = FailureLog(quiet=True)
    for result in failures_of(results):
        failures.add(result.as_error())
    if failures.failures:
        raise RuntimeError(f"fingerprint: {failures.summary()}")
    # nnU-Net pools its cases in sorted identifier order (the float32 mean and std depend on it)
    order = sorted(range(len(jobs)), key=lambda i: (dataset_dirs.index(jobs[i][0]), jobs[i][1]))
    samples = [results[i][1] for i in order if results[i][1] is not None]
    samples = samples if sum(s.size for s in samples) else []
    return {
        "fingerprint_version": FINGERPRINT_VERSION,
        "sources_digest": sources_digest(dataset_dirs),
        "datasets": datasets,
        "axis_order": "RAS",
        "cases": [record for record, _ in results],
        "intensity": {"CT": pooled_statistics(samples)} if samples else {},
        "intensity_sampling": {"max_samples": int(max_intensity_samples), "seed": seed, "rule": "nnunetv2"},
    }


# --- plan rules ----------------------------------------------------------------------------------------

def target_spacing(spacings: np.ndarray, shapes: np.ndarray,
                   anisotropy_threshold: float = ANISOTROPY_THRESHOLD) -> list[float]:
    """nnU-Net's rule: the per-axis median spacing; when the coarsest axis is more than ``threshold`` times
    coarser than the others and has ``threshold`` times fewer voxels, that axis takes the 10th percentile
    of its spacings instead (but never finer than the other axes)."""
    spacings, shapes = np.asarray(spacings, dtype=float), np.asarray(shapes, dtype=float)
    target = np.percentile(spacings, 50, axis=0)
    median_shape = np.percentile(shapes, 50, axis=0)
    worst = int(np.argmax(target))
    others = [a for a in range(3) if a != worst]
    anisotropic_spacing = target[worst] > anisotropy_threshold * max(target[others])
    anisotropic_voxels = median_shape[worst] * anisotropy_threshold < min(median_shape[others])
    if anisotropic_spacing and anisotropic_voxels:
        low_res = float(np.percentile(spacings[:, worst], 10))
        if low_res < max(target[others]):
            low_res = max(target[others]) + 1e-5
        target[worst] = low_res
    return [float(s) for s in target]


def pool_kernels(patch_size: Sequence[int], spacing: Sequence[float], num_pools: int = NUM_POOLS,
                 min_size: int = MIN_BOTTLENECK) -> list[list[int]]:
    """STU-Net's ``num_pools`` stride triples. At each stage an axis is halved when it stays >= ``min_size``
    and its current spacing is less than twice the finest halvable axis' (so coarse axes wait until the
    others catch up, as in nnU-Net); otherwise it keeps stride 1."""
    size = np.array(patch_size, dtype=float)
    current = np.array(spacing, dtype=float)
    pools = []
    for _ in range(num_pools):
        halvable = size / 2 >= min_size
        stride = [1, 1, 1]
        if halvable.any():
            finest = current[halvable].min()
            stride = [2 if halvable[a] and current[a] / finest < 2 else 1 for a in range(3)]
        size /= stride
        current *= stride
        pools.append(stride)
    return pools


def _divisors(pools: list[list[int]]) -> np.ndarray:
    return np.prod(np.asarray(pools), axis=0)


def divisible_patch(patch_size: Sequence[int], spacing: Sequence[float], num_pools: int = NUM_POOLS,
                    min_size: int = MIN_BOTTLENECK) -> tuple[list[int], list[list[int]]]:
    """Round ``patch_size`` up until every axis divides by the product of its strides."""
    patch = np.asarray(patch_size, dtype=int)
    for _ in range(10):
        pools = pool_kernels(patch, spacing, num_pools, min_size)
        divisor = _divisors(pools)
        rounded = np.ceil(patch / divisor).astype(int) * divisor
        if np.array_equal(rounded, patch):
            break
        patch = rounded
    return [int(n) for n in patch], pools


def fit_patch_size(spacing: Sequence[float], median_shape: Sequence[float], voxel_budget: int = VOXEL_BUDGET,
                   num_pools: int = NUM_POOLS, min_size: int = MIN_BOTTLENECK
                   ) -> tuple[list[int], list[list[int]]]:
    """nnU-Net's search: start from a patch of equal physical extent per axis and 8x the budget, clip it to
    the median shape, then shrink the axis that is largest relative to the median shape until the patch
    (made divisible for its pools) holds at most ``voxel_budget`` voxels."""
    spacing = np.asarray(spacing, dtype=float)
    median_shape = np.maximum(np.asarray(median_shape, dtype=float), 1)
    inverse = 1 / spacing
    start = inverse / np.prod(inverse) ** (1 / 3) * (8 * voxel_budget) ** (1 / 3)
    patch = np.maximum(np.round(np.minimum(start, median_shape)), 1).astype(int)
    for _ in range(10_000):
        candidate, pools = divisible_patch(patch, spacing, num_pools, min_size)
        if np.prod(candidate) <= voxel_budget:
            return candidate, pools
        divisor = _divisors(pools)
        ratio = np.asarray(candidate) / median_shape
        shrinkable = np.asarray(candidate) > divisor
        if not shrinkable.any():
            return candidate, pools
        axis = int(np.argmax(np.where(shrinkable, ratio, -np.inf)))
        patch = np.asarray(candidate)
        patch[axis] -= divisor[axis]
    raise RuntimeError("patch size search did not converge")


def _normalization(fingerprint: dict[str, Any]) -> dict[str, Any]:
    modalities = {d["modality"] for d in fingerprint["datasets"]}
    if modalities != {"CT"}:
        return {"scheme": "zscore", "why": "MR or mixed CT+MR: per-image z-score"}
    stats = fingerprint.get("intensity", {}).get("CT")
    if not stats:
        raise ValueError("CT plan needs foreground intensity statistics, but no training case has labels")
    return {"scheme": "ct", "clip": [stats["percentile_00_5"], stats["percentile_99_5"]],
            "mean": stats["mean"], "std": stats["std"],
            "why": "CT: clip to the foreground 0.5/99.5 percentiles, z-score with the foreground mean/std"}


# Bookkeeping that does not change what preprocessing produces stays out of the hash.
_NOT_HASHED = ("hash", "fingerprint_digest", "num_training_cases")


def plan_hash(plan: dict[str, Any]) -> str:
    """Content hash of everything that shapes the cache and the network."""
    content = {k: v for k, v in plan.items() if k not in _NOT_HASHED}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def make_plan(fingerprint: dict[str, Any], *, patch_size: Sequence[int] | None = None,
              voxel_budget: int = VOXEL_BUDGET, num_pools: int = NUM_POOLS,
              min_bottleneck: int = MIN_BOTTLENECK, anisotropy_threshold: float = ANISOTROPY_THRESHOLD,
              target_spacing_override: Sequence[float] | None = None) -> Plan:
    """The plan for a fingerprint (one dataset or the union of several). Axis order is RAS throughout.

    ``patch_size`` fixes the patch (rounded up to be divisible by its pools); otherwise it is searched
    for from ``voxel_budget`` and the median shape after resampling."""
    cases = fingerprint["cases"]
    if not cases:
        raise ValueError("fingerprint has no training cases")
    spacings = np.array([c["spacing"] for c in cases], dtype=float)
    cropped = np.array([c["shape_after_crop"] for c in cases], dtype=float)
    if target_spacing_override is not None:
        spacing = [float(s) for s in target_spacing_override]
    else:
        spacing = target_spacing(spacings, cropped, anisotropy_threshold)
    median_shape = np.median(cropped * spacings / np.asarray(spacing), axis=0)
    if patch_size is not None:
        patch, pools = divisible_patch(patch_size, spacing, num_pools, min_bottleneck)
    else:
        patch, pools = fit_patch_size(spacing, median_shape, voxel_budget, num_pools, min_bottleneck)
    plan = {
        "plan_version": PLAN_VERSION,
        "datasets": [{k: d[k] for k in ("name", "modality", "label_system")}
                     for d in fingerprint["datasets"]],
        "fingerprint_digest": fingerprint["sources_digest"],
        "num_training_cases": len(cases),
        "axis_order": "RAS",
        "label_space": "flare22",
        "num_classes": NUM_CLASSES,
        "class_names": ["background", *FLARE22_ORGANS],
        "target_spacing": spacing,
        "anisotropic": bool(max(spacing) / min(spacing) > anisotropy_threshold),
        "median_shape_after_resampling": [float(n) for n in median_shape],
        "normalization": _normalization(fingerprint),
        "crop": {"ct_threshold": CT_BODY_THRESHOLD, "other": "nonzero"},
        "voxel_budget": int(voxel_budget),
        "patch_size": patch,
        "patch_size_requested": [int(n) for n in patch_size] if patch_size is not None else None,
        "pool_op_kernel_sizes": pools,
        "conv_kernel_sizes": [[3, 3, 3]] * (num_pools + 1),
    }
    plan["hash"] = plan_hash(plan)
    return Plan.from_dict(plan)


def plan_datasets(names: list[str], data_root: str | os.PathLike, preprocessed_root: str | os.PathLike,
                  plan_name: str | None = None, num_workers: int = 1,
                  intensity_samples: int = NNUNET_TOTAL_SAMPLES, **overrides: Any) -> Path:
    """Fingerprint (reused while the source files and the sampling are unchanged) and plan the union of
    ``names``; writes ``fingerprint.json`` and ``plans.json`` atomically into ``{preprocessed_root}/{plan_name}``
    (default name: the dataset names joined by ``+``) and returns that folder. ``intensity_samples``: CT
    foreground voxels sampled in all (nnU-Net's 1e8 gives nnU-Net's statistics; fewer is faster)."""
    if int(intensity_samples) < 1:
        raise ValueError(f"plan.intensity_samples={intensity_samples}: it must be a positive number of voxels")
    dataset_dirs = [Path(data_root) / name for name in names]
    for dataset_dir in dataset_dirs:
        if not UnifiedDataset(dataset_dir).exists():
            raise FileNotFoundError(f"{dataset_dir}: no {DATASET_JSON} (convert the dataset first)")
    plan_dir = Path(preprocessed_root) / (plan_name or "+".join(names))
    fingerprint_path = plan_dir / "fingerprint.json"
    fingerprint = None
    if fingerprint_path.exists():
        try:
            fingerprint = json.loads(fingerprint_path.read_text())
        except ValueError:
            fingerprint = None
        sampling = {"max_samples": int(intensity_samples), "seed": NNUNET_SEED, "rule": "nnunetv2"}
        if fingerprint and (fingerprint.get("sources_digest") != sources_digest(dataset_dirs)
                            or fingerprint.get("fingerprint_version") != FINGERPRINT_VERSION
                            or fingerprint.get("intensity_sampling") != sampling):
            fingerprint = None
    if fingerprint is None:
        fingerprint = fingerprint_datasets(dataset_dirs, num_workers=num_workers,
                                           max_intensity_samples=int(intensity_samples))
        write_text_atomic(fingerprint_path, json.dumps(fingerprint, indent=1))
    plan = make_plan(fingerprint, **overrides)
    plans_path = plan_dir / "plans.json"
    previous = json.loads(plans_path.read_text()) if plans_path.exists() else {}
    if previous.get("hash") != plan.hash:
        write_text_atomic(plans_path, plan.to_json())
    log.info("plan %s: spacing %s, patch %s, normalisation %s -> %s", plan_dir.name, list(plan.target_spacing),
             list(plan.patch_size), plan.normalization["scheme"], plans_path)
    return plan_dir
