"""The paper's tables as text: Table 3 (Table 9 with MR test sets) per model, the model-size table and
the per-organ tables, rendered to Markdown, LaTeX and CSV rows."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from aeval.reporting.cells import (
    METRICS,
    MODEL_ORDER,
    MR_DATASETS,
    MR_TEST_SETS,
    PROTOCOL_ORDER,
    TEST_ORDER,
    TRAIN_ORDER,
    case_count,
    completeness,
    display,
    fmt_mean_sd,
    fmt_value,
    mean_sd,
    ordered,
)


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
        return ordered((c.get("variant") for c in picked), ())
    slots = {}
    for c in picked:
        slots.setdefault((c["protocol"], c["train"], c["test"]), set()).add(c.get("run"))
    if any(len(runs) > 1 for runs in slots.values()):
        return ordered((c.get("run") for c in picked), ())
    return [None]


def grids_of(cells: list[dict]) -> list[Grid]:
    """One grid per (metric, model, run variant) among the cells."""
    grids = []
    for metric in ordered((c["metric"] for c in cells), ("aeval", "flare22")):
        for model in ordered((c["model"] for c in cells if c["metric"] == metric), MODEL_ORDER):
            of_model = [c for c in cells if c["metric"] == metric and c["model"] == model]
            for variant in _variants(of_model):
                picked = [c for c in of_model if variant is None or variant in (c.get("variant"), c.get("run"))]
                grids.append(_grid(metric, model, variant, picked))
    return grids


def _grid(metric: str | None, model: str | None, variant: str | None, picked: list[dict]) -> Grid:
    protocols = ordered((c["protocol"] for c in picked), PROTOCOL_ORDER)
    trains = ordered((c["train"] for c in picked), TRAIN_ORDER)
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
    tests = ordered((c["test"] for c in picked), TEST_ORDER)
    return Grid(metric, model, row_keys, tests, values, variant,
                {key: ",".join(sorted(found)) for key, found in runs.items()})


def _pair(dsc: str, nsd: str) -> str:
    return f"{dsc} / {nsd}"


def grid_table(grid: Grid) -> TextTable:
    """Table 3 (Table 9 with AMOS MR): DSC / NSD per cell, Mean ± SD per row, per column and overall."""
    def stat(keys=None, tests=None) -> str:
        return _pair(*(fmt_mean_sd(grid.present(m, keys, tests)) for m in METRICS))

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
                text = _pair(fmt_value(c["dsc"]), fmt_value(c["nsd"])) if c else "–"
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
            mean, sd = mean_sd(grid.present(m, [key])) if grid.present(m, [key]) else ("", "")
            row[f"mean_{m}"], row[f"sd_{m}"] = _round(mean), _round(sd)
        row["incomplete"] = len(grid.incomplete([key]))
        out.append(row)
    for stat_name, index in (("column mean", 0), ("column sd", 1)):
        row = {"metric": grid.metric or "", "model": grid.model or "", "protocol": "", "train": "", "run": "",
               "label": stat_name, "incomplete": len(grid.incomplete()) if index == 0 else ""}
        for t in grid.tests:
            for m in METRICS:
                values = grid.present(m, tests=[t])
                row[f"{t}_{m}"] = _round(mean_sd(values)[index]) if values else ""
        for m in METRICS:
            values = grid.present(m)
            row[f"mean_{m}" if index == 0 else f"sd_{m}"] = _round(mean_sd(values)[index]) if values else ""
            row.setdefault(f"sd_{m}" if index == 0 else f"mean_{m}", "")
        out.append(row)
    return out


def _round(value):
    return round(value, 4) if isinstance(value, float) else value


def model_size_table(grids: list[Grid]) -> TextTable:
    """Figure 3 as a table: per model, mean ± SD over all its cells."""
    rows = [[display(g.model) + (f" ({g.variant})" if g.variant else ""), fmt_mean_sd(g.present("dsc")),
             fmt_mean_sd(g.present("nsd")),
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
        tests = ordered((c["test"] for c in picked), TEST_ORDER)
        organs = list(dict.fromkeys(c["organ"] for c in picked))
        values = {(c["organ"], c["test"]): c for c in picked}
        rows = []
        for organ in organs:
            row = [organ]
            for t in tests:
                c = values.get((organ, t))
                row.append(_pair(fmt_value(c["dsc"]), fmt_value(c["nsd"])) if c else "–")
            present = [values[(organ, t)] for t in tests if (organ, t) in values]
            row.append(_pair(*(fmt_mean_sd([c[m] for c in present]) for m in METRICS)))
            rows.append(row)
        title = " · ".join(p for p in (display(model) if model else "", f"trained on {display(train)}",
                                       protocol or "", f"metric {metric}" if metric else "") if p)
        tables.append(TextTable(f"Per organ — {title} — DSC / NSD (%)",
                                ["Organ"] + [display(t) for t in tests] + ["Mean ± SD"], rows))
    return tables
