"""Score a folder of predictions against ground truth: ``python -m aeval.score pred_dir=… gt_dir=…``.

Files are paired by case name (file name without ``.nii.gz``/``.nii`` and a trailing ``_0000``). A prediction
may also be TotalSegmentator's default output, a folder ``<case>/`` of per-structure masks
``<structure>.nii.gz``: it is merged in ``pred_labels``' id order as the converter merges TotalSegmentator
masks (absent structures count as empty). Both
sides are remapped by organ name to the evaluation classes (8 A-Eval organs by default), spacing comes
from the ground truth's header, and every case is scored by :func:`aeval.metrics.score_case`. Writes
``cases.csv`` (case, organ, dsc, nsd) and ``summary.json`` (per-organ means, the overall mean over all
case × organ pairs, as fractions 0–1) into ``out``. A missing or unreadable file, or a prediction whose
shape or affine differs from its ground truth, is one line naming the file; the other cases are scored
and the command exits with code 2.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from aeval.data.convert import merge_totalseg
from aeval.labels import get_system, remap
from aeval.metrics import CLASS_SPACES, score_case, scoring_rules, surfel_area_table
from aeval.nifti import CaseError, FailureLog, read_label, spacing_of, write_text_atomic

NIFTI_SUFFIXES = (".nii.gz", ".nii")
CASES_CSV = "cases.csv"
SUMMARY_JSON = "summary.json"


def case_name(path: str | os.PathLike) -> str:
    """``amos_0013_0000.nii.gz`` → ``amos_0013``."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name[: -len("_0000")] if name.endswith("_0000") else name


def _nifti_files(folder: Path, mask_folders: bool = False) -> dict[str, Path]:
    if not folder.is_dir():
        raise CaseError(folder, "folder not found")
    files = sorted(p for p in folder.iterdir() if p.name.endswith(NIFTI_SUFFIXES) and not p.name.startswith("."))
    found = {case_name(p): p for p in files}
    subfolders = folder.iterdir() if mask_folders else ()
    for sub in sorted(p for p in subfolders if p.is_dir() and not p.name.startswith(".")):
        if case_name(sub) not in found and any(sub.glob("*.nii.gz")):  # TotalSegmentator: <case>/<structure>.nii.gz
            found[case_name(sub)] = sub
    return found


def score_pair(pred_path: str | os.PathLike, gt_path: str | os.PathLike, pred_system: str, gt_system: str,
               mode: str = "aeval", classes: str = "aeval8") -> dict[str, dict[str, float]]:
    """DSC and NSD per organ of one prediction file against its ground-truth file.

    Raises :class:`CaseError` naming the file for unreadable files, labels outside their system, and a
    prediction whose shape or affine (1e-3 mm) differs from the ground truth's."""
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
    return score_case(pred, gt, spacing_of(gt_img), mode=mode, classes=classes)


def _score_job(case: str, pred_path: Path, gt_path: Path, pred_system: str, gt_system: str, mode: str,
               classes: str) -> tuple[str, dict[str, dict[str, float]] | None, str | None]:
    """One case in a worker; failures come back as their one-line message."""
    try:
        return case, score_pair(pred_path, gt_path, pred_system, gt_system, mode, classes), None
    except CaseError as err:
        return case, None, str(err)
    except (ValueError, OSError, RuntimeError, EOFError) as err:
        return case, None, str(CaseError(pred_path, f"{type(err).__name__}: {err}"))


@dataclass
class FolderScore:
    """What :func:`score_folder` measured: one row per case × organ, the summary, the failure lines."""

    rows: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

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
    return {**overall, "n_cases": len({r["case"] for r in rows}), "organs": per_organ}


def write_scores(out_dir: str | os.PathLike, rows: Iterable[Mapping], summary: Mapping) -> Path:
    """``cases.csv`` and ``summary.json`` in ``out_dir``, each written atomically."""
    out_dir = Path(out_dir)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["case", "organ", "dsc", "nsd"])
    for r in rows:
        writer.writerow([r["case"], r["organ"], repr(float(r["dsc"])), repr(float(r["nsd"]))])
    write_text_atomic(out_dir / CASES_CSV, buffer.getvalue())
    write_text_atomic(out_dir / SUMMARY_JSON, json.dumps(summary, indent=2) + "\n")
    return out_dir


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
                 num_workers: int = 1, progress: bool = True, extra: Mapping | None = None,
                 printer: Callable[[str], None] | None = None) -> FolderScore:
    """Score every ground-truth case of ``gt_dir`` against the prediction of the same name in ``pred_dir``.

    ``pred_labels``/``gt_labels`` name the label systems of the two folders (see ``aeval.labels``),
    ``metric`` the rules (``aeval`` or ``flare22``). ``extra`` is merged into ``summary.json`` (the
    evaluate stage adds the cell's protocol/train/model/test). Writes into ``out_dir`` when given."""
    scoring_rules(metric, classes)  # unknown mode or class space: ValueError before any work
    for system in (pred_labels, gt_labels):
        try:
            get_system(system)
        except KeyError as err:
            raise ValueError(err.args[0]) from None
    log = FailureLog(printer)
    say = printer or (lambda line: print(line, flush=True))
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    gt_files = _nifti_files(gt_dir)
    pred_files = _nifti_files(pred_dir, mask_folders=True)
    if not gt_files:
        raise CaseError(gt_dir, "no NIfTI files (.nii.gz/.nii)")
    jobs = []
    for case, gt_path in gt_files.items():
        if case in pred_files:
            jobs.append((case, pred_files[case], gt_path))
        else:
            log.add(CaseError(pred_dir / f"{case}.nii.gz", f"prediction missing (ground truth {gt_path})"))
    orphans = sorted(set(pred_files) - set(gt_files))
    if orphans:
        say(f"[warning] {len(orphans)} prediction(s) without ground truth ignored: {', '.join(orphans[:5])}"
            + (" ..." if len(orphans) > 5 else ""))

    results: dict[str, dict] = {}
    failed: dict[str, str] = {}
    surfel_area_table((1.0, 1.0, 1.0))  # builds the cached surfel geometry once, before workers fork
    bar = Progress(TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   disable=not progress, transient=True)

    def record(outcome: tuple[str, dict | None, str | None]) -> None:
        case, scores, error = outcome
        if error is None:
            results[case] = scores
        else:
            failed[case] = error
        bar.advance(task)

    with bar:
        task = bar.add_task("score", total=len(jobs))
        args = [(case, p, g, pred_labels, gt_labels, metric, classes) for case, p, g in jobs]
        if num_workers <= 1 or len(jobs) <= 1:
            for a in args:
                record(_score_job(*a))
        else:
            with ProcessPoolExecutor(max_workers=num_workers) as pool:
                for future in as_completed([pool.submit(_score_job, *a) for a in args]):
                    record(future.result())
    for case in sorted(failed):
        log.add(failed[case])

    organs = CLASS_SPACES[classes]
    rows = [{"case": case, "organ": organ, **results[case][organ]} for case in sorted(results) for organ in organs]
    summary = {
        "metric": metric, "mode": metric, "classes": classes, **summarize(rows, organs),
        "n_failed": len(log.failures), "failures": list(log.failures),
        "pred_dir": str(pred_dir), "gt_dir": str(gt_dir), "pred_labels": pred_labels, "gt_labels": gt_labels,
        **(dict(extra) if extra else {}),
    }
    if out_dir is not None:
        write_scores(out_dir, rows, summary)
        say(f"wrote {Path(out_dir) / CASES_CSV} and {Path(out_dir) / SUMMARY_JSON}")
    return FolderScore(rows, summary, list(log.failures))


def run(cfg: DictConfig) -> int:
    """The CLI's work: score, print the table and the failures, return the exit code."""
    try:
        result = score_folder(cfg.pred_dir, cfg.gt_dir, cfg.pred_labels, cfg.gt_labels, out_dir=cfg.out,
                              metric=cfg.metric.name, classes=cfg.metric.classes, num_workers=cfg.num_workers,
                              progress=cfg.progress)
    except (CaseError, ValueError) as err:  # a missing folder, an unknown label system or metric mode
        print(f"[error] {err}")
        return 2
    Console().print(summary_table(result.summary, title=f"{cfg.pred_dir} vs {cfg.gt_dir} ({cfg.metric.name})"))
    if result.failures:
        print(f"{len(result.failures)} case(s) failed:\n" + "\n".join(f"  {f}" for f in result.failures))
    return result.exit_code


@hydra.main(version_base=None, config_path="conf", config_name="score")
def main(cfg: DictConfig) -> None:
    code = run(cfg)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
