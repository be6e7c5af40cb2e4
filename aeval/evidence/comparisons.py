"""Paired comparisons of runs on the same cases: mean difference, paired bootstrap interval, Wilcoxon p,
Holm over the family asked for; a table and a forest plot."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aeval import stats
from aeval.evidence.bootstrap import Bootstrap
from aeval.evidence.cases import RUN_FIELDS
from aeval.evidence.tables import fmt_interval
from aeval.keys import CellKey
from aeval.reporting.cells import (
    METRICS,
    MODEL_ORDER,
    PROTOCOL_ORDER,
    TEST_ORDER,
    TRAIN_ORDER,
    display,
    ordered,
)
from aeval.reporting.figures import pyplot, save_figure
from aeval.reporting.tables import TextTable


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
        selectors = [{compare: v} for v in ordered((getattr(k, compare) for k in keys), order)]
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
    """The paired comparisons as one table (difference, interval, p, Holm)."""
    rows = [[c.a, c.b, c.match, display(c.test), c.metric, c.measure.upper(), str(c.values["n"]),
             f"{c.values['mean_a']:.2f}", f"{c.values['mean_b']:.2f}",
             fmt_interval((c.values["diff"], c.values["low"], c.values["high"])), _p_text(c.values["p"]),
             _p_text(c.p_holm)] for c in comparisons]
    n = len(comparisons) // len(METRICS)
    note = (f"Δ = A − B on the cases both scored (%), {100 * boot.confidence:.0f}% paired percentile bootstrap "
            f"({boot.n_resamples} resamples, seed {boot.seed}); p: two-sided Wilcoxon signed-rank on per-case "
            f"scores; Holm over the {n} comparisons of each measure; both-empty rule '{boot.rule}'.")
    return TextTable("Paired comparisons", ["A", "B", "matched on", "Test", "metric", "measure", "cases", "A (%)",
                                            "B (%)", "Δ [CI]", "p", "p (Holm)"], rows, [note])


def forest_plot(comparisons: list[Comparison], path: Path) -> Path:
    """Mean differences with their intervals, one panel per measure; filled where Holm's p < 0.05."""
    plt = pyplot()
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
    save_figure(fig, path)
    plt.close(fig)
    return path
