"""aeval.export: a unified dataset becomes an nnU-Net v2 raw dataset (links or copies, nnU-Net's dataset.json)
that nnU-Net's own integrity check accepts; bad input is one line and exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import affine_for

from aeval.data.nnunet_export import export_dataset, raw_dataset_name
from aeval.errors import CaseError

ROOT = Path(__file__).resolve().parents[1]


def unified_dataset(root: Path, name: str = "mini_ct") -> Path:
    """Two labelled and one unlabelled training case, one labelled test case (FLARE22 labels)."""
    folder = root / name
    rng = np.random.default_rng(0)
    affine = affine_for("LPS", (1.5, 1.5, 3.0))
    cases = {"train": ["mini_001", "mini_002", "mini_003"], "test": ["mini_101"]}
    for split, names in cases.items():
        images, labels = ("imagesTr", "labelsTr") if split == "train" else ("imagesTs", "labelsTs")
        for case in names:
            image = rng.normal(-500, 300, (24, 20, 12)).astype(np.int16)
            (folder / images).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(image, affine), folder / images / f"{case}_0000.nii.gz")
            if case != "mini_003":
                label = np.zeros(image.shape, np.uint8)
                label[6:16, 5:14, 3:9] = 1
                label[2:5, 2:5, 2:5] = 13
                (folder / labels).mkdir(parents=True, exist_ok=True)
                nib.save(nib.Nifti1Image(label, affine), folder / labels / f"{case}.nii.gz")
    meta = {"name": name, "modality": "CT", "label_system": "flare22", "channel_names": {"0": "CT"},
            "labels": {"background": 0}, "numTraining": 3, "numTest": 1, "file_ending": ".nii.gz"}
    (folder / "dataset.json").write_text(json.dumps(meta))
    (folder / "splits.json").write_text(json.dumps(cases))
    return folder


@pytest.mark.parametrize("link", [True, False])
def test_export_writes_an_nnunet_raw_dataset(tmp_path, link):
    source = unified_dataset(tmp_path / "unified")
    summary = export_dataset(source, tmp_path / "raw", 7, link=link)
    folder = tmp_path / "raw" / "Dataset007_mini_ct"
    assert summary.folder == folder
    assert (summary.num_training, summary.num_test, summary.unlabelled_skipped) == (2, 1, 1)
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == ["mini_001_0000.nii.gz", "mini_002_0000.nii.gz"]
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == ["mini_001.nii.gz", "mini_002.nii.gz"]
    image = folder / "imagesTr" / "mini_001_0000.nii.gz"
    assert image.is_symlink() == link
    assert image.read_bytes() == (source / "imagesTr" / "mini_001_0000.nii.gz").read_bytes()
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"} and meta["numTraining"] == 2 and meta["file_ending"] == ".nii.gz"
    assert meta["labels"]["background"] == 0 and meta["labels"]["liver"] == 1 and meta["labels"]["kidney_left"] == 13
    assert len(meta["labels"]) == 14
    export_dataset(source, tmp_path / "raw", 7, link=link)  # a re-export refreshes in place


def test_nnunet_accepts_the_export(tmp_path):
    verify = pytest.importorskip("nnunetv2.experiment_planning.verify_dataset_integrity")
    summary = export_dataset(unified_dataset(tmp_path / "unified"), tmp_path / "raw", 8)
    verify.verify_dataset_integrity(str(summary.folder), num_processes=1)


def test_export_cli_and_bad_input(tmp_path):
    unified_dataset(tmp_path / "unified")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    common = [f"paths.data_root={tmp_path / 'unified'}", f"nnunet_raw={tmp_path / 'raw'}",
              f"hydra.run.dir={tmp_path / 'hydra'}"]
    done = subprocess.run([sys.executable, "-m", "aeval.export", "name=mini_ct", "dataset_id=9", *common],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "raw" / "Dataset009_mini_ct" / "dataset.json").exists()
    bad = subprocess.run([sys.executable, "-m", "aeval.export", "name=missing", "dataset_id=9", *common],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stdout + bad.stderr
    assert "missing: no dataset.json" in bad.stdout
    with pytest.raises(ValueError, match="1..999"):
        raw_dataset_name(1000, "x")
    with pytest.raises(CaseError, match="nowhere: no dataset.json"):
        export_dataset(tmp_path / "nowhere", tmp_path / "raw", 3)
