"""Result cells as the report reads them: dataset and model display names, the paper's orders, and
rows normalised from the results store, a CSV or a DataFrame (values in %)."""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from aeval.errors import CaseError

DATASET_NAMES = {
    "flare22": "FLARE22", "amos_ct": "AMOS CT", "amos_mr": "AMOS MR", "amos_ct_mr": "AMOS CT+MR",
    "word": "WORD", "word2025": "WORD 2025", "totalseg": "TotalSegmentator", "totalseg_v2": "TotalSegmentator v2",
    "totalseg_mr": "TotalSegmentator MR", "btcv": "BTCV", "joint": "Joint",
}


MODEL_NAMES = {"stu_s": "STU-Net-S", "stu_b": "STU-Net-B", "stu_l": "STU-Net-L", "stu_h": "STU-Net-H"}


TRAIN_ORDER = ("flare22", "amos_ct", "amos_mr", "amos_ct_mr", "word", "word2025", "totalseg", "totalseg_v2",
               "totalseg_mr", "joint")


TEST_ORDER = ("flare22", "amos_ct", "word", "word2025", "totalseg", "totalseg_v2", "btcv", "amos_mr", "totalseg_mr")


PROTOCOL_ORDER = ("individual", "pseudo_label", "multimodal", "joint")


MODEL_ORDER = ("stu_s", "stu_b", "stu_l", "stu_h")


MR_DATASETS = frozenset({"amos_mr", "totalseg_mr"})  # MR test columns; MR-trained rows in the modality layout


MR_TEST_SETS = MR_DATASETS


METRICS = ("dsc", "nsd")


PAPER_DIR = Path(__file__).resolve().parents[1] / "paper"


PUBLISHED_MODEL = "stu_l"  # the size of the paper's tables


def display(name: str) -> str:
    """The paper's name of a dataset or model (``amos_ct`` -> ``AMOS CT``)."""
    return DATASET_NAMES.get(name, MODEL_NAMES.get(name, name))


def ordered(values: Iterable[str | None], preferred: Sequence[str]) -> list:
    """The distinct values, in ``preferred``'s order first, then alphabetically."""
    rank = {v: i for i, v in enumerate(preferred)}
    return sorted(set(values), key=lambda v: (rank.get(v, len(rank)), str(v)))


def fmt_value(value: float) -> str:
    """Two decimals, as the paper prints percentages."""
    return f"{value:.2f}"


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population SD (numpy ``std``, ddof=0), as the paper reports them."""
    array = np.asarray(values, np.float64)
    return float(array.mean()), float(array.std())


def fmt_mean_sd(values: Sequence[float]) -> str:
    """``mean ± SD`` (population SD), or a dash for no values."""
    if not len(values):
        return "–"
    mean, sd = mean_sd(values)
    return f"{fmt_value(mean)} ± {fmt_value(sd)}"


def _optional(value) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    return text or None


def normalize_cells(cells) -> list[dict]:
    """Rows ``{protocol, model, metric, organ, train, test, dsc, nsd}`` (values in %) from dicts, a CSV's
    rows or a DataFrame; raises ValueError for a row without train/test/dsc/nsd or a duplicated cell."""
    if hasattr(cells, "to_dict"):
        cells = cells.to_dict("records")
    rows, seen = [], set()
    for i, cell in enumerate(cells):
        try:
            row = {k: _optional(cell.get(k)) for k in ("protocol", "model", "run", "metric", "organ")}
            row.update(train=str(cell["train"]).strip(), test=str(cell["test"]).strip(),
                       dsc=float(cell["dsc"]), nsd=float(cell["nsd"]))
            if isinstance(cell.get("case_dsc"), list | tuple):
                row["case_dsc"] = tuple(float(v) for v in cell["case_dsc"])
            row.update({k: cell[k] for k in ("variant", "n_cases", "n_failed", "n_expected")
                        if cell.get(k) is not None})
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"cell {i + 1}: needs train, test, dsc and nsd ({type(err).__name__}: {err})") from None
        row.update(_counts(cell))
        key = tuple(row[k] for k in ("protocol", "model", "run", "metric", "organ", "train", "test"))
        if key in seen:
            raise ValueError(f"cell {i + 1}: duplicate cell {key}")
        seen.add(key)
        rows.append(row)
    return rows


def _counts(cell) -> dict:
    """``n_cases``/``n_failed``/``n_expected`` of a cell, where known (the results store records them)."""
    counts = {}
    for name in ("n_cases", "n_failed", "n_expected"):
        value = _optional(cell.get(name))
        if value is not None:
            counts[name] = int(float(value))
    return counts


def case_count(cell: dict) -> str | None:
    """``"cases scored/cases expected"`` where the cell records them, e.g. ``"3/4"``."""
    if "n_cases" not in cell:
        return None
    return f"{cell['n_cases']}/{cell.get('n_expected') or cell['n_cases'] + cell.get('n_failed', 0)}"


def completeness(cell: dict) -> str | None:
    """The case count of a cell scored on fewer cases than expected (some failed), None for a complete one."""
    count = case_count(cell)
    if count is None:
        return None
    scored, expected = (int(n) for n in count.split("/"))
    return count if scored < expected or cell.get("n_failed") else None


def csv_text(records: list[dict]) -> str:
    """Records as CSV text, the union of their keys as the header."""
    fields = list(dict.fromkeys(k for r in records for k in r))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return buffer.getvalue()


def read_cells_csv(path: str | os.PathLike) -> list[dict]:
    """The cells of a CSV file (a CaseError naming it when unreadable or malformed)."""
    path = Path(path)
    if not path.is_file():
        raise CaseError(path, "file not found")
    with open(path, newline="") as f:
        try:
            return normalize_cells(list(csv.DictReader(f)))
        except ValueError as err:
            raise CaseError(path, str(err)) from None
