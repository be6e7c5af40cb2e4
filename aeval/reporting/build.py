"""One report from a set of cells: every table and figure written into one folder."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from aeval.evidence import evidence_from_config
from aeval.metrics import metric_card
from aeval.nifti import write_text_atomic
from aeval.reporting.cells import METRICS, csv_text, normalize_cells, ordered, read_cells_csv
from aeval.reporting.figures import case_boxplot, heatmap, model_size_chart, slug
from aeval.reporting.paper import load_paper, paper_comparison
from aeval.reporting.tables import grid_csv_rows, grid_table, grids_of, model_size_table, organ_tables
from aeval.results import read_cells
from aeval.validate import check_output_folder

log = logging.getLogger(__name__)


@dataclass
class Report:
    """The Markdown text (what the CLI prints) and the files written."""

    text: str
    files: list[Path]


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
    grids = grids_of(grid_cells)
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
            name = slug("heatmap", grid.metric if several else None, grid.model if several else None, metric)
            files.append(heatmap(grid, metric, out_dir / f"{name}.png"))
        if figures:
            name = slug("boxplot", grid.metric if several else None, grid.model if several else None, "dsc")
            box = case_boxplot(grid, grid_cells, out_dir / f"{name}.png")
            files += [box] if box else []
        if paper_cells is not None:
            compared = paper_comparison(grid, paper_cells)
            if compared:
                sections.append(compared[0].markdown())
                tex.append(compared[0].latex())
                comparisons += compared[1]
    for metric in ordered((g.metric for g in grids), ("aeval", "flare22")):
        sized = [g for g in grids if g.metric == metric and g.model]
        if len(sized) > 1:
            table = model_size_table(sized)
            sections.append(table.markdown())
            tex.append(table.latex())
            name = slug("model_sizes", metric if len({g.metric for g in grids}) > 1 else None)
            if figures:
                files.append(model_size_chart(sized, out_dir / f"{name}.png"))
    for table in organ_tables(cells):
        sections.append(table.markdown())
        tex.append(table.latex())
    if paper_cells is not None and not comparisons:
        sections.append(f"No cell matches the paper's values ({paper}).\n")
    text = "\n".join(sections)
    files.append(write_text_atomic(out_dir / "grid.md", text))
    files.append(write_text_atomic(out_dir / "grid.csv", csv_text(csv_rows)))
    files.append(write_text_atomic(out_dir / "grid.tex", "% needs \\usepackage{booktabs}\n" + "\n".join(tex)))
    organ_records = [c for c in cells if c["organ"]]
    if organ_records:
        files.append(write_text_atomic(out_dir / "organs.csv", csv_text(organ_records)))
    if comparisons:
        files.append(write_text_atomic(out_dir / "comparison.csv", csv_text(comparisons)))
    return Report(text, files)


def metric_section(cells: list[dict]) -> list[str]:
    """The report's metric card: what each metric mode among ``cells`` scores and how."""
    keys = ordered((c["metric"] for c in cells if c["metric"]), ("aeval", "flare22", "aeval10", "aeval2025_script"))
    lines = ["### Metric", ""]
    for key in keys:
        lines += metric_card(key)
    if any(c["metric"] is None for c in cells):
        lines.append("- cells without a metric mode (a CSV without a `metric` column): mode not recorded.")
    return lines + [""]


def report_from_config(cfg: DictConfig) -> Report:
    """The ``aeval.report`` job's work: read the cells (``cells=`` CSV or ``results=`` folder), keep the
    requested metric and protocol, write the report, and the per-case evidence where a results folder has it.

    Raises:
        CaseError: a cells file or results folder that cannot be read.
        ValueError: no grid cells, or a malformed cell.
    """
    problems: list[str] = []
    check_output_folder(cfg.out)
    cells = read_cells_csv(cfg.cells) if cfg.cells else read_cells(cfg.results, problems)
    if cfg.get("metric"):
        cells = [c for c in cells if c["metric"] in (None, cfg.metric)]
    if cfg.get("protocol"):
        cells = [c for c in cells if c["protocol"] in (None, cfg.protocol)]
    for line in problems:
        log.warning("%s", line)
    report = build_report(cells, cfg.out, paper=cfg.paper)
    if not cfg.cells and cfg.get("evidence"):  # per-case evidence needs the results folder
        found = evidence_from_config(cfg)
        for line in found.problems:
            log.warning("%s", line)
        report = Report(report.text + "\n" + found.text, report.files + found.files)
    return report
