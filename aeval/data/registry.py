"""The dataset registry: one ``conf/dataset/<name>.yaml`` per dataset says where its raw files are and
how they are laid out; this module turns such a config into a :class:`DatasetSpec` and lists its cases."""

from __future__ import annotations

import csv
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aeval.labels import get_system

LAYOUTS = ("paired", "totalseg")
MODALITIES = ("CT", "MR")


@dataclass(frozen=True)
class RawCase:
    """One case as found in a raw download: an image and, for labelled cases, its label source."""

    case: str
    split: str
    image: Path
    label: Path | None  # a label file, or (TotalSegmentator) the segmentations/ folder


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    modality: str
    layout: str
    label_system: str
    raw_dir: Path
    splits: dict[str, dict[str, Any] | list[dict[str, Any]]]  # a rule, or alternatives: the first that finds images
    case_id: dict[str, Any] | None = None
    version: str | None = None
    meta: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> DatasetSpec:
        cfg = dict(cfg)
        known = {"name", "modality", "layout", "label_system", "raw_dir", "splits", "case_id", "version", "meta"}
        if cfg.get("layout") not in LAYOUTS:
            raise ValueError(f"dataset {cfg.get('name')}: layout must be one of {LAYOUTS}, got {cfg.get('layout')}")
        if cfg.get("modality") not in MODALITIES:
            raise ValueError(f"dataset {cfg.get('name')}: modality must be one of {MODALITIES}")
        get_system(cfg["label_system"])  # fails early on a typo
        return cls(
            name=cfg["name"], modality=cfg["modality"], layout=cfg["layout"], label_system=cfg["label_system"],
            raw_dir=Path(cfg["raw_dir"]), splits={k: _split_rules(v) for k, v in dict(cfg["splits"]).items()},
            case_id=dict(cfg["case_id"]) if cfg.get("case_id") else None, version=cfg.get("version"),
            meta=cfg.get("meta"), extra={k: v for k, v in cfg.items() if k not in known},
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
        if not meta.exists():
            raise FileNotFoundError(f"{meta}: TotalSegmentator meta.csv not found")
        with meta.open(newline="") as handle:
            rows = list(csv.DictReader(handle, delimiter=";"))
        cases = []
        for row in rows:
            if row.get("split") != rule["split"]:
                continue
            folder = self.raw_dir / row["image_id"]
            cases.append(RawCase(row["image_id"], split, folder / "ct.nii.gz", folder / "segmentations"))
        return sorted(cases, key=lambda c: c.case)


def _split_rules(value: Any) -> dict[str, Any] | list[dict[str, Any]]:
    if isinstance(value, Mapping):
        return dict(value)
    return [dict(rule) for rule in value]
