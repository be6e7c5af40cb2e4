"""Protocol 2 (pseudo-labelling) and the pseudo-labelled datasets that protocols 2 and 4 train on.

The protocol: round 1 trains a teacher on the labelled set(s); every further round pseudo-labels the
unlabelled pool with the previous round's model and retrains on labelled + pseudo-labelled data.

Pseudo-labelled datasets: a teacher's predictions written as a unified dataset that training reads like
any other (``imagesTr`` linked to the source images, ``labelsTr`` in the FLARE22 system, ``dataset.json``,
``splits.json`` with every labelled case in ``train``).

Two modes:

- ``all``: label every voxel of an unlabelled pool (FLARE22's 2000 CTs) with the evaluation predictor
  (sliding window, the configured test-time augmentation), in each image's own geometry.
- ``fill_missing``: complete a partially annotated dataset (WORD): its own labels are kept; the teacher fills
  only voxels the dataset leaves unlabelled with the classes it does not annotate (aorta, IVC), and splits
  its merged labels (adrenal) into the classes they stand for.

An optional confidence rule (off by default, as in the paper) drops cases whose mean maximum softmax
probability over the predicted foreground is below a threshold; it costs a second forward pass per case.
A dataset is finished when its ``dataset.json`` says ``complete``; an unfinished one resumes (cases already
predicted are kept).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from scipy import ndimage

from aeval.data.preprocess import preprocess_image
from aeval.dataset import UnifiedDataset
from aeval.errors import CaseError, FailureLog
from aeval.labels import FLARE22_ORGANS, annotated_classes, flare22_sets, remap
from aeval.models.load import LoadedModel
from aeval.nifti import load_nifti, read_label, save_nifti, write_text_atomic
from aeval.prediction import make_predictor, predict_files
from aeval.protocols import ProtocolPlan, PseudoLabelled, Round

log = logging.getLogger(__name__)

MODES = ("all", "fill_missing")
TEACHER_DIR = "teacher"          # fill_missing: the teacher's raw predictions, kept for inspection
CONFIDENCE_JSON = "confidence.json"
FLARE22 = "flare22"


def plan(cfg: DictConfig) -> ProtocolPlan:
    """Rounds of ``protocol=pseudo_label`` for ``cfg.train_sets`` (FLARE22 by default)."""
    protocol = cfg.protocol
    labelled = [str(name) for name in cfg.train_sets]
    rounds = [Round("teacher", tuple(labelled))]
    for r in range(1, int(protocol.rounds)):
        rounds.append(Round(f"student{r}", (*labelled, PseudoLabelled(str(protocol.unlabeled), "all", r - 1))))
    return ProtocolPlan(protocol.name, "+".join(labelled), rounds, [str(t) for t in protocol.test_sets])


def is_complete(dataset_dir: Path) -> bool:
    """A pseudo-label dataset whose every case was written (its dataset.json says so)."""
    try:
        meta = UnifiedDataset(dataset_dir).meta
    except CaseError:
        return False
    return bool(meta.get("pseudo_labels", {}).get("complete"))


def link_image(source: Path, target: Path) -> None:
    """The source image under the new name: a hard link (a symlink across file systems), never a copy —
    FLARE22's unlabelled pool is 2000 CTs."""
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        os.symlink(source.resolve(), target)


def case_confidence(logits: torch.Tensor) -> float:
    """Mean maximum softmax probability over the voxels predicted as foreground (1.0 when there are none)."""
    best = torch.softmax(logits.float(), dim=0).max(dim=0)
    foreground = best.indices > 0
    return float(best.values[foreground].mean()) if foreground.any() else 1.0


def lateral_split(region: np.ndarray, pair: tuple[int, int], reference: np.ndarray, affine: np.ndarray
                  ) -> np.ndarray:
    """Right/left classes for each connected component of ``region``: right when its centroid lies to the
    patient's right (larger RAS+ world x: nibabel's x grows toward the patient's right) of the centroid of
    ``reference`` (the dataset's labelled organs)."""
    right, left = pair
    out = np.zeros(region.shape, dtype=np.uint8)
    components, count = ndimage.label(region)
    centre_x = (affine[:3, :3] @ np.argwhere(reference).mean(0) + affine[:3, 3])[0] if reference.any() else 0.0
    for index, centroid in enumerate(ndimage.center_of_mass(region, components, range(1, count + 1)), start=1):
        x = (affine[:3, :3] @ np.asarray(centroid) + affine[:3, 3])[0]
        out[components == index] = right if x > centre_x else left
    return out


def _lateral_pair(classes: frozenset[int]) -> tuple[int, int] | None:
    names = {FLARE22_ORGANS[c - 1]: c for c in classes}
    rights = [n for n in names if n.endswith("_right")]
    if len(names) == 2 and len(rights) == 1 and rights[0].removesuffix("_right") + "_left" in names:
        return names[rights[0]], names[rights[0].removesuffix("_right") + "_left"]
    return None


def complete_labels(native: np.ndarray, system: str, prediction: np.ndarray, affine: np.ndarray,
                    spacing: tuple[float, ...] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """FLARE22 labels for one case of a partially annotated dataset (``native`` in ``system``) and the
    teacher's FLARE22 ``prediction`` of it.

    - labels naming one FLARE22 class keep it; labels naming none (WORD's colon, bladder, ...) become 0;
    - voxels the dataset leaves unlabelled (0) take the teacher's class when it is one the dataset does not
      annotate (WORD: aorta, IVC), else stay 0;
    - a merged label (WORD's adrenal) takes the teacher's class where it predicts one of the merged classes,
      elsewhere the class of the nearest voxel (mm) predicted as one of them; when the teacher predicts none
      of them anywhere, left/right pairs are split by side (:func:`lateral_split`).
    """
    if native.shape != prediction.shape:
        raise ValueError(f"labels {native.shape} and prediction {prediction.shape} differ in shape")
    out = remap(native, system, FLARE22)
    prediction = prediction.astype(np.uint8, copy=False)
    missing = sorted(set(range(1, len(FLARE22_ORGANS) + 1)) - annotated_classes(system))
    fill = (native == 0) & np.isin(prediction, missing)
    out[fill] = prediction[fill]
    for value, classes in flare22_sets(system).items():
        region = native == value
        if len(classes) < 2 or not region.any():
            continue
        predicted = np.isin(prediction, sorted(classes))
        agreed = region & predicted
        out[agreed] = prediction[agreed]
        rest = region & ~predicted
        if not rest.any():
            continue
        if predicted.any():
            box = tuple(slice(int(lo), int(hi) + 1) for lo, hi in
                        zip(np.argwhere(rest | predicted).min(0), np.argwhere(rest | predicted).max(0), strict=True))
            _, nearest = ndimage.distance_transform_edt(~predicted[box], sampling=spacing, return_indices=True)
            sub = rest[box]
            out[box][sub] = prediction[box][tuple(index[sub] for index in nearest)]
        elif (pair := _lateral_pair(classes)) is not None:
            out[rest] = lateral_split(rest, pair, native > 0, affine)[rest]
        else:
            raise ValueError(f"cannot split label {value} of {system} into {sorted(classes)}: "
                             "the teacher predicts none of them")
    return out


def write_pseudo_labels(model: LoadedModel, source_dir: str | Path, out_dir: str | Path, *, mode: str = "all",
                        inference: Mapping[str, Any] | None = None, confidence_threshold: float | None = None,
                        provenance: Mapping[str, Any] | None = None, failures: FailureLog | None = None) -> Path:
    """Write the pseudo-labelled dataset of ``source_dir``'s training cases into ``out_dir`` (its name is the
    dataset's name). A failing case is one line in ``failures`` and is left out; the dataset is then marked
    incomplete, so the next call retries it. Returns ``out_dir``."""
    if mode not in MODES:
        raise ValueError(f"unknown pseudo-label mode {mode!r}; known: {', '.join(MODES)}")
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    failures = failures if failures is not None else FailureLog()
    source, target = UnifiedDataset(source_dir), UnifiedDataset(out_dir)
    cases = source.cases("train")
    if not cases:
        raise CaseError(source_dir, "no training cases to pseudo-label")
    to_system = None if model.label_system == FLARE22 else FLARE22
    images = []
    for case in cases:
        image = target.image(case)
        link_image(source.image(case), image)
        images.append(image)
    labels_dir = target.labels_dir("train")
    if mode == "all":
        predict_files(model, images, labels_dir, to_system=to_system, inference=inference, skip_existing=True,
                      failures=failures)
    else:
        predict_files(model, images, out_dir / TEACHER_DIR, to_system=to_system, inference=inference,
                      skip_existing=True, failures=failures)
        for case in cases:
            with failures.case(source.label(case)):
                _write_completed(source, target, case)
    labelled = [case for case in cases if (labels_dir / f"{case}.nii.gz").exists()]
    kept, scores = labelled, {}
    if confidence_threshold is not None:
        scores = confidences(model, out_dir, labelled, inference, failures)
        kept = [case for case in labelled if scores.get(case, 0.0) >= confidence_threshold]
    complete = len(labelled) == len(cases) and (confidence_threshold is None or set(labelled) <= set(scores))
    _write_metadata(target, source, kept, {
        **(provenance or {}), "source": source.name, "mode": mode, "teacher_labels": model.label_system,
        "confidence_threshold": confidence_threshold, "dropped_by_confidence": sorted(set(labelled) - set(kept)),
        "failed": sorted(set(cases) - set(labelled)), "complete": complete})
    log.info("pseudo-labels %s: %d of %d case(s) from %s (%s) -> %s", out_dir.name, len(kept), len(cases),
             source.name, mode, out_dir)
    return out_dir


def _write_completed(source: UnifiedDataset, dataset: UnifiedDataset, case: str) -> None:
    target = dataset.label(case)
    teacher = dataset.root / TEACHER_DIR / f"{case}.nii.gz"
    if target.exists() or not teacher.exists():
        return
    native, label_img = read_label(source.label(case))
    predicted, predicted_img = read_label(teacher)
    if predicted.shape != native.shape or not np.allclose(predicted_img.affine, label_img.affine, atol=1e-3):
        raise CaseError(teacher, "teacher prediction does not share the label's geometry")
    try:
        merged = complete_labels(native, source.label_system, predicted, label_img.affine,
                                 label_img.header.get_zooms()[:3])
    except ValueError as err:
        raise CaseError(source.label(case), str(err)) from None
    save_nifti(merged, label_img.affine, target, header=label_img.header)


def confidences(model: LoadedModel, out_dir: Path, cases: list[str], inference: Mapping[str, Any] | None,
                failures: FailureLog) -> dict[str, float]:
    """Per-case confidence (:func:`case_confidence`), cached in ``confidence.json`` so a resumed run does not
    recompute it."""
    path = out_dir / CONFIDENCE_JSON
    scores = json.loads(path.read_text()) if path.exists() else {}
    todo = [case for case in cases if case not in scores]
    if todo:
        predictor = make_predictor(model, inference)
        for case in todo:
            image_path = UnifiedDataset(out_dir).image(case)
            with failures.case(image_path):
                image, _ = preprocess_image(load_nifti(image_path), model.plan)
                scores[case] = case_confidence(predictor(torch.from_numpy(image)))
                write_text_atomic(path, json.dumps(scores, indent=1))
    return scores


def _write_metadata(dataset: UnifiedDataset, source: UnifiedDataset, cases: list[str],
                    provenance: dict[str, Any]) -> None:
    dataset.write_metadata({"train": cases}, name=dataset.root.name, modality=source.modality,
                           description=f"pseudo-labels of {source.name} ({provenance['mode']})",
                           label_system=FLARE22, labelled=True, pseudo_labels=provenance)
