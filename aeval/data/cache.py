"""The preprocessing cache of a unified dataset's training cases for one plan.

Layout (:func:`preprocess_dataset`): ``{case}.npy`` image float32 (1,X,Y,Z), ``{case}_seg.npy`` codes uint8
(1,X,Y,Z), ``{case}.json`` properties, ``cache.json`` manifest; all written atomically, memory-mappable. A case
is rebuilt when the plan's hash or its source files' stamps change, or a file is corrupt.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import Progress

from aeval.data.preprocess import preprocess_case
from aeval.dataset import UnifiedDataset
from aeval.errors import EXPECTED_COMPUTE_ERRORS, CaseFailure, FailureLog
from aeval.nifti import (
    atomic_path,
    file_stamp,
    remove_stale_temporaries,
    write_text_atomic,
)
from aeval.parallel import failures_of, map_cases
from aeval.plan import Plan

log = logging.getLogger(__name__)


CACHE_MANIFEST = "cache.json"


class PreprocessingFailed(RuntimeError):
    """Some cases of a dataset could not be preprocessed; ``failures`` holds one line per case."""

    def __init__(self, failures: list[str]):
        self.failures = failures
        super().__init__(f"{len(failures)} case(s) failed preprocessing:\n" + "\n".join(failures))


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, np.ascontiguousarray(array))


def _array_ok(path: Path, shape: Sequence[int], dtype: np.dtype) -> bool:
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError):
        return False
    return array.shape == tuple(shape) and array.dtype == dtype


def cached_properties(cache_dir: Path, case: str, plan_hash: str,
                      sources: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The case's properties if its cache is complete, readable and built with ``plan_hash`` (and, when
    given, from these exact source files); ``None`` when it must be (re)built."""
    try:
        properties = json.loads((cache_dir / f"{case}.json").read_text())
    except (OSError, ValueError):
        return None
    if properties.get("plan_hash") != plan_hash:
        return None
    if sources is not None and properties.get("sources") != sources:
        return None
    shape = [1, *properties["shape_after_resample"]]
    if not _array_ok(cache_dir / f"{case}.npy", shape, np.dtype(np.float32)):
        return None
    if properties.get("labelled") and not _array_ok(cache_dir / f"{case}_seg.npy", shape, np.dtype(np.uint8)):
        return None
    return properties


def cache_case(dataset_dir: Path, case: str, plan: Plan, cache_dir: Path,
               dataset: dict[str, Any]) -> dict[str, Any]:
    """Preprocess one training case of a unified dataset into ``cache_dir`` (properties JSON written last,
    after the old one is removed, so a half-written case never looks valid)."""
    image_path, label_path = UnifiedDataset(dataset_dir).case_files(case)
    image, seg, properties = preprocess_case(image_path, label_path, plan, dataset["label_system"],
                                             dataset["modality"])
    properties.update(case=case, dataset=dataset["name"], labelled=seg is not None,
                      sources={"image": file_stamp(image_path), "label": file_stamp(label_path)})
    cache_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / f"{case}.json").unlink(missing_ok=True)
    _save_npy(cache_dir / f"{case}.npy", image)
    if seg is not None:
        _save_npy(cache_dir / f"{case}_seg.npy", seg)
    else:
        (cache_dir / f"{case}_seg.npy").unlink(missing_ok=True)
    write_text_atomic(cache_dir / f"{case}.json", json.dumps(properties, separators=(",", ":")))
    return properties


def load_or_rebuild_case(cache_dir: Path, case: str, plan: Plan) -> dict[str, Any]:
    """Properties of a cached case; a missing, corrupt or stale case is rebuilt from the source dataset
    recorded in the cache manifest."""
    properties = cached_properties(cache_dir, case, plan.hash)
    if properties is not None:
        return properties
    manifest = json.loads((cache_dir / CACHE_MANIFEST).read_text())
    dataset = {key: manifest[key] for key in ("name", "modality", "label_system")}
    return cache_case(Path(manifest["dataset_dir"]), case, plan, cache_dir, dataset)


def _cache_job(job: tuple[Path, str, Plan, Path, dict]) -> str:
    dataset_dir, case, plan, cache_dir, dataset = job
    cache_case(dataset_dir, case, plan, cache_dir, dataset)
    return case


def preprocess_dataset(dataset_dir: str | os.PathLike, plan_path: str | os.PathLike,
                       out_dir: str | os.PathLike | None = None, num_workers: int = 1, *,
                       failures: FailureLog | None = None, progress: Progress | None = None) -> Path:
    """Fill the cache of a unified dataset's training cases for a plan; returns the cache folder
    (default ``{plan folder}/{dataset name}``).

    Idempotent: a case whose cache matches the plan hash and its source files' size/mtime is skipped; a
    changed plan or a corrupt file rebuilds it. A failing case (e.g. labels outside the dataset's label
    system) does not stop the others; the failures are added to ``failures`` when given, else raised
    together as :class:`PreprocessingFailed` at the end."""
    dataset_dir, plan_path = Path(dataset_dir), Path(plan_path)
    plan = Plan.read(plan_path)
    unified = UnifiedDataset(dataset_dir)
    dataset_info = unified.info()
    cache_dir = Path(out_dir) if out_dir is not None else plan_path.parent / unified.name
    cases = unified.cases("train")
    todo = []
    for case in cases:
        image, label = unified.case_files(case)
        sources = {"image": file_stamp(image), "label": file_stamp(label)}
        if cached_properties(cache_dir, case, plan.hash, sources) is None:
            todo.append(case)
    jobs = [(dataset_dir, case, plan, cache_dir, dataset_info) for case in todo]
    remove_stale_temporaries(cache_dir)  # left by a run that was killed while writing
    results = map_cases(_cache_job, jobs, num_workers=num_workers, context="spawn",
                        initializer=torch.set_num_threads, initargs=(1,), expected=EXPECTED_COMPUTE_ERRORS,
                        path_of=lambda job: UnifiedDataset(job[0]).image(job[1]),
                        description=f"preprocess {unified.name}", progress=progress)
    errors = [str(failure) for failure in failures_of(results)]
    failed = {job[1] for job, result in zip(jobs, results, strict=True) if isinstance(result, CaseFailure)}
    done = [case for case in cases if case not in failed]
    labelled = [case for case in done if unified.case_files(case)[1] is not None]
    manifest = {**dataset_info, "dataset_dir": str(dataset_dir.resolve()), "plan_hash": plan.hash,
                "cases": done, "labelled_cases": labelled}
    cache_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(cache_dir / CACHE_MANIFEST, json.dumps(manifest, indent=1))
    log.info("preprocess %s: %d built, %d up to date, %d failed -> %s", unified.name, len(jobs) - len(errors),
             len(cases) - len(jobs), len(errors), cache_dir)
    if errors:
        if failures is None:
            raise PreprocessingFailed(errors)
        for message in errors:
            failures.add(message)
    return cache_dir
