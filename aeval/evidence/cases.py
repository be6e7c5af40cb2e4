"""The per-case table every piece of evidence starts from: one row per scored (cell, case, organ), read
from the cells' ``cases.csv`` on disk, written as ``cases.csv`` (and ``cases.parquet`` with pyarrow), and
its strata (one per test set) for resampling."""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aeval.errors import CaseError
from aeval.keys import CellKey
from aeval.labels import AEVAL10_ORGANS
from aeval.nifti import atomic_path, write_text_atomic
from aeval.reporting.cells import (
    TEST_ORDER,
    ordered,
)
from aeval.results import SUMMARY_JSON, cell_dir, cell_keys, read_case_columns, read_summary

log = logging.getLogger(__name__)


RULES = ("published", "excluded")  # both-empty pairs score 1 (A-Eval) | are dropped (TotalSegmentator, Touchstone)


RUN_FIELDS = ("protocol", "train", "model", "run")


ORGAN_ORDER = AEVAL10_ORGANS


CASE_COLUMNS = ("protocol", "train", "model", "run", "test", "metric", "case", "organ", "dsc", "nsd",
                "gt_empty", "pred_empty", "both_empty")


@dataclass
class CaseTable:
    """Every scored (cell, case, organ), column-wise: ``cell`` indexes ``keys``; DSC/NSD in %; flags 1/0, NaN
    where the cell was scored before flags were stored."""

    keys: list[CellKey]
    cell: np.ndarray
    case: np.ndarray
    organ: np.ndarray
    dsc: np.ndarray
    nsd: np.ndarray
    gt_empty: np.ndarray
    pred_empty: np.ndarray
    strata: dict | None = field(default=None, repr=False)

    @property
    def both_empty(self) -> np.ndarray:
        both = self.gt_empty * self.pred_empty
        return np.where((self.gt_empty == 0) | (self.pred_empty == 0), 0.0, both)

    def __len__(self) -> int:
        return len(self.cell)

    def values(self, metric: str) -> np.ndarray:
        return self.dsc if metric == "dsc" else self.nsd

    def records(self) -> Iterable[dict[str, Any]]:
        both = self.both_empty
        for i in range(len(self)):
            key = self.keys[self.cell[i]]
            yield {**key.as_dict(), "case": self.case[i], "organ": self.organ[i], "dsc": self.dsc[i],
                   "nsd": self.nsd[i], "gt_empty": self.gt_empty[i], "pred_empty": self.pred_empty[i],
                   "both_empty": both[i]}


def load_case_table(results_root: str | os.PathLike, keys: Sequence[CellKey] | None = None,
                    problems: list[str] | None = None) -> CaseTable:
    """The case rows of ``keys`` (every cell under ``results_root`` when None). A cell without a readable
    summary or case table is left out; ``problems`` gets one line naming its file (else it is raised)."""
    candidates = list(cell_keys(results_root) if keys is None else keys)
    keys, parts = [], []
    for key in candidates:
        try:
            if read_summary(results_root, key) is None:
                raise CaseError(cell_dir(results_root, key) / SUMMARY_JSON, "unreadable cell summary")
            columns = read_case_columns(results_root, key)
        except CaseError as err:
            if problems is None:
                raise
            problems.append(f"{err} (left out of the evidence)")
            continue
        parts.append((np.full(len(columns["case"]), len(keys), np.intp), columns))
        keys.append(key)

    def joined(name: str, dtype) -> np.ndarray:
        return np.concatenate([np.asarray(c[name], dtype) for _, c in parts]) if parts else np.zeros(0, dtype)

    cells = np.concatenate([c for c, _ in parts]) if parts else np.zeros(0, np.intp)
    return CaseTable(keys, cells, joined("case", object), joined("organ", object), 100 * joined("dsc", np.float64),
                     100 * joined("nsd", np.float64), joined("gt_empty", np.float64), joined("pred_empty", np.float64))


def cell_text(value: Any) -> str:
    """A value as the case table's CSV writes it (empty for None/NaN)."""
    if isinstance(value, float):
        return "" if np.isnan(value) else repr(value)
    return str(value)


def write_case_table(table: CaseTable, out_dir: Path) -> list[Path]:
    """``cases.csv`` always, ``cases.parquet`` too when pyarrow is installed."""
    keys = [table.keys[i] for i in table.cell]
    flags = {name: np.where(np.isnan(a), "", np.where(a == 1, "1", "0")).tolist() for name, a in
             (("gt_empty", table.gt_empty), ("pred_empty", table.pred_empty), ("both_empty", table.both_empty))}
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CASE_COLUMNS)
    writer.writerows(zip(*([getattr(k, name) for k in keys] for name in RUN_FIELDS + ("test", "metric")),
                         table.case, table.organ, map(repr, table.dsc.tolist()), map(repr, table.nsd.tolist()),
                         flags["gt_empty"], flags["pred_empty"], flags["both_empty"], strict=True))
    files = [write_text_atomic(out_dir / "cases.csv", buffer.getvalue())]
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        log.info("pyarrow not installed: cases.parquet not written")
        return files
    data = {name: [getattr(k, name) for k in keys] for name in RUN_FIELDS + ("test", "metric")}
    data.update(case=list(table.case), organ=list(table.organ), dsc=table.dsc, nsd=table.nsd)
    for name, array in (("gt_empty", table.gt_empty), ("pred_empty", table.pred_empty),
                        ("both_empty", table.both_empty)):
        data[name] = pa.array(array == 1, pa.bool_(), mask=np.isnan(array))
    with atomic_path(out_dir / "cases.parquet") as tmp:
        pq.write_table(pa.table(data), tmp)
    files.append(out_dir / "cases.parquet")
    return files


@dataclass
class Stratum:
    """One test set: its cases (the union over the cells on it) and, per cell on it, dense (case, organ)
    arrays of DSC, NSD and the both-empty flag (NaN where a pair is absent or a flag unknown)."""

    test: str
    cases: list[str]
    organs: list[str]
    cells: list[int]
    dsc: np.ndarray
    nsd: np.ndarray
    both: np.ndarray
    present: np.ndarray

    def row(self, cell: int) -> int:
        return self.cells.index(cell)

    _weights: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def weights(self, rule: str) -> np.ndarray:
        """Scored pairs per (cell, case, organ) under ``rule``; NaN for a cell whose flags are unknown."""
        if rule not in self._weights:
            if rule == "published":
                weights = self.present.astype(np.float64)
            else:
                weights = (self.present & (self.both == 0)).astype(np.float64)
                weights[np.any(self.present & np.isnan(self.both), axis=(1, 2))] = np.nan
            self._weights[rule] = weights
        return self._weights[rule]


def strata(table: CaseTable) -> dict[str, Stratum]:
    """Dense arrays per test set (computed once per table)."""
    if table.strata is not None:
        return table.strata
    out = {}
    test_of_cell = np.array([k.test for k in table.keys], object)
    tests = test_of_cell[table.cell] if len(table) else np.zeros(0, object)
    organ_names = ordered(table.organ, ORGAN_ORDER)
    organ_codes = {o: i for i, o in enumerate(organ_names)}
    organ_pos = np.fromiter((organ_codes[o] for o in table.organ), np.intp, len(table))
    both = table.both_empty
    for test in ordered({k.test for k in table.keys}, TEST_ORDER):
        rows = np.flatnonzero(tests == test)
        cases, case_index = np.unique(table.case[rows].astype(str), return_inverse=True)
        cells = sorted(set(table.cell[rows].tolist()))
        cell_pos = np.searchsorted(cells, table.cell[rows])
        shape = (len(cells), len(cases), len(organ_names))
        arrays = {name: np.full(shape, np.nan) for name in ("dsc", "nsd", "both")}
        for name, source in (("dsc", table.dsc), ("nsd", table.nsd), ("both", both)):
            arrays[name][cell_pos, case_index, organ_pos[rows]] = source[rows]
        present = np.zeros(shape, bool)
        present[cell_pos, case_index, organ_pos[rows]] = True
        out[test] = Stratum(test, list(cases), organ_names, cells, arrays["dsc"], arrays["nsd"], arrays["both"],
                            present)
    table.strata = out
    return out
