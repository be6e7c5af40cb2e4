"""The A-Eval scoring rules: which organs each metric mode scores, at which NSD tolerance, with which slice crop
and empty-mask rules, and :func:`score_case`, which applies them to one case.

Mode ``aeval`` is exactly what the published A-Eval script does, ``flare22`` what that script meant;
``aeval10`` and ``aeval2025_script`` are the same two readings for the ten organs of the 2025 edition.
The surface maths (DeepMind's surface Dice, reimplemented) is :mod:`aeval.surface`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
from scipy import ndimage

from aeval.labels import AEVAL8_ORGANS, AEVAL10_ORGANS, AEVAL2025_ORGANS
from aeval.surface import Box, mask_surface, surface_dice, surfel_area_table

METRIC_MODES = ("aeval", "flare22", "aeval10", "aeval2025_script")


CLASS_SPACES = {"aeval8": AEVAL8_ORGANS, "aeval10": AEVAL10_ORGANS, "aeval2025": AEVAL2025_ORGANS}


# The class spaces each mode scores; the first is its default, the one a cell folder's name leaves out.
MODE_CLASSES = {
    "aeval": ("aeval8", "aeval10"),
    "flare22": ("aeval8", "aeval10"),
    "aeval10": ("aeval2025",),
    "aeval2025_script": ("aeval2025",),
}


# What each mode is, for metric cards and error messages.
MODE_DESCRIPTIONS = {
    "aeval": "the published 2023 A-Eval script reproduced exactly (FLARE22's tolerance list and crop ids indexed "
             "by the 8-class ids): numbers comparable to the 2023 paper",
    "flare22": "what the 2023 script meant: FLARE22's tolerance by organ name, slice crop for esophagus only",
    "aeval10": "the ten organs of the 2025 edition as the benchmark means them: FLARE22's tolerance by organ "
               "name, slice crop for esophagus only",
    "aeval2025_script": "what the 2025 repository's unchanged 2023 script does to the 2025 numbering (tolerance "
                        "list and crop ids by id, class_list 1..8): numbers comparable to the 2025 README; "
                        "left adrenal and esophagus are not scored",
}


# FLARE22's NSD tolerances (mm) by organ, and the organs it scores only on the GT's labelled slices.
FLARE22_TOLERANCE_MM = {
    "liver": 5.0, "kidney_right": 3.0, "kidney_left": 3.0, "spleen": 3.0, "pancreas": 5.0, "aorta": 2.0,
    "inferior_vena_cava": 2.0, "adrenal_gland_right": 2.0, "adrenal_gland_left": 2.0, "gallbladder": 2.0,
    "esophagus": 3.0, "stomach": 5.0, "duodenum": 7.0,
}


FLARE22_SLICE_CROPPED = frozenset({"aorta", "inferior_vena_cava", "esophagus"})


# The published A-Eval script keeps FLARE22's per-class list and crop ids (5 aorta, 6 IVC, 10 esophagus)
# but indexes them with the remapped class ids, and scores ``class_list`` 1..8 only (2023 and 2025 alike).
AEVAL_SCRIPT_TOLERANCE_BY_ID = (0, 5, 3, 3, 5, 2, 2, 2, 2, 2, 3, 5, 7, 3)


AEVAL_SCRIPT_CROPPED_IDS = frozenset({5, 6, 10})


AEVAL_SCRIPT_CLASS_LIST = tuple(range(1, 9))


@dataclass(frozen=True)
class OrganRule:
    """How one class is scored: NSD tolerance and whether both masks are cut to the GT's slices."""

    organ: str
    label: int
    tolerance_mm: float
    slice_crop: bool


def _check_mode(mode: str, classes: str | None) -> str:
    if mode not in METRIC_MODES:
        raise ValueError(f"unknown metric mode '{mode}'; known: {', '.join(METRIC_MODES)}")
    classes = classes or MODE_CLASSES[mode][0]
    if classes not in CLASS_SPACES:
        raise ValueError(f"unknown class space '{classes}'; known: {', '.join(CLASS_SPACES)}")
    if classes not in MODE_CLASSES[mode]:
        raise ValueError(f"metric mode '{mode}' scores class space {' or '.join(MODE_CLASSES[mode])}, "
                         f"not '{classes}'")
    return classes


def _script_rule(organ: str, label: int) -> OrganRule:
    return OrganRule(organ, label, float(AEVAL_SCRIPT_TOLERANCE_BY_ID[label]), label in AEVAL_SCRIPT_CROPPED_IDS)


def _flare22_rule(organ: str, label: int) -> OrganRule:
    return OrganRule(organ, label, FLARE22_TOLERANCE_MM[organ], organ in FLARE22_SLICE_CROPPED)


@cache
def scoring_rules(mode: str = "aeval", classes: str | None = None) -> tuple[OrganRule, ...]:
    """The rule of every scored class of ``classes`` under metric ``mode`` (``classes=None``: the mode's own).

    ``aeval``: the 8 organs get the script's tolerance and crop by their 8-class id (liver 5, kidney_right
    3, spleen 3, pancreas 5, gallbladder 2 + crop, esophagus 2 + crop, stomach 2, kidney_left 2). The
    adrenals of ``aeval10`` were never scored by that script and get FLARE22's rule (2 mm, no crop).
    ``flare22`` and ``aeval10``: FLARE22's rule by organ name (esophagus 3 mm + crop, stomach 5, kidneys 3, ...).
    ``aeval2025_script``: the script's rule by id on the 2025 numbering, ids 1..8 only (spleen 5, kidneys 3,
    gallbladder 5, liver 2 + crop, stomach 2 + crop, pancreas 2, right adrenal 2; left adrenal and esophagus
    are left out).
    """
    classes = _check_mode(mode, classes)
    rules = []
    for label, organ in enumerate(CLASS_SPACES[classes], start=1):
        if mode == "aeval2025_script":
            if label in AEVAL_SCRIPT_CLASS_LIST:
                rules.append(_script_rule(organ, label))
        elif mode == "aeval" and organ in AEVAL8_ORGANS:
            rules.append(_script_rule(organ, label))
        else:
            rules.append(_flare22_rule(organ, label))
    return tuple(rules)


def unscored_organs(mode: str, classes: str | None = None) -> tuple[str, ...]:
    """Organs of the class space that ``mode`` leaves out (``aeval2025_script``: left adrenal, esophagus)."""
    scored = {rule.organ for rule in scoring_rules(mode, _check_mode(mode, classes))}
    return tuple(o for o in CLASS_SPACES[_check_mode(mode, classes)] if o not in scored)


def metric_key(mode: str, classes: str | None = None) -> str:
    """How a cell's metric folder is named: the mode, plus the class space when it is not the mode's default
    (``aeval``, ``aeval-aeval10``, ``flare22``, ``aeval10``, ``aeval2025_script``)."""
    default = MODE_CLASSES.get(mode, ("aeval8",))[0]
    classes = classes or default
    return mode if classes == default else f"{mode}-{classes}"


def parse_metric_key(key: str) -> tuple[str, str]:
    """``(mode, classes)`` of a cell folder name written by :func:`metric_key`; ValueError for another name."""
    mode, _, classes = key.partition("-")
    if mode not in METRIC_MODES:
        raise ValueError(f"'{key}' is not a metric mode; known: {', '.join(METRIC_MODES)}")
    return mode, _check_mode(mode, classes or None)


def metric_card(key: str) -> list[str]:
    """Markdown lines that say what metric ``key`` (a cell folder name) is: mode, organs, tolerances, crops."""
    try:
        mode, classes = parse_metric_key(key)
    except ValueError:
        return [f"- `{key}`: not an aeval metric mode (cells from elsewhere)."]
    rules = ", ".join(f"{r.organ} {r.tolerance_mm:g} mm" + (" + crop" if r.slice_crop else "")
                      for r in scoring_rules(mode, classes))
    lines = [f"- `{key}` (mode `{mode}`, classes `{classes}`): {MODE_DESCRIPTIONS[mode]}.",
             f"  NSD tolerance per organ: {rules}."]
    left_out = unscored_organs(mode, classes)
    if left_out:
        lines.append(f"  Not scored: {', '.join(left_out)}.")
    return lines


def _crop_z(box: Box | None, z_start: int, z_stop: int) -> Box | None:
    if box is None:
        return None
    return box[0], box[1], slice(max(box[2].start, z_start), min(box[2].stop, z_stop))


def score_case(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], mode: str = "aeval",
               classes: str | None = None) -> dict[str, dict[str, float]]:
    """DSC and NSD of every scored class of ``classes`` (None: the mode's own class space) for one case:
    ``{organ: {"dsc": .., "nsd": ..}}``.

    Both label maps are already in the evaluation space (0 background, 1..8 or 1..10), spacing in
    array-axis order (the GT header's zooms). Rules, per class:
    GT and prediction empty → 1, 1; GT empty, prediction not → 0, 0; for a slice-cropped class both masks
    are cut to ``[:, :, zmin:zmax]`` of the GT's third-axis extent (upper bound exclusive, as published:
    the top GT slice is dropped) and a GT on one slice (an empty crop) → 0, 0; else DSC and NSD at the
    class's tolerance (a GT with an empty prediction → 0, 0).
    """
    rules = scoring_rules(mode, classes)
    n_classes = len(CLASS_SPACES[_check_mode(mode, classes)])
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape or gt.ndim != 3:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} must be 3-D of one shape")
    if len(spacing) != 3:
        raise ValueError(f"spacing needs 3 values, got {tuple(spacing)}")
    for name, labels in (("prediction", pred), ("ground truth", gt)):
        if labels.dtype.kind not in "iub":
            raise ValueError(f"{name} labels must be integers, got {labels.dtype}")
        if labels.size and (labels.min() < 0 or labels.max() > n_classes):
            raise ValueError(f"{name} has labels outside 0..{n_classes} (not in the {classes} space)")
    pred, gt = pred.astype(np.uint8, copy=False), gt.astype(np.uint8, copy=False)
    gt_boxes = ndimage.find_objects(gt, max_label=n_classes)
    pred_boxes = ndimage.find_objects(pred, max_label=n_classes)
    table = surfel_area_table(spacing)
    scores = {}
    for rule in rules:
        gt_box, pred_box = gt_boxes[rule.label - 1], pred_boxes[rule.label - 1]
        if gt_box is None:
            scores[rule.organ] = {"dsc": 1.0, "nsd": 1.0} if pred_box is None else {"dsc": 0.0, "nsd": 0.0}
            continue
        if rule.slice_crop:
            z_start, z_stop = gt_box[2].start, gt_box[2].stop - 1  # the script's exclusive upper bound
            if z_stop <= z_start:
                scores[rule.organ] = {"dsc": 0.0, "nsd": 0.0}
                continue
            gt_box, pred_box = _crop_z(gt_box, z_start, z_stop), _crop_z(pred_box, z_start, z_stop)
        gt_surface = mask_surface(gt, rule.label, gt_box, table)
        pred_surface = mask_surface(pred, rule.label, pred_box, table)
        intersection = 0
        if not pred_surface.empty:
            common = tuple(slice(max(g.start, p.start), min(g.stop, p.stop))
                           for g, p in zip(gt_box, pred_box, strict=True))
            if all(s.stop > s.start for s in common):
                intersection = int(np.count_nonzero((gt[common] == rule.label) & (pred[common] == rule.label)))
        dsc = 2.0 * intersection / (gt_surface.voxels + pred_surface.voxels)
        nsd = surface_dice(gt_surface, pred_surface, spacing, rule.tolerance_mm)
        scores[rule.organ] = {"dsc": dsc, "nsd": nsd}
    return scores


def empty_flags(pred: np.ndarray, gt: np.ndarray, classes: str = "aeval8") -> dict[str, dict[str, bool]]:
    """Which organs are absent from the ground truth and from the prediction (whole volume, evaluation space):
    ``{organ: {"gt_empty": .., "pred_empty": ..}}``. Stored next to the scores because the rules score a
    both-empty pair as 1, which other tools drop; the report needs to tell such pairs apart."""
    organs = CLASS_SPACES[classes]
    counts = [np.bincount(np.asarray(a).ravel().astype(np.intp, copy=False), minlength=len(organs) + 1)
              for a in (gt, pred)]
    return {organ: {"gt_empty": bool(counts[0][i] == 0), "pred_empty": bool(counts[1][i] == 0)}
            for i, organ in enumerate(organs, start=1)}
