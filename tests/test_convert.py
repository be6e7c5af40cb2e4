"""Converters from each raw layout into the unified layout, bad inputs, and idempotent re-runs."""

import gzip
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from conftest import CONF_DIR, write_nifti
from omegaconf import OmegaConf

from aeval.data.convert import convert_dataset
from aeval.data.prepare import prepare
from aeval.data.registry import DatasetSpec
from aeval.errors import FailureLog
from aeval.labels import get_system

SHAPE = (12, 10, 8)
LPS = np.diag([-1.5, -1.5, 4.0, 1.0])


def dataset_config(name, raw_root):
    cfg = OmegaConf.load(CONF_DIR / "dataset" / f"{name}.yaml")
    cfg = OmegaConf.merge({"paths": {"raw_root": str(raw_root)}}, {"d": cfg})
    return OmegaConf.to_container(cfg, resolve=True)["d"]


def pair(raw, image_rel, label_rel, seed, max_label, affine=LPS):
    rng = np.random.default_rng(seed)
    image = rng.normal(0, 100, SHAPE).astype(np.int16)
    label = rng.integers(0, max_label + 1, SHAPE).astype(np.uint8)
    write_nifti(raw / image_rel, image, affine)
    if label_rel:
        write_nifti(raw / label_rel, label, affine)
    return image, label


@pytest.fixture
def raw_root(tmp_path):
    raw = tmp_path / "raw"
    amos = "AMOS/amos22"
    for i in (1, 2, 540):
        pair(raw, f"{amos}/imagesTr/amos_{i:04d}.nii.gz", f"{amos}/labelsTr/amos_{i:04d}.nii.gz", i, 15)
    for i in (7, 560):
        pair(raw, f"{amos}/imagesVa/amos_{i:04d}.nii.gz", f"{amos}/labelsVa/amos_{i:04d}.nii.gz", i, 15)
    for i in (1, 2):
        pair(raw, f"BTCV/RawData/Training/img/img{i:04d}.nii.gz", f"BTCV/RawData/Training/label/label{i:04d}.nii.gz",
             10 + i, 13, np.diag([0.8, 0.8, 3.0, 1.0]))
    ts = raw / "TotalSegmentator"
    system = get_system("totalseg_v1")
    rows = ["image_id;age;gender;institute;study_type;split"]
    for i, split in ((1, "train"), (2, "val"), (3, "test")):
        case = ts / f"s{i:04d}"
        write_nifti(case / "ct.nii.gz", np.full(SHAPE, -500, np.int16), LPS)
        for organ in system.names.values():
            mask = np.zeros(SHAPE, np.uint8)
            if organ == "liver":
                mask[:6] = 1
            elif organ == "duodenum":  # overlaps the liver and comes later in the class map: it wins
                mask[4:8] = 1
            write_nifti(case / "segmentations" / f"{organ}.nii.gz", mask, LPS)
        rows.append(f"s{i:04d};50;m;A;ct;{split}")
    (ts / "meta.csv").write_text("\n".join(rows) + "\n")
    return raw


def test_paired_layout_amos_ct_and_mr_split_by_id(raw_root, tmp_path):
    data_root = tmp_path / "unified"
    ct = convert_dataset(DatasetSpec.from_config(dataset_config("amos_ct", raw_root)), data_root)
    mr = convert_dataset(DatasetSpec.from_config(dataset_config("amos_mr", raw_root)), data_root)
    assert ct.per_split() == {"train": 2, "test": 1} and mr.per_split() == {"train": 1, "test": 1}
    out = data_root / "amos_ct"
    assert json.loads((out / "splits.json").read_text()) == {"train": ["amos_0001", "amos_0002"], "test": ["amos_0007"]}
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["label_system"] == "amos" and meta["modality"] == "CT" and meta["labels"]["liver"] == 6
    assert meta["numTraining"] == 2 and meta["numTest"] == 1
    raw_image = raw_root / "AMOS/amos22/imagesTr/amos_0002.nii.gz"
    assert (out / "imagesTr/amos_0002_0000.nii.gz").read_bytes() == raw_image.read_bytes()
    assert (out / "labelsTs/amos_0007.nii.gz").exists()
    assert json.loads((data_root / "amos_mr/splits.json").read_text())["test"] == ["amos_0560"]


def test_btcv_label_template_and_geometry_kept(raw_root, tmp_path):
    summary = convert_dataset(DatasetSpec.from_config(dataset_config("btcv", raw_root)), tmp_path / "u")
    assert [c.case for c in summary.cases] == ["img0001", "img0002"]
    label = nib.load(str(tmp_path / "u/btcv/labelsTs/img0001.nii.gz"))
    np.testing.assert_allclose(label.affine, np.diag([0.8, 0.8, 3.0, 1.0]))
    assert summary.cases[0].spacing == pytest.approx((0.8, 0.8, 3.0))


def test_totalsegmentator_merge_in_class_map_order(raw_root, tmp_path):
    summary = convert_dataset(DatasetSpec.from_config(dataset_config("totalseg", raw_root)), tmp_path / "u")
    assert summary.per_split() == {"train": 1, "test": 1}  # the v1 'val' split is A-Eval's test set
    merged = nib.load(str(tmp_path / "u/totalseg/labelsTs/s0002.nii.gz"))
    data = np.asanyarray(merged.dataobj)
    assert data.dtype == np.uint8
    assert (data[:4] == 5).all() and (data[4:8] == 56).all() and (data[8:] == 0).all()
    np.testing.assert_allclose(merged.affine, LPS)
    assert summary.cases[0].orientation == "LPS"


def test_bad_inputs_one_line_each_others_carry_on(raw_root, tmp_path):
    amos = raw_root / "AMOS/amos22"
    # corrupt gzip, shape mismatch, unknown label, NaN intensities, missing label file
    (amos / "imagesTr/amos_0003.nii.gz").write_bytes(gzip.compress(b"not a nifti")[:20])
    (amos / "labelsTr/amos_0003.nii.gz").write_bytes(b"")
    pair(raw_root, "AMOS/amos22/imagesTr/amos_0004.nii.gz", None, 4, 15)
    write_nifti(amos / "labelsTr/amos_0004.nii.gz", np.zeros((5, 5, 5), np.uint8), LPS)
    pair(raw_root, "AMOS/amos22/imagesTr/amos_0005.nii.gz", None, 5, 15)
    write_nifti(amos / "labelsTr/amos_0005.nii.gz", np.full(SHAPE, 42, np.uint8), LPS)
    nan_image = np.zeros(SHAPE, np.float32)
    nan_image[1, 1, 1] = np.nan
    write_nifti(amos / "imagesTr/amos_0006.nii.gz", nan_image, LPS)
    write_nifti(amos / "labelsTr/amos_0006.nii.gz", np.zeros(SHAPE, np.uint8), LPS)
    pair(raw_root, "AMOS/amos22/imagesTr/amos_0008.nii.gz", None, 8, 15)

    failures = FailureLog()
    summary = convert_dataset(DatasetSpec.from_config(dataset_config("amos_ct", raw_root)), tmp_path / "u",
                              failures=failures)
    assert sorted(c.case for c in summary.cases) == ["amos_0001", "amos_0002", "amos_0007"]
    assert len(failures.failures) == 5 and failures.exit_code() == 2
    text = "\n".join(failures.failures)
    assert all(len(line.splitlines()) == 1 for line in failures.failures)
    assert "amos_0003.nii.gz: unreadable" in text
    assert "labelsTr/amos_0004.nii.gz: shape (5, 5, 5) does not match" in text
    assert "labelsTr/amos_0005.nii.gz: values 42 are not labels of system 'amos'" in text
    assert "imagesTr/amos_0006.nii.gz: image contains NaN" in text
    assert "labelsTr/amos_0008.nii.gz: file not found" in text
    leftovers = [p.name for p in (tmp_path / "u").rglob("*") if ".tmp" in p.name or "amos_000" in p.name and
                 any(f"amos_000{i}" in p.name for i in (3, 4, 5, 6, 8))]
    assert leftovers == []


def test_rerun_skips_unchanged_and_redoes_changed(raw_root, tmp_path):
    spec = DatasetSpec.from_config(dataset_config("amos_ct", raw_root))
    first = convert_dataset(spec, tmp_path / "u")
    assert first.skipped == 0
    again = convert_dataset(spec, tmp_path / "u")
    assert again.skipped == 3 and len(again.cases) == 3
    pair(raw_root, "AMOS/amos22/imagesTr/amos_0002.nii.gz", "AMOS/amos22/labelsTr/amos_0002.nii.gz", 99, 15)
    third = convert_dataset(spec, tmp_path / "u")
    assert third.skipped == 2
    converted = nib.load(str(tmp_path / "u/amos_ct/labelsTr/amos_0002.nii.gz"))
    expected = np.random.default_rng(99)
    expected.normal(0, 100, SHAPE)
    assert (np.asanyarray(converted.dataobj) == expected.integers(0, 16, SHAPE)).all()


def test_prepare_reports_missing_raw_folders_and_converts_the_rest(raw_root, tmp_path):
    datasets = {name: dataset_config(name, raw_root) for name in ("amos_ct", "word", "btcv")}
    summaries, failures = prepare(datasets, tmp_path / "u")
    assert [s.name for s in summaries] == ["amos_ct", "btcv"]
    assert failures.exit_code() == 0
    _, strict = prepare(datasets, tmp_path / "u2", missing_ok=False)
    assert strict.exit_code() == 2 and "WORD-V0.1.0" in strict.failures[0]


def test_prepare_cli_exit_code_and_one_line_errors(raw_root, tmp_path):
    amos = raw_root / "AMOS/amos22"
    write_nifti(amos / "labelsTr/amos_0002.nii.gz", np.full(SHAPE, 77, np.uint8), LPS)
    result = subprocess.run(
        [sys.executable, "-m", "aeval.prepare", f"paths.raw_root={raw_root}", f"paths.data_root={tmp_path / 'u'}",
         f"paths.log_dir={tmp_path / 'logs'}", "only=[amos_ct,btcv]", "num_workers=1"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "amos_0002.nii.gz: values 77 are not labels of system 'amos'" in result.stdout.replace("\n", "")
    assert (tmp_path / "u/btcv/dataset.json").exists()
