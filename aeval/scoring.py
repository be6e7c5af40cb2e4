"""The score stage: a folder of predictions against ground truth (``python -m aeval.score`` runs it).

Files are paired by case name (file name without ``.nii.gz``/``.nii`` and a trailing ``_0000``). A prediction
may also be TotalSegmentator's default output, a folder ``<case>/`` of per-structure masks
``<structure>.nii.gz``: it is merged in ``pred_labels``' id order as the converter merges TotalSegmentator
masks (absent structures count as empty). Both
sides are remapped by organ name to the evaluation classes (8 A-Eval organs by default), spacing comes
from the ground truth's header, and every case is scored by :func:`aeval.metrics.score_case`. Writes
``cases.csv`` (case, organ, dsc, nsd, and the organ's gt_empty/pred_empty flags) and ``summary.json``
(per-organ means, the overall mean over all case × organ pairs, as fractions 0–1, and the share of
both-empty pairs) into ``out``. A missing or unreadable file, or a prediction whose
shape or affine differs from its ground truth, is one line naming the file; the other cases are scored
and the command exits with code 2.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.table import Table

from aeval.cpu import default_workers, limit_worker_threads
from aeval.data.convert import merge_totalseg
from aeval.errors import EXPECTED_COMPUTE_ERRORS, CaseError, CaseFailure, FailureLog
from aeval.labels import get_system, remap
from aeval.metrics import empty_flags, score_case, scoring_rules
from aeval.nifti import is_nifti, nifti_case_name, nifti_cases, read_label, remove_stale_temporaries, spacing_of
from aeval.parallel import failures_of, map_cases
from aeval.results import CASES_CSV, SUMMARY_JSON, write_scores
from aeval.surface import surfel_area_table

log = logging.getLogger(__name__)


def _nifti_files(folder: Path, failures: FailureLog, mask_folders: bool = False) -> tuple[dict[str, Path], set[str]]:
    """The folder's NIfTI files by case, and the cases two files claim (one failure line each, left out). With
    ``mask_folders``, a subfolder ``<case>/`` of per-structure masks (TotalSegmentator's output) is a case too."""
    if not folder.is_dir():
        raise CaseError(folder, "folder not found")
    files, duplicates = nifti_cases([p for p in folder.iterdir() if is_nifti(p)])
    for err in duplicates:
        failures.add(err)
    claimed = {nifti_case_name(err.path) for err in duplicates}
    subfolders = folder.iterdir() if mask_folders else ()
    for sub in sorted(p for p in subfolders if p.is_dir() and not p.name.startswith(".")):
        if sub.name not in files and sub.name not in claimed and any(p for p in sub.iterdir() if is_nifti(p)):
            files[sub.name] = sub
    return files, claimed


def score_pair(pred_path: str | os.PathLike, gt_path: str | os.PathLike, pred_system: str, gt_system: str,
               mode: str = "aeval", classes: str = "aeval8") -> dict[str, dict[str, float]]:
    """DSC and NSD per organ of one prediction file against its ground-truth file.

    Raises :class:`CaseError` naming the file for unreadable files, labels outside their system, and a
    prediction whose shape or affine (1e-3 mm) differs from the ground truth's."""
    return _score_pair(pred_path, gt_path, pred_system, gt_system, mode, classes)[0]


def _score_pair(pred_path: str | os.PathLike, gt_path: str | os.PathLike, pred_system: str, gt_system: str,
                mode: str, classes: str) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, bool]]]:
    """:func:`score_pair` plus the organs' empty flags (:func:`aeval.metrics.empty_flags`)."""
    gt, gt_img = read_label(gt_path)
    if Path(pred_path).is_dir():
        pred, pred_img = merge_totalseg(Path(pred_path), gt_img, pred_system, missing_ok=True), gt_img
    else:
        pred, pred_img = read_label(pred_path)
    if pred.shape != gt.shape:
        raise CaseError(pred_path, f"shape {pred.shape} does not match ground truth shape {gt.shape} ({gt_path})")
    if not np.allclose(pred_img.affine, gt_img.affine, atol=1e-3):
        raise CaseError(pred_path, f"affine does not match the ground truth's affine ({gt_path})")
    try:
        pred = remap(pred, pred_system, classes)
    except ValueError as err:
        raise CaseError(pred_path, str(err)) from None
    try:
        gt = remap(gt, gt_system, classes)
    except ValueError as err:
        raise CaseError(gt_path, str(err)) from None
    return score_case(pred, gt, spacing_of(gt_img), mode=mode, classes=classes), empty_flags(pred, gt, classes)


def _score_job(job: tuple[str, Path, Path, str, str, str, str]) -> dict[str, dict[str, float | bool]]:
    """One case (in a worker): its scores with each organ's empty flags."""
    scores, flags = _score_pair(*job[1:])
    return {organ: {**values, **flags[organ]} for organ, values in scores.items()}


@dataclass
class FolderScore:
    """What :func:`score_folder` measured: one row per case × organ, the summary, the failed cases."""

    rows: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    failures: list[CaseFailure] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 2 if self.failures else 0


def summarize(rows: Iterable[Mapping], organs: Iterable[str]) -> dict:
    """Per-organ means and the overall mean over all case × organ pairs (fractions; None when empty)."""
    rows = list(rows)
    per_organ = {}
    for organ in organs:
        picked = [r for r in rows if r["organ"] == organ]
        per_organ[organ] = {m: (float(np.mean([r[m] for r in picked])) if picked else None) for m in ("dsc", "nsd")}
    overall = {f"mean_{m}": (float(np.mean([r[m] for r in rows])) if rows else None) for m in ("dsc", "nsd")}
    summary = {**overall, "n_cases": len({r["case"] for r in rows}), "organs": per_organ}
    if rows and all("gt_empty" in r and "pred_empty" in r for r in rows):  # pairs the rules score as 1, 1
        both = sum(bool(r["gt_empty"]) and bool(r["pred_empty"]) for r in rows)
        summary.update(n_both_empty=both, both_empty_fraction=both / len(rows))
    return summary


def summary_table(summary: Mapping, title: str = "") -> Table:
    """A rich table of the per-organ and overall means in %."""
    table = Table(title=title or None)
    table.add_column("organ")
    table.add_column("DSC %", justify="right")
    table.add_column("NSD %", justify="right")

    def pct(v):
        return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"

    for organ, values in summary["organs"].items():
        table.add_row(organ, pct(values["dsc"]), pct(values["nsd"]))
    table.add_section()
    table.add_row(f"mean ({summary['n_cases']} cases)", pct(summary["mean_dsc"]), pct(summary["mean_nsd"]))
    return table


def score_folder(pred_dir: str | os.PathLike, gt_dir: str | os.PathLike, pred_labels: str, gt_labels: str,
                 out_dir: str | os.PathLike | None = None, metric: str = "aeval", classes: str = "aeval8",
                 num_workers: int | None = None, progress: bool = True, extra: Mapping | None = None,
                 quiet: bool = False) -> FolderScore:
    """Score every ground-truth case of ``gt_dir`` against the prediction of the same name in ``pred_dir``.

    ``pred_labels``/``gt_labels`` name the label systems of the two folders (see ``aeval.labels``),
    ``metric`` the rules (``aeval``, ``flare22``, ``aeval10``, ``aeval2025_script``; see ``aeval.metrics``).
    ``extra`` is merged into ``summary.json`` (the evaluate stage adds the cell's protocol/train/model/test).
    ``num_workers``: scoring processes (None: one per core, at most one per case; see :mod:`aeval.cpu`).
    Writes into ``out_dir`` when given. Each failure is logged as one line unless ``quiet`` (a caller that
    reports them itself)."""
    scoring_rules(metric, classes)  # unknown mode or class space: ValueError before any work
    for system in (pred_labels, gt_labels):
        try:
            get_system(system)
        except KeyError as err:
            raise ValueError(err.args[0]) from None
    failures = FailureLog(quiet=quiet)
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    gt_files, gt_duplicates = _nifti_files(gt_dir, failures)
    pred_files, pred_duplicates = _nifti_files(pred_dir, failures, mask_folders=True)
    if not gt_files and not gt_duplicates:
        raise CaseError(gt_dir, "no NIfTI files (.nii.gz/.nii)")
    jobs = []
    for case, gt_path in gt_files.items():
        if case in pred_duplicates:  # its line is printed; not "prediction missing"
            continue
        if case in pred_files:
            jobs.append((case, pred_files[case], gt_path))
        else:
            failures.add(CaseError(pred_dir / f"{case}.nii.gz", f"prediction missing (ground truth {gt_path})"))
    orphans = sorted(set(pred_files) - set(gt_files))
    if orphans:
        log.warning("%d prediction(s) without ground truth ignored: %s%s", len(orphans), ", ".join(orphans[:5]),
                    " ..." if len(orphans) > 5 else "")

    surfel_area_table((1.0, 1.0, 1.0))  # builds the cached surfel geometry once, before workers fork
    args = [(case, p, g, pred_labels, gt_labels, metric, classes) for case, p, g in jobs]
    workers = default_workers(num_workers, len(args))
    outcomes = map_cases(_score_job, args, num_workers=workers, path_of=lambda job: job[1],
                         description="scoring", show_progress=progress, expected=EXPECTED_COMPUTE_ERRORS,
                         initializer=limit_worker_threads, initargs=(workers,))
    results = {job[0]: outcome for job, outcome in zip(args, outcomes, strict=True)
               if not isinstance(outcome, CaseFailure)}
    failures.extend(failures_of(outcomes))

    organs = [rule.organ for rule in scoring_rules(metric, classes)]  # a mode may leave organs out
    rows = [{"case": case, "organ": organ, **results[case][organ]} for case in sorted(results) for organ in organs]
    summary = {
        "metric": metric, "mode": metric, "classes": classes, **summarize(rows, organs),
        "n_failed": len(failures.records), "failures": failures.failures,
        "n_expected": len(gt_files) + len(gt_duplicates),
        "pred_dir": str(pred_dir), "gt_dir": str(gt_dir), "pred_labels": pred_labels, "gt_labels": gt_labels,
        **(dict(extra) if extra else {}),
    }
    if out_dir is not None:
        remove_stale_temporaries(out_dir)
        write_scores(out_dir, rows, summary)
        log.info("wrote %s and %s", Path(out_dir) / CASES_CSV, Path(out_dir) / SUMMARY_JSON)
    return FolderScore(rows, summary, failures.records)
