"""``python -m aeval.report`` / ``aeval-report``: the A-Eval tables and figures from result cells.

    aeval-report results=outputs/results out=outputs/report      # every cell of a results folder
    aeval-report cells=my_cells.csv out=report paper=table3      # a CSV of cells beside the paper's Table 3

The tables, pictures and the paper comparison live in :mod:`aeval.reporting`; the per-case evidence
(``evidence=true``) in :mod:`aeval.evidence`.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from aeval.console import console
from aeval.entry import hydra_entry
from aeval.reporting.build import report_from_config

log = logging.getLogger(__name__)


def report_job(cfg: DictConfig) -> int:
    """Write the report and print its Markdown (the tables are this command's output)."""
    report = report_from_config(cfg)
    console.print(report.text, markup=False, highlight=False, soft_wrap=True)
    log.info("wrote %s", ", ".join(str(f) for f in report.files))
    return 0


main = hydra_entry("report", report_job)

if __name__ == "__main__":
    main()
