"""``aeval.score``: pairing, remapping both sides by organ name, spacing from the GT header, outputs, and
bad inputs (listed by file, the rest scored, exit code 2)."""

from __future__ import annotations

import csv
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from aeval.labels import AEVAL8_ORGANS, get_system, remap
from aeval.metrics import score_case
from aeval.nifti import nifti_case_name as case_name
from aeval.scoring import score_folder, score_pair

ROOT = Path(__file__).resolve().parents[1]
SPACING = (0.8, 0.9, 2.5)
AFFINE = np.diag([*SPACING, 1.0])


def _anatomy(seed: int) -> np.ndarray:
    """A FLARE22-space label map with all 13 classes as boxes, jittered per case."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((36, 32, 20), np.uint8)
    for label in range(1, 14):
        x, y = 1 + ((label - 1) % 5) * 7, 1 + ((label - 1) // 5) * 10
        z0 = int(rng.integers(1, 8))
        labels[x:x + 5, y:y + 8, z0:z0 + int(rng.integers(3, 10))] = label
    return labels


def _in_system(flare_labels: np.ndarray, system: str) -> np.ndarray:
    """The same anatomy numbered in another label system (by organ name)."""
    target = {name: i for i, name in get_system(system).names.items()}
    lut = np.zeros(14, np.uint8)
    for i, name in get_system("flare22").names.items():
        lut[i] = target.get(name, 0)
    return lut[flare_labels]


def _save(data: np.ndarray, path: Path, affine=AFFINE) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


@pytest.fixture
def folders(tmp_path):
    """GT in FLARE22 numbering, predictions in AMOS numbering (shifted by one slice), 3 good cases."""
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    for i in range(3):
        gt = _anatomy(i)
        _save(gt, gt_dir / f"case_{i:03d}.nii.gz")
        _save(_in_system(np.roll(gt, 1, axis=2), "amos"), pred_dir / f"case_{i:03d}_0000.nii.gz")
    return pred_dir, gt_dir


def _header_spacing(path: Path) -> tuple[float, ...]:
    return tuple(float(z) for z in nib.load(str(path)).header.get_zooms()[:3])  # float32 zooms, as read


def _expected(pred_path: Path, gt_path: Path, mode="aeval") -> dict:
    gt = remap(np.asarray(nib.load(str(gt_path)).dataobj), "flare22", "aeval8")
    pred = remap(np.asarray(nib.load(str(pred_path)).dataobj), "amos", "aeval8")
    return score_case(pred, gt, _header_spacing(gt_path), mode)


def test_case_name():
    assert case_name("a/amos_0013_0000.nii.gz") == "amos_0013"
    assert case_name("word_0001.nii") == "word_0001"
    assert case_name("x_0000_0000.nii.gz") == "x_0000"


def test_score_pair_remaps_both_sides_by_name(folders):
    pred_dir, gt_dir = folders
    got = score_pair(pred_dir / "case_000_0000.nii.gz", gt_dir / "case_000.nii.gz", "amos", "flare22")
    assert got == _expected(pred_dir / "case_000_0000.nii.gz", gt_dir / "case_000.nii.gz")
    assert got["liver"]["dsc"] < 1  # the slice shift is seen
    # the header's anisotropic spacing in array-axis order is what is used
    gt = remap(np.asarray(nib.load(str(gt_dir / "case_000.nii.gz")).dataobj), "flare22", "aeval8")
    pred = remap(np.asarray(nib.load(str(pred_dir / "case_000_0000.nii.gz")).dataobj), "amos", "aeval8")
    assert got != score_case(pred, gt, _header_spacing(gt_dir / "case_000.nii.gz")[::-1])


def test_score_folder_writes_cases_and_summary(folders, tmp_path):
    pred_dir, gt_dir = folders
    out = tmp_path / "out"
    result = score_folder(pred_dir, gt_dir, "amos", "flare22", out_dir=out, metric="flare22", progress=False)
    assert result.exit_code == 0 and result.failures == []
    with open(out / "cases.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == [f"case_{i:03d}" for i in range(3) for _ in AEVAL8_ORGANS]
    assert [r["organ"] for r in rows[:8]] == list(AEVAL8_ORGANS)
    for i in range(3):
        expected = _expected(pred_dir / f"case_{i:03d}_0000.nii.gz", gt_dir / f"case_{i:03d}.nii.gz", "flare22")
        for r in rows[8 * i:8 * i + 8]:
            assert float(r["dsc"]) == expected[r["organ"]]["dsc"]
            assert float(r["nsd"]) == expected[r["organ"]]["nsd"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric"] == summary["mode"] == "flare22" and summary["n_cases"] == 3
    assert summary["mean_dsc"] == pytest.approx(np.mean([float(r["dsc"]) for r in rows]))
    assert summary["mean_nsd"] == pytest.approx(np.mean([float(r["nsd"]) for r in rows]))
    for organ in AEVAL8_ORGANS:
        values = [float(r["nsd"]) for r in rows if r["organ"] == organ]
        assert summary["organs"][organ]["nsd"] == pytest.approx(np.mean(values))
    assert summary["failures"] == [] and not list(out.glob(".*tmp*"))  # nothing half-written left


def test_parallel_workers_give_the_same_rows(folders):
    pred_dir, gt_dir = folders
    one = score_folder(pred_dir, gt_dir, "amos", "flare22", progress=False)
    two = score_folder(pred_dir, gt_dir, "amos", "flare22", num_workers=2, progress=False)
    assert one.rows == two.rows and one.summary == two.summary


def _add_bad_cases(pred_dir: Path, gt_dir: Path) -> dict[str, str]:
    """Six broken cases; returns case → the expected piece of its failure line."""
    for i in range(3, 9):
        _save(_anatomy(i), gt_dir / f"case_{i:03d}.nii.gz")
    # case_003: no prediction
    (pred_dir / "case_004.nii.gz").write_bytes(gzip.compress(b"not a nifti at all" * 10)[:40])  # corrupt gzip
    _save(_in_system(_anatomy(5)[:30], "amos"), pred_dir / "case_005.nii.gz")  # shape mismatch
    shifted = AFFINE.copy()
    shifted[0, 3] = 5.0
    _save(_in_system(_anatomy(6), "amos"), pred_dir / "case_006.nii.gz", affine=shifted)  # affine mismatch
    bad = _in_system(_anatomy(7), "amos")
    bad[0, 0, 0] = 99  # not an AMOS label
    _save(bad, pred_dir / "case_007.nii.gz")
    truncated = _save(_in_system(_anatomy(8), "amos"), pred_dir / "case_008.nii.gz")  # gzip cut short
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    return {"case_008": "unreadable voxel data", "case_003": "prediction missing", "case_004": "unreadable",
            "case_005": "does not match ground truth shape",
            "case_006": "affine does not match", "case_007": "not labels of system 'amos'"}


def test_bad_inputs_are_listed_and_the_rest_scored(folders, tmp_path, caplog):
    pred_dir, gt_dir = folders
    expected = _add_bad_cases(pred_dir, gt_dir)
    with caplog.at_level("INFO"):
        result = score_folder(pred_dir, gt_dir, "amos", "flare22", out_dir=tmp_path / "out", progress=False)
    assert result.exit_code == 2
    assert len(result.failures) == 6
    for case, piece in expected.items():
        line = next(str(f) for f in result.failures if case in f.path)
        assert piece in line and "\n" not in line
    assert {r["case"] for r in result.rows} == {"case_000", "case_001", "case_002"}
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["n_cases"] == 3 and summary["n_failed"] == 6 and len(summary["failures"]) == 6
    assert sum(r.levelname == "ERROR" for r in caplog.records) == 6  # one logged line per failed case


def test_cli_exit_code_and_outputs(folders, tmp_path):
    pred_dir, gt_dir = folders
    _add_bad_cases(pred_dir, gt_dir)
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "aeval.score", f"pred_dir={pred_dir}", f"gt_dir={gt_dir}", "pred_labels=amos",
         "gt_labels=flare22", "metric=aeval", f"out={out}", "num_workers=2", "progress=false",
         f"hydra.run.dir={tmp_path / 'hydra'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "AEVAL_ROOT": str(tmp_path)})
    assert proc.returncode == 2, proc.stderr
    assert "case_004.nii.gz" in proc.stdout and "6 case(s) failed" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric"] == "aeval" and summary["n_cases"] == 3
    assert f"{100 * summary['mean_dsc']:.2f}" in proc.stdout  # the printed table


def test_config_composes():
    with initialize_config_dir(config_dir=str(ROOT / "aeval" / "conf"), version_base=None):
        cfg = compose("score", overrides=["pred_dir=p", "gt_dir=g", "metric=flare22", "out=o"])
    assert cfg.metric.name == "flare22" and cfg.metric.classes == "aeval8" and cfg.num_workers is None  # aeval.cpu
    with initialize_config_dir(config_dir=str(ROOT / "aeval" / "conf"), version_base=None):
        cfg = compose("score", overrides=["pred_dir=p", "gt_dir=g", "out=o"])
    assert cfg.metric.name == "aeval"


def test_missing_folders_are_one_line_errors(tmp_path):
    from aeval.errors import CaseError

    with pytest.raises(CaseError, match="folder not found"):
        score_folder(tmp_path / "nope", tmp_path, "amos", "amos", progress=False)
    with pytest.raises(CaseError, match="no NIfTI files"):
        score_folder(tmp_path, tmp_path, "amos", "amos", progress=False)


def test_unknown_systems_and_modes_fail_before_scoring(folders):
    pred_dir, gt_dir = folders
    with pytest.raises(ValueError, match="unknown label system 'amoss'"):
        score_folder(pred_dir, gt_dir, "amoss", "flare22", progress=False)
    with pytest.raises(ValueError, match="unknown metric mode"):
        score_folder(pred_dir, gt_dir, "amos", "flare22", metric="dice", progress=False)


def test_totalsegmentator_mask_folders_score_like_their_multilabel_file(tmp_path):
    """TotalSegmentator's default output (``<case>/<structure>.nii.gz``) is merged and scored like the ``--ml``
    file; absent structures are empty; a mask whose geometry differs is one line naming it."""
    gt_dir, folder_dir, ml_dir = tmp_path / "gt", tmp_path / "masks", tmp_path / "ml"
    for d in (gt_dir, folder_dir, ml_dir):
        d.mkdir()
    for i in range(2):
        gt = _anatomy(i)
        _save(gt, gt_dir / f"case_{i}.nii.gz")
        pred = _in_system(np.roll(_anatomy(i), 1, axis=2), "totalseg_v2")
        _save(pred, ml_dir / f"case_{i}.nii.gz")
        masks = folder_dir / f"case_{i}"
        masks.mkdir()
        for label_id in np.unique(pred)[1:]:
            _save((pred == label_id).astype(np.uint8), masks / f"{get_system('totalseg_v2').names[label_id]}.nii.gz")
    _save(np.zeros((36, 32, 20), np.uint8), folder_dir / "case_0" / "urinary_bladder.nii.gz")  # an empty one
    from_folders = score_folder(folder_dir, gt_dir, "totalseg_v2", "flare22", progress=False)
    from_files = score_folder(ml_dir, gt_dir, "totalseg_v2", "flare22", progress=False)
    assert not from_folders.failures and from_folders.summary["n_cases"] == 2
    assert from_folders.rows == from_files.rows
    assert 0.3 < from_folders.summary["mean_dsc"] < 1

    _save(np.zeros((36, 32, 21), np.uint8), folder_dir / "case_1" / "liver.nii.gz")
    broken = score_folder(folder_dir, gt_dir, "totalseg_v2", "flare22", progress=False)
    assert len(broken.failures) == 1 and "case_1/liver.nii.gz: shape" in str(broken.failures[0])
