"""Bootstrap intervals for every cell mean and every row, column, CT and overall mean of the paper's
grid: cases resampled within each test set, one draw per test set shared by every cell on it
(:mod:`aeval.stats`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from aeval import stats
from aeval.evidence.cases import RULES, CaseTable, strata


class Bootstrap:
    """Case-resampling bootstrap of a table's cells: one draw of case counts per test set (its seed fixed by
    ``seed`` and the test set's name), shared by every cell, mean and paired difference on that set."""

    def __init__(self, table: CaseTable, rule: str = "published", n_resamples: int = 10_000,
                 confidence: float = 0.95, seed: int = 0):
        if rule not in RULES:
            raise ValueError(f"both-empty rule '{rule}' unknown; use one of {', '.join(RULES)}")
        self.table, self.rule, self.n_resamples, self.confidence, self.seed = table, rule, n_resamples, confidence, seed
        self.strata = strata(table)
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
