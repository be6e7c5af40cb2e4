"""``python -m aeval.evaluate``: predict every test case of each test set and score it, one result cell
per test set, keyed by protocol / training set(s) / model / test set / metric mode.

A finished cell (its ``summary.json`` exists and records no failed case) is skipped; predictions already on
disk are reused, so a crashed or partly failed evaluation resumes where it stopped.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from aeval.console import console
from aeval.metrics import scoring_rules
from aeval.nifti import CaseError, FailureLog
from aeval.predict import LoadedModel, case_name, load_model, predict_files, print_error
from aeval.report import cell_dir, write_cell
from aeval.score import SUMMARY_JSON, score_folder

PREDICTIONS = "predictions"
KEY_FIELDS = ("protocol", "train", "model")


@dataclass
class Evaluation:
    """Cells written and skipped by one :func:`evaluate` call, and the failure lines."""

    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failures: FailureLog = field(default_factory=FailureLog)


def held_out_cases(dataset_dir: Path) -> tuple[list[Path], Path, str]:
    """Images of a unified dataset's test split, its label folder and its label system."""
    meta_path = dataset_dir / "dataset.json"
    if not meta_path.exists():
        raise CaseError(dataset_dir, "no dataset.json (run `python -m aeval.prepare` first)")
    try:
        meta = json.loads(meta_path.read_text())
        splits = json.loads((dataset_dir / "splits.json").read_text())
        system = meta["label_system"]
        cases = list(splits.get("test") or [])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CaseError(dataset_dir, f"unreadable dataset.json/splits.json ({type(err).__name__}: {err})") from None
    if not cases:
        raise CaseError(dataset_dir, "the test split is empty")
    images = [dataset_dir / "imagesTs" / f"{case}_0000.nii.gz" for case in cases]
    return images, dataset_dir / "labelsTs", system


def metric_key(metric: str, classes: str = "aeval8") -> str:
    """How a cell's metric folder is named: the mode, plus the class space when it is not the 8 organs."""
    return metric if classes == "aeval8" else f"{metric}-{classes}"


def cell_finished(cell: Path) -> bool:
    """A cell counts as finished when its summary is readable and no case failed."""
    try:
        summary = json.loads((cell / SUMMARY_JSON).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and not summary.get("n_failed")


def evaluate(model: LoadedModel, test_sets: list[str], data_root: str | Path, results_root: str | Path, *,
             key: Mapping[str, str], metric: str = "aeval", classes: str = "aeval8",
             inference: Mapping[str, Any] | None = None,
             overwrite: bool = False, num_workers: int = 1, failures: FailureLog | None = None) -> Evaluation:
    """Write the cells ``results_root/<protocol>/<train>/<model>/<test>/<metric>`` for every test set; the
    predictions (model label space) go to ``.../<test>/predictions`` and are shared by the metric modes."""
    scoring_rules(metric, classes)  # an unknown mode or class space: ValueError before any prediction
    result = Evaluation(failures=failures if failures is not None else FailureLog())
    for test in test_sets:
        cell = cell_dir(results_root, key["protocol"], key["train"], key["model"], test, metric_key(metric, classes))
        if not overwrite and cell_finished(cell):
            console.print(f"cell {cell} exists, skipped", markup=False, highlight=False)
            result.skipped.append(cell)
            continue
        try:
            images, labels_dir, gt_system = held_out_cases(Path(data_root) / test)
        except CaseError as err:
            result.failures.add(err)
            continue
        predictions = cell.parent / PREDICTIONS
        console.print(f"{key['train']} -> {test}: {len(images)} case(s)", markup=False, highlight=False)
        written = predict_files(model, images, predictions, inference=inference, skip_existing=not overwrite,
                                failures=result.failures)
        # a case whose prediction failed already has its line; scoring would add "prediction missing"
        unpredicted = {str(predictions / f"{case_name(p)}.nii.gz") for p in images} - {str(p) for p in written}
        try:
            scores = score_folder(predictions, labels_dir, pred_labels=model.label_system, gt_labels=gt_system,
                                  metric=metric, classes=classes, num_workers=num_workers, progress=True,
                                  printer=lambda line: None)
        except CaseError as err:
            result.failures.add(err)
            continue
        for line in scores.failures:
            if not any(line.startswith(f"{path}: prediction missing") for path in unpredicted):
                result.failures.add(line, None)
        if not scores.rows:
            continue
        write_cell(results_root, key["protocol"], key["train"], key["model"], test, metric_key(metric, classes),
                   scores.summary, scores.rows)
        console.print(f"  DSC {100 * scores.summary['mean_dsc']:.2f}  NSD {100 * scores.summary['mean_nsd']:.2f}"
                      f"  -> {cell}", markup=False, highlight=False)
        result.written.append(cell)
    return result


def checkpoint_key(model: LoadedModel, overrides: Mapping[str, str | None], source: str | Path) -> dict[str, str]:
    """The cell key: what the user set, else what the checkpoint recorded at training time."""
    key = {name: overrides.get(name) or model.run_key.get(name) for name in KEY_FIELDS}
    missing = [name for name, value in key.items() if not value]
    if missing:
        names = {"protocol": "protocol_name", "train": "train_name", "model": "model_name"}
        raise CaseError(source, f"set {', '.join(names[m] + '=' for m in missing)} "
                        "(the checkpoint does not record them)")
    return {name: str(value) for name, value in key.items()}


@hydra.main(version_base=None, config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    try:
        model = load_model(cfg.ckpt_path, plan=cfg.get("plan"), size=cfg.get("size"),
                           label_system=cfg.get("model_labels"), configuration=cfg.get("configuration"),
                           reorient=cfg.get("reorient"))
        key = checkpoint_key(model, {"protocol": cfg.protocol_name, "train": cfg.train_name,
                                     "model": cfg.model_name}, cfg.ckpt_path)
    except (CaseError, ValueError) as err:
        print_error(f"[error] {err}")
        sys.exit(2)
    failures = FailureLog(printer=print_error)
    try:
        result = evaluate(model, list(cfg.test_sets), cfg.paths.data_root, cfg.paths.results_root, key=key,
                          metric=cfg.metric.name, classes=cfg.metric.classes,
                          inference=OmegaConf.to_container(cfg.inference, resolve=True),
                          overwrite=cfg.overwrite, num_workers=cfg.num_workers, failures=failures)
    except ValueError as err:  # a bad inference setting, metric mode or label system
        print_error(f"[error] {err}")
        sys.exit(2)
    console.print(f"{len(result.written)} cell(s) written, {len(result.skipped)} skipped; {failures.summary()}",
                  markup=False, highlight=False, soft_wrap=True)
    sys.exit(failures.exit_code())


if __name__ == "__main__":
    main()
