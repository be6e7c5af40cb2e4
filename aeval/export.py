"""``python -m aeval.export name=<dataset> dataset_id=<NNN>``: a unified dataset as an nnU-Net v2 raw dataset
(see :mod:`aeval.data.nnunet_export`)."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from aeval.console import console
from aeval.data.nnunet_export import export_dataset
from aeval.nifti import CaseError

_EXIT_CODE: list[int] = []


def run(cfg: DictConfig) -> int:
    """Export, print where it went; the exit code (2 and one line on bad input)."""
    try:
        summary = export_dataset(Path(cfg.paths.data_root) / cfg.name, cfg.nnunet_raw, cfg.dataset_id, link=cfg.link)
    except (CaseError, ValueError) as err:
        console.print(f"[error] {err}", style="red", markup=False, highlight=False, soft_wrap=True)
        return 2
    skipped = f", {summary.unlabelled_skipped} unlabelled left out" if summary.unlabelled_skipped else ""
    console.print(f"{summary.folder}: {summary.num_training} training, {summary.num_test} test case(s){skipped}",
                  markup=False, highlight=False, soft_wrap=True)
    return 0


@hydra.main(version_base=None, config_path="conf", config_name="export")
def main(cfg: DictConfig) -> None:
    _EXIT_CODE.append(run(cfg))


def cli() -> None:
    """Console-script entry: run, then exit with the code ``run`` returned."""
    main()
    raise SystemExit(_EXIT_CODE[-1] if _EXIT_CODE else 1)


if __name__ == "__main__":
    cli()
