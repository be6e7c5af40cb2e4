"""The unified dataset layout every stage after conversion reads (nnU-Net v2 raw style), in one place.

At ``{data_root}/{name}/``::

    imagesTr/{case}_0000.nii.gz   labelsTr/{case}.nii.gz     (training split)
    imagesTs/{case}_0000.nii.gz   labelsTs/{case}.nii.gz     (test split: A-Eval's validation sets)
    dataset.json   {"name", "modality", "label_system", "channel_names", "labels", "numTraining", "numTest", ...}
    splits.json    {"train": [...], "test": [...]}

Conversion writes it (:mod:`aeval.data.convert`), as do the pseudo-label rounds; planning, preprocessing,
evaluation, export and the evidence gallery read it through :class:`UnifiedDataset`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from aeval.errors import CaseError
from aeval.labels import get_system
from aeval.nifti import write_text_atomic

__all__ = ["DATASET_JSON", "SPLITS", "SPLITS_JSON", "UnifiedDataset"]

DATASET_JSON = "dataset.json"
SPLITS_JSON = "splits.json"
SPLITS = {"train": ("imagesTr", "labelsTr"), "test": ("imagesTs", "labelsTs")}  # split -> image, label folder
CHANNEL = "_0000"
SUFFIX = ".nii.gz"


@dataclass(frozen=True)
class UnifiedDataset:
    """One dataset in the unified layout.

    Args:
        root: the dataset's folder (``{data_root}/{name}``).
    """

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def at(cls, data_root: str | os.PathLike, name: str) -> UnifiedDataset:
        return cls(Path(data_root) / name)

    def exists(self) -> bool:
        """Converted: its ``dataset.json`` is there."""
        return (self.root / DATASET_JSON).exists()

    @cached_property
    def meta(self) -> dict[str, Any]:
        """``dataset.json``.

        Raises:
            CaseError: naming the folder when the dataset is not converted or its ``dataset.json`` is unreadable.
        """
        path = self.root / DATASET_JSON
        if not path.exists():
            raise CaseError(self.root, f"no {DATASET_JSON} (run `python -m aeval.prepare` first)")
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise CaseError(path, f"unreadable {DATASET_JSON} ({type(err).__name__}: {err})") from None
        if not isinstance(meta, dict):
            raise CaseError(path, f"{DATASET_JSON} is not a JSON object")
        return meta

    def _field(self, key: str) -> str:
        if key not in self.meta:
            raise CaseError(self.root / DATASET_JSON, f"no {key!r} (convert the dataset again)")
        return str(self.meta[key])

    @property
    def name(self) -> str:
        return self._field("name")

    @property
    def modality(self) -> str:
        return self._field("modality")

    @property
    def label_system(self) -> str:
        return self._field("label_system")

    def info(self) -> dict[str, str]:
        """``{name, modality, label_system}``: what a plan and a cache record of the dataset."""
        return {"name": self.name, "modality": self.modality, "label_system": self.label_system}

    def cases(self, split: str) -> list[str]:
        """The cases of ``split`` (``train`` / ``test``) as ``splits.json`` lists them; without one, the images
        found in the split's folder.

        Raises:
            CaseError: an unreadable ``splits.json``.
        """
        _check_split(split)
        path = self.root / SPLITS_JSON
        if path.exists():
            try:
                return [str(case) for case in json.loads(path.read_text()).get(split) or []]
            except (OSError, ValueError, AttributeError) as err:
                raise CaseError(path, f"unreadable {SPLITS_JSON} ({type(err).__name__}: {err})") from None
        return sorted(p.name.removesuffix(CHANNEL + SUFFIX) for p in self.images_dir(split).glob(f"*{CHANNEL}{SUFFIX}"))

    def images_dir(self, split: str) -> Path:
        return self.root / SPLITS[_check_split(split)][0]

    def labels_dir(self, split: str) -> Path:
        return self.root / SPLITS[_check_split(split)][1]

    def image(self, case: str, split: str = "train") -> Path:
        return self.images_dir(split) / f"{case}{CHANNEL}{SUFFIX}"

    def label(self, case: str, split: str = "train") -> Path:
        return self.labels_dir(split) / f"{case}{SUFFIX}"

    def case_files(self, case: str, split: str = "train") -> tuple[Path, Path | None]:
        """A case's image and label; None for the label of an unlabelled case."""
        label = self.label(case, split)
        return self.image(case, split), (label if label.exists() else None)

    def write_metadata(self, splits: Mapping[str, Sequence[str]], *, name: str, description: str, modality: str,
                       label_system: str, labelled: bool, **extra: Any) -> None:
        """Write ``splits.json`` and ``dataset.json`` (atomically): the one writer of both."""
        splits = {split: list(splits.get(split, [])) for split in SPLITS}
        system = get_system(label_system)
        meta = {
            "name": name, "description": description, "modality": modality, "label_system": label_system,
            "channel_names": {"0": modality},
            "labels": {"background": 0, **{organ: i for i, organ in sorted(system.names.items())}},
            "numTraining": len(splits["train"]), "numTest": len(splits["test"]),
            "labelled": labelled, "file_ending": SUFFIX, **extra,
        }
        write_text_atomic(self.root / SPLITS_JSON, json.dumps(splits, indent=2))
        write_text_atomic(self.root / DATASET_JSON, json.dumps(meta, indent=2))
        self.__dict__.pop("meta", None)


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; the unified layout has {', '.join(SPLITS)}")
    return split
