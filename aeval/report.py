"""The A-Eval tables and figures from result cells: ``python -m aeval.report cells=FILE.csv out=…`` or
``python -m aeval.report results=DIR out=…``.

A cell is one (protocol, training set, model, run, test set, metric mode) result, stored by
:mod:`aeval.results` (which alone reads and writes cells); a CSV gives the same rows directly (columns
``train,test,dsc,nsd`` in %, optionally ``model``, ``run``, ``protocol``, ``metric`` and ``organ``).

:func:`build_report` writes the paper's Table 3 layout per model (rows = training sets, columns = test
sets, DSC / NSD with 2 decimals, ``Mean ± SD`` per row and per column and overall, population SD; with
AMOS MR among the test sets ``CT Mean ± SD`` and ``All Mean ± SD`` as in Table 9), the model-size
comparison (Figure 3) when cells carry several models, per-organ tables when organ-level cells exist,
and optionally the paper's published values beside ours: ``grid.md``, ``grid.csv``, ``grid.tex``, one
heatmap PNG per metric, ``model_sizes.png``. With two or more MR test sets (the 2025 edition's grid) the
table is laid out by modality: CT columns, ``CT Mean``, MR columns, ``MR Mean``, ``All Mean``, and the same
for the rows (CT-trained rows, MR-trained rows, then their means); cells read from a results folder carry
their per-case DSC, drawn as the 2025 README's box plots (``boxplot_dsc.png``). Every report opens with a
metric card naming the metric mode of its cells and the rules it applies.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from aeval.entry import hydra_entry
from aeval.errors import CaseError
from aeval.metrics import metric_card
from aeval.nifti import atomic_path, write_text_atomic
from aeval.results import read_cells
from aeval.validate import check_output_folder

DATASET_NAMES = {
    "flare22": "FLARE22", "amos_ct": "AMOS CT", "amos_mr": "AMOS MR", "amos_ct_mr": "AMOS CT+MR",
    "word": "WORD", "word2025": "WORD 2025", "totalseg": "TotalSegmentator", "totalseg_v2": "TotalSegmentator v2",
    "totalseg_mr": "TotalSegmentator MR", "btcv": "BTCV", "joint": "Joint",
}
MODEL_NAMES = {"stu_s": "STU-Net-S", "stu_b": "STU-Net-B", "stu_l": "STU-Net-L", "stu_h": "STU-Net-H"}
TRAIN_ORDER = ("flare22", "amos_ct", "amos_mr", "amos_ct_mr", "word", "word2025", "totalseg", "totalseg_v2",
               "totalseg_mr", "joint")
TEST_ORDER = ("flare22", "amos_ct", "word", "word2025", "totalseg", "totalseg_v2", "btcv", "amos_mr", "totalseg_mr")
PROTOCOL_ORDER = ("individual", "pseudo_label", "multimodal", "joint")
MODEL_ORDER = ("stu_s", "stu_b", "stu_l", "stu_h")
MR_DATASETS = frozenset({"amos_mr", "totalseg_mr"})  # MR test columns; MR-trained rows in the modality layout
MR_TEST_SETS = MR_DATASETS
METRICS = ("dsc", "nsd")
PAPER_DIR = Path(__file__).resolve().parent / "paper"
PUBLISHED_MODEL = "stu_l"  # the size of the paper's tables


def display(name: str) -> str:
    return DATASET_NAMES.get(name, MODEL_NAMES.get(name, name))


def _order(values: Iterable[str | None], preferred: Sequence[str]) -> list:
    rank = {v: i for i, v in enumerate(preferred)}
    return sorted(set(values), key=lambda v: (rank.get(v, len(rank)), str(v)))


def _fmt(value: float) -> str:
    return f"{value:.2f}"


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population SD (numpy ``std``, ddof=0), as the paper reports them."""
    array = np.asarray(values, np.float64)
    return float(array.mean()), float(array.std())


def _fmt_mean_sd(values: Sequence[float]) -> str:
    if not len(values):
        return "–"
    mean, sd = _mean_sd(values)
    return f"{_fmt(mean)} ± {_fmt(sd)}"


# --- cells ----------------------------------------------------------------------------------------------

def _optional(value) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    return text or None


def normalize_cells(cells) -> list[dict]:
    """Rows ``{protocol, model, metric, organ, train, test, dsc, nsd}`` (values in %) from dicts, a CSV's
    rows or a DataFrame; raises ValueError for a row without train/test/dsc/nsd or a duplicated cell."""
    if hasattr(cells, "to_dict"):
        cells = cells.to_dict("records")
    rows, seen = [], set()
    for i, cell in enumerate(cells):
        try:
            row = {k: _optional(cell.get(k)) for k in ("protocol", "model", "run", "metric", "organ")}
            row.update(train=str(cell["train"]).strip(), test=str(cell["test"]).strip(),
                       dsc=float(cell["dsc"]), nsd=float(cell["nsd"]))
            if isinstance(cell.get("case_dsc"), list | tuple):
                row["case_dsc"] = tuple(float(v) for v in cell["case_dsc"])
            row.update({k: cell[k] for k in ("variant", "n_cases", "n_failed", "n_expected")
                        if cell.get(k) is not None})
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"cell {i + 1}: needs train, test, dsc and nsd ({type(err).__name__}: {err})") from None
        row.update(_counts(cell))
        key = tuple(row[k] for k in ("protocol", "model", "run", "metric", "organ", "train", "test"))
        if key in seen:
            raise ValueError(f"cell {i + 1}: duplicate cell {key}")
        seen.add(key)
        rows.append(row)
    return rows


def _counts(cell) -> dict:
    """``n_cases``/``n_failed``/``n_expected`` of a cell, where known (the results store records them)."""
    counts = {}
    for name in ("n_cases", "n_failed", "n_expected"):
        value = _optional(cell.get(name))
        if value is not None:
            counts[name] = int(float(value))
    return counts


def case_count(cell: dict) -> str | None:
    """``"cases scored/cases expected"`` where the cell records them, e.g. ``"3/4"``."""
    if "n_cases" not in cell:
        return None
    return f"{cell['n_cases']}/{cell.get('n_expected') or cell['n_cases'] + cell.get('n_failed', 0)}"


def completeness(cell: dict) -> str | None:
    """The case count of a cell scored on fewer cases than expected (some failed), None for a complete one."""
    count = case_count(cell)
    if count is None:
        return None
    scored, expected = (int(n) for n in count.split("/"))
    return count if scored < expected or cell.get("n_failed") else None


def read_cells_csv(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise CaseError(path, "file not found")
    with open(path, newline="") as f:
        try:
            return normalize_cells(list(csv.DictReader(f)))
        except ValueError as err:
            raise CaseError(path, str(err)) from None


# --- tables ---------------------------------------------------------------------------------------------

@dataclass
class TextTable:
    """A table as strings, rendered to Markdown and LaTeX alike."""

    title: str
    header: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.header) + " |",
                 "|" + "|".join(["---"] + [":---:"] * (len(self.header) - 1)) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        lines += [""] + [f"{n}" for n in self.notes] + ([""] if self.notes else [])
        return "\n".join(lines)

    def latex(self) -> str:
        def tex(text: str) -> str:
            text = re.sub(r"([&%_#$])", r"\\\1", text.replace("\\", r"\textbackslash{}"))
            return text.replace("±", r"$\pm$").replace("–", "--").replace("Δ", r"$\Delta$")

        lines = [r"\begin{table}[ht]", r"\centering", rf"\caption{{{tex(self.title)}}}",
                 r"\begin{tabular}{l" + "c" * (len(self.header) - 1) + "}", r"\toprule",
                 " & ".join(tex(h) for h in self.header) + r" \\", r"\midrule"]
        lines += [" & ".join(tex(c) for c in r) + r" \\" for r in self.rows]
        lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
        return "\n".join(lines)


@dataclass
class Grid:
    """The train × test cells of one (metric, model): values[(protocol, train)][test] = {dsc, nsd}."""

    metric: str | None
    model: str | None
    row_keys: list[tuple[str | None, str]]
    tests: list[str]
    values: dict
    variant: str | None = None
    runs: dict = field(default_factory=dict)  # (protocol, train) -> the run hash(es) its cells came from

    @property
    def title(self) -> str:
        parts = [display(self.model) if self.model else "", f"run {self.variant}" if self.variant else "",
                 f"metric {self.metric}" if self.metric else ""]
        return " · ".join(p for p in parts if p) or "Train × test grid"

    def label(self, key: tuple[str | None, str]) -> str:
        protocol, train = key
        siblings = {p for p, t in self.row_keys if t == train}
        if len(siblings) <= 1:
            return display(train)
        if protocol == "pseudo_label":
            return f"{display(train)} w/ PL"
        if protocol == "individual" and "pseudo_label" in siblings:
            return f"{display(train)} w/o PL"
        return f"{display(train)} ({protocol})"

    def cell(self, key, test) -> dict | None:
        return self.values.get(key, {}).get(test)

    @property
    def ct_tests(self) -> list[str]:
        return [t for t in self.tests if t not in MR_TEST_SETS]

    @property
    def mr_tests(self) -> list[str]:
        return [t for t in self.tests if t in MR_TEST_SETS]

    @property
    def split_modalities(self) -> bool:
        return any(t in MR_TEST_SETS for t in self.tests) and bool(self.ct_tests)

    @property
    def by_modality(self) -> bool:
        """The 2025 layout (CT / MR columns and rows, each with its mean): two or more MR test sets."""
        return len(self.mr_tests) >= 2 and bool(self.ct_tests)

    def row_groups(self) -> list[tuple[str, list]]:
        """Bottom rows of the table: (label, row keys); by modality CT-trained and MR-trained rows apart."""
        if not self.by_modality:
            return [("Mean ± SD", self.row_keys)]
        ct = [k for k in self.row_keys if k[1] not in MR_DATASETS]
        mr = [k for k in self.row_keys if k[1] in MR_DATASETS]
        groups = [("CT Mean ± SD", ct)] if ct and mr else []
        groups += [("MR Mean ± SD", mr)] if ct and mr else []
        return groups + [("All Mean ± SD" if ct and mr else "Mean ± SD", self.row_keys)]

    def present(self, metric: str, keys=None, tests=None) -> list[float]:
        keys = self.row_keys if keys is None else keys
        tests = self.tests if tests is None else tests
        return [c[metric] for k in keys for t in tests if (c := self.cell(k, t)) is not None]

    def missing(self) -> list[str]:
        return [f"{self.label(k)} → {display(t)}" for k in self.row_keys for t in self.tests if self.cell(k, t) is None]

    def incomplete(self, keys=None) -> list[str]:
        """Cells scored on fewer cases than expected, as ``"label → test n = 3/4"``."""
        keys = self.row_keys if keys is None else keys
        return [f"{self.label(k)} → {display(t)} n = {c['partial']}" for k in keys for t in self.tests
                if (c := self.cell(k, t)) is not None and c.get("partial")]


def _variants(picked: list[dict]) -> list[str | None]:
    """Runs to report apart: a caller's ``variant`` labels, else the run hashes when one (protocol, train,
    test) holds cells of several runs (a seed sweep); one unnamed grid otherwise."""
    if any(c.get("variant") for c in picked):
        return _order((c.get("variant") for c in picked), ())
    slots = {}
    for c in picked:
        slots.setdefault((c["protocol"], c["train"], c["test"]), set()).add(c.get("run"))
    if any(len(runs) > 1 for runs in slots.values()):
        return _order((c.get("run") for c in picked), ())
    return [None]


def _grids(cells: list[dict]) -> list[Grid]:
    grids = []
    for metric in _order((c["metric"] for c in cells), ("aeval", "flare22")):
        for model in _order((c["model"] for c in cells if c["metric"] == metric), MODEL_ORDER):
            of_model = [c for c in cells if c["metric"] == metric and c["model"] == model]
            for variant in _variants(of_model):
                picked = [c for c in of_model if variant is None or variant in (c.get("variant"), c.get("run"))]
                grids.append(_grid(metric, model, variant, picked))
    return grids


def _grid(metric: str | None, model: str | None, variant: str | None, picked: list[dict]) -> Grid:
    protocols = _order((c["protocol"] for c in picked), PROTOCOL_ORDER)
    trains = _order((c["train"] for c in picked), TRAIN_ORDER)
    row_keys = [(p, t) for p in protocols for t in trains
                if any(c["protocol"] == p and c["train"] == t for c in picked)]
    if len(protocols) > 1:  # keep a training set's rows together
        row_keys.sort(key=lambda k: trains.index(k[1]))
    values: dict = {}
    runs: dict = {}
    for c in picked:
        values.setdefault((c["protocol"], c["train"]), {})[c["test"]] = {
            **{m: c[m] for m in METRICS}, "partial": completeness(c), "n": case_count(c)}
        if c.get("run"):
            runs.setdefault((c["protocol"], c["train"]), set()).add(c["run"])
    tests = _order((c["test"] for c in picked), TEST_ORDER)
    return Grid(metric, model, row_keys, tests, values, variant,
                {key: ",".join(sorted(found)) for key, found in runs.items()})


def _pair(dsc: str, nsd: str) -> str:
    return f"{dsc} / {nsd}"


def grid_table(grid: Grid) -> TextTable:
    """Table 3 (Table 9 with AMOS MR): DSC / NSD per cell, Mean ± SD per row, per column and overall."""
    def stat(keys=None, tests=None) -> str:
        return _pair(*(_fmt_mean_sd(grid.present(m, keys, tests)) for m in METRICS))

    ct, mr = grid.ct_tests, grid.mr_tests
    if grid.by_modality:
        columns = ct + ["CT Mean ± SD"] + mr + ["MR Mean ± SD", "All Mean ± SD"]
    elif grid.split_modalities:
        columns = ct + ["CT Mean ± SD"] + mr + ["All Mean ± SD"]
    else:
        columns = grid.tests + ["Mean ± SD"]
    mean_tests = {"CT Mean ± SD": ct, "MR Mean ± SD": mr}
    header = ["Train \\ Test"] + [c if c.endswith("SD") else display(c) for c in columns]
    row_keys = grid.row_keys
    if grid.by_modality:  # CT-trained rows first, then MR-trained ones
        row_keys = sorted(row_keys, key=lambda k: k[1] in MR_DATASETS)
    rows = []
    for key in row_keys:
        row = [grid.label(key)]
        for column in columns:
            if column.endswith("Mean ± SD"):
                row.append(stat([key], mean_tests.get(column)))
            else:
                c = grid.cell(key, column)
                text = _pair(_fmt(c["dsc"]), _fmt(c["nsd"])) if c else "–"
                row.append(f"{text} (n = {c['partial']})" if c and c["partial"] else text)
        rows.append(row)
    for label, keys in grid.row_groups():
        bottom = [label]
        for column in columns:
            if column.endswith("Mean ± SD"):
                bottom.append(stat(keys, mean_tests.get(column)))
            else:
                bottom.append(stat(keys, [column]))
        rows.append(bottom)
    notes = ["DSC / NSD in %; SD is the population SD (ddof=0)."]
    if grid.runs:
        notes.append("Runs: " + "; ".join(f"{grid.label(k)} {grid.runs[k]}" for k in grid.row_keys if k in grid.runs))
    missing = grid.missing()
    if missing:
        notes.append(f"Missing cells ({len(missing)}, means over the present ones): " + "; ".join(missing))
    incomplete = grid.incomplete()
    if incomplete:
        notes.append(f"Incomplete cells ({len(incomplete)}, scored on the cases that did not fail; re-run them to "
                     "complete): " + "; ".join(incomplete))
    return TextTable(f"{grid.title} — DSC / NSD (%)", header, rows, notes)


def grid_csv_rows(grid: Grid) -> list[dict]:
    """Machine-readable grid: one row per training set plus a column-mean and a column-SD row."""
    out = []
    for key in grid.row_keys:
        row = {"metric": grid.metric or "", "model": grid.model or "", "protocol": key[0] or "", "train": key[1],
               "run": grid.runs.get(key, ""), "label": grid.label(key)}
        for t in grid.tests:
            c = grid.cell(key, t)
            for m in METRICS:
                row[f"{t}_{m}"] = round(c[m], 4) if c else ""
            if c and c["n"]:
                row[f"{t}_n"] = c["n"]
        for m in METRICS:
            mean, sd = _mean_sd(grid.present(m, [key])) if grid.present(m, [key]) else ("", "")
            row[f"mean_{m}"], row[f"sd_{m}"] = _round(mean), _round(sd)
        row["incomplete"] = len(grid.incomplete([key]))
        out.append(row)
    for stat_name, index in (("column mean", 0), ("column sd", 1)):
        row = {"metric": grid.metric or "", "model": grid.model or "", "protocol": "", "train": "", "run": "",
               "label": stat_name, "incomplete": len(grid.incomplete()) if index == 0 else ""}
        for t in grid.tests:
            for m in METRICS:
                values = grid.present(m, tests=[t])
                row[f"{t}_{m}"] = _round(_mean_sd(values)[index]) if values else ""
        for m in METRICS:
            values = grid.present(m)
            row[f"mean_{m}" if index == 0 else f"sd_{m}"] = _round(_mean_sd(values)[index]) if values else ""
            row.setdefault(f"sd_{m}" if index == 0 else f"mean_{m}", "")
        out.append(row)
    return out


def _round(value):
    return round(value, 4) if isinstance(value, float) else value


def model_size_table(grids: list[Grid]) -> TextTable:
    """Figure 3 as a table: per model, mean ± SD over all its cells."""
    rows = [[display(g.model) + (f" ({g.variant})" if g.variant else ""), _fmt_mean_sd(g.present("dsc")),
             _fmt_mean_sd(g.present("nsd")),
             str(len(g.present("dsc")))] for g in grids]
    metric = grids[0].metric
    title = "Model sizes — mean ± SD over the cells" + (f" · metric {metric}" if metric else "")
    return TextTable(title, ["Model", "DSC (%)", "NSD (%)", "cells"], rows)


def organ_tables(cells: list[dict]) -> list[TextTable]:
    """Per-organ DSC / NSD (Tables 7/8): one table per (metric, model, protocol, training set)."""
    organ_cells = [c for c in cells if c["organ"]]
    tables = []
    groups = sorted({(c["metric"], c["model"], c["protocol"], c["train"]) for c in organ_cells},
                    key=lambda k: tuple(str(v) for v in k))
    for metric, model, protocol, train in groups:
        picked = [c for c in organ_cells
                  if (c["metric"], c["model"], c["protocol"], c["train"]) == (metric, model, protocol, train)]
        tests = _order((c["test"] for c in picked), TEST_ORDER)
        organs = list(dict.fromkeys(c["organ"] for c in picked))
        values = {(c["organ"], c["test"]): c for c in picked}
        rows = []
        for organ in organs:
            row = [organ]
            for t in tests:
                c = values.get((organ, t))
                row.append(_pair(_fmt(c["dsc"]), _fmt(c["nsd"])) if c else "–")
            present = [values[(organ, t)] for t in tests if (organ, t) in values]
            row.append(_pair(*(_fmt_mean_sd([c[m] for c in present]) for m in METRICS)))
            rows.append(row)
        title = " · ".join(p for p in (display(model) if model else "", f"trained on {display(train)}",
                                       protocol or "", f"metric {metric}" if metric else "") if p)
        tables.append(TextTable(f"Per organ — {title} — DSC / NSD (%)",
                                ["Organ"] + [display(t) for t in tests] + ["Mean ± SD"], rows))
    return tables


# --- the paper's values -----------------------------------------------------------------------------------

def load_paper(paper: str | os.PathLike) -> list[dict]:
    """Published cells: ``table3``/``table9`` (from ``aeval/paper/``, STU-Net-L) or a CSV path."""
    path = Path(paper)
    if path.suffix:
        return read_cells_csv(path)
    cells = read_cells_csv(PAPER_DIR / f"{paper}_cells.csv")
    return [{**c, "model": c["model"] or PUBLISHED_MODEL} for c in cells]


def paper_comparison(grid: Grid, paper: list[dict]) -> tuple[TextTable, list[dict]] | None:
    """Our cells beside the paper's (same training and test set, and protocol/model where both say)."""
    entries = []
    for key in grid.row_keys:
        protocol, train = key
        for test in grid.tests:
            ours = grid.cell(key, test)
            if ours is None:
                continue
            match = [p for p in paper if p["train"] == train and p["test"] == test and p["organ"] is None
                     and (p["protocol"] is None or protocol is None or p["protocol"] == protocol)
                     and (p["model"] is None or grid.model is None or p["model"] == grid.model)]
            if len(match) == 1:
                entries.append((key, test, ours, match[0]))
    if not entries:
        return None
    rows, records = [], []
    for key, test, ours, ref in entries:
        deltas = {m: ours[m] - ref[m] for m in METRICS}
        rows.append([grid.label(key), display(test)]
                    + [v for m in METRICS for v in (_fmt(ours[m]), _fmt(ref[m]), f"{deltas[m]:+.2f}")])
        records.append({"metric": grid.metric or "", "model": grid.model or "", "protocol": key[0] or "",
                        "train": key[1], "test": test,
                        **{f"{k}_{m}": round(v, 4) for m in METRICS
                           for k, v in (("ours", ours[m]), ("paper", ref[m]), ("delta", deltas[m]))}})
    mean = {m: (np.mean([e[2][m] for e in entries]), np.mean([e[3][m] for e in entries])) for m in METRICS}
    rows.append(["Mean", f"{len(entries)} cells"]
                + [v for m in METRICS for v in (_fmt(mean[m][0]), _fmt(mean[m][1]), f"{mean[m][0] - mean[m][1]:+.2f}")])
    header = ["Train", "Test", "DSC ours", "DSC paper", "Δ DSC", "NSD ours", "NSD paper", "Δ NSD"]
    return TextTable(f"{grid.title} — ours vs the paper (%)", header, rows), records


# --- figures --------------------------------------------------------------------------------------------

def _slug(*parts: str | None) -> str:
    return "_".join(re.sub(r"[^A-Za-z0-9_]+", "-", p).strip("-") for p in parts if p)


def _save_figure(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=150, bbox_inches="tight", format="png")
    return path


def heatmap(grid: Grid, metric: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.array([[c[metric] if (c := grid.cell(k, t)) else np.nan for t in grid.tests] for k in grid.row_keys])
    fig, ax = plt.subplots(figsize=(1.4 * len(grid.tests) + 2.5, 0.7 * len(grid.row_keys) + 1.8))
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(grid.tests)), [display(t) for t in grid.tests], rotation=30, ha="right")
    ax.set_yticks(range(len(grid.row_keys)), [grid.label(k) for k in grid.row_keys])
    ax.set_xlabel("test set")
    ax.set_ylabel("training set")
    finite = matrix[np.isfinite(matrix)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, "–" if np.isnan(v) else _fmt(v), ha="center", va="center",
                color="black" if not np.isnan(v) and v > middle else "white", fontsize=9)
    fig.colorbar(image, ax=ax, label=f"{metric.upper()} (%)")
    ax.set_title(f"{grid.title} — {metric.upper()}")
    _save_figure(fig, path)
    plt.close(fig)
    return path


def case_boxplot(grid: Grid, cells: list[dict], path: Path) -> Path | None:
    """The 2025 README's view: per test set, the distribution of per-case DSC of each training set's model.
    None when no cell of ``grid`` carries per-case values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_case = {(c["protocol"], c["train"], c["test"]): c["case_dsc"] for c in cells
                if c.get("case_dsc") and c["organ"] is None and c["metric"] == grid.metric and c["model"] == grid.model}
    tests = [t for t in grid.tests if any(k[2] == t for k in per_case)]
    if not tests:
        return None
    keys = sorted(grid.row_keys, key=lambda k: k[1] in MR_DATASETS) if grid.by_modality else grid.row_keys
    colours = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, len(tests), figsize=(2.2 + 0.45 * len(keys) * len(tests), 4.2), squeeze=False,
                             sharey=True)
    for ax, test in zip(axes[0], tests, strict=True):
        present = [k for k in keys if (*k, test) in per_case]
        boxes = ax.boxplot([per_case[(*k, test)] for k in present], patch_artist=True, widths=0.6,
                           medianprops={"color": "black"})
        for i, (box, key) in enumerate(zip(boxes["boxes"], present, strict=True), start=1):
            box.set_facecolor(colours(keys.index(key) % 10))
            box.set_alpha(0.7)
            values = per_case[(*key, test)]  # the cases themselves: a few cases make no box
            ax.plot(i + np.linspace(-0.15, 0.15, len(values)), values, "o", color="black", markersize=2.5)
        ax.set_xticks(range(1, len(present) + 1), [grid.label(k) for k in present], rotation=60, ha="right",
                      fontsize=8)
        ax.set_title(display(test), fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].set_ylabel("per-case DSC (%)")
    fig.suptitle(f"{grid.title} — per-case DSC by training set")
    _save_figure(fig, path)
    plt.close(fig)
    return path


def model_size_chart(grids: list[Grid], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(len(grids))
    fig, ax = plt.subplots(figsize=(1.6 * len(grids) + 2, 4))
    for offset, metric in ((-0.18, "dsc"), (0.18, "nsd")):
        stats = [_mean_sd(g.present(metric)) for g in grids]
        bars = ax.bar(x + offset, [s[0] for s in stats], 0.36, yerr=[s[1] for s in stats], capsize=4,
                      label=metric.upper())
        ax.bar_label(bars, fmt="%.2f", padding=2, fontsize=8, label_type="center")
    ax.set_xticks(x, [display(g.model) for g in grids])
    ax.set_ylabel("mean ± SD over cells (%)")
    ax.set_title("Model sizes" + (f" · metric {grids[0].metric}" if grids[0].metric else ""))
    ax.legend()
    _save_figure(fig, path)
    plt.close(fig)
    return path


# --- the report -----------------------------------------------------------------------------------------

@dataclass
class Report:
    """The Markdown text (what the CLI prints) and the files written."""

    text: str
    files: list[Path]


def _csv_text(records: list[dict]) -> str:
    fields = list(dict.fromkeys(k for r in records for k in r))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return buffer.getvalue()


def build_report(cells_df_or_rows, out_dir: str | os.PathLike, paper: str | os.PathLike | None = None,
                 title: str = "A-Eval results", figures: bool = True) -> Report:
    """Write ``grid.md``, ``grid.csv``, ``grid.tex``, heatmaps (and the model-size chart, per-organ
    tables, the comparison with ``paper``) into ``out_dir``; return the Markdown text and the files.
    ``figures=False`` skips the PNGs."""
    cells = normalize_cells(cells_df_or_rows)
    grid_cells = [c for c in cells if c["organ"] is None]
    if not grid_cells:
        raise ValueError("no grid cells (rows without an organ) to report")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    grids = _grids(grid_cells)
    paper_cells = load_paper(paper) if paper else None
    sections, tex, csv_rows, files, comparisons = [f"# {title}", ""], [], [], [], []
    sections += metric_section(grid_cells)
    several = len(grids) > 1
    for grid in grids:
        table = grid_table(grid)
        sections.append(table.markdown())
        tex.append(table.latex())
        csv_rows += grid_csv_rows(grid)
        for metric in METRICS if figures else ():
            name = _slug("heatmap", grid.metric if several else None, grid.model if several else None, metric)
            files.append(heatmap(grid, metric, out_dir / f"{name}.png"))
        if figures:
            name = _slug("boxplot", grid.metric if several else None, grid.model if several else None, "dsc")
            box = case_boxplot(grid, grid_cells, out_dir / f"{name}.png")
            files += [box] if box else []
        if paper_cells is not None:
            compared = paper_comparison(grid, paper_cells)
            if compared:
                sections.append(compared[0].markdown())
                tex.append(compared[0].latex())
                comparisons += compared[1]
    for metric in _order((g.metric for g in grids), ("aeval", "flare22")):
        sized = [g for g in grids if g.metric == metric and g.model]
        if len(sized) > 1:
            table = model_size_table(sized)
            sections.append(table.markdown())
            tex.append(table.latex())
            name = _slug("model_sizes", metric if len({g.metric for g in grids}) > 1 else None)
            if figures:
                files.append(model_size_chart(sized, out_dir / f"{name}.png"))
    for table in organ_tables(cells):
        sections.append(table.markdown())
        tex.append(table.latex())
    if paper_cells is not None and not comparisons:
        sections.append(f"No cell matches the paper's values ({paper}).\n")
    text = "\n".join(sections)
    files.append(write_text_atomic(out_dir / "grid.md", text))
    files.append(write_text_atomic(out_dir / "grid.csv", _csv_text(csv_rows)))
    files.append(write_text_atomic(out_dir / "grid.tex", "% needs \\usepackage{booktabs}\n" + "\n".join(tex)))
    organ_records = [c for c in cells if c["organ"]]
    if organ_records:
        files.append(write_text_atomic(out_dir / "organs.csv", _csv_text(organ_records)))
    if comparisons:
        files.append(write_text_atomic(out_dir / "comparison.csv", _csv_text(comparisons)))
    return Report(text, files)


def metric_section(cells: list[dict]) -> list[str]:
    """The report's metric card: what each metric mode among ``cells`` scores and how."""
    keys = _order((c["metric"] for c in cells if c["metric"]), ("aeval", "flare22", "aeval10", "aeval2025_script"))
    lines = ["### Metric", ""]
    for key in keys:
        lines += metric_card(key)
    if any(c["metric"] is None for c in cells):
        lines.append("- cells without a metric mode (a CSV without a `metric` column): mode not recorded.")
    return lines + [""]


def run(cfg: DictConfig) -> int:
    """The CLI's work: read the cells, write the report, print it; a bad input is one line and code 2."""
    problems: list[str] = []
    check_output_folder(cfg.out)
    try:
        cells = read_cells_csv(cfg.cells) if cfg.cells else read_cells(cfg.results, problems)
        if cfg.get("metric"):
            cells = [c for c in cells if c["metric"] in (None, cfg.metric)]
        if cfg.get("protocol"):
            cells = [c for c in cells if c["protocol"] in (None, cfg.protocol)]
        for line in problems:
            print(f"[warning] {line}")
        report = build_report(cells, cfg.out, paper=cfg.paper)
        if not cfg.cells and cfg.get("evidence"):  # per-case evidence needs the results folder
            from aeval import evidence

            found = evidence.run(cfg)
            for line in found.problems:
                print(f"[warning] {line}")
            report = Report(report.text + "\n" + found.text, report.files + found.files)
    except (CaseError, ValueError) as err:
        print(f"[error] {err}")
        return 2
    print(report.text)
    print("wrote " + ", ".join(str(f) for f in report.files))
    return 0


main = hydra_entry("report", run)

if __name__ == "__main__":
    main()
