"""The evaluate stage: predict every test case of each test set and score it, one result cell per test set,
keyed by the run (protocol / training sets / model / run hash) plus test set and metric mode.

A finished cell (its ``summary.json`` exists and records no failed case) is skipped; predictions already on
disk are reused, so a crashed or partly failed evaluation resumes where it stopped.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aeval.dataset import UnifiedDataset
from aeval.errors import CaseError, FailureLog
from aeval.keys import RUN_HASH_LENGTH, RunKey, digest
from aeval.metrics import metric_key, scoring_rules
from aeval.models.load import LoadedModel
from aeval.nifti import nifti_case_name
from aeval.prediction import predict_files
from aeval.results import cell_dir, cell_finished, predictions_dir, write_cell
from aeval.scoring import score_folder

log = logging.getLogger(__name__)

KEY_FIELDS = ("protocol", "train", "model", "run")


@dataclass
class Evaluation:
    """Cells written and skipped by one :func:`evaluate` call, and the failure lines."""

    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failures: FailureLog = field(default_factory=FailureLog)


def held_out_cases(dataset: UnifiedDataset) -> tuple[list[Path], Path, str]:
    """Images of a unified dataset's test split, its label folder and its label system."""
    system, cases = dataset.label_system, dataset.cases("test")
    if not cases:
        raise CaseError(dataset.root, "the test split is empty")
    return [dataset.image(case, "test") for case in cases], dataset.labels_dir("test"), system


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
            log.info("cell %s exists, skipped", cell)
            result.skipped.append(cell)
            continue
        try:
            images, labels_dir, gt_system = held_out_cases(UnifiedDataset.at(data_root, test))
        except CaseError as err:
            result.failures.add(err)
            continue
        predictions = predictions_dir(results_root, key, test)
        log.info("%s -> %s: %d case(s)", key.train, test, len(images))
        written = predict_files(model, images, predictions, inference=inference, skip_existing=not overwrite,
                                failures=result.failures)
        # a case whose prediction failed already has its line; scoring would add "prediction missing"
        unpredicted = {str(predictions / f"{nifti_case_name(p)}.nii.gz") for p in images} - {str(p) for p in written}
        try:
            scores = score_folder(predictions, labels_dir, pred_labels=model.label_system, gt_labels=gt_system,
                                  metric=metric, classes=classes, num_workers=num_workers, progress=True,
                                  quiet=True)
        except CaseError as err:
            result.failures.add(err)
            continue
        result.failures.extend([f for f in scores.failures if f.path not in unpredicted])
        if not scores.rows:
            continue
        write_cell(results_root, cell_key, {**scores.summary, "n_expected": len(images)}, scores.rows)
        log.info("  DSC %.2f  NSD %.2f  -> %s", 100 * scores.summary["mean_dsc"], 100 * scores.summary["mean_nsd"],
                 cell)
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
