"""``python -m aeval.prepare`` / ``aeval-prepare``: raw downloads (or the synthetic A-Eval-mini) -> unified datasets.

    aeval-prepare paths.raw_root=/data/raw                 # every configured dataset found there
    aeval-prepare synthetic=true                           # write the synthetic A-Eval-mini first
    aeval-prepare only=[flare22,btcv] num_workers=8
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf

from aeval.console import console
from aeval.data.prepare import prepare, summary_table
from aeval.data.synthetic import generate_mini
from aeval.entry import hydra_entry

log = logging.getLogger(__name__)


def prepare_job(cfg: DictConfig) -> int:
    """Convert the configured datasets and print the summary table; exit code 2 when any case failed."""
    if cfg.synthetic:
        generate_mini(cfg.paths.raw_root, OmegaConf.to_container(cfg.mini, resolve=True))
        log.info("synthetic A-Eval-mini written to %s", cfg.paths.raw_root)
    datasets = OmegaConf.to_container(cfg.datasets, resolve=True)
    summaries, failures = prepare(datasets, cfg.paths.data_root, only=cfg.only, missing_ok=cfg.missing_ok,
                                  num_workers=cfg.num_workers)
    console.print(summary_table(summaries))
    log.info("unified datasets in %s; %s", cfg.paths.data_root, failures.summary())
    return failures.exit_code()


main = hydra_entry("prepare", prepare_job)

if __name__ == "__main__":
    main()
