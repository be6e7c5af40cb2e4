"""Preprocessing cache: geometry round trips, resampling against independent references, normalisation,
set-valued labels, and the cache's idempotence, invalidation and repair."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import FAST_INTENSITY_SAMPLES, affine_for, write_nifti
from nibabel import orientations

from aeval.data.cache import PreprocessingFailed, cached_properties, load_or_rebuild_case, preprocess_dataset
from aeval.data.geometry import from_ras, resample_image, resampled_argmax, to_ras
from aeval.data.label_codes import LABEL_SETS, codes_to_classes
from aeval.data.planner import plan_datasets
from aeval.data.preprocess import normalise, preprocess_case, preprocess_image
from aeval.data.restore import restore_labels, restore_to_original
from aeval.errors import FailureLog
from aeval.labels import remap
from aeval.plan import Plan

# --- a tiny unified dataset writer (shared with test_plan / test_datamodule) ----------------------------



def blob_labels(shape, blobs, rng: np.random.Generator) -> np.ndarray:
    """Ellipsoids ``(label, centre fraction xyz, radius fraction xyz)`` painted in order."""
    grid = np.stack(np.meshgrid(*[(np.arange(n) + 0.5) / n for n in shape], indexing="ij"), -1)
    labels = np.zeros(shape, dtype=np.uint8)
    for label, centre, radius in blobs:
        jitter = rng.uniform(-0.03, 0.03, 3)
        inside = ((((grid - np.asarray(centre) - jitter) / np.asarray(radius)) ** 2).sum(-1)) <= 1
        labels[inside] = label
    return labels


DEFAULT_BLOBS = [(1, (0.4, 0.45, 0.5), (0.25, 0.2, 0.3)), (3, (0.7, 0.6, 0.5), (0.12, 0.15, 0.25)),
                 (2, (0.3, 0.7, 0.45), (0.1, 0.1, 0.2)), (11, (0.6, 0.3, 0.55), (0.12, 0.1, 0.2))]


def ct_image(labels: np.ndarray, rng: np.random.Generator, air_border: int = 2) -> np.ndarray:
    """CT-like: -1000 HU air around a body of ~40 HU, organs brighter by label, a little noise."""
    image = np.full(labels.shape, 40.0, dtype=np.float32) + rng.normal(0, 5, labels.shape).astype(np.float32)
    image += labels.astype(np.float32) * 12
    if air_border:
        image[:air_border] = image[-air_border:] = -1000
        image[:, :air_border] = image[:, -air_border:] = -1000
    return image


def write_unified_dataset(root: Path, name: str, cases: list[dict], *, modality: str = "CT",
                          label_system: str = "flare22", labelled: bool = True, seed: int = 0,
                          blobs=DEFAULT_BLOBS) -> Path:
    """``cases``: dicts with ``shape``, ``spacing`` and optional ``axcodes`` (RAS), ``labels`` (array),
    ``image`` (array). Writes imagesTr/labelsTr, dataset.json and splits.json in the unified layout."""
    rng = np.random.default_rng(seed)
    out = root / name
    ids = []
    for i, case in enumerate(cases):
        case_id = case.get("id", f"{name}_{i:03d}")
        ids.append(case_id)
        labels = case.get("labels")
        if labels is None:
            labels = blob_labels(case["shape"], blobs, rng)
        image = case.get("image")
        if image is None:
            mr = labels * 50.0 + rng.uniform(50, 150, labels.shape)
            image = ct_image(labels, rng) if modality == "CT" else mr
        affine = affine_for(case.get("axcodes", "RAS"), case["spacing"])
        write_nifti(out / "imagesTr" / f"{case_id}_0000.nii.gz", np.asarray(image, dtype=np.float32), affine)
        if labelled:
            write_nifti(out / "labelsTr" / f"{case_id}.nii.gz", np.asarray(labels, dtype=np.uint8), affine)
    (out / "dataset.json").write_text(json.dumps({
        "name": name, "modality": modality, "label_system": label_system, "channel_names": {"0": modality},
        "labels": {"background": 0}, "numTraining": len(ids), "numTest": 0, "file_ending": ".nii.gz"}))
    (out / "splits.json").write_text(json.dumps({"train": ids, "test": []}))
    return out


ANISO_CASES = [{"shape": (40, 36, 24), "spacing": (0.9, 0.9, 4.0)},
               {"shape": (34, 38, 20), "spacing": (1.1, 1.0, 5.0)},
               {"shape": (44, 40, 28), "spacing": (0.8, 0.85, 3.5)},
               {"shape": (38, 34, 22), "spacing": (1.0, 0.95, 4.5)}]  # medians match no case


def _planned(tmp_path: Path, cases, name="ds", **kwargs) -> tuple[Path, Path]:
    write_unified_dataset(tmp_path / "unified", name, cases, **kwargs)
    plan_dir = plan_datasets([name], tmp_path / "unified", tmp_path / "pre", patch_size=[16, 16, 8],
                             intensity_samples=FAST_INTENSITY_SAMPLES)
    return tmp_path / "unified" / name, plan_dir / "plans.json"


# --- geometry ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("axcodes", ["RAS", "LPS", "LAS", "PSL", "IRA"])
def test_ras_reorientation_matches_nibabel_and_inverts(axcodes):
    data = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)
    img = nib.Nifti1Image(data, affine_for(axcodes, (1.0, 2.0, 3.0)))
    transform = orientations.io_orientation(img.affine)
    ras = to_ras(data, transform)
    canonical = nib.as_closest_canonical(img)
    np.testing.assert_array_equal(ras, np.asarray(canonical.dataobj))
    np.testing.assert_array_equal(from_ras(ras, transform), data)


# --- resampling against references ---------------------------------------------------------------------

def test_cubic_resampling_reproduces_a_linear_ramp():
    """A 3rd-order spline reproduces linear functions; voxel centres map as (j + 0.5) * scale - 0.5."""
    shape, new_shape = (40, 36, 6), (62, 24, 6)
    x = np.arange(shape[0], dtype=np.float32)[:, None, None] * np.ones(shape, np.float32)
    y = np.arange(shape[1], dtype=np.float32)[None, :, None] * np.ones(shape, np.float32)
    out = resample_image(2 * x + 3 * y, new_shape, None)
    cx = (np.arange(new_shape[0]) + 0.5) * shape[0] / new_shape[0] - 0.5
    cy = (np.arange(new_shape[1]) + 0.5) * shape[1] / new_shape[1] - 0.5
    expected = 2 * cx[:, None, None] + 3 * cy[None, :, None] + np.zeros(new_shape)
    inner = (slice(8, -8), slice(8, -8), slice(None))  # the spline's edge handling fades within a few voxels
    np.testing.assert_allclose(out[inner], expected[inner], atol=1e-3)


def test_separate_z_resamples_the_low_res_axis_by_nearest_neighbour():
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(10, 12, 6)).astype(np.float32)
    out = resample_image(volume, (15, 18, 9), z_axis=2)
    in_plane = resample_image(volume, (15, 18, 6), z_axis=None)  # in-plane only: z untouched
    nearest = np.minimum(np.floor((np.arange(9) + 0.5) * 6 / 9).astype(int), 5)
    np.testing.assert_allclose(out, in_plane[:, :, nearest], atol=1e-5)


@pytest.mark.parametrize("z_axis", [None, 1])
def test_chunked_linear_argmax_matches_torch_interpolate(z_axis):
    rng = np.random.default_rng(1)
    logits = torch.from_numpy(rng.normal(size=(4, 9, 7, 11)).astype(np.float32))
    out_shape = (37, 13, 20)  # more than one chunk along the first axis
    if z_axis is None:
        reference = F.interpolate(logits[None], size=out_shape, mode="trilinear", align_corners=False)[0]
        channels = [lambda lo, hi, c=c: logits[c, lo:hi] for c in range(4)]
        ours = resampled_argmax(channels, [9], out_shape, None)
    else:  # nearest along axis 1, bilinear in the others: move axis 1 first, as the callers do
        index = np.minimum(np.floor((np.arange(13) + 0.5) * 7 / 13).astype(int), 6)
        planes = F.interpolate(logits.permute(2, 0, 1, 3), size=(37, 20), mode="bilinear",
                               align_corners=False)
        reference = planes.permute(1, 2, 0, 3)[:, :, index]
        moved = logits.permute(0, 2, 1, 3)
        channels = [lambda lo, hi, c=c: moved[c, lo:hi] for c in range(4)]
        ours = np.moveaxis(resampled_argmax(channels, [7], (13, 37, 20), 1), 0, 1)
    assert (ours == reference.argmax(0).numpy()).mean() > 0.999


def test_normalisation_schemes():
    image = np.array([-2000.0, -100.0, 0.0, 50.0, 3000.0], dtype=np.float32)
    ct, _ = normalise(image, {"scheme": "ct", "clip": [-100.0, 200.0], "mean": 20.0, "std": 40.0})
    np.testing.assert_allclose(ct, (np.clip(image, -100, 200) - 20) / 40)
    z, stats = normalise(image, {"scheme": "zscore"})
    assert abs(z.mean()) < 1e-6 and abs(z.std() - 1) < 1e-5
    assert stats["mean"] == pytest.approx(float(image.mean()))


# --- the round trip ------------------------------------------------------------------------------------

@pytest.mark.parametrize("axcodes", ["RAS", "LPS", "LAS"])
def test_preprocess_then_restore_returns_the_original_labels(tmp_path, axcodes):
    cases = [{**c, "axcodes": axcodes} for c in ANISO_CASES]
    dataset_dir, plan_path = _planned(tmp_path, cases)
    plan = json.loads(plan_path.read_text())
    for i in range(len(cases)):
        image_path = dataset_dir / "imagesTr" / f"ds_{i:03d}_0000.nii.gz"
        label_path = dataset_dir / "labelsTr" / f"ds_{i:03d}.nii.gz"
        image, seg, props = preprocess_case(image_path, label_path, plan, "flare22")
        original = remap(np.asarray(nib.load(label_path).dataobj), "flare22", "flare22")
        assert props["shape_after_resample"] != props["shape_after_crop"]  # it really was resampled
        assert image.dtype == np.float32 and seg.dtype == np.uint8 and image.shape == seg.shape
        one_hot = torch.nn.functional.one_hot(torch.from_numpy(seg[0]).long(), 14).permute(3, 0, 1, 2).float()
        restored = restore_to_original(one_hot, props)
        assert restored.dtype == np.uint8 and restored.shape == original.shape
        assert (restored == original).mean() >= 0.99
        for organ in (1, 3):  # organs survive too, not just background
            dice = 2 * ((restored == organ) & (original == organ)).sum() / ((restored == organ).sum()
                                                                            + (original == organ).sum())
            assert dice > 0.93
        if i > 0:
            continue
        np.testing.assert_array_equal(restore_labels(seg, props), restored)
        half = one_hot.numpy().astype(np.float16)
        np.testing.assert_array_equal(restore_to_original(half, props), restored)
        # the cache holds exactly what inference-time preprocessing gives
        alone, alone_props = preprocess_image(image_path, plan)
        np.testing.assert_array_equal(alone, image)
        assert alone_props["crop_bbox"] == props["crop_bbox"]


def test_ct_crop_removes_air_and_restore_pastes_back(tmp_path):
    rng = np.random.default_rng(3)
    labels = np.zeros((30, 30, 10), np.uint8)
    labels[10:20, 12:18, 3:7] = 1
    image = np.full(labels.shape, -1000.0, np.float32)
    image[5:25, 8:22, :] = 30 + 20 * labels[5:25, 8:22, :] + rng.normal(0, 3, (20, 14, 10))
    case = {"shape": labels.shape, "spacing": (1, 1, 1), "labels": labels, "image": image, "axcodes": "LPS"}
    dataset_dir, plan_path = _planned(tmp_path, [case] * 2)
    plan = json.loads(plan_path.read_text())
    image_out, seg, props = preprocess_case(dataset_dir / "imagesTr/ds_000_0000.nii.gz",
                                            dataset_dir / "labelsTr/ds_000.nii.gz", plan, "flare22")
    assert props["shape_after_crop"] == [20, 14, 10] and props["foreground_outside_crop"] == 0
    one_hot = F.one_hot(torch.from_numpy(seg[0]).long(), 14).permute(3, 0, 1, 2).float()
    np.testing.assert_array_equal(restore_to_original(one_hot, props), labels)


def test_set_valued_labels_keep_their_set(tmp_path):
    """WORD's single adrenal label stands for {right, left adrenal}: stored as a set code, not 0."""
    labels = np.zeros((24, 24, 8), np.uint8)
    labels[4:12, 4:12, 2:6] = 1    # liver
    labels[14:20, 14:20, 2:6] = 12  # adrenal_glands
    labels[2:4, 18:22, 1:3] = 10   # colon: not a FLARE22 organ
    dataset_dir, plan_path = _planned(tmp_path, [{"shape": labels.shape, "spacing": (1, 1, 1),
                                                  "labels": labels}] * 2, label_system="word")
    plan = json.loads(plan_path.read_text())
    _, seg, props = preprocess_case(dataset_dir / "imagesTr/ds_000_0000.nii.gz",
                                    dataset_dir / "labelsTr/ds_000.nii.gz", plan, "word")
    code = next(c for c, s in LABEL_SETS.items() if s == {7, 8})
    assert code >= 14 and props["label_sets"][str(code)] == [7, 8]
    assert set(np.unique(seg)) == {0, 1, code}
    assert (seg == code).sum() == (labels == 12).sum()
    assert set(np.unique(codes_to_classes(seg))) == {0, 1}
    assert sorted(props["class_locations"]) == ["1", str(code)]


def test_class_locations_point_at_their_class(tmp_path):
    dataset_dir, plan_path = _planned(tmp_path, ANISO_CASES)
    plan = json.loads(plan_path.read_text())
    _, seg, props = preprocess_case(dataset_dir / "imagesTr/ds_000_0000.nii.gz",
                                    dataset_dir / "labelsTr/ds_000.nii.gz", plan, "flare22")
    flat = seg[0].ravel()
    assert sorted(map(int, props["class_locations"])) == [c for c in np.unique(flat) if c]
    for code, where in props["class_locations"].items():
        assert (flat[np.asarray(where)] == int(code)).all()
        assert len(where) == min(1000, int((flat == int(code)).sum()))


# --- the cache -----------------------------------------------------------------------------------------

def _mtimes(cache_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in cache_dir.glob("ds_*")}


def test_cache_is_idempotent_invalidated_by_plan_and_source_changes(tmp_path):
    dataset_dir, plan_path = _planned(tmp_path, ANISO_CASES)
    cache = preprocess_dataset(dataset_dir, plan_path)
    assert cache == plan_path.parent / "ds"
    manifest = json.loads((cache / "cache.json").read_text())
    assert manifest["cases"] == ["ds_000", "ds_001", "ds_002", "ds_003"]
    image = np.load(cache / "ds_001.npy", mmap_mode="r")
    assert isinstance(image, np.memmap) and image.dtype == np.float32 and image.ndim == 4
    first = _mtimes(cache)
    preprocess_dataset(dataset_dir, plan_path)
    assert _mtimes(cache) == first  # nothing rebuilt

    # a source file changes -> only that case is rebuilt
    label = dataset_dir / "labelsTr" / "ds_002.nii.gz"
    os.utime(label, ns=(label.stat().st_atime_ns, label.stat().st_mtime_ns + 10**9))
    preprocess_dataset(dataset_dir, plan_path)
    now = _mtimes(cache)
    assert now["ds_000.json"] == first["ds_000.json"] and now["ds_002.json"] != first["ds_002.json"]

    # a changed plan invalidates every case
    plan_datasets(["ds"], tmp_path / "unified", tmp_path / "pre", patch_size=[32, 32, 8],
                  intensity_samples=FAST_INTENSITY_SAMPLES)
    preprocess_dataset(dataset_dir, plan_path)
    plan = json.loads(plan_path.read_text())
    for case in ("ds_000", "ds_001", "ds_002"):
        assert json.loads((cache / f"{case}.json").read_text())["plan_hash"] == plan["hash"]
        assert _mtimes(cache)[f"{case}.npy"] != now[f"{case}.npy"]


def test_corrupt_cache_file_is_rebuilt_for_that_case(tmp_path):
    dataset_dir, plan_path = _planned(tmp_path, ANISO_CASES)
    cache = preprocess_dataset(dataset_dir, plan_path)
    plan = json.loads(plan_path.read_text())
    good = np.load(cache / "ds_001_seg.npy")
    before = _mtimes(cache)
    data = (cache / "ds_001_seg.npy").read_bytes()
    (cache / "ds_001_seg.npy").write_bytes(data[: len(data) // 2])  # truncated
    assert cached_properties(cache, "ds_001", plan["hash"]) is None
    preprocess_dataset(dataset_dir, plan_path)
    np.testing.assert_array_equal(np.load(cache / "ds_001_seg.npy"), good)
    assert _mtimes(cache)["ds_000.npy"] == before["ds_000.npy"]
    # the loader-side repair does the same from the manifest
    (cache / "ds_002.json").write_text("{not json")
    props = load_or_rebuild_case(cache, "ds_002", Plan.from_dict(plan))
    assert props["case"] == "ds_002" and cached_properties(cache, "ds_002", plan["hash"]) is not None


def test_labels_outside_the_label_system_are_named(tmp_path):
    labels = blob_labels((24, 24, 8), DEFAULT_BLOBS, np.random.default_rng(0))
    bad = labels.copy()
    bad[1, 1, 1] = 20  # flare22 has 13 labels
    case = {"shape": labels.shape, "spacing": (1, 1, 2), "labels": labels}
    dataset_dir, plan_path = _planned(tmp_path, [case] * 2)
    write_nifti(dataset_dir / "labelsTr" / "ds_001.nii.gz", bad, affine_for("RAS", (1, 1, 2)))
    with pytest.raises(PreprocessingFailed) as err:
        preprocess_dataset(dataset_dir, plan_path)
    assert "labelsTr/ds_001.nii.gz" in str(err.value) and "20" in str(err.value)
    assert len(err.value.failures) == 1
    cache = plan_path.parent / "ds"
    assert (cache / "ds_000.json").exists() and not (cache / "ds_001.json").exists()  # others carried on
    log = FailureLog(quiet=True)
    preprocess_dataset(dataset_dir, plan_path, failures=log)
    assert log.exit_code() != 0 and "ds_001" in log.failures[0]


@pytest.mark.slow  # spawns two workers that import torch
def test_parallel_preprocessing_equals_serial(tmp_path):
    dataset_dir, plan_path = _planned(tmp_path, ANISO_CASES)
    serial = preprocess_dataset(dataset_dir, plan_path, tmp_path / "serial", num_workers=1)
    parallel = preprocess_dataset(dataset_dir, plan_path, tmp_path / "parallel", num_workers=2)
    for case in ("ds_000", "ds_003"):
        np.testing.assert_array_equal(np.load(serial / f"{case}.npy"), np.load(parallel / f"{case}.npy"))
        np.testing.assert_array_equal(np.load(serial / f"{case}_seg.npy"),
                                      np.load(parallel / f"{case}_seg.npy"))


@pytest.mark.slow
def test_restore_of_a_full_size_ct_stays_within_2gb(tmp_path):
    """512x512x400 original, 14 classes: peak extra memory of the restore stays under ~2 GB."""
    import subprocess
    import sys

    script = r"""
import resource, sys, numpy as np, torch
from aeval.data.restore import restore_to_original
props = {"shape_after_resample": [256, 256, 200], "shape_after_crop": [512, 512, 400], "z_axis": None,
         "ras_shape": [512, 512, 400], "crop_bbox": [[0, 512], [0, 512], [0, 400]],
         "ras_transform": [[0, -1], [1, -1], [2, 1]], "original": {"shape": [512, 512, 400]}}
torch.manual_seed(0)
logits = torch.randn((14, 256, 256, 200))  # resident before the measurement starts
logits[3, 100:150, 90:140, 50:120] += 10
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = restore_to_original(logits, props)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert out.shape == (512, 512, 400) and out.dtype == np.uint8 and (out == 3).sum() > 0
print((peak - before) / 1024**2)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    extra_gb = float(result.stdout.strip().splitlines()[-1])
    assert extra_gb < 2.0, extra_gb


def test_unlabelled_dataset_in_a_joint_plan_caches_images_only(tmp_path):
    root = tmp_path / "unified"
    write_unified_dataset(root, "ds", ANISO_CASES[:2])
    write_unified_dataset(root, "unl", ANISO_CASES[2:], labelled=False, seed=1)
    plan_dir = plan_datasets(["ds", "unl"], root, tmp_path / "pre", patch_size=[16, 16, 8],
                             intensity_samples=FAST_INTENSITY_SAMPLES)
    plan = json.loads((plan_dir / "plans.json").read_text())
    assert plan["num_training_cases"] == 4 and plan["normalization"]["scheme"] == "ct"
    cache = preprocess_dataset(root / "unl", plan_dir / "plans.json")
    manifest = json.loads((cache / "cache.json").read_text())
    assert manifest["cases"] == ["unl_000", "unl_001"] and manifest["labelled_cases"] == []
    assert not list(cache.glob("*_seg.npy"))
    props = cached_properties(cache, "unl_000", plan["hash"])
    assert props is not None and props["labelled"] is False and "class_locations" not in props
