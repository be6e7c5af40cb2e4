"""The dataset registry: one ``conf/dataset/<name>.yaml`` per dataset says where its raw files are and
how they are laid out; this module turns such a config into a :class:`DatasetSpec` and lists its cases."""

from __future__ import annotations

import csv
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aeval.errors import CaseError
from aeval.labels import get_system

LAYOUTS = ("paired", "totalseg")
MODALITIES = ("CT", "MR")
# TotalSegmentator's meta.csv: the columns a split rule needs (``image_id``, and ``split`` by default).
META_ID_COLUMN = "image_id"
ADRENAL_SPLITS = ("midline",)  # aeval.data.convert.split_word_adrenals


@dataclass(frozen=True)
class RawCase:
    """One case as found in a raw download: an image and, for labelled cases, its label source."""

    case: str
    split: str
    image: Path
    label: Path | None  # a label file, or (TotalSegmentator) the segmentations/ folder


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset's raw layout and settings, as ``conf/dataset/<name>.yaml`` gives them."""

    name: str
    modality: str
    layout: str
    label_system: str
    raw_dir: Path
    splits: dict[str, dict[str, Any] | list[dict[str, Any]]]  # a rule, or alternatives: the first that finds images
    case_id: dict[str, Any] | None = None
    meta: str | None = None
    image: str = "ct.nii.gz"  # TotalSegmentator: the image file of a case folder (the MR dataset: mri.nii.gz)
    split_adrenals: str | None = None  # paired WORD: write 2025-style labels (12 left, 17 right adrenal)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> DatasetSpec:
        """Raises ``ValueError`` (one line naming the dataset and key) for a bad or retired setting."""
        cfg = dict(cfg)
        name = cfg.get("name")
        known = {"name", "modality", "layout", "label_system", "raw_dir", "splits", "case_id", "meta", "image",
                 "split_adrenals"}
        if "version" in cfg:  # it used to be accepted and ignored; label_system is the one switch
            raise ValueError(f"dataset {name}: 'version' is not a setting; set label_system (totalseg_v1, "
                             "totalseg_v2, totalseg_mr) to choose the structure names, or use dataset "
                             "totalseg_v2 / totalseg_mr")
        if cfg.get("layout") not in LAYOUTS:
            raise ValueError(f"dataset {name}: layout must be one of {LAYOUTS}, got {cfg.get('layout')}")
        if cfg.get("modality") not in MODALITIES:
            raise ValueError(f"dataset {name}: modality must be one of {MODALITIES}")
        try:
            get_system(cfg["label_system"])  # fails early on a typo
        except KeyError as err:
            raise ValueError(f"dataset {name}: label_system: {err.args[0]}") from None
        split_adrenals = cfg.get("split_adrenals")
        if split_adrenals is not None and (split_adrenals not in ADRENAL_SPLITS or cfg["label_system"] != "word2025"):
            raise ValueError(f"dataset {name}: split_adrenals must be one of {ADRENAL_SPLITS} (or null), and "
                             f"needs label_system word2025; got {split_adrenals!r} with {cfg['label_system']}")
        return cls(
            name=name, modality=cfg["modality"], layout=cfg["layout"], label_system=cfg["label_system"],
            raw_dir=Path(cfg["raw_dir"]), splits={k: _split_rules(v) for k, v in dict(cfg["splits"]).items()},
            case_id=dict(cfg["case_id"]) if cfg.get("case_id") else None, meta=cfg.get("meta"),
            image=cfg.get("image") or "ct.nii.gz", split_adrenals=split_adrenals,
            extra={k: v for k, v in cfg.items() if k not in known},
        )

    def has_labels(self) -> bool:
        return self.layout == "totalseg" or any(
            rule.get("labels") for split in self.splits for rule in self.split_rules(split))

    def split_rules(self, split: str) -> list[dict[str, Any]]:
        """A split's rule and its alternatives (releases differ: FLARE22's ``Validation/`` is ``Tuning/`` in some)."""
        rules = self.splits[split]
        return list(rules) if isinstance(rules, list) else [rules]

    def find_cases(self) -> list[RawCase]:
        """Every case of every split, sorted; raises ``FileNotFoundError`` when the raw folder is missing.
        A split with alternatives takes the cases of the first alternative that finds any."""
        if not self.raw_dir.is_dir():
            raise FileNotFoundError(f"{self.raw_dir}: raw folder of dataset '{self.name}' not found")
        finder = self._paired_cases if self.layout == "paired" else self._totalseg_cases
        cases = []
        for split in self.splits:
            for rule in self.split_rules(split):
                found = finder(split, rule)
                if found:
                    cases += found
                    break
        return cases

    def describe_split(self, split: str) -> str:
        """What a split looks for, for the line that says it found nothing."""
        return " or ".join(str(rule.get("images") or f"split={rule.get('split')}") for rule in self.split_rules(split))

    def _keep(self, case: str) -> bool:
        if not self.case_id:
            return True
        match = re.search(self.case_id["regex"], case)
        if not match:
            return False
        number = int(match.group(1))
        return self.case_id.get("min", -1) <= number <= self.case_id.get("max", float("inf"))

    def _paired_cases(self, split: str, rule: dict[str, Any]) -> list[RawCase]:
        cases = []
        for image in sorted(self.raw_dir.glob(rule["images"])):
            case = re.sub(r"_0000$", "", image.name.removesuffix(".gz").removesuffix(".nii"))
            if not self._keep(case):
                continue
            label = None
            if rule.get("labels"):
                digits = re.findall(r"\d+", case)
                label = self.raw_dir / rule["labels"].format(case=case, id=digits[-1] if digits else "")
            cases.append(RawCase(case, split, image, label))
        return cases

    def _totalseg_cases(self, split: str, rule: dict[str, Any]) -> list[RawCase]:
        meta = self.raw_dir / (self.meta or "meta.csv")
        column = rule.get("column", "split")
        rows = read_meta(meta, (META_ID_COLUMN, column))
        cases = []
        for row in rows:
            if (row[column] or "").strip() != rule["split"]:
                continue
            case = row[META_ID_COLUMN].strip()
            folder = self.raw_dir / case
            cases.append(RawCase(case, split, folder / self.image, folder / "segmentations"))
        return sorted(cases, key=lambda c: c.case)


def read_meta(path: Path, columns: tuple[str, ...]) -> list[dict[str, str]]:
    """Rows of a TotalSegmentator ``meta.csv`` (``;``-separated, or ``,`` when the header has no ``;``; a UTF-8
    BOM is ignored). ``FileNotFoundError`` when it is absent; :class:`CaseError` naming the file and its
    columns when one of ``columns`` is missing."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: TotalSegmentator meta.csv not found")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        header = handle.readline()
        handle.seek(0)
        reader = csv.DictReader(handle, delimiter=";" if ";" in header or "," not in header else ",")
        found = [name.strip() for name in reader.fieldnames or []]
        missing = [c for c in columns if c not in found]
        if missing:
            raise CaseError(path, f"no column {', '.join(repr(c) for c in missing)} (columns: {', '.join(found)}); "
                            "a split column of another name is set with splits.<split>.column")
        reader.fieldnames = found
        return list(reader)


def _split_rules(value: Any) -> dict[str, Any] | list[dict[str, Any]]:
    if isinstance(value, Mapping):
        return dict(value)
    return [dict(rule) for rule in value]
