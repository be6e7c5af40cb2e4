"""``python -m aeval.score`` / ``aeval-score``: score a folder of predictions against ground truth.

    aeval-score pred_dir=my_preds gt_dir=data/unified/btcv/labelsTs pred_labels=totalseg_v2 gt_labels=btcv
    aeval-score ... metric=flare22 out=scores/          # cases.csv + summary.json

The work is :func:`aeval.scoring.score_folder`; files are paired by case name, both sides remapped by organ
name, and a bad case is one line while the others are scored (exit code 2).
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from aeval.console import console
from aeval.entry import hydra_entry
from aeval.scoring import score_folder, summary_table
from aeval.validate import check_output_folder

log = logging.getLogger(__name__)


def score_job(cfg: DictConfig) -> int:
    """Score, print the per-organ table; the exit code is 2 when any case failed."""
    check_output_folder(cfg.out)
    result = score_folder(cfg.pred_dir, cfg.gt_dir, cfg.pred_labels, cfg.gt_labels, out_dir=cfg.out,
                          metric=cfg.metric.name, classes=cfg.metric.classes, num_workers=cfg.num_workers,
                          progress=cfg.progress)
    console.print(summary_table(result.summary, title=f"{cfg.pred_dir} vs {cfg.gt_dir} ({cfg.metric.name})"))
    if result.failures:
        log.info("%d case(s) failed (one line each above); the others are scored", len(result.failures))
    return result.exit_code


main = hydra_entry("score", score_job)

if __name__ == "__main__":
    main()
