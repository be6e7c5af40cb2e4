"""All the evidence for a results folder in one call, written into one folder (``evidence.md`` and its files)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aeval.evidence.bootstrap import Bootstrap
from aeval.evidence.cases import cell_text, load_case_table, write_case_table
from aeval.evidence.comparisons import compare_runs, comparison_table, forest_plot, parse_selectors
from aeval.evidence.gallery import log_gallery_to_wandb, worst_case_gallery
from aeval.evidence.ranks import rank_figure, rank_studies, rank_table
from aeval.evidence.tables import empty_figure, empty_tables, grid_cells, interval_tables
from aeval.keys import CellKey
from aeval.nifti import write_text_atomic
from aeval.reporting.cells import (
    METRICS,
    csv_text,
)
from aeval.reporting.figures import slug
from aeval.reporting.tables import grids_of
from aeval.results import cell_keys

log = logging.getLogger(__name__)




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
    """The evidence's Markdown text, the files written and the problems met on the way."""

    text: str
    files: list[Path]
    problems: list[str]


def _csv(records: list[dict]) -> str:
    return csv_text([{k: cell_text(v) for k, v in r.items()} for r in records])


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
    grid_rows, lookup = grid_cells(table)
    grids = grids_of(grid_rows) if grid_rows else []
    several = len(grids) > 1

    tables, records, matrices = empty_tables(grids, lookup, table, options.empty_grid)
    sections += [t.markdown() for t in tables]
    files.append(write_text_atomic(out_dir / "empty_pairs.csv", _csv(records)))
    if options.figures and options.empty_grid:
        for grid, matrix in matrices.values():
            name = slug("empty_pairs", grid.metric if several else None, grid.model if several else None,
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
                files.append(rank_figure(study, out_dir / f"{slug('ranks', study.title)}.png"))
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


def evidence_from_config(cfg: Mapping[str, Any]) -> Evidence:
    """The report CLI's hook: evidence for the cells under ``cfg.results`` (those of ``cfg.metric`` and
    ``cfg.protocol`` when set) into ``cfg.out``."""
    options = EvidenceOptions.from_config(cfg)
    keys = [k for k in cell_keys(cfg["results"])
            if (not cfg.get("metric") or k.metric == cfg["metric"])
            and (not cfg.get("protocol") or k.protocol == cfg["protocol"])]
    paths = cfg.get("paths") or {}
    return build_evidence(cfg["results"], cfg["out"], options, keys, paths.get("data_root"))
