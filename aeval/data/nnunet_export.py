"""A unified dataset as an nnU-Net v2 raw dataset, so ``nnUNetv2_plan_and_preprocess`` runs on exactly the
files aeval plans and trains on.

``{data_root}/{name}/{imagesTr,labelsTr,imagesTs,labelsTs}`` -> ``{out_root}/Dataset{NNN}_{name}/`` with the
same file names, as symlinks (default) or copies, and an nnU-Net ``dataset.json`` (``channel_names``,
``labels`` name -> id with background 0, ``numTraining``, ``file_ending``). nnU-Net trains on every image of
``imagesTr`` and needs a label for each, so unlabelled training images are left out (and counted). Files
are written atomically and an existing export is refreshed in place.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from aeval.dataset import UnifiedDataset
from aeval.errors import CaseError
from aeval.labels import get_system
from aeval.nifti import atomic_path, write_text_atomic

log = logging.getLogger(__name__)


@dataclass
class ExportSummary:
    """Where the raw dataset was written and how many cases it holds."""

    folder: Path
    num_training: int
    num_test: int
    unlabelled_skipped: int


def raw_dataset_name(dataset_id: int, name: str) -> str:
    """nnU-Net's folder name ``Dataset{NNN}_{name}``; ids are 1..999."""
    if not 1 <= int(dataset_id) <= 999:
        raise ValueError(f"nnU-Net dataset ids are 1..999, got {dataset_id}")
    return f"Dataset{int(dataset_id):03d}_{name}"


def _place(source: Path, target: Path, link: bool) -> None:
    with atomic_path(target) as tmp:
        if link:
            tmp.unlink()
            os.symlink(source.resolve(), tmp)
        else:
            shutil.copyfile(source, tmp)


def nnunet_dataset_json(meta: dict, num_training: int) -> dict:
    """nnU-Net v2's dataset.json for a unified dataset's dataset.json."""
    system = get_system(meta["label_system"])
    ids = sorted(system.names)
    if ids != list(range(1, len(ids) + 1)):
        raise ValueError(f"label system {system.name} is not numbered 1..N; nnU-Net needs consecutive labels")
    return {
        "channel_names": dict(meta.get("channel_names") or {"0": meta["modality"]}),
        "labels": {"background": 0, **{system.names[i]: i for i in ids}},
        "numTraining": num_training,
        "file_ending": ".nii.gz",
        "name": meta["name"],
        "description": f"aeval unified dataset {meta['name']} ({meta['label_system']} labels), exported for nnU-Net",
        "aeval_label_system": meta["label_system"],
    }


def export_dataset(dataset_dir: str | Path, out_root: str | Path, dataset_id: int, *, link: bool = True
                   ) -> ExportSummary:
    """Write ``{out_root}/Dataset{NNN}_{name}`` from the unified dataset at ``dataset_dir``.

    Raises :class:`CaseError` naming the folder when it is not a unified dataset."""
    dataset = UnifiedDataset(dataset_dir)
    meta = dataset.meta  # a CaseError naming the folder when it is not a unified dataset
    folder = Path(out_root) / raw_dataset_name(dataset_id, dataset.name)
    exported = UnifiedDataset(folder)  # nnU-Net's raw layout is the unified one: imagesTr/<case>_0000.nii.gz, ...
    counts = {"train": 0, "test": 0, "skipped": 0}
    for split in ("train", "test"):
        for case in dataset.cases(split):
            image, label = dataset.image(case, split), dataset.label(case, split)
            if split == "train" and not label.exists():
                counts["skipped"] += 1
                continue
            _place(image, exported.image(case, split), link)
            if label.exists():
                _place(label, exported.label(case, split), link)
            counts[split] += 1
    if not counts["train"]:
        raise CaseError(dataset_dir, "no labelled training case to export (nnU-Net needs a label for every "
                        "imagesTr image)")
    write_text_atomic(folder / "dataset.json", json.dumps(nnunet_dataset_json(meta, counts["train"]), indent=2))
    log.info("exported %s -> %s: %d training, %d test case(s)%s", dataset_dir, folder, counts["train"],
             counts["test"], f", {counts['skipped']} unlabelled left out" if counts["skipped"] else "")
    return ExportSummary(folder, counts["train"], counts["test"], counts["skipped"])
