"""Evidence report speed: a full model-size study (4 sizes × 4 training sets × 5 test sets = 80 cells, ~300
cases × 8 organs each, 192,000 case rows) through ``python -m aeval.report`` with bootstrap intervals for
every cell and mean (10,000 resamples), every pairwise comparison of the sizes (6 pairs × 20 cells = 120
paired tests per measure, Holm), rank-then-aggregate with rank stability, and all figures.

    PYTHONPATH=. .venv/bin/python experiments/benchmarks/evidence_speed.py [--cases 300] [--repeats 1]
        [--record experiments/benchmarks/results/evidence_speed.md]

The synthetic cells are written with :func:`aeval.results.write_cell` first (not timed); then
``aeval.reporting.build.report_from_config`` is timed end to end (reading the cells, the paper's tables and
heatmaps, the evidence),
and the evidence stages once more on their own.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from score_speed import timed  # the benchmarks' one timing helper (median of repeats), same folder

import aeval
from aeval import evidence
from aeval.keys import CellKey
from aeval.labels import AEVAL8_ORGANS
from aeval.reporting.build import report_from_config
from aeval.reporting.tables import grids_of
from aeval.results import write_cell
from aeval.scoring import summarize

MODELS = ("stu_s", "stu_b", "stu_l", "stu_h")
TRAINS = ("flare22", "amos_ct", "word", "totalseg")
TESTS = ("flare22", "amos_ct", "word", "totalseg", "btcv")
CONF = Path(aeval.__file__).resolve().parent / "conf"


def synthesize(root: Path, n_cases: int, seed: int = 0) -> int:
    """Cells with per-case difficulty shared across runs, size effects of ~1 point, 5% organs absent."""
    rng = np.random.default_rng(seed)
    hard = {t: rng.normal(0, 0.03, n_cases) for t in TESTS}
    absent = {t: rng.random((n_cases, 8)) < 0.05 for t in TESTS}
    rows_written = 0
    for m, model in enumerate(MODELS):
        for train in TRAINS:
            for test in TESTS:
                base = 0.84 + 0.01 * m - (0.05 if train != test else 0)
                dsc = np.clip(base + hard[test][:, None] + rng.normal(0, 0.05, (n_cases, 8)), 0, 1)
                gt_empty = absent[test]
                pred_empty = gt_empty & (rng.random((n_cases, 8)) < 0.8)
                dsc = np.where(gt_empty, pred_empty.astype(float), dsc)
                nsd = np.where(gt_empty, dsc, np.minimum(1, dsc + 0.03))
                rows = [{"case": f"{test}_{c:04d}", "organ": organ, "dsc": float(dsc[c, o]), "nsd": float(nsd[c, o]),
                         "gt_empty": bool(gt_empty[c, o]), "pred_empty": bool(pred_empty[c, o])}
                        for c in range(n_cases) for o, organ in enumerate(AEVAL8_ORGANS)]
                key = CellKey("individual", train, model, f"run{m}", test, "aeval")
                write_cell(root, key, summarize(rows, AEVAL8_ORGANS), rows)
                rows_written += len(rows)
    return rows_written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--record", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        load = os.getloadavg()[0]
        start = time.perf_counter()
        n_rows = synthesize(tmp / "results", args.cases)
        print(f"synthesized {n_rows} case rows in {time.perf_counter() - start:.1f} s")
        overrides = [f"results={tmp / 'results'}", f"out={tmp / 'report'}", "evidence.ci=true",
                     "compare=model", "compare_pairs=all", "evidence.ranks=true"]
        with initialize_config_dir(str(CONF), version_base=None):
            cfg = compose("report", overrides=overrides)
        with contextlib.redirect_stdout(io.StringIO()):  # the report's text is not what is measured
            total, _ = timed(lambda: report_from_config(cfg), args.repeats)
        options = evidence.EvidenceOptions(ci=True, compare="model", compare_pairs="all", ranks=True, figures=False)
        stages, _ = timed(lambda: evidence.build_evidence(tmp / "results", tmp / "evidence", options), args.repeats)
        table = evidence.load_case_table(tmp / "results")
        compute, _ = timed(lambda: _compute(table), args.repeats)
        n_pairs = len(open(tmp / "report" / "paired.csv").read().splitlines()) - 1
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine()) if Path("/proc/cpuinfo").exists() else \
        platform.machine()
    lines = [
        "# Evidence report speed (issue 15)",
        "",
        f"Machine: {os.cpu_count()} cores ({cpu}), no GPU; date {dt.date.today().isoformat()}; "
        f"load average {load:.1f} when it started (the 2 cores are shared with other jobs).",
        "Command: `PYTHONPATH=. .venv/bin/python experiments/benchmarks/evidence_speed.py "
        f"--cases {args.cases} --repeats {args.repeats}`",
        "",
        f"Study: {len(MODELS)} sizes × {len(TRAINS)} training sets × {len(TESTS)} test sets = 80 cells, "
        f"{args.cases} cases × 8 organs each ({n_rows} case rows); 10,000 resamples; {n_pairs} paired tests "
        "(6 size pairs × 20 cells × DSC, NSD), Holm per measure; rank-then-aggregate for the sizes and each grid.",
        "",
        f"| what | s (median of {args.repeats}) |",
        "|---|---|",
        f"| `python -m aeval.report` work (`report_from_config`: read cells, paper tables + heatmaps, "
        "evidence with figures) "
        f"| {total:.1f} |",
        f"| evidence alone, no figures (read case tables, cases.csv, intervals, comparisons, ranks) | {stages:.1f} |",
        f"| statistics alone (bootstrap of every cell and mean, 240 paired comparisons, ranks) | {compute:.1f} |",
        "",
        "Target: under 30 s on 2 cores.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.record:
        args.record.parent.mkdir(parents=True, exist_ok=True)
        args.record.write_text(text)


def _compute(table: evidence.CaseTable) -> None:
    table._strata = None
    boot = evidence.Bootstrap(table, n_resamples=10_000)
    rows, lookup = evidence.grid_cells(table)
    grids = grids_of(rows)
    evidence.interval_tables(grids, lookup, boot)
    evidence.compare_runs(boot, evidence.parse_selectors("model", table.keys), "all")
    evidence.rank_studies(boot, grids, lookup)


if __name__ == "__main__":
    main()
