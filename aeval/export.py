"""``python -m aeval.export name=<dataset> dataset_id=<NNN>``: a unified dataset as an nnU-Net v2 raw dataset
(see :mod:`aeval.data.nnunet_export`)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from aeval.console import console
from aeval.data.nnunet_export import export_dataset
from aeval.entry import hydra_entry


def run(cfg: DictConfig) -> int:
    """Export and print where it went (bad input: one line and exit code 2, by :mod:`aeval.entry`)."""
    summary = export_dataset(Path(cfg.paths.data_root) / cfg.name, cfg.nnunet_raw, cfg.dataset_id, link=cfg.link)
    skipped = f", {summary.unlabelled_skipped} unlabelled left out" if summary.unlabelled_skipped else ""
    console.print(f"{summary.folder}: {summary.num_training} training, {summary.num_test} test case(s){skipped}",
                  markup=False, highlight=False, soft_wrap=True)
    return 0


main = hydra_entry("export", run)

if __name__ == "__main__":
    main()
