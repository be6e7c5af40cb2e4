"""``python -m aeval.export name=<dataset> dataset_id=<NNN>``: a unified dataset as an nnU-Net v2 raw dataset
(see :mod:`aeval.data.nnunet_export`)."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from aeval.data.nnunet_export import export_dataset
from aeval.entry import hydra_entry

log = logging.getLogger(__name__)


def export_job(cfg: DictConfig) -> int:
    """Export and print where it went (bad input: one line and exit code 2, by :mod:`aeval.entry`)."""
    summary = export_dataset(Path(cfg.paths.data_root) / cfg.name, cfg.nnunet_raw, cfg.dataset_id, link=cfg.link)
    skipped = f", {summary.unlabelled_skipped} unlabelled left out" if summary.unlabelled_skipped else ""
    log.info("%s: %d training, %d test case(s)%s", summary.folder, summary.num_training, summary.num_test, skipped)
    return 0


main = hydra_entry("export", export_job)

if __name__ == "__main__":
    main()
