"""The paper's published cells (``aeval/paper/``) and our cells beside them."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from aeval.reporting.cells import METRICS, PAPER_DIR, PUBLISHED_MODEL, display, fmt_value, read_cells_csv
from aeval.reporting.tables import Grid, TextTable


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
                    + [v for m in METRICS for v in (fmt_value(ours[m]), fmt_value(ref[m]), f"{deltas[m]:+.2f}")])
        records.append({"metric": grid.metric or "", "model": grid.model or "", "protocol": key[0] or "",
                        "train": key[1], "test": test,
                        **{f"{k}_{m}": round(v, 4) for m in METRICS
                           for k, v in (("ours", ours[m]), ("paper", ref[m]), ("delta", deltas[m]))}})
    mean = {m: (np.mean([e[2][m] for e in entries]), np.mean([e[3][m] for e in entries])) for m in METRICS}
    rows.append(["Mean", f"{len(entries)} cells"]
                + [v for m in METRICS
                   for v in (fmt_value(mean[m][0]), fmt_value(mean[m][1]), f"{mean[m][0] - mean[m][1]:+.2f}")])
    header = ["Train", "Test", "DSC ours", "DSC paper", "Δ DSC", "NSD ours", "NSD paper", "Δ NSD"]
    return TextTable(f"{grid.title} — ours vs the paper (%)", header, rows), records
