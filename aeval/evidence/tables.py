"""The evidence laid out as the paper's grid: interval tables, and the empty-case accounting (share of
both-empty pairs per cell, and the grid with those pairs dropped beside the published one)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from aeval.evidence.bootstrap import Bootstrap
from aeval.evidence.cases import CaseTable
from aeval.reporting.cells import (
    METRICS,
    MR_TEST_SETS,
    display,
)
from aeval.reporting.figures import pyplot, save_figure
from aeval.reporting.tables import Grid, TextTable


def grid_cells(table: CaseTable) -> tuple[list[dict], dict]:
    """Grid rows (published cell means, as :func:`aeval.reporting.build.build_report` takes them) and a lookup
    (metric, model, protocol, train, test) -> [(run, cell index)]."""
    boot = Bootstrap(table, n_resamples=1)
    rows, lookup = [], {}
    for index, key in enumerate(table.keys):
        if index not in boot.stratum_of:
            continue
        rows.append({**key.as_dict(), "organ": None, **{m: boot.point(index, m) for m in METRICS}})
        lookup.setdefault((key.metric, key.model, key.protocol, key.train, key.test), []).append((key.run, index))
    return rows, lookup


def grid_cell(grid: Grid, lookup: dict, row_key: tuple, test: str) -> int | None:
    """The case-table index of the grid's cell (row, test), None when absent."""
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
        return [i for k in keys for t in tests if (i := grid_cell(grid, lookup, k, t)) is not None]

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


def fmt_interval(interval: tuple[float, float, float]) -> str:
    """``mean [low, high]`` with two decimals."""
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
                "intervals", lambda cells, metric=metric: boot.interval(cells, metric), fmt_interval, [note])
            tables.append(table)
            records += [{**_grid_fields(grid), "measure": metric, "rule": boot.rule, "row": r["row"],
                         "column": r["column"], **dict(zip(("mean", "low", "high"), r["value"], strict=True)),
                         "confidence": boot.confidence, "n_resamples": boot.n_resamples, "seed": boot.seed}
                        for r in found]
    return tables, records


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
                 if (i := grid_cell(grid, lookup, k, t)) is not None}
        matrices[grid.title] = (grid, {
            "share": [[share[cells[(k, t)]] if (k, t) in cells else np.nan for t in grid.tests] for k in grid.row_keys],
            "delta": [[excluded.point(cells[(k, t)], "dsc") - published.point(cells[(k, t)], "dsc")
                       if (k, t) in cells else np.nan for t in grid.tests] for k in grid.row_keys]})
        for i in cells.values():
            records.append({**table.keys[i].as_dict(), "both_empty_pct": share[i],
                            **{f"{m}_{rule}": boot.point(i, m) for m in METRICS
                               for rule, boot in (("published", published), ("excluded", excluded))}})
    return tables, records, matrices


def empty_figure(grid: Grid, matrices: Mapping[str, list], path: Path) -> Path:
    """Two heatmaps: the share of both-empty pairs and how much DSC drops when they are excluded."""
    plt = pyplot()
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
    save_figure(fig, path)
    plt.close(fig)
    return path
