"""The results store: the one module that writes, reads and lists result cells.

A cell is one run's scores on one test set under one metric mode::

    <results_root>/<protocol>/<train>/<model>/<run>/<test>/<metric>/cases.csv      one row per case x organ
    <results_root>/<protocol>/<train>/<model>/<run>/<test>/<metric>/summary.json   written last

``summary.json`` holds the cell's key, ``mean_dsc``/``mean_nsd`` and per-organ means as fractions 0-1, and
``n_cases``/``n_failed``/``n_expected``. It is written after ``cases.csv``, each atomically, so a cell with a
summary is complete on disk; a cell counts as finished when its summary records no failed case.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from aeval.errors import CaseError
from aeval.keys import CellKey, RunKey
from aeval.nifti import write_text_atomic

__all__ = ["CASES_CSV", "FLAGS", "PREDICTIONS", "SUMMARY_JSON", "cell_dir", "cell_finished", "cell_keys",
           "missing_cells", "predictions_dir", "read_case_columns", "read_case_rows", "read_cells", "read_summary",
           "write_cell", "write_scores"]

CASES_CSV = "cases.csv"
SUMMARY_JSON = "summary.json"
PREDICTIONS = "predictions"
FLAGS = ("gt_empty", "pred_empty")  # cases.csv columns after dsc, nsd: 1/0, empty (or absent: older cells) = unknown
KEY_DEPTH = 6  # protocol / train / model / run / test / metric


def cell_dir(results_root: str | os.PathLike, key: CellKey) -> Path:
    """The folder of one cell in the results store."""
    return Path(results_root, key.protocol, key.train, key.model, key.run, key.test, key.metric)


def predictions_dir(results_root: str | os.PathLike, run: RunKey, test: str) -> Path:
    """Where a run's predictions on a test set go (model label space; shared by the metric modes)."""
    return Path(results_root, run.protocol, run.train, run.model, run.run, test, PREDICTIONS)


def write_scores(out_dir: str | os.PathLike, rows: Iterable[Mapping], summary: Mapping) -> Path:
    """``cases.csv`` then ``summary.json`` in ``out_dir``, each atomically (the summary marks completion)."""
    out_dir = Path(out_dir)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["case", "organ", "dsc", "nsd", *FLAGS])
    for r in rows:
        writer.writerow([r["case"], r["organ"], repr(float(r["dsc"])), repr(float(r["nsd"])),
                         *(_flag_text(r.get(flag)) for flag in FLAGS)])
    write_text_atomic(out_dir / CASES_CSV, buffer.getvalue())
    write_text_atomic(out_dir / SUMMARY_JSON, json.dumps(dict(summary), indent=2) + "\n")
    return out_dir


def write_cell(results_root: str | os.PathLike, key: CellKey, summary: Mapping[str, Any],
               rows: Iterable[Mapping] | None = None) -> Path:
    """Write one cell with its key added to the summary (what :func:`aeval.scoring.score_folder` returns)."""
    folder = cell_dir(results_root, key)
    full = {**summary, **key.as_dict()}
    if rows is None:
        write_text_atomic(folder / SUMMARY_JSON, json.dumps(full, indent=2) + "\n")
    else:
        write_scores(folder, rows, full)
    return folder


def _summary(folder: Path) -> dict[str, Any] | None:
    try:
        summary = json.loads((folder / SUMMARY_JSON).read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def cell_finished(results_root: str | os.PathLike, key: CellKey) -> bool:
    """A cell is finished when its summary is readable and records no failed case."""
    summary = _summary(cell_dir(results_root, key))
    return summary is not None and not summary.get("n_failed")


def missing_cells(results_root: str | os.PathLike, keys: Iterable[CellKey]) -> list[CellKey]:
    """The keys whose cells are not finished."""
    return [key for key in keys if not cell_finished(results_root, key)]


def _row(key: dict[str, str], organ: str | None, values: Mapping[str, Any], summary: Mapping[str, Any]
         ) -> dict[str, Any]:
    return {**key, "organ": organ, "dsc": 100 * values["dsc"], "nsd": 100 * values["nsd"],
            "n_cases": summary.get("n_cases"), "n_failed": summary.get("n_failed") or 0,
            "n_expected": summary.get("n_expected")}


def read_cells(results_root: str | os.PathLike, problems: list[str] | None = None, *,
               runs: Sequence[RunKey] | None = None) -> list[dict[str, Any]]:
    """Cell rows in % (``organ`` None) and organ rows from every summary under ``results_root`` (only those of
    ``runs`` when given). Unreadable or empty cells are skipped and described in ``problems``."""
    root = Path(results_root)
    if not root.is_dir():
        raise CaseError(root, "results folder not found")
    problems = problems if problems is not None else []
    wanted = None if runs is None else set(runs)
    rows = []
    for path in sorted(root.glob("/".join("*" * KEY_DEPTH) + "/" + SUMMARY_JSON)):
        parts = path.relative_to(root).parts[:KEY_DEPTH]
        key = dict(zip(CellKey.__dataclass_fields__, parts, strict=True))
        if wanted is not None and RunKey(*parts[:4]) not in wanted:
            continue
        summary = _summary(path.parent)
        try:
            if summary is None:
                raise ValueError("not a JSON object")
            if summary.get("mean_dsc") is None or summary.get("mean_nsd") is None:
                problems.append(f"{path}: no scored cases")
                continue
            rows.append({**_row(key, None, {"dsc": summary["mean_dsc"], "nsd": summary["mean_nsd"]}, summary),
                         "case_dsc": _case_dsc(root, CellKey(**key))})
            for organ, values in (summary.get("organs") or {}).items():
                if values.get("dsc") is not None and values.get("nsd") is not None:
                    rows.append(_row(key, organ, values, summary))
        except (ValueError, TypeError, AttributeError, KeyError) as err:
            problems.append(f"{path}: unreadable cell ({type(err).__name__}: {err})")
    return rows


def _case_dsc(results_root: Path, key: CellKey) -> list[float] | None:
    """Per-case DSC (%, the mean over the case's organs) from a cell's ``cases.csv`` (for box plots); None when
    unreadable."""
    try:
        columns = read_case_columns(results_root, key)
    except CaseError:
        return None
    per_case: dict[str, list[float]] = {}
    for case, dsc in zip(columns["case"], columns["dsc"], strict=True):
        per_case.setdefault(case, []).append(float(dsc))
    return [100 * sum(values) / len(values) for _, values in sorted(per_case.items())] or None


def read_case_rows(results_root: str | os.PathLike, key: CellKey) -> list[dict[str, Any]]:
    """A cell's ``cases.csv`` as rows ``{case, organ, dsc, nsd, gt_empty, pred_empty}`` (fractions; a flag is
    None where the cell was scored before flags were stored)."""
    columns = read_case_columns(results_root, key)
    flags = {flag: [None if np.isnan(v) else bool(v) for v in columns[flag]] for flag in FLAGS}
    return [{"case": case, "organ": organ, "dsc": float(dsc), "nsd": float(nsd),
             **{flag: flags[flag][i] for flag in FLAGS}}
            for i, (case, organ, dsc, nsd) in enumerate(zip(columns["case"], columns["organ"], columns["dsc"],
                                                            columns["nsd"], strict=True))]


# --- listing cells and empty flags (for aeval.evidence) -----------------------------------------------------

def read_case_columns(results_root: str | os.PathLike, key: CellKey) -> dict[str, Any]:
    """A cell's ``cases.csv`` column-wise, fast enough for a whole grid: ``case``/``organ`` lists, ``dsc``/``nsd``
    float arrays (fractions), ``gt_empty``/``pred_empty`` float arrays of 1/0, NaN where unknown."""
    path = cell_dir(results_root, key) / CASES_CSV
    try:
        with open(path, newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader)
            rows = list(reader)
        columns = list(zip(*rows, strict=True)) if rows else [()] * len(header)
        named = dict(zip(header, columns, strict=True))
        out: dict[str, Any] = {"case": list(named["case"]), "organ": list(named["organ"]),
                               "dsc": np.asarray(named["dsc"], np.float64), "nsd": np.asarray(named["nsd"], np.float64)}
        for flag in FLAGS:
            text = np.asarray(named.get(flag, [""] * len(rows)), dtype=str)
            if not np.isin(text, ("0", "1", "")).all():
                raise ValueError(f"{flag} holds values other than 0, 1 or empty")
            out[flag] = np.where(text == "1", 1.0, np.where(text == "0", 0.0, np.nan))
        return out
    except (OSError, KeyError, ValueError, StopIteration) as err:
        raise CaseError(path, f"unreadable case table ({type(err).__name__}: {err})") from None


def _flag_text(value: Any) -> str:
    return "" if value is None else str(int(bool(value)))


def cell_keys(results_root: str | os.PathLike, runs: Sequence[RunKey] | None = None) -> list[CellKey]:
    """The keys of every cell with a summary under ``results_root`` (only those of ``runs`` when given)."""
    root = Path(results_root)
    if not root.is_dir():
        raise CaseError(root, "results folder not found")
    wanted = None if runs is None else set(runs)
    keys = [CellKey(*path.relative_to(root).parts[:KEY_DEPTH])
            for path in sorted(root.glob("/".join("*" * KEY_DEPTH) + "/" + SUMMARY_JSON))]
    return [k for k in keys if wanted is None or k.run_key in wanted]


def read_summary(results_root: str | os.PathLike, key: CellKey) -> dict[str, Any] | None:
    """A cell's ``summary.json`` (None when missing or unreadable)."""
    return _summary(cell_dir(results_root, key))
