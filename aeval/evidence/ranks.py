"""Rank-then-aggregate (FLARE, challengeR) with bootstrap rank stability, for model sizes and training sets."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aeval import stats
from aeval.evidence.bootstrap import Bootstrap
from aeval.evidence.tables import grid_cell
from aeval.reporting.cells import (
    METRICS,
    MODEL_ORDER,
    display,
    ordered,
)
from aeval.reporting.figures import pyplot, save_figure
from aeval.reporting.tables import Grid, TextTable


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
    for metric in ordered({k.metric for k in keys}, ("aeval", "flare22")):
        models: dict[str, dict[tuple, int]] = {}
        for i, k in enumerate(keys):
            if k.metric == metric and i in boot.stratum_of:
                models.setdefault(display(k.model), {}).setdefault((k.protocol, k.train, k.test), i)
        by_size = {display(m): models[display(m)] for m in ordered({k.model for k in keys}, MODEL_ORDER)
                   if display(m) in models}
        study = rank_study(boot, f"Model sizes · metric {metric}", by_size)
        if study:
            studies.append(study)
    for grid in grids:
        rows = {grid.label(k): {t: i for t in grid.tests if (i := grid_cell(grid, lookup, k, t)) is not None}
                for k in grid.row_keys}
        study = rank_study(boot, f"Training sets · {grid.title}", rows)
        if study:
            studies.append(study)
    return studies


def rank_table(study: RankStudy, boot: Bootstrap) -> TextTable:
    """A rank study as a table: mean rank (overall, per measure) and the share of resamples at each rank."""
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
    plt = pyplot()
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
    save_figure(fig, path)
    plt.close(fig)
    return path
