"""``python -m aeval.evaluate``: predict every test case of each test set and score it, one result cell
per test set, keyed by protocol / training set(s) / model / test set / metric mode.

A finished cell (its ``summary.json`` exists) is skipped; predictions already on disk are reused, so a
crashed evaluation resumes where it stopped.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from aeval.console import console
from aeval.nifti import CaseError, FailureLog
from aeval.predict import LoadedModel, load_model, predict_files
from aeval.report import cell_dir, write_cell
from aeval.score import score_folder

PREDICTIONS = "predictions"


@dataclass
class Evaluation:
    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failures: FailureLog = field(default_factory=FailureLog)


def test_cases(dataset_dir: Path) -> tuple[list[Path], Path, str]:
    """Images of a unified dataset's test split, its label folder and its label system."""
    meta_path = dataset_dir / "dataset.json"
    if not meta_path.exists():
        raise CaseError(dataset_dir, "no dataset.json (run `python -m aeval.prepare` first)")
    meta = json.loads(meta_path.read_text())
    splits = json.loads((dataset_dir / "splits.json").read_text())
    if not splits.get("test"):
        raise CaseError(dataset_dir, "the test split is empty")
    images = [dataset_dir / "imagesTs" / f"{case}_0000.nii.gz" for case in splits["test"]]
    return images, dataset_dir / "labelsTs", meta["label_system"]


def evaluate(model: LoadedModel, test_sets: list[str], data_root: str | Path, results_root: str | Path, *,
             key: dict[str, str], metric: str = "aeval", classes: str = "aeval8",
             inference: dict[str, Any] | None = None,
             overwrite: bool = False, num_workers: int = 1, failures: FailureLog | None = None) -> Evaluation:
    """Write the cells ``results_root/<protocol>/<train>/<model>/<test>/<metric>`` for every test set."""
    result = Evaluation(failures=failures if failures is not None else FailureLog())
    metric_key = metric if classes == "aeval8" else f"{metric}-{classes}"
    for test in test_sets:
        cell = cell_dir(results_root, key["protocol"], key["train"], key["model"], test, metric_key)
        if (cell / "summary.json").exists() and not overwrite:
            console.print(f"cell {cell} exists, skipped", highlight=False)
            result.skipped.append(cell)
            continue
        try:
            images, labels_dir, gt_system = test_cases(Path(data_root) / test)
        except (CaseError, OSError, ValueError) as err:
            result.failures.add(err if isinstance(err, CaseError) else CaseError(Path(data_root) / test, str(err)))
            continue
        predictions = cell.parent / PREDICTIONS
        console.print(f"[bold]{key['train']} -> {test}[/bold]: {len(images)} case(s)", highlight=False)
        predict_files(model, images, predictions, inference=inference, skip_existing=not overwrite,
                      failures=result.failures)
        try:
            scores = score_folder(predictions, labels_dir, pred_labels=model.label_system, gt_labels=gt_system,
                                  metric=metric, classes=classes, num_workers=num_workers, progress=True,
                                  printer=lambda line: None)
        except CaseError as err:
            result.failures.add(err)
            continue
        for line in scores.failures:
            result.failures.add(line, None)
        if not scores.rows:
            continue
        write_cell(results_root, key["protocol"], key["train"], key["model"], test, metric_key, scores.summary,
                   scores.rows)
        console.print(f"  DSC {100 * scores.summary['mean_dsc']:.2f}  NSD {100 * scores.summary['mean_nsd']:.2f}"
                      f"  -> {cell}", highlight=False)
        result.written.append(cell)
    return result


def checkpoint_key(ckpt_path: str | Path, overrides: dict[str, Any]) -> dict[str, str]:
    """The cell key: what the user set, else what the checkpoint recorded at training time."""
    import torch

    recorded: dict[str, str] = {}
    try:
        hparams = torch.load(ckpt_path, map_location="cpu", weights_only=True).get("hyper_parameters") or {}
        recorded = dict(hparams.get("run_key") or {})
    except Exception:  # an official checkpoint: no recorded key
        recorded = {}
    key = {name: overrides.get(name) or recorded.get(name) for name in ("protocol", "train", "model")}
    missing = [name for name, value in key.items() if not value]
    if missing:
        raise ValueError(f"{ckpt_path}: set {', '.join(missing)}= (the checkpoint does not record them)")
    return key


@hydra.main(version_base=None, config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    try:
        key = checkpoint_key(cfg.ckpt_path, {"protocol": cfg.protocol_name, "train": cfg.train_name,
                                             "model": cfg.model_name})
        model = load_model(cfg.ckpt_path, plan=cfg.get("plan"), size=cfg.get("size"),
                           label_system=cfg.get("model_labels"))
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        console.print(f"[red]{err}[/red]", highlight=False)
        sys.exit(2)
    failures = FailureLog(printer=lambda line: console.print(f"[red]{line}[/red]", highlight=False))
    result = evaluate(model, list(cfg.test_sets), cfg.paths.data_root, cfg.paths.results_root, key=key,
                      metric=cfg.metric.name, classes=cfg.metric.classes,
                      inference=OmegaConf.to_container(cfg.inference, resolve=True),
                      overwrite=cfg.overwrite, num_workers=cfg.num_workers, failures=failures)
    console.print(f"{len(result.written)} cell(s) written, {len(result.skipped)} skipped; {failures.summary()}",
                  highlight=False)
    sys.exit(failures.exit_code())


if __name__ == "__main__":
    main()
