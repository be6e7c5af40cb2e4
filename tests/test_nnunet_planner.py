"""aeval's planner vs nnU-Net 2.8's own (``DatasetFingerprintExtractor`` + ``ExperimentPlanner``, what
``nnUNetv2_plan_and_preprocess`` plans with) on the same files, exported by ``aeval.export``: the target
spacing (mapped from nnU-Net's transposed SimpleITK order to RAS) and the CT normalisation statistics are
equal, on synthetic CTs in LPS (anisotropic: the 10th-percentile rule) and a permuted orientation, and on
the real small CT. Patch sizes differ by design (STU-Net's fixed six stages and 128^3 budget vs nnU-Net's
GPU-memory model; see experiments/benchmarks/results/nnunet_planner.md)."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
from conftest import REAL
from test_preprocess import blob_labels, ct_image, write_unified_dataset

pytest.importorskip("nnunetv2", reason="nnU-Net v2 is the reference: pip install -e '.[nnunet]' torch==2.13.0")

from nnunet_planner_reference import nnunet_plan_subprocess, to_ras  # noqa: E402

from aeval.data.intensity import NNUNET_SEED, pooled_statistics  # noqa: E402
from aeval.data.nnunet_export import export_dataset  # noqa: E402
from aeval.data.planner import fingerprint_datasets, make_plan  # noqa: E402

SAMPLES = 400_000  # foreground voxels in all, both planners (nnU-Net's default 1e8: the benchmark)
STATS = ("mean", "std", "percentile_00_5", "percentile_99_5", "median", "min", "max")
# name: (axcodes, [(spacing in array order, shape)], zero slices at both ends of the last array axis)
DATASETS = {
    "lps_aniso": ("LPS", [((0.8, 0.8, 4.0), (40, 36, 10)), ((0.75, 0.7, 5.0), (44, 40, 8)),
                          ((0.9, 0.85, 3.0), (36, 38, 12))], 0),
    "permuted": ("PSL", [((1.0, 2.0, 1.5), (30, 20, 28)), ((1.1, 2.2, 1.4), (28, 18, 30)),
                         ((0.9, 2.5, 1.6), (32, 22, 26)), ((1.2, 1.8, 1.5), (30, 20, 30))], 2),
}


def _synthetic(root, name, axcodes, cases, zero_ends, seed):
    rng = np.random.default_rng(seed)
    specs = []
    for spacing, shape in cases:
        labels = blob_labels(shape, [(1, (0.45, 0.5, 0.5), (0.3, 0.25, 0.35)), (2, (0.7, 0.4, 0.5),
                                      (0.12, 0.15, 0.3)), (6, (0.3, 0.6, 0.45), (0.1, 0.12, 0.25))], rng)
        image = ct_image(labels, rng) + rng.normal(0, 25, shape).astype(np.float32)  # distinct voxel values
        if zero_ends:  # nnU-Net crops these (crop to non-zero); aeval's CT crop keeps them (> -500 HU)
            image[..., :zero_ends] = image[..., -zero_ends:] = 0
        specs.append({"shape": shape, "spacing": spacing, "axcodes": axcodes, "labels": labels, "image": image})
    return write_unified_dataset(root, name, specs)


def _real_dataset(root):
    """example_ct_sm with its TotalSegmentator labels as a one-case unified dataset (the converter's layout)."""
    folder = root / "real_ct"
    files = [("imagesTr", "example_ct_sm", "real_000_0000"), ("labelsTr", "example_seg", "real_000")]
    for sub, source, target in files:
        (folder / sub).mkdir(parents=True, exist_ok=True)
        os.symlink(REAL / f"{source}.nii.gz", folder / sub / f"{target}.nii.gz")
    (folder / "dataset.json").write_text(json.dumps({
        "name": "real_ct", "modality": "CT", "label_system": "totalseg_v2", "channel_names": {"0": "CT"},
        "labels": {"background": 0}, "numTraining": 1, "numTest": 0, "file_ending": ".nii.gz"}))
    (folder / "splits.json").write_text(json.dumps({"train": ["real_000"], "test": []}))
    return folder


def _both_planners(tmp, folders, samples):
    """aeval's fingerprint and plan of each unified dataset, and nnU-Net's of its export."""
    ours, names = {}, {}
    for i, folder in enumerate(folders, start=1):
        fingerprint = fingerprint_datasets([folder], max_intensity_samples=samples)
        ours[folder.name] = (fingerprint, make_plan(fingerprint).to_dict(), folder)
        names[folder.name] = export_dataset(folder, tmp / "raw", 500 + i).folder.name
    theirs = nnunet_plan_subprocess(tmp / "raw", tmp / "nnunet_pre", list(names.values()), samples)
    return {name: (*ours[name], theirs[names[name]]) for name in ours}


@pytest.fixture(scope="module")
def synthetic_plans(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("planner")
    folders = [_synthetic(tmp / "unified", name, *spec, seed=i) for i, (name, spec) in enumerate(DATASETS.items())]
    return _both_planners(tmp, folders, SAMPLES)


def _affine(folder):
    return nib.load(next((folder / "imagesTr").glob("*_0000.nii.gz"))).affine


def assert_same_plan(fingerprint, plan, folder, nnunet):
    plans, nn_fingerprint = nnunet["plans"], nnunet["fingerprint"]
    affine = _affine(folder)
    # per-case spacings: nnU-Net's are SimpleITK (z, y, x) of the stored orientation, aeval's RAS
    assert [c["spacing"] for c in fingerprint["cases"]] == [to_ras(s, [0, 1, 2], affine)
                                                           for s in nn_fingerprint["spacings"]]
    fullres = plans["configurations"]["3d_fullres"]
    assert plan["target_spacing"] == pytest.approx(to_ras(fullres["spacing"], plans["transpose_forward"], affine),
                                                   rel=1e-12)
    reference = plans["foreground_intensity_properties_per_channel"]["0"]
    ours = fingerprint["intensity"]["CT"]
    assert {k: ours[k] for k in STATS} == {k: reference[k] for k in STATS}  # bit for bit: the same samples
    assert fullres["normalization_schemes"] == ["CTNormalization"] and plan["normalization"]["scheme"] == "ct"
    assert plan["normalization"]["clip"] == pytest.approx([reference["percentile_00_5"], reference["percentile_99_5"]])
    assert (plan["normalization"]["mean"], plan["normalization"]["std"]) == pytest.approx(
        (reference["mean"], reference["std"]))


@pytest.mark.parametrize("name", list(DATASETS))
def test_target_spacing_and_ct_statistics_equal_nnunets(synthetic_plans, name):
    fingerprint, plan, folder, nnunet = synthetic_plans[name]
    assert_same_plan(fingerprint, plan, folder, nnunet)
    # permuted: the coarsest axis is SimpleITK's axis 1, so nnU-Net transposes it first
    assert synthetic_plans[name][3]["plans"]["transpose_forward"] == ([1, 0, 2] if name == "permuted" else [0, 1, 2])
    if name == "lps_aniso":  # the anisotropic rule fired in both: the coarse axis takes its 10th percentile
        z = [spacing[2] for spacing, _ in DATASETS[name][1]]
        assert plan["target_spacing"][2] == pytest.approx(np.percentile(z, 10))
        assert plan["target_spacing"][2] < np.median(z)
    # patch sizes are not compared: STU-Net's six stages and 128^3 budget vs nnU-Net's VRAM model
    assert len(plan["pool_op_kernel_sizes"]) == 5 and np.prod(plan["patch_size"]) <= 128**3


def test_the_sampling_order_matters(synthetic_plans):
    """The comparison is sensitive: the same seed over the foreground in nibabel's (x, y, z) order instead of
    SimpleITK's (z, y, x) gives other statistics."""
    fingerprint, _, folder, nnunet = synthetic_plans["permuted"]
    per_case = SAMPLES // len(fingerprint["cases"])
    naive = []
    for image_path in sorted((folder / "imagesTr").glob("*_0000.nii.gz")):
        image = np.asarray(nib.load(image_path).dataobj, dtype=np.float32)
        labels = np.asarray(nib.load(folder / "labelsTr" / image_path.name.replace("_0000", "")).dataobj)
        naive.append(np.random.RandomState(NNUNET_SEED).choice(image[labels > 0], per_case, replace=True))
    reference = nnunet["plans"]["foreground_intensity_properties_per_channel"]["0"]
    assert pooled_statistics(naive)["mean"] != pytest.approx(reference["mean"], rel=1e-6)
    assert fingerprint["intensity"]["CT"]["mean"] == pytest.approx(reference["mean"], rel=1e-9)


@pytest.mark.skipif(not (REAL / "example_ct_sm.nii.gz").exists() or not (REAL / "example_seg.nii.gz").exists(),
                    reason="../shared/data/real/example_ct_sm.nii.gz + example_seg.nii.gz are not present")
def test_real_ct_plan_equals_nnunets(tmp_path):
    folder = _real_dataset(tmp_path / "unified")
    fingerprint, plan, folder, nnunet = _both_planners(tmp_path, [folder], 1_000_000)["real_ct"]
    assert_same_plan(fingerprint, plan, folder, nnunet)
    assert plan["target_spacing"] == pytest.approx([3.0, 3.0, 3.0])
