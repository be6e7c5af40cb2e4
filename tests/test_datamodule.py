"""The DataModule: batch layout (deep supervision, annotated masks), foreground oversampling rate and
class balance, augmentation keeping image and labels aligned, padding, determinism across workers,
validation split, mixed sources and cache repair."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST_INTENSITY_SAMPLES
from test_preprocess import blob_labels, write_unified_dataset

from aeval.data.augment import AUGMENTATION_DEFAULTS, augmentation_config, extract_patch
from aeval.data.cache import preprocess_dataset
from aeval.data.datamodule import AEvalDataModule, EpochSeeds, deep_supervision_strides, split_cases
from aeval.data.planner import plan_datasets


def _cache(root: Path, name: str, cases: list[dict], patch, **kwargs) -> tuple[Path, dict]:
    write_unified_dataset(root / "unified", name, cases, **kwargs)
    plan_dir = plan_datasets([name], root / "unified", root / "pre", patch_size=patch,
                             intensity_samples=FAST_INTENSITY_SAMPLES)
    cache = preprocess_dataset(root / "unified" / name, plan_dir / "plans.json")
    return cache, json.loads((plan_dir / "plans.json").read_text())


@pytest.fixture(scope="module")
def sparse(tmp_path_factory):
    """96^3 cases, no resampling (one spacing): a big liver block and an 8-voxel spleen far from it."""
    labels = np.zeros((96, 96, 96), np.uint8)
    labels[60:80, 60:80, 60:80] = 1
    labels[4:6, 4:6, 4:6] = 3
    image = np.full(labels.shape, 40.0, np.float32) + 30 * labels
    cases = [{"shape": labels.shape, "spacing": (1, 1, 1), "labels": labels, "image": image}] * 2
    return _cache(tmp_path_factory.mktemp("sparse"), "sparse", cases, [8, 8, 8])


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    """MR (per-image z-score: the cached image is an affine function of the one written), no resampling."""
    rng = np.random.default_rng(0)
    cases = []
    for _ in range(4):
        labels = blob_labels((40, 40, 32), [(1, (0.45, 0.5, 0.5), (0.3, 0.25, 0.3)),
                                           (3, (0.75, 0.7, 0.5), (0.15, 0.2, 0.25)),
                                           (11, (0.3, 0.2, 0.5), (0.15, 0.12, 0.2))], rng)
        cases.append({"shape": labels.shape, "spacing": (1.5, 1.5, 2.0), "labels": labels,
                      "image": 100 + 100 * (labels > 0).astype(np.float32)})
    return _cache(tmp_path_factory.mktemp("blobs"), "blobs", cases, [24, 24, 16], modality="MR")


def _module(cache_plan, **kwargs) -> AEvalDataModule:
    cache, plan = cache_plan
    settings = {"batch_size": 2, "iterations_per_epoch": 4, "val_cases": 0, "num_workers": 0, "seed": 7,
                "augment": False, **kwargs}
    module = AEvalDataModule([cache] if not isinstance(cache, list) else cache, plan, **settings)
    module.setup()
    return module


def test_batch_layout_with_deep_supervision(blobs):
    module = _module(blobs, augment=True)
    batch = next(iter(module.train_dataloader()))
    pools = blobs[1]["pool_op_kernel_sizes"]
    assert batch["image"].shape == (2, 1, 24, 24, 16) and batch["image"].dtype == torch.float32
    assert batch["target"].shape == (2, 1, 24, 24, 16) and batch["target"].dtype == torch.int64
    assert batch["annotated"].shape == (2, 14) and batch["annotated"].dtype == torch.bool
    assert batch["annotated"].all()  # flare22 annotates everything
    assert int(batch["target"].max()) <= 13
    strides = deep_supervision_strides(pools)
    assert len(batch["targets_ds"]) == len(pools) == 5 and strides[0] == [1, 1, 1]
    cumulative = np.ones(3, int)
    for k, target in enumerate(batch["targets_ds"]):
        assert list(target.shape[2:]) == [n // c for n, c in zip((24, 24, 16), cumulative, strict=True)]
        sx, sy, sz = cumulative
        assert torch.equal(target, batch["target"][:, :, ::sx, ::sy, ::sz])
        if k < len(pools):
            cumulative = cumulative * np.asarray(pools[k])


def test_foreground_oversampling_rate_is_a_third(sparse):
    dataset = _module(sparse).train_dataloader().dataset
    draws = 3000
    with_foreground = sum(bool((dataset[seed]["target"] > 0).any()) for seed in range(draws))
    # a random 8^3 patch in 96^3 almost never meets the foreground: the rate is the oversampling rate
    assert abs(with_foreground / draws - 0.33) < 0.03


def test_oversampling_is_class_balanced(sparse):
    dataset = _module(sparse, oversample_foreground=1.0).train_dataloader().dataset
    hits = [dataset[seed]["target"] for seed in range(600)]
    spleen = np.mean([bool((t == 3).any()) for t in hits])
    assert all(bool((t > 0).any()) for t in hits)
    assert abs(spleen - 0.5) < 0.07  # 8 voxels vs 8000, yet half the patches: classes drawn uniformly


def test_spatial_augmentation_keeps_image_and_labels_aligned(blobs):
    """The image is 100 + 100 * foreground: after rotation/scaling (trilinear) and mirroring, thresholding
    it must give the (nearest-neighbour) target's foreground. One voxel of misalignment drops the
    agreement to ~0.93, a flip to ~0.7."""
    cache, _ = blobs
    augment = {name: False for name in AUGMENTATION_DEFAULTS}  # spatial transforms only
    augment.update(rotation={"p": 1.0}, scaling={"p": 1.0}, mirror={"p": 0.5})
    dataset = _module(blobs, augment=augment, oversample_foreground=1.0).train_dataloader().dataset
    plain = _module(blobs, augment=False, oversample_foreground=1.0).train_dataloader().dataset
    for seed in range(10):
        sample = dataset[seed]
        stats = json.loads((cache / f"{sample['case'].split('/')[1]}.json").read_text())["normalization"]
        image = sample["image"][0].numpy()
        foreground = (image * stats["std"] + stats["mean"]) > 150
        target = sample["target"][0].numpy()
        inside = image != 0  # padding outside the case is exactly 0
        assert ((target > 0) == foreground)[inside].mean() > 0.975
        assert set(np.unique(target)) <= {0, 1, 3, 11} and (target > 0).any()
        assert not torch.equal(sample["target"], plain[seed]["target"])  # it was transformed


def test_patch_extraction_against_plain_crops_and_rot90():
    rng = np.random.default_rng(2)
    image = rng.normal(size=(1, 30, 28, 26)).astype(np.float32)
    labels = rng.integers(0, 14, size=(1, 30, 28, 26)).astype(np.uint8)
    for lower in ([3, 4, 5], [-6, 20, 15]):  # inside, and hanging over the edges (zero padding)
        crop_image, crop_labels = extract_patch(image, labels, lower, (16, 16, 16))
        same_image, same_labels = extract_patch(image, labels, lower, (16, 16, 16), np.eye(3))
        assert torch.allclose(crop_image, same_image, atol=1e-5) and torch.equal(crop_labels, same_labels)
        # a quarter turn about the third axis maps the grid onto itself: exactly a rot90 of the crop
        quarter = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
        turned_image, turned_labels = extract_patch(image, labels, lower, (16, 16, 16), quarter)
        expected = np.rot90(crop_labels.numpy(), k=-1, axes=(1, 2))
        np.testing.assert_array_equal(turned_labels.numpy(), expected)
        np.testing.assert_allclose(turned_image.numpy(), np.rot90(crop_image.numpy(), k=-1, axes=(1, 2)), atol=1e-5)
    assert crop_labels.dtype == torch.uint8 and int((crop_image == 0).sum()) > 0


def test_elastic_and_intensity_augmentation_run_and_keep_labels(blobs):
    config = augmentation_config({"elastic": True})
    assert config["elastic"]["p"] == 0.2 and augmentation_config(True)["elastic"]["p"] == 0.0
    everything = {name: {"p": 1.0} for name in config}
    dataset = _module(blobs, augment=everything, oversample_foreground=1.0).train_dataloader().dataset
    sample = dataset[3]
    assert torch.isfinite(sample["image"]).all() and sample["image"].shape == (1, 24, 24, 16)
    assert set(torch.unique(sample["target"]).tolist()) <= {0, 1, 3, 11}
    with pytest.raises(ValueError, match="unknown augmentation"):
        augmentation_config({"shear": True})


def test_case_smaller_than_the_patch_is_padded(tmp_path):
    labels = np.zeros((10, 10, 6), np.uint8)
    labels[3:7, 3:7, 2:4] = 2
    case = {"shape": labels.shape, "spacing": (1, 1, 1), "labels": labels, "image": 50.0 + 20 * labels}
    cache_plan = _cache(tmp_path, "tiny", [case, case], [16, 16, 8])
    dataset = _module(cache_plan).train_dataloader().dataset
    for seed in range(5):
        sample = dataset[seed]
        assert sample["target"].shape == (1, 16, 16, 8)
        assert int((sample["target"] == 2).sum()) == int((labels == 2).sum())  # whole case inside
        assert float(sample["image"][0, 0, 0, 0]) == 0.0  # padding: 0 in normalised units


def test_batches_do_not_depend_on_worker_count(blobs):
    serial = list(_module(blobs, augment=True, num_workers=0).train_dataloader())
    parallel = list(_module(blobs, augment=True, num_workers=2).train_dataloader())
    assert len(serial) == len(parallel) == 4
    for a, b in zip(serial, parallel, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["target"], b["target"])


def test_epoch_seeds():
    sampler = EpochSeeds(6, seed=3)
    first, second = list(sampler), list(sampler)
    assert first != second and len(first) == 6
    sampler.set_epoch(0)
    assert list(sampler) == first


def test_validation_split_and_fixed_patches(blobs):
    module = _module(blobs, val_cases=0.25, val_patches_per_case=2)
    assert len(module.train_cases) == 3 and len(module.val_cases) == 1
    assert not {c.key for c in module.train_cases} & {c.key for c in module.val_cases}
    again = _module(blobs, val_cases=0.25)
    assert [c.key for c in again.val_cases] == [c.key for c in module.val_cases]
    first = list(module.val_dataloader())
    second = list(module.val_dataloader())
    assert len(first) == 1 and torch.equal(first[0]["image"], second[0]["image"])
    assert bool((first[0]["target"][0] > 0).any())  # the first patch of a case is on foreground
    train, val = split_cases({"a": ["a/1", "a/2", "a/3"], "b": ["b/1"]}, ["2", "b/1"], seed=0)
    assert (train, val) == (["a/1", "a/3"], ["a/2", "b/1"])
    assert _module(blobs, val_cases=0).val_dataloader() == []


def test_mixed_sources_sample_cases_uniformly(tmp_path, blobs):
    write_unified_dataset(tmp_path, "small", [{"shape": (40, 40, 32), "spacing": (1.5, 1.5, 2.0)}] * 2,
                          modality="MR")
    # caches mixed in one module share its plan (as a joint plan's caches do)
    cache = preprocess_dataset(tmp_path / "small", blobs[0].parent / "plans.json", tmp_path / "small_cache")
    dataset = _module(([blobs[0], cache], blobs[1])).train_dataloader().dataset
    assert len(dataset.cases) == 6
    draws = 900
    from_small = sum(dataset[seed]["case"].startswith("small/") for seed in range(draws))
    assert abs(from_small / draws - 2 / 6) < 0.05


def test_set_valued_labels_and_partial_annotation(tmp_path):
    labels = np.zeros((24, 24, 12), np.uint8)
    labels[4:12, 4:12, 3:9] = 1
    labels[14:20, 14:20, 3:9] = 12  # WORD's adrenal_glands
    case = {"shape": labels.shape, "spacing": (1, 1, 1), "labels": labels, "image": 40.0 + 20 * labels}
    cache_plan = _cache(tmp_path, "word", [case, case], [16, 16, 8], label_system="word")
    hard = _module(cache_plan, oversample_foreground=1.0).train_dataloader().dataset
    codes = _module(cache_plan, oversample_foreground=1.0, target_codes=True).train_dataloader().dataset
    seen_hard, seen_codes = set(), set()
    for seed in range(20):
        seen_hard |= set(torch.unique(hard[seed]["target"]).tolist())
        seen_codes |= set(torch.unique(codes[seed]["target"]).tolist())
    assert seen_hard == {0, 1} and seen_codes == {0, 1, 14}
    annotated = hard[0]["annotated"]
    assert annotated[[0, 1, 7, 8]].all() and not annotated[[5, 6]].any()  # WORD: no aorta, no IVC


def test_corrupt_cache_is_rebuilt_at_setup_and_foreign_plans_refused(tmp_path):
    case = {"shape": (24, 24, 12), "spacing": (1, 1, 1)}
    cache, plan = _cache(tmp_path, "c", [case, case], [16, 16, 8])
    good = np.load(cache / "c_001.npy")
    (cache / "c_001.npy").write_bytes(b"garbage")
    module = _module((cache, plan))
    assert len(module.train_cases) == 2
    np.testing.assert_array_equal(np.load(cache / "c_001.npy"), good)
    with pytest.raises(ValueError, match="re-run preprocessing"):
        _module((cache, {**plan, "hash": "0" * 16}))
