"""The prepare stage: every configured dataset's raw download -> its unified dataset, and the summary table.

A dataset whose raw folder is absent is skipped (``missing_ok``); a bad setting or a broken case is one line
and the other datasets go on."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.progress import Progress
from rich.table import Table

from aeval.console import console
from aeval.data.convert import ConversionSummary, convert_dataset
from aeval.data.registry import DatasetSpec
from aeval.errors import CaseError, FailureLog

log = logging.getLogger(__name__)


def prepare(datasets: Mapping[str, Mapping[str, Any]], data_root: str | Path, *, only: list[str] | None = None,
            missing_ok: bool = True, num_workers: int = 1) -> tuple[list[ConversionSummary], FailureLog]:
    """Convert the named datasets; per-case failures are collected, not raised."""
    failures = FailureLog()
    summaries = []
    names = list(only) if only else list(datasets)
    unknown = [n for n in names if n not in datasets]
    if unknown:
        raise KeyError(f"unknown dataset(s) {unknown}; configured: {list(datasets)}")
    absent = []
    with Progress(console=console, transient=True) as progress:
        for name in names:
            try:
                spec = DatasetSpec.from_config(datasets[name])
            except ValueError as err:  # a bad dataset setting: one line, the other datasets go on
                failures.add(str(err), None)
                continue
            try:
                summary = convert_dataset(spec, Path(data_root), num_workers=num_workers, failures=failures,
                                          progress=progress)
            except CaseError as err:  # the dataset's own index (meta.csv) is unusable
                failures.add(err)
                continue
            except FileNotFoundError as err:
                if not missing_ok:
                    failures.add(str(err).split(": ", 1)[1], spec.raw_dir)
                log.warning("skip %s: %s", name, err)
                absent.append(spec.raw_dir)
                continue
            summaries.append(summary)
    if names and len(absent) == len(names) and missing_ok:  # a wrong paths.raw_root, not a partial download
        failures.add(f"none of the datasets {names} found here; set paths.raw_root to the folder holding "
                     "the downloads", os.path.commonpath(absent))
    return summaries, failures


def summary_table(summaries: list[ConversionSummary]) -> Table:
    """Per dataset: modality, label system, cases per split, spacing range, orientations, labels present."""
    table = Table(title="Unified datasets")
    for column in ("dataset", "modality", "labels", "train", "test", "new/skipped", "spacing (mm)", "orientations",
                   "labels present"):
        table.add_column(column)
    for s in summaries:
        spacings = [c.spacing for c in s.cases] or [(0, 0, 0)]
        low = [min(sp[i] for sp in spacings) for i in range(3)]
        high = [max(sp[i] for sp in spacings) for i in range(3)]
        present = sorted({v for c in s.cases for v in c.labels_present})
        splits = s.per_split()
        table.add_row(
            s.name, s.modality, s.label_system, str(splits.get("train", 0)), str(splits.get("test", 0)),
            f"{len(s.cases) - s.skipped}/{s.skipped}",
            " x ".join(f"{a:.2g}-{b:.2g}" if a != b else f"{a:.2g}" for a, b in zip(low, high, strict=True)),
            ",".join(sorted({c.orientation for c in s.cases})),
            _ranges(present) or "-",
        )
    return table


def _ranges(values: list[int]) -> str:
    """[1,2,3,5] -> '1-3,5'."""
    out, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ",".join(out)
