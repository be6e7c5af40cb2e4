"""When a multirun of the grid ends: one report over the cells of every job (model sizes, seeds, fanned-out
rows), whichever launcher ran them. Registered in ``aeval/conf/grid.yaml`` under ``hydra.callbacks``.

Each grid job leaves ``grid_runs.json`` (its runs and report settings) in its output folder; the callback
reads them from the sweep folder, so jobs that ran as SLURM or local processes count the same as in-process
ones. The report goes to ``<sweep dir>/report``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from aeval.jobs import job_outcomes
from aeval.keys import RunKey
from aeval.orchestration.grid import GRID_RUNS_JSON, GridOutcome, ReportSpec, report_runs

log = logging.getLogger(__name__)


def multirun_reports(sweep_dir: Path) -> list[GridOutcome]:
    """One report per (results folder, metric mode) over the grid jobs of ``sweep_dir`` that used it:
    ``<sweep dir>/report`` (``report/<metric>`` when the jobs used several)."""
    groups: dict[tuple[str, str], list[tuple[dict[str, Any], list[RunKey]]]] = {}
    for outcome in job_outcomes(sweep_dir):
        try:
            record = json.loads((Path(outcome["dir"]) / GRID_RUNS_JSON).read_text())
        except (OSError, ValueError):
            continue
        spec = record["spec"]
        runs = [RunKey.from_mapping(r) for r in record["runs"]]
        groups.setdefault((spec["results_root"], spec["metric"]), []).append((spec, runs))
    reports = []
    for (results_root, metric), jobs in groups.items():
        specs = [spec for spec, _ in jobs]
        tests = tuple(dict.fromkeys(t for s in specs for t in s["tests"]))
        folder = sweep_dir / "report" / (metric if len(groups) > 1 else "")
        spec = ReportSpec(results_root, metric, tests, str(folder),
                          f"A-Eval multirun {sweep_dir.name} ({len(jobs)} jobs), metric {metric}",
                          specs[0].get("paper"), any(s.get("compare_marginal") for s in specs))
        reports.append(report_runs(spec, [r for _, runs in jobs for r in runs]))
    return reports


class GridReport(Callback):
    """Builds the grid report from all jobs' cells when a multirun of ``aeval.grid`` ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        outcomes = multirun_reports(sweep_dir) if sweep_dir.is_dir() else []
        if not any(o.report_dir for o in outcomes):
            log.error("multirun report: no finished cells under %s", sweep_dir)
        for outcome in outcomes:
            if outcome.report_dir is not None:
                log.info("multirun report: %s (%d run(s), %d cell(s) missing)", outcome.report_dir,
                         len(outcome.runs), len(outcome.missing))
