"""Planning rules: target spacing (median; anisotropic low-res axis), normalisation per modality, CT
intensity statistics, pool kernels valid for the patch, patch size from a voxel budget, joint plans."""

from __future__ import annotations

import functools
import json
import os

import nibabel as nib
import numpy as np
import pytest
from test_preprocess import blob_labels, write_unified_dataset

from aeval.data.planner import (
    divisible_patch,
    fingerprint_datasets,
    fit_patch_size,
    make_plan,
    plan_datasets,
    plan_hash,
    pool_kernels,
    target_spacing,
)

SAMPLES = 100_000


def _fingerprint(spacings, shapes, modalities=("CT",), ct_stats=True) -> dict:
    """A fingerprint as ``fingerprint_datasets`` writes it, for the pure planning rules."""
    stats = {"percentile_00_5": -50.0, "percentile_99_5": 250.0, "mean": 90.0, "std": 45.0}
    return {
        "sources_digest": "test",
        "datasets": [{"name": f"d{i}", "modality": m, "label_system": "flare22"}
                     for i, m in enumerate(modalities)],
        "cases": [{"spacing": list(s), "shape": list(n), "shape_after_crop": list(n)}
                  for s, n in zip(spacings, shapes, strict=True)],
        "intensity": {"CT": stats} if ct_stats else {},
    }


def test_target_spacing_is_the_per_axis_median():
    rng = np.random.default_rng(0)
    spacings = rng.uniform([0.6, 0.6, 0.8], [1.0, 1.0, 2.0], size=(9, 3))
    shapes = np.full((9, 3), 200)
    assert target_spacing(spacings, shapes) == pytest.approx(list(np.median(spacings, axis=0)))
    plan = make_plan(_fingerprint(spacings, shapes)).to_dict()
    assert plan["target_spacing"] == pytest.approx(list(np.median(spacings, axis=0)))
    assert not plan["anisotropic"]


def test_anisotropic_low_res_axis_takes_the_10th_percentile():
    z = np.array([5.0, 5.0, 5.0, 3.0, 2.5, 5.0, 5.0, 1.5, 5.0, 5.0, 4.0])
    spacings = np.column_stack([np.full(z.size, 0.8), np.full(z.size, 0.75), z])
    shapes = np.tile([512, 512, 60], (z.size, 1))
    expected = [0.8, 0.75, float(np.percentile(z, 10))]
    assert expected[2] < np.median(z)
    assert target_spacing(spacings, shapes) == pytest.approx(expected)
    # nnU-Net's second condition: a coarse axis that still has many voxels keeps the median
    many_slices = np.tile([512, 512, 400], (z.size, 1))
    assert target_spacing(spacings, many_slices)[2] == pytest.approx(np.median(z))
    # never finer than the in-plane axes
    fine = np.column_stack([np.full(5, 3.0), np.full(5, 0.5), [10.0, 10.0, 10.0, 1.0, 1.0]])
    low = target_spacing(fine, np.tile([40, 512, 12], (5, 1)))
    assert low[2] == pytest.approx(3.0 + 1e-5)


@pytest.mark.parametrize(("modalities", "scheme"),
                         [(("CT",), "ct"), (("MR",), "zscore"), (("CT", "MR"), "zscore"), (("CT", "CT"), "ct")])
def test_normalisation_scheme_per_modality(modalities, scheme):
    fingerprint = _fingerprint([(1, 1, 1)] * 2, [(64, 64, 64)] * 2, modalities)
    normalization = make_plan(fingerprint).normalization
    assert normalization["scheme"] == scheme
    if scheme == "ct":
        assert normalization["clip"] == [-50.0, 250.0]
        assert (normalization["mean"], normalization["std"]) == (90.0, 45.0)


def test_ct_plan_without_labelled_foreground_is_refused():
    with pytest.raises(ValueError, match="intensity statistics"):
        make_plan(_fingerprint([(1, 1, 1)], [(64, 64, 64)], ("CT",), ct_stats=False))


def test_fingerprint_spacing_in_ras_order_and_ct_foreground_statistics(tmp_path):
    rng = np.random.default_rng(5)
    blobs = [(1, (0.5, 0.5, 0.5), (0.3, 0.3, 0.3)), (2, (0.2, 0.2, 0.5), (0.1, 0.1, 0.2))]
    labels = blob_labels((30, 28, 20), blobs, rng)
    images = [np.where(labels > 0, rng.normal(100, 30, labels.shape), 40).astype(np.float32) for _ in range(3)]
    for image in images:
        image[:, :, :2] = -1000  # air slices: cropped away
    cases = [{"shape": labels.shape, "spacing": (1.0, 2.0, 3.0), "labels": labels, "image": im, "axcodes": ax}
             for im, ax in zip(images, ["RAS", "PSL", "LPS"], strict=True)]
    dataset_dir = write_unified_dataset(tmp_path, "ct", cases)
    fp = fingerprint_datasets([dataset_dir], max_intensity_samples=600_000)
    by_case = {c["case"]: c for c in fp["cases"]}
    assert by_case["ct_000"]["spacing"] == [1.0, 2.0, 3.0] and by_case["ct_000"]["orientation"] == "RAS"
    # PSL: array axis 0 runs A-P, 1 I-S, 2 R-L -> RAS order (axis 2, axis 0, axis 1)
    assert by_case["ct_001"]["spacing"] == [3.0, 1.0, 2.0] and by_case["ct_001"]["orientation"] == "PSL"
    assert by_case["ct_001"]["shape"] == [20, 30, 28]
    assert by_case["ct_000"]["shape_after_crop"] == [30, 28, 18]
    # equal foreground per case -> the pooled sample estimates the plain foreground distribution
    foreground = np.concatenate([im[labels > 0] for im in images])
    stats = fp["intensity"]["CT"]
    spread = float(foreground.std())
    assert stats["mean"] == pytest.approx(foreground.mean(), abs=0.02 * spread)
    assert stats["std"] == pytest.approx(spread, rel=0.02)
    assert stats["percentile_00_5"] == pytest.approx(np.percentile(foreground, 0.5), abs=0.1 * spread)
    assert stats["percentile_99_5"] == pytest.approx(np.percentile(foreground, 99.5), abs=0.1 * spread)
    assert stats["num_samples"] == 600_000
    again = fingerprint_datasets([dataset_dir], max_intensity_samples=600_000)
    assert again["intensity"] == fp["intensity"]  # fixed seed


@pytest.mark.parametrize(("patch", "spacing", "expected"), [
    ((128, 128, 128), (1, 1, 1), [[2, 2, 2]] * 5),
    ((160, 160, 48), (0.8, 0.8, 3.0), [[2, 2, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 1]]),
    ((64, 64, 128), (1, 1, 1), [[2, 2, 2]] * 4 + [[1, 1, 2]]),
])
def test_pool_kernels_by_hand(patch, spacing, expected):
    assert pool_kernels(patch, spacing) == expected


@pytest.mark.parametrize("spacing", [(1, 1, 1), (0.8, 0.8, 2.5), (0.7, 0.7, 5.0), (3.0, 0.9, 0.9)])
@pytest.mark.parametrize("patch", [(128, 128, 128), (192, 160, 48), (96, 96, 96), (40, 56, 20), (112, 112, 16)])
def test_pools_are_valid_for_the_patch(patch, spacing):
    requested = np.asarray(patch)
    patch, pools = divisible_patch(patch, spacing)
    assert len(pools) == 5 and all(len(p) == 3 and set(p) <= {1, 2} for p in pools)
    size = np.asarray(patch, dtype=float)
    for stride in pools:
        halvable = size / 2 >= 4
        assert all(halvable[a] for a in range(3) if stride[a] == 2)  # never below 4 at the bottleneck
        size = size / stride
    assert (size == np.round(size)).all() and (size >= 4).all()  # divisible all the way down
    assert (np.asarray(patch) >= requested).all() and (np.asarray(patch) < 2 * requested).all()


def test_patch_size_from_the_voxel_budget():
    patch, pools = fit_patch_size((1, 1, 1), (300, 300, 300), voxel_budget=128**3)
    assert np.prod(patch) <= 128**3 and np.prod(patch) >= 128**3 / 2
    assert all(n % np.prod([p[a] for p in pools]) == 0 for a, n in enumerate(patch))
    small, _ = fit_patch_size((1, 1, 1), (40, 36, 20), voxel_budget=128**3)  # whole case fits
    assert all(s >= m for s, m in zip(small, (40, 36, 20), strict=True))
    aniso, aniso_pools = fit_patch_size((0.8, 0.8, 5.0), (400, 400, 60), voxel_budget=128**3)
    assert np.prod(aniso) <= 128**3 and aniso[2] <= 64 and aniso[0] > aniso[2]
    assert aniso_pools[0][2] == 1  # the coarse axis waits
    plan = make_plan(_fingerprint([(1, 1, 1)] * 3, [(300, 300, 300)] * 3), voxel_budget=64**3).to_dict()
    assert np.prod(plan["patch_size"]) <= 64**3
    given = make_plan(_fingerprint([(1, 1, 1)] * 3, [(300, 300, 300)] * 3), patch_size=[100, 128, 128]).to_dict()
    # 100 takes 4 halvings (100/32 < 2*4), so it is rounded up to a multiple of 16
    assert given["patch_size"] == [112, 128, 128] and given["patch_size_requested"] == [100, 128, 128]
    assert [p[0] for p in given["pool_op_kernel_sizes"]] == [2, 2, 2, 2, 1]


def test_plan_datasets_writes_a_joint_plan_over_the_union(tmp_path):
    root = tmp_path / "unified"
    a_spacings = [(0.8, 0.8, 2.0), (0.9, 0.9, 2.5)]
    b_spacings = [(1.2, 1.2, 1.5), (1.0, 1.1, 3.0), (0.7, 0.75, 2.2)]
    write_unified_dataset(root, "a", [{"shape": (24, 24, 12), "spacing": s} for s in a_spacings])
    write_unified_dataset(root, "b", [{"shape": (24, 24, 12), "spacing": s} for s in b_spacings], seed=1)
    # the reuse rules, not the statistics, are under test: a small sample keeps it fast (nnU-Net's 1e8 is the default)
    run_plan = functools.partial(plan_datasets, intensity_samples=SAMPLES)
    plan_dir = run_plan(["a", "b"], root, tmp_path / "pre")
    assert plan_dir == tmp_path / "pre" / "a+b"
    plan = json.loads((plan_dir / "plans.json").read_text())
    fingerprint = json.loads((plan_dir / "fingerprint.json").read_text())
    assert plan["target_spacing"] == pytest.approx(list(np.median(a_spacings + b_spacings, axis=0)))
    assert [d["name"] for d in plan["datasets"]] == ["a", "b"] and len(fingerprint["cases"]) == 5
    assert plan["hash"] == plan_hash(plan) and plan["label_space"] == "flare22" and plan["num_classes"] == 14
    assert len(plan["pool_op_kernel_sizes"]) == 5 and not any(np.isnan(plan["target_spacing"]))

    # unchanged sources: the fingerprint is reused; a parameter change gives a new hash
    stamp = (plan_dir / "fingerprint.json").stat().st_mtime_ns
    run_plan(["a", "b"], root, tmp_path / "pre")
    assert (plan_dir / "fingerprint.json").stat().st_mtime_ns == stamp
    run_plan(["a", "b"], root, tmp_path / "pre", patch_size=[16, 16, 8])
    assert json.loads((plan_dir / "plans.json").read_text())["hash"] != plan["hash"]
    # a changed source file: fingerprinted again
    label = root / "b" / "labelsTr" / "b_000.nii.gz"
    img = nib.load(label)
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8) + np.asarray(img.dataobj), img.affine), label)
    os.utime(label, ns=(stamp + 10**9, stamp + 10**9))
    run_plan(["a", "b"], root, tmp_path / "pre", plan_name="custom")
    assert (tmp_path / "pre" / "custom" / "plans.json").exists()
    run_plan(["a", "b"], root, tmp_path / "pre")
    assert (plan_dir / "fingerprint.json").stat().st_mtime_ns != stamp
    # a fingerprint of another sampling (or of the sampling before nnU-Net's rule) is redone, not reused
    stamp = (plan_dir / "fingerprint.json").stat().st_mtime_ns
    run_plan(["a", "b"], root, tmp_path / "pre", intensity_samples=2 * SAMPLES)
    assert json.loads((plan_dir / "fingerprint.json").read_text())["intensity"]["CT"]["num_samples"] == 2 * SAMPLES
    old = json.loads((plan_dir / "fingerprint.json").read_text())
    old["fingerprint_version"] = 1
    (plan_dir / "fingerprint.json").write_text(json.dumps(old))
    run_plan(["a", "b"], root, tmp_path / "pre", intensity_samples=2 * SAMPLES)
    assert json.loads((plan_dir / "fingerprint.json").read_text())["fingerprint_version"] == 2
    with pytest.raises(ValueError, match="plan.intensity_samples=0"):
        run_plan(["a", "b"], root, tmp_path / "pre", intensity_samples=0)
