"""Evidence beyond the paper's one mean per cell, from the per-case tables of the cells on disk (nothing is
re-predicted): ``python -m aeval.report results=DIR evidence.ci=true compare=model ...``.

* ``cases.csv`` (and ``cases.parquet`` with pyarrow): one tidy row per scored (run, test set, case, organ) with
  DSC, NSD (%), the metric mode and the empty flags.
* Bootstrap intervals for every cell mean and every row, column, CT and overall mean of the paper's grid
  (cases resampled within each test set, one draw per test set shared by every cell on it; :mod:`aeval.stats`).
* Paired comparisons of runs on the same cases: mean difference, paired bootstrap interval, Wilcoxon p, Holm
  over the family asked for; a table and a forest plot.
* Empty-case accounting: the share of both-empty pairs per cell (the rules score them 1) and, on request, the
  grid with those pairs dropped (TotalSegmentator's and Touchstone's rule) beside the published one.
* Rank-then-aggregate (FLARE, challengeR) with bootstrap rank stability, for model sizes and training sets.
* Worst-case galleries: the k worst cases of every off-diagonal cell as overlays, also to W&B when a run is on.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aeval import stats
from aeval.errors import CaseError
from aeval.keys import CellKey
from aeval.labels import AEVAL10_ORGANS, remap
from aeval.metrics import CLASS_SPACES, parse_metric_key
from aeval.nifti import atomic_path, write_text_atomic
from aeval.report import (
    METRICS,
    MODEL_ORDER,
    MR_TEST_SETS,
    PROTOCOL_ORDER,
    TEST_ORDER,
    TRAIN_ORDER,
    Grid,
    TextTable,
    _csv_text,
    _grids,
    _order,
    _save_figure,
    _slug,
    display,
)
from aeval.results import SUMMARY_JSON, cell_dir, cell_keys, predictions_dir, read_case_columns, read_summary

__all__ = ["Bootstrap", "CaseTable", "Comparison", "EvidenceOptions", "RULES", "build_evidence", "compare_runs",
           "load_case_table", "parse_selectors", "rank_study", "run", "worst_case_gallery", "write_case_table"]

log = logging.getLogger(__name__)

RULES = ("published", "excluded")  # both-empty pairs score 1 (A-Eval) | are dropped (TotalSegmentator, Touchstone)
RUN_FIELDS = ("protocol", "train", "model", "run")
ORGAN_ORDER = AEVAL10_ORGANS
CASE_COLUMNS = ("protocol", "train", "model", "run", "test", "metric", "case", "organ", "dsc", "nsd",
                "gt_empty", "pred_empty", "both_empty")


# --- the per-case table ---------------------------------------------------------------------------------------

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
    _strata: dict | None = field(default=None, repr=False)

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


def _cell_text(value: Any) -> str:
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


# --- cells as dense case x organ arrays, per test set ---------------------------------------------------------

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


def _strata(table: CaseTable) -> dict[str, Stratum]:
    """Dense arrays per test set (computed once per table)."""
    if table._strata is not None:
        return table._strata
    out = {}
    test_of_cell = np.array([k.test for k in table.keys], object)
    tests = test_of_cell[table.cell] if len(table) else np.zeros(0, object)
    organ_names = _order(table.organ, ORGAN_ORDER)
    organ_codes = {o: i for i, o in enumerate(organ_names)}
    organ_pos = np.fromiter((organ_codes[o] for o in table.organ), np.intp, len(table))
    both = table.both_empty
    for test in _order({k.test for k in table.keys}, TEST_ORDER):
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
    table._strata = out
    return out


class Bootstrap:
    """Case-resampling bootstrap of a table's cells: one draw of case counts per test set (its seed fixed by
    ``seed`` and the test set's name), shared by every cell, mean and paired difference on that set."""

    def __init__(self, table: CaseTable, rule: str = "published", n_resamples: int = 10_000,
                 confidence: float = 0.95, seed: int = 0):
        if rule not in RULES:
            raise ValueError(f"both-empty rule '{rule}' unknown; use one of {', '.join(RULES)}")
        self.table, self.rule, self.n_resamples, self.confidence, self.seed = table, rule, n_resamples, confidence, seed
        self.strata = _strata(table)
        self._counts: dict[str, np.ndarray] = {}
        self._replicates: dict[str, dict[int, np.ndarray]] = {}
        self._points: dict[str, dict[int, float]] = {}
        self.stratum_of = {cell: s for s in self.strata.values() for cell in s.cells}

    def counts(self, test: str) -> np.ndarray:
        if test not in self._counts:
            n = len(self.strata[test].cases)
            self._counts[test] = stats.bootstrap_counts(n, self.n_resamples, stats.rng_for(self.seed, test))
        return self._counts[test]

    def case_sums(self, cell: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """Per case of the cell's test set: the sum of the scored pairs' values and their count."""
        s = self.stratum_of[cell]
        i = s.row(cell)
        weights = s.weights(self.rule)[i]
        values = np.where(weights > 0, getattr(s, metric)[i], 0.0)
        return (values * weights).sum(1), weights.sum(1)

    def point(self, cell: int, metric: str) -> float:
        points = self._points.setdefault(metric, {})
        if cell not in points:
            sums, weights = self.case_sums(cell, metric)
            points[cell] = float(sums.sum() / weights.sum()) if weights.sum() > 0 else float("nan")
        return points[cell]

    def replicates(self, cell: int, metric: str) -> np.ndarray:
        cache = self._replicates.setdefault(metric, {})
        if cell not in cache:  # every cell of the test set at once: one matrix product
            s = self.stratum_of[cell]
            pairs = [self.case_sums(c, metric) for c in s.cells]
            sums = np.stack([p[0] for p in pairs], 1)
            weights = np.stack([p[1] for p in pairs], 1)
            resampled = stats.ratio_replicates(self.counts(s.test), sums, weights)
            for j, c in enumerate(s.cells):
                cache[c] = resampled[:, j]
        return cache[cell]

    def interval(self, cells: Sequence[int], metric: str) -> tuple[float, float, float]:
        """Mean over ``cells`` of their means and its interval (each test set resampled on its own)."""
        if not cells:
            return (float("nan"),) * 3
        mean = float(np.mean([self.point(c, metric) for c in cells]))
        if np.isnan(mean):
            return (mean,) * 3
        replicates = np.mean([self.replicates(c, metric) for c in cells], axis=0)
        low, high = stats.percentile_interval(replicates, self.confidence)
        return mean, float(low), float(high)

    def paired(self, a: int, b: int, metric: str) -> dict[str, float]:
        """Cell ``a`` minus cell ``b`` on the cases both scored: the difference of means, its paired bootstrap
        interval, the Wilcoxon p of the per-case scores, and both means."""
        s = self.stratum_of[a]
        (sa, wa), (sb, wb) = self.case_sums(a, metric), self.case_sums(b, metric)
        common = (wa > 0) & (wb > 0)
        n = int(common.sum())
        if n == 0:
            return {"n": 0, **{k: float("nan") for k in ("mean_a", "mean_b", "diff", "low", "high", "p")}}
        if common.all():  # the cells' own resamples, drawn from the same counts: paired
            replicates = self.replicates(a, metric) - self.replicates(b, metric)
        else:  # resample the common cases only
            keys = self.table.keys
            counts = stats.bootstrap_counts(n, self.n_resamples, stats.rng_for(
                self.seed, s.test, str(keys[a]), str(keys[b])))
            replicates = (stats.ratio_replicates(counts, sa[common], wa[common])
                          - stats.ratio_replicates(counts, sb[common], wb[common]))
        sa, wa, sb, wb = sa[common], wa[common], sb[common], wb[common]
        low, high = stats.percentile_interval(replicates, self.confidence)
        mean_a, mean_b = sa.sum() / wa.sum(), sb.sum() / wb.sum()
        return {"n": n, "mean_a": float(mean_a), "mean_b": float(mean_b), "diff": float(mean_a - mean_b),
                "low": float(low), "high": float(high), "p": stats.wilcoxon_p(sa / wa, sb / wb)}


# --- grids in the paper's layout -----------------------------------------------------------------------------

def _grid_cells(table: CaseTable) -> tuple[list[dict], dict]:
    """Grid rows (published cell means, as :func:`aeval.report.build_report` takes them) and a lookup
    (metric, model, protocol, train, test) -> [(run, cell index)]."""
    boot = Bootstrap(table, n_resamples=1)
    rows, lookup = [], {}
    for index, key in enumerate(table.keys):
        if index not in boot.stratum_of:
            continue
        rows.append({**key.as_dict(), "organ": None, **{m: boot.point(index, m) for m in METRICS}})
        lookup.setdefault((key.metric, key.model, key.protocol, key.train, key.test), []).append((key.run, index))
    return rows, lookup


def _grid_cell(grid: Grid, lookup: dict, row_key: tuple, test: str) -> int | None:
    found = lookup.get((grid.metric, grid.model, *row_key, test), [])
    found = [i for run, i in found if grid.variant is None or run == grid.variant]
    return found[0] if len(found) == 1 else None


def _columns(grid: Grid) -> list[str]:
    if grid.split_modalities:
        return grid.ct_tests + ["CT Mean"] + [t for t in grid.tests if t in MR_TEST_SETS] + ["All Mean"]
    return grid.tests + ["Mean"]


def layout_table(grid: Grid, lookup: dict, title: str, value: Callable[[list[int]], Any],
                 fmt: Callable[[Any], str], notes: Sequence[str] = ()) -> tuple[TextTable, list[dict]]:
    """A table in the paper's layout (rows = training sets, test sets, a row mean, CT/All means with AMOS MR,
    a bottom row of column means): ``value(cells)`` of one cell or of the cells a mean covers, shown with
    ``fmt``. Returns the table and ``{row, column, value}`` records."""
    columns = _columns(grid)

    def ids(keys, tests) -> list[int]:
        return [i for k in keys for t in tests if (i := _grid_cell(grid, lookup, k, t)) is not None]

    def cells_of(keys, column) -> list[int]:
        if column == "CT Mean":
            return ids(keys, grid.ct_tests)
        return ids(keys, grid.tests if column.endswith("Mean") else [column])

    header = ["Train \\ Test"] + [c if c.endswith("Mean") else display(c) for c in columns]
    rows, records = [], []
    for label, keys in [(grid.label(k), [k]) for k in grid.row_keys] + [("Mean", grid.row_keys)]:
        row = [label]
        for column, name in zip(columns, header[1:], strict=True):
            cells = cells_of(keys, column)
            if not cells:
                row.append("–")
                continue
            result = value(cells)
            row.append(fmt(result))
            records.append({"row": label, "column": name, "value": result})
        rows.append(row)
    return TextTable(title, header, rows, list(notes)), records


def _fmt_interval(interval: tuple[float, float, float]) -> str:
    mean, low, high = interval
    return "–" if np.isnan(mean) else f"{mean:.2f} [{low:.2f}, {high:.2f}]"


def _grid_fields(grid: Grid) -> dict[str, str]:
    return {"metric": grid.metric or "", "model": grid.model or "", "variant": grid.variant or ""}


def interval_tables(grids: list[Grid], lookup: dict, boot: Bootstrap) -> tuple[list[TextTable], list[dict]]:
    """Every cell and mean as ``mean [low, high]`` (one table per grid and measure) and the same as records."""
    tables, records = [], []
    note = (f"{100 * boot.confidence:.0f}% percentile bootstrap over cases within each test set, "
            f"{boot.n_resamples} resamples, seed {boot.seed}, both-empty rule '{boot.rule}'. "
            "A mean over cells is the mean of the cell means; each test set is resampled on its own.")
    for grid in grids:
        for metric in METRICS:
            table, found = layout_table(
                grid, lookup, f"{grid.title} — {metric.upper()} (%) with {100 * boot.confidence:.0f}% bootstrap "
                "intervals", lambda cells, metric=metric: boot.interval(cells, metric), _fmt_interval, [note])
            tables.append(table)
            records += [{**_grid_fields(grid), "measure": metric, "rule": boot.rule, "row": r["row"],
                         "column": r["column"], **dict(zip(("mean", "low", "high"), r["value"], strict=True)),
                         "confidence": boot.confidence, "n_resamples": boot.n_resamples, "seed": boot.seed}
                        for r in found]
    return tables, records


# --- empty-case accounting ------------------------------------------------------------------------------------

def empty_tables(grids: list[Grid], lookup: dict, table: CaseTable, side_by_side: bool
                 ) -> tuple[list[TextTable], list[dict], dict]:
    """Per grid: the share of both-empty pairs per cell and, with ``side_by_side``, DSC and NSD under the
    published rule and with those pairs dropped. Returns the tables, one record per cell, and per grid the
    matrices the figure draws."""
    published, excluded = Bootstrap(table, "published", 1), Bootstrap(table, "excluded", 1)
    both = table.both_empty
    share = {}
    for i in range(len(table.keys)):
        picked = both[table.cell == i]
        share[i] = float(100 * picked.mean()) if picked.size else float("nan")

    def pct(value: float) -> str:
        return "?" if np.isnan(value) else f"{value:.1f}"

    def pair(values: tuple[float, float]) -> str:
        return f"{values[0]:.2f} / {'?' if np.isnan(values[1]) else f'{values[1]:.2f}'}"

    tables, records, matrices = [], [], {}
    for grid in grids:
        tables.append(layout_table(
            grid, lookup, f"{grid.title} — both-empty pairs (% of case × organ pairs)",
            lambda cells: float(np.mean([share[i] for i in cells])), pct,
            ["Pairs where the organ is absent from both the ground truth and the prediction; the published rule "
             "scores them DSC = NSD = 1. '?': the cell was scored before empty flags were stored (re-score it)."])[0])
        if side_by_side:
            for metric in METRICS:
                def means(cells, metric=metric):
                    return (float(np.mean([published.point(i, metric) for i in cells])),
                            float(np.mean([excluded.point(i, metric) for i in cells])))

                tables.append(layout_table(grid, lookup, f"{grid.title} — {metric.upper()} (%): published rule / "
                                           "both-empty pairs excluded", means, pair,
                                           ["Means over the cells as in the paper; '?': empty flags unknown."])[0])
        cells = {(k, t): i for k in grid.row_keys for t in grid.tests
                 if (i := _grid_cell(grid, lookup, k, t)) is not None}
        matrices[grid.title] = (grid, {
            "share": [[share[cells[(k, t)]] if (k, t) in cells else np.nan for t in grid.tests] for k in grid.row_keys],
            "delta": [[excluded.point(cells[(k, t)], "dsc") - published.point(cells[(k, t)], "dsc")
                       if (k, t) in cells else np.nan for t in grid.tests] for k in grid.row_keys]})
        for i in cells.values():
            records.append({**table.keys[i].as_dict(), "both_empty_pct": share[i],
                            **{f"{m}_{rule}": boot.point(i, m) for m in METRICS
                               for rule, boot in (("published", published), ("excluded", excluded))}})
    return tables, records, matrices


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def empty_figure(grid: Grid, matrices: Mapping[str, list], path: Path) -> Path:
    """Two heatmaps: the share of both-empty pairs and how much DSC drops when they are excluded."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(1.8 * len(grid.tests) + 4, 0.5 * len(grid.row_keys) + 1.8))
    for ax, name, label, cmap in ((axes[0], "share", "both-empty pairs (%)", "magma"),
                                  (axes[1], "delta", "DSC excluded − published (pp)", "coolwarm_r")):
        matrix = np.array(matrices[name], np.float64)
        finite = matrix[np.isfinite(matrix)]
        extent = max(abs(finite).max(), 1e-9) if finite.size else 1
        limits = {"vmin": -extent, "vmax": extent} if name == "delta" else {"vmin": 0}
        image = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, aspect="auto", **limits)
        high = np.nanmax(matrix) if finite.size else 0
        for (i, j), v in np.ndenumerate(matrix):
            dark = name == "share" and not np.isnan(v) and v < 0.6 * high
            ax.text(j, i, "?" if np.isnan(v) else f"{v:.1f}", ha="center", va="center", fontsize=8,
                    color="white" if dark else "black")
        ax.set_xticks(range(len(grid.tests)), [display(t) for t in grid.tests], rotation=30, ha="right")
        ax.set_yticks(range(len(grid.row_keys)), [grid.label(k) for k in grid.row_keys])
        fig.colorbar(image, ax=ax, label=label)
    fig.suptitle(f"{grid.title} — both-empty pairs")
    _save_figure(fig, path)
    plt.close(fig)
    return path


# --- paired comparisons -------------------------------------------------------------------------------------

@dataclass
class Comparison:
    """One paired comparison: selector ``a`` minus selector ``b`` for the runs matched on ``match`` on one
    test set and measure."""

    a: str
    b: str
    match: str
    metric: str
    test: str
    measure: str
    values: dict[str, float] = field(default_factory=dict)
    p_holm: float = float("nan")

    @property
    def label(self) -> str:
        return f"{self.a} − {self.b}" + (f" · {self.match}" if self.match else "") + f" · {display(self.test)}"


def _selector_text(selector: Mapping[str, str]) -> str:
    return ", ".join(display(v) if f in ("model", "train") else f"{f}={v}" if f == "run" else display(v)
                     for f, v in selector.items())


def parse_selectors(compare: Any, keys: Sequence[CellKey]) -> list[dict[str, str]]:
    """Selectors from ``compare``: a field name (``model``: one selector per model present), or a list whose
    items are mappings ``{field: value}`` or bare values (``stu_s``: the one field that holds that value)."""
    if compare is None:
        return []
    if isinstance(compare, str):
        if compare not in RUN_FIELDS:
            raise ValueError(f"compare={compare}: a field ({', '.join(RUN_FIELDS)}) or a list of selectors")
        order = {"model": MODEL_ORDER, "protocol": PROTOCOL_ORDER, "train": TRAIN_ORDER}.get(compare, ())
        selectors = [{compare: v} for v in _order((getattr(k, compare) for k in keys), order)]
    else:
        selectors = []
        for item in compare:
            if isinstance(item, Mapping):
                unknown = set(item) - set(RUN_FIELDS)
                if unknown:
                    raise ValueError(f"compare: unknown field(s) {', '.join(sorted(unknown))}; "
                                     f"use {', '.join(RUN_FIELDS)}")
                selectors.append({str(f): str(v) for f, v in item.items()})
                continue
            fields = [f for f in RUN_FIELDS if any(getattr(k, f) == str(item) for k in keys)]
            if len(fields) != 1:
                raise ValueError(f"compare: '{item}' is {'in no' if not fields else 'in several'} run field"
                                 f"{'' if not fields else 's (' + ', '.join(fields) + ')'}; write {{field: value}}")
            selectors.append({fields[0]: str(item)})
    if len(selectors) < 2:
        raise ValueError(f"compare: needs at least two selectors, got {len(selectors)}")
    return selectors


def _matches(key: CellKey, selector: Mapping[str, str]) -> bool:
    return all(getattr(key, f) == v for f, v in selector.items())


def compare_runs(boot: Bootstrap, selectors: list[dict[str, str]], pairs: str = "reference") -> list[Comparison]:
    """Paired comparisons of selector pairs (``reference``: each against the first; ``all``: every pair), per
    metric mode, matched run (the run fields neither selector names) and test set, for DSC and NSD; Holm's
    correction over each measure's family."""
    if pairs not in ("reference", "all"):
        raise ValueError(f"compare_pairs={pairs}: use reference or all")
    chosen = [(selectors[0], s) for s in selectors[1:]] if pairs == "reference" else \
        [(a, b) for i, a in enumerate(selectors) for b in selectors[i + 1:]]
    keys = boot.table.keys
    scored = [i for i in range(len(keys)) if i in boot.stratum_of]
    out: list[Comparison] = []
    for a_sel, b_sel in chosen:
        match_fields = [f for f in ("protocol", "train", "model") if f not in a_sel and f not in b_sel]
        groups: dict[tuple, dict[str, list[int]]] = {}
        for i in scored:
            for side, selector in (("a", a_sel), ("b", b_sel)):
                if _matches(keys[i], selector):
                    group = (keys[i].metric, *(getattr(keys[i], f) for f in match_fields), keys[i].test)
                    groups.setdefault(group, {"a": [], "b": []})[side].append(i)
        test_rank = {t: i for i, t in enumerate(TEST_ORDER)}
        groups = {g: sides for g, sides in sorted(groups.items(), key=lambda item: (
            item[0][:-1], test_rank.get(item[0][-1], len(test_rank)), item[0][-1])) if sides["a"] and sides["b"]}
        varying = [j for j in range(len(match_fields)) if len({g[1 + j] for g in groups}) > 1]
        for group, sides in groups.items():
            for side, selector in (("a", a_sel), ("b", b_sel)):
                if len(sides[side]) > 1:
                    found = ", ".join(sorted(str(keys[i].run) for i in sides[side]))
                    raise ValueError(f"compare: {selector} matches {len(sides[side])} runs on {group[-1]} "
                                     f"(runs {found}); add run: <hash> to the selector")
            metric, *matched, test = group
            match = ", ".join(display(matched[j]) for j in varying)
            for measure in METRICS:
                values = boot.paired(sides["a"][0], sides["b"][0], measure)
                out.append(Comparison(_selector_text(a_sel), _selector_text(b_sel), match, metric, test, measure,
                                      values))
    if not out:
        raise ValueError(f"compare: no test set has cells of both sides of any pair ({selectors})")
    for measure in METRICS:
        family = [c for c in out if c.measure == measure]
        for c, p in zip(family, stats.holm([c.values["p"] for c in family]), strict=True):
            c.p_holm = float(p)
    return out


def _p_text(p: float) -> str:
    return "–" if np.isnan(p) else f"{p:.2e}" if p < 1e-3 else f"{p:.3f}"


def comparison_table(comparisons: list[Comparison], boot: Bootstrap) -> TextTable:
    rows = [[c.a, c.b, c.match, display(c.test), c.metric, c.measure.upper(), str(c.values["n"]),
             f"{c.values['mean_a']:.2f}", f"{c.values['mean_b']:.2f}",
             _fmt_interval((c.values["diff"], c.values["low"], c.values["high"])), _p_text(c.values["p"]),
             _p_text(c.p_holm)] for c in comparisons]
    n = len(comparisons) // len(METRICS)
    note = (f"Δ = A − B on the cases both scored (%), {100 * boot.confidence:.0f}% paired percentile bootstrap "
            f"({boot.n_resamples} resamples, seed {boot.seed}); p: two-sided Wilcoxon signed-rank on per-case "
            f"scores; Holm over the {n} comparisons of each measure; both-empty rule '{boot.rule}'.")
    return TextTable("Paired comparisons", ["A", "B", "matched on", "Test", "metric", "measure", "cases", "A (%)",
                                            "B (%)", "Δ [CI]", "p", "p (Holm)"], rows, [note])


def forest_plot(comparisons: list[Comparison], path: Path) -> Path:
    """Mean differences with their intervals, one panel per measure; filled where Holm's p < 0.05."""
    plt = _plt()
    measures = [m for m in METRICS if any(c.measure == m for c in comparisons)]
    n = max(sum(c.measure == m for c in comparisons) for m in measures)
    fig, axes = plt.subplots(1, len(measures), figsize=(6 * len(measures), 0.28 * n + 1.6), sharey=True,
                             squeeze=False)
    for ax, measure in zip(axes[0], measures, strict=True):
        picked = [c for c in comparisons if c.measure == measure]
        y = np.arange(len(picked))[::-1]
        diff = np.array([c.values["diff"] for c in picked])
        err = np.array([[c.values["diff"] - c.values["low"], c.values["high"] - c.values["diff"]] for c in picked]).T
        significant = np.array([c.p_holm < 0.05 for c in picked])
        ax.errorbar(diff, y, xerr=err, fmt="none", ecolor="0.4", capsize=2)
        ax.scatter(diff[significant], y[significant], color="tab:red", zorder=3, label="Holm p < 0.05")
        ax.scatter(diff[~significant], y[~significant], facecolor="white", edgecolor="tab:blue", zorder=3,
                   label="not significant")
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(y, [c.label for c in picked] if measure == measures[0] else [], fontsize=7)
        ax.set_xlabel(f"Δ {measure.upper()} (percentage points), A − B")
        ax.set_title(measure.upper())
    axes[0][0].legend(loc="lower left", fontsize=7)
    _save_figure(fig, path)
    plt.close(fig)
    return path


# --- rank-then-aggregate ----------------------------------------------------------------------------------------

@dataclass
class RankStudy:
    """Mean ranks (per case, organ and measure, 1 = best, averaged) and how often each entry holds each rank."""

    title: str
    entries: list[str]
    mean_rank: np.ndarray
    mean_rank_by: dict[str, np.ndarray]
    frequencies: np.ndarray
    n_tuples: int


def rank_study(boot: Bootstrap, title: str, entries: Mapping[str, Mapping[tuple, int]]) -> RankStudy | None:
    """Rank ``entries`` (name -> {block: cell}) against each other in every (block, case, organ) that all of
    them scored, on DSC and NSD; average the ranks; bootstrap the cases of each test set for rank stability.
    Under the ``excluded`` rule a pair that any entry scores as both-empty is left out."""
    names = list(entries)
    blocks = sorted(set.intersection(*(set(e) for e in entries.values())), key=str)
    if len(names) < 2 or not blocks:
        return None
    sums: dict[str, np.ndarray] = {}  # test -> per-case rank sums (n_cases, n_entries)
    counts: dict[str, np.ndarray] = {}
    by_measure = {m: [0.0, 0] for m in METRICS}
    for block in blocks:
        cells = [entries[n][block] for n in names]
        s = boot.stratum_of[cells[0]]
        rows = [s.row(c) for c in cells]
        ok = s.present[rows].all(0)
        if boot.rule == "excluded":
            ok &= ~np.any(s.both[rows] == 1, axis=0) & ~np.any(np.isnan(s.both[rows]), axis=0)
        case_of = np.nonzero(ok)[0]
        if not case_of.size:
            continue
        rank_sum = sums.setdefault(s.test, np.zeros((len(s.cases), len(names))))
        count = counts.setdefault(s.test, np.zeros(len(s.cases)))
        for measure in METRICS:
            values = getattr(s, measure)[rows][:, ok].T  # (pairs, entries)
            ranks = stats.case_ranks(values)
            np.add.at(rank_sum, case_of, ranks)
            np.add.at(count, case_of, 1)
            by_measure[measure][0] = by_measure[measure][0] + ranks.sum(0)
            by_measure[measure][1] += len(ranks)
    if not counts:
        return None
    total = sum(c.sum() for c in counts.values())
    mean_rank = sum(s.sum(0) for s in sums.values()) / total
    resampled = sum(boot.counts(t) @ sums[t] for t in sums) / sum(boot.counts(t) @ counts[t] for t in counts)[:, None]
    return RankStudy(title, names, mean_rank, {m: v[0] / v[1] for m, v in by_measure.items() if v[1]},
                     stats.rank_frequencies(resampled), int(total // len(METRICS)))


def rank_studies(boot: Bootstrap, grids: list[Grid], lookup: dict) -> list[RankStudy]:
    """Model sizes (same protocol and training set) and training sets (rows of one model's grid)."""
    keys = boot.table.keys
    studies = []
    for metric in _order({k.metric for k in keys}, ("aeval", "flare22")):
        models: dict[str, dict[tuple, int]] = {}
        for i, k in enumerate(keys):
            if k.metric == metric and i in boot.stratum_of:
                models.setdefault(display(k.model), {}).setdefault((k.protocol, k.train, k.test), i)
        ordered = {display(m): models[display(m)] for m in _order({k.model for k in keys}, MODEL_ORDER)
                   if display(m) in models}
        study = rank_study(boot, f"Model sizes · metric {metric}", ordered)
        if study:
            studies.append(study)
    for grid in grids:
        rows = {grid.label(k): {t: i for t in grid.tests if (i := _grid_cell(grid, lookup, k, t)) is not None}
                for k in grid.row_keys}
        study = rank_study(boot, f"Training sets · {grid.title}", rows)
        if study:
            studies.append(study)
    return studies


def rank_table(study: RankStudy, boot: Bootstrap) -> TextTable:
    n = len(study.entries)
    order = np.argsort(study.mean_rank, kind="stable")
    rows = [[study.entries[e], f"{study.mean_rank[e]:.3f}",
             *(f"{study.mean_rank_by[m][e]:.3f}" if m in study.mean_rank_by else "–" for m in METRICS),
             *(f"{100 * study.frequencies[e, r]:.1f}" for r in range(n))] for e in order]
    note = (f"Ranked per case, organ and measure among the {n} entries (1 = best, ties share the best rank), "
            f"ranks averaged over {study.n_tuples} (case, organ) pairs × DSC, NSD; P(rank r): share of "
            f"{boot.n_resamples} case bootstraps (seed {boot.seed}) in which the entry ranks r-th.")
    return TextTable(f"Rank-then-aggregate — {study.title}", ["Entry", "mean rank", "DSC rank", "NSD rank",
                                                               *(f"P(rank {r + 1}) %" for r in range(n))],
                     rows, [note])


def rank_figure(study: RankStudy, path: Path) -> Path:
    """challengeR's blob plot: how often each entry (x) holds each rank (y), bubble area = share of resamples."""
    plt = _plt()
    n = len(study.entries)
    order = np.argsort(study.mean_rank, kind="stable")
    fig, ax = plt.subplots(figsize=(0.9 * n + 2.5, 0.6 * n + 2))
    for x, e in enumerate(order):
        share = study.frequencies[e]
        ranks = np.flatnonzero(share)
        ax.scatter(np.full(ranks.size, x), ranks + 1, s=900 * share[ranks], color="tab:blue", alpha=0.7)
        for r in ranks:
            if share[r] >= 0.05:
                ax.text(x + 0.18, r + 1, f"{100 * share[r]:.0f}%", va="center", fontsize=7)
        ax.plot(x, study.mean_rank[e], marker="x", color="black")
    ax.set_xticks(range(n), [study.entries[e] for e in order], rotation=30, ha="right")
    ax.set_yticks(range(1, n + 1))
    ax.set_ylim(n + 0.6, 0.4)
    ax.set_ylabel("rank (bubble: share of bootstrap resamples; x: mean rank)")
    ax.set_title(f"Rank stability — {study.title}")
    _save_figure(fig, path)
    plt.close(fig)
    return path


# --- worst-case galleries -----------------------------------------------------------------------------------

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
    plt = _plt()
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
    _save_figure(fig, path)
    plt.close(fig)
    return path


def _case_files(results_root: Path, data_root: Path, key: CellKey, case: str) -> tuple[Path, Path, Path]:
    return (predictions_dir(results_root, key.run_key, key.test) / f"{case}.nii.gz",
            data_root / key.test / "imagesTs" / f"{case}_0000.nii.gz",
            data_root / key.test / "labelsTs" / f"{case}.nii.gz")


def _label_systems(results_root: Path, data_root: Path, key: CellKey) -> tuple[str, str]:
    summary = read_summary(results_root, key) or {}
    gt_system = summary.get("gt_labels")
    if not gt_system:
        meta = data_root / key.test / "dataset.json"
        if not meta.is_file():
            raise CaseError(meta, "file not found (needed for the ground truth's label system)")
        try:
            gt_system = json.loads(meta.read_text())["label_system"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CaseError(meta, f"no label_system ({type(err).__name__}: {err})") from None
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
        slug = _slug(key.protocol, key.train, key.model, key.run, key.test, key.metric)
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
                                  out_dir / "gallery" / slug / f"{case}.png")
            files.append(path)
            images.setdefault(slug, []).append((path, title))
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


# --- the evidence report -------------------------------------------------------------------------------------

@dataclass
class EvidenceOptions:
    """What :func:`build_evidence` adds (``evidence.*`` and ``compare*`` in ``conf/report.yaml``)."""

    cases: bool = True
    ci: bool = False
    n_resamples: int = 10_000
    confidence: float = 0.95
    seed: int = 0
    both_empty: str = "published"
    empty_grid: bool = False
    ranks: bool = False
    gallery: int = 0
    wandb: bool = False
    compare: Any = None
    compare_pairs: str = "reference"
    figures: bool = True

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> EvidenceOptions:
        from omegaconf import OmegaConf

        section = cfg.get("evidence") or {}
        section = OmegaConf.to_container(section, resolve=True) if OmegaConf.is_config(section) else dict(section)
        compare = cfg.get("compare")
        compare = OmegaConf.to_container(compare, resolve=True) if OmegaConf.is_config(compare) else compare
        known = set(cls.__dataclass_fields__) - {"compare", "compare_pairs"}
        unknown = set(section) - known
        if unknown:
            raise ValueError(f"evidence: unknown key(s) {', '.join(sorted(unknown))}")
        return cls(**section, compare=compare, compare_pairs=str(cfg.get("compare_pairs") or "reference"))


@dataclass
class Evidence:
    text: str
    files: list[Path]
    problems: list[str]


def _csv(records: list[dict]) -> str:
    return _csv_text([{k: _cell_text(v) for k, v in r.items()} for r in records])


def build_evidence(results_root: str | os.PathLike, out_dir: str | os.PathLike, options: EvidenceOptions,
                   keys: Sequence[CellKey] | None = None, data_root: str | os.PathLike | None = None) -> Evidence:
    """Write ``evidence.md`` and what its options ask for into ``out_dir`` from the cells of ``keys`` (every
    cell under ``results_root`` when None)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    table = load_case_table(results_root, keys, problems)
    if not len(table):
        asked = [name for name, on in (("evidence.ci", options.ci), ("compare", options.compare is not None),
                                       ("evidence.ranks", options.ranks), ("evidence.gallery", options.gallery))
                 if on]
        if asked:
            raise ValueError(f"{results_root}: no cell has a case table (cases.csv); {', '.join(asked)} need one")
        return Evidence("", [], problems)
    files: list[Path] = []
    sections = ["# Evidence beyond the means", ""]
    if options.cases:
        files += write_case_table(table, out_dir)
        flagged = int(np.sum(~np.isnan(table.gt_empty)))
        sections.append(f"Per-case table: `cases.csv`{' and `cases.parquet`' if len(files) > 1 else ''} "
                        f"({len(table)} case × organ rows of {len(table.keys)} cells; "
                        f"{len(table) - flagged} rows without empty flags).\n")
    boot = Bootstrap(table, options.both_empty, options.n_resamples, options.confidence, options.seed)
    grid_rows, lookup = _grid_cells(table)
    grids = _grids(grid_rows) if grid_rows else []
    several = len(grids) > 1

    tables, records, matrices = empty_tables(grids, lookup, table, options.empty_grid)
    sections += [t.markdown() for t in tables]
    files.append(write_text_atomic(out_dir / "empty_pairs.csv", _csv(records)))
    if options.figures and options.empty_grid:
        for grid, matrix in matrices.values():
            name = _slug("empty_pairs", grid.metric if several else None, grid.model if several else None,
                         grid.variant if several else None)
            files.append(empty_figure(grid, matrix, out_dir / f"{name}.png"))

    if options.ci:
        tables, records = interval_tables(grids, lookup, boot)
        sections += [t.markdown() for t in tables]
        files.append(write_text_atomic(out_dir / "intervals.csv", _csv(records)))

    if options.compare is not None:
        selectors = parse_selectors(options.compare, table.keys)
        comparisons = compare_runs(boot, selectors, options.compare_pairs)
        sections.append(comparison_table(comparisons, boot).markdown())
        files.append(write_text_atomic(out_dir / "paired.csv", _csv([
            {"a": c.a, "b": c.b, "matched_on": c.match, "metric": c.metric, "test": c.test, "measure": c.measure,
             **c.values, "p_holm": c.p_holm, "rule": boot.rule, "seed": boot.seed,
             "n_resamples": boot.n_resamples} for c in comparisons])))
        if options.figures:
            files.append(forest_plot(comparisons, out_dir / "paired_forest.png"))

    if options.ranks:
        records = []
        for study in rank_studies(boot, grids, lookup):
            sections.append(rank_table(study, boot).markdown())
            for e, name in enumerate(study.entries):
                records.append({"study": study.title, "entry": name, "mean_rank": study.mean_rank[e],
                                **{f"{m}_rank": study.mean_rank_by.get(m, [np.nan] * len(study.entries))[e]
                                   for m in METRICS},
                                **{f"p_rank_{r + 1}": study.frequencies[e, r] for r in range(len(study.entries))}})
            if options.figures:
                files.append(rank_figure(study, out_dir / f"{_slug('ranks', study.title)}.png"))
        if records:
            files.append(write_text_atomic(out_dir / "ranks.csv", _csv(records)))
        else:
            sections.append("No rank study: no two models or training sets share scored cases.\n")

    if options.gallery > 0:
        if data_root is None:
            raise ValueError("evidence.gallery needs paths.data_root (the unified datasets)")
        gallery, images_files, images = worst_case_gallery(boot, results_root, data_root, options.gallery, out_dir,
                                                           problems)
        files += images_files
        if gallery is not None:
            sections.append(gallery.markdown())
        if log_gallery_to_wandb(images, options.wandb, out_dir):
            sections.append("Gallery logged to W&B (`gallery/<cell>`).\n")
    if several:
        sections.append("Grids: " + ", ".join(g.title for g in grids) + "\n")
    text = "\n".join(sections)
    files.append(write_text_atomic(out_dir / "evidence.md", text))
    log.info("evidence: wrote %d files to %s", len(files), out_dir)
    return Evidence(text, files, problems)


def run(cfg: Mapping[str, Any]) -> Evidence:
    """The report CLI's hook: evidence for the cells under ``cfg.results`` (those of ``cfg.metric`` and
    ``cfg.protocol`` when set) into ``cfg.out``."""
    options = EvidenceOptions.from_config(cfg)
    keys = [k for k in cell_keys(cfg["results"])
            if (not cfg.get("metric") or k.metric == cfg["metric"])
            and (not cfg.get("protocol") or k.protocol == cfg["protocol"])]
    paths = cfg.get("paths") or {}
    return build_evidence(cfg["results"], cfg["out"], options, keys, paths.get("data_root"))
