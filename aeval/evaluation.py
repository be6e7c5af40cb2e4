"""The evaluate stage: predict every test case of each test set and score it, one result cell per test set,
keyed by the run (protocol / training sets / model / run hash) plus test set and metric mode.

A finished cell (its ``summary.json`` exists and records no failed case) is skipped; predictions already on
disk are reused, so a crashed or partly failed evaluation resumes where it stopped.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aeval.console import console
from aeval.errors import CaseError, FailureLog
from aeval.keys import RUN_HASH_LENGTH, RunKey, digest
from aeval.metrics import metric_key, scoring_rules
from aeval.nifti import nifti_case_name
from aeval.predict import LoadedModel, predict_files
from aeval.results import cell_dir, cell_finished, predictions_dir, write_cell
from aeval.score import score_folder

KEY_FIELDS = ("protocol", "train", "model", "run")


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


def evaluate(model: LoadedModel, test_sets: list[str], data_root: str | Path, results_root: str | Path, *,
             key: RunKey, metric: str = "aeval", classes: str = "aeval8",
             inference: Mapping[str, Any] | None = None,
             overwrite: bool = False, num_workers: int | None = None, failures: FailureLog | None = None) -> Evaluation:
    """Write the cell of ``key`` on every test set (:mod:`aeval.results`); the predictions (model label space)
    go beside the cells and are shared by the metric modes."""
    scoring_rules(metric, classes)  # an unknown mode or class space: ValueError before any prediction
    result = Evaluation(failures=failures if failures is not None else FailureLog())
    for test in test_sets:
        cell_key = key.cell(test, metric_key(metric, classes))
        cell = cell_dir(results_root, cell_key)
        if not overwrite and cell_finished(results_root, cell_key):
            console.print(f"cell {cell} exists, skipped", markup=False, highlight=False)
            result.skipped.append(cell)
            continue
        try:
            images, labels_dir, gt_system = held_out_cases(Path(data_root) / test)
        except CaseError as err:
            result.failures.add(err)
            continue
        predictions = predictions_dir(results_root, key, test)
        console.print(f"{key.train} -> {test}: {len(images)} case(s)", markup=False, highlight=False)
        written = predict_files(model, images, predictions, inference=inference, skip_existing=not overwrite,
                                failures=result.failures)
        # a case whose prediction failed already has its line; scoring would add "prediction missing"
        unpredicted = {str(predictions / f"{nifti_case_name(p)}.nii.gz") for p in images} - {str(p) for p in written}
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
        write_cell(results_root, cell_key, {**scores.summary, "n_expected": len(images)}, scores.rows)
        console.print(f"  DSC {100 * scores.summary['mean_dsc']:.2f}  NSD {100 * scores.summary['mean_nsd']:.2f}"
                      f"  -> {cell}", markup=False, highlight=False)
        result.written.append(cell)
    return result


def checkpoint_key(model: LoadedModel, overrides: Mapping[str, str | None], source: str | Path) -> RunKey:
    """The cells' run key: what the user set, else what the checkpoint recorded at training time. A checkpoint
    that records no run hash (an official one) is named by a hash of its path."""
    key = {name: overrides.get(name) or model.run_key.get(name) for name in KEY_FIELDS}
    key["run"] = key["run"] or digest(str(Path(source).resolve()), RUN_HASH_LENGTH)
    missing = [name for name, value in key.items() if not value]
    if missing:
        names = {"protocol": "protocol_name", "train": "train_name", "model": "model_name"}
        raise CaseError(source, f"set {', '.join(names[m] + '=' for m in missing)} "
                        "(the checkpoint does not record them)")
    return RunKey.from_mapping(key)
