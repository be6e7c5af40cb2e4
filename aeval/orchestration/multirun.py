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


def multirun_report(sweep_dir: Path) -> GridOutcome | None:
    """The report over every grid job of ``sweep_dir`` (None when no job recorded its runs)."""
    runs: list[RunKey] = []
    specs: list[dict[str, Any]] = []
    for outcome in job_outcomes(sweep_dir):
        try:
            record = json.loads((Path(outcome["dir"]) / GRID_RUNS_JSON).read_text())
        except (OSError, ValueError):
            continue
        specs.append(record["spec"])
        runs += [RunKey.from_mapping(r) for r in record["runs"]]
    if not specs:
        return None
    first = specs[0]
    tests = tuple(dict.fromkeys(t for s in specs for t in s["tests"]))
    spec = ReportSpec(first["results_root"], first["metric"], tests, str(sweep_dir / "report"),
                      f"A-Eval multirun {sweep_dir.name} ({len(specs)} jobs), metric {first['metric']}",
                      first.get("paper"), any(s.get("compare_marginal") for s in specs))
    return report_runs(spec, runs)


class GridReport(Callback):
    """Builds the grid report from all jobs' cells when a multirun of ``aeval.grid`` ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        outcome = multirun_report(sweep_dir) if sweep_dir.is_dir() else None
        if outcome is None or outcome.report_dir is None:
            log.error("multirun report: no finished cells under %s", sweep_dir)
        else:
            log.info("multirun report: %s (%d run(s), %d cell(s) missing)", outcome.report_dir, len(outcome.runs),
                     len(outcome.missing))
