"""Patches for training: a LightningDataModule over one or more preprocessing caches.

Training draws ``iterations_per_epoch x batch_size`` patches per epoch. Each patch comes from one integer
seed (from :class:`EpochSeeds`, derived from the module seed and the epoch), which fixes the case, the
location and every augmentation draw — so batches are the same whatever the number of workers, and a
resumed run sees the same stream. Cases are drawn uniformly over all caches (joint training mixes sources
by case count). With probability ``oversample_foreground`` a patch is centred on a foreground voxel: a class
present in the case is picked uniformly, then one of its voxels (class locations precomputed in the cache).

With ``augment_on="gpu"`` the training workers only cut each patch's region
(:func:`aeval.data.augment.cut_region`, the same draws from the same seed) and
:meth:`AEvalDataModule.on_after_batch_transfer` resamples and augments the batch on the device it was
moved to, so with the same seeds the batches are those of ``"cpu"``.

Validation uses fixed patches, no augmentation: per held-out case one patch centred on foreground (class
drawn with a per-case seed) and ``val_patches_per_case - 1`` random ones. Whole-case sliding-window
validation belongs to inference.

A batch: ``image`` (B,1,X,Y,Z) float32; ``target`` (B,1,X,Y,Z) int64 FLARE22 classes (voxels whose source
label stands for a SET of classes — WORD's adrenal — are 0 there, as :func:`aeval.labels.to_flare22` does;
with ``target_codes=True`` they keep their code >= 14, see :data:`aeval.data.label_codes.LABEL_SETS`);
``annotated`` (B,14) bool, the classes the case's label system annotates plus background; ``targets_ds``
the target at every deep-supervision resolution, full resolution first (strided, no pooling);
``case`` the ``dataset/case`` keys.
"""

from __future__ import annotations

import json
import zlib
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from aeval.data.augment import PatchAugmenter, augmentation_config, cut_region, extract_patch, resample_region
from aeval.data.cache import CACHE_MANIFEST, load_or_rebuild_case
from aeval.data.label_codes import NUM_CLASSES, codes_to_classes
from aeval.labels import annotated_classes
from aeval.plan import Plan

_OPEN_CASES = 32  # per dataset object: memory maps and class locations kept for this many recent cases


def deep_supervision_strides(pools: Sequence[Sequence[int]],
                             num_outputs: int | None = None) -> list[list[int]]:
    """Stride of each deep-supervision output relative to the input, full resolution first: the
    cumulative products of the pool kernels (STU-Net: one output per decoder stage, ``len(pools)``)."""
    count = len(pools) if num_outputs is None else num_outputs
    strides, current = [], np.ones(3, dtype=int)
    for k in range(count):
        strides.append([int(s) for s in current])
        if k < len(pools):
            current = current * np.asarray(pools[k], dtype=int)
    return strides


@dataclass(frozen=True)
class CachedCase:
    """What sampling needs to know about a cached case, without its arrays."""

    key: str
    cache_dir: Path
    case: str
    shape: tuple[int, int, int]
    codes: tuple[int, ...]          # non-zero label codes present
    annotated: tuple[bool, ...]     # per FLARE22 class, background included

    @property
    def image_path(self) -> Path:
        return self.cache_dir / f"{self.case}.npy"

    @property
    def seg_path(self) -> Path:
        return self.cache_dir / f"{self.case}_seg.npy"


class EpochSeeds(Sampler[int]):
    """Yields ``num_samples`` patch seeds per epoch, derived from ``(seed, rank, epoch)``: each distributed
    process (``rank``) draws its own patches. Lightning calls :meth:`set_epoch`; without it each new
    iteration counts as the next epoch."""

    def __init__(self, num_samples: int, seed: int, rank: int = 0):
        self.num_samples, self.seed, self.rank, self.epoch = int(num_samples), int(seed), int(rank), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.rank, self.epoch])
        self.epoch += 1
        return iter(int(s) for s in rng.integers(0, 2**62, self.num_samples))


class _Patches(Dataset):
    """Patch drawing shared by the training and validation datasets."""

    def __init__(self, cases: Sequence[CachedCase], patch_size: Sequence[int],
                 strides: list[list[int]] | None, oversample_foreground: float,
                 augmenter: PatchAugmenter | None, target_codes: bool, defer: bool = False):
        self.cases = list(cases)
        self.defer = defer  # augment_on=gpu: only cut regions here, augment after the transfer
        self.patch_size = np.asarray(patch_size, dtype=int)
        self.strides = strides
        self.oversample_foreground = oversample_foreground
        self.augmenter = augmenter
        self.target_codes = target_codes
        self._locations: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()
        self._arrays: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def _memory_maps(self, case: CachedCase) -> tuple[np.ndarray, np.ndarray]:
        """Image and labels memory maps, kept open for the most recent cases (opened lazily, so each
        worker process has its own)."""
        if case.key not in self._arrays:
            self._arrays[case.key] = (np.load(case.image_path, mmap_mode="r"), np.load(case.seg_path, mmap_mode="r"))
            if len(self._arrays) > _OPEN_CASES:
                self._arrays.popitem(last=False)
        self._arrays.move_to_end(case.key)
        return self._arrays[case.key]

    def _class_locations(self, case: CachedCase) -> dict[str, np.ndarray]:
        if case.key not in self._locations:
            properties = json.loads((case.cache_dir / f"{case.case}.json").read_text())
            self._locations[case.key] = {c: np.asarray(v, dtype=np.int64)
                                         for c, v in properties.get("class_locations", {}).items()}
            if len(self._locations) > _OPEN_CASES:
                self._locations.popitem(last=False)
        self._locations.move_to_end(case.key)
        return self._locations[case.key]

    def lower_corner(self, case: CachedCase, rng: np.random.Generator, foreground: bool) -> np.ndarray:
        """nnU-Net's patch placement: random, or centred on a voxel of a uniformly chosen present class;
        a case smaller than the patch is centred with the rest padded."""
        shape = np.asarray(case.shape)
        pad = np.maximum(self.patch_size - shape, 0)
        low = -(pad // 2)
        high = shape + pad // 2 + pad % 2 - self.patch_size
        if foreground and case.codes:
            code = case.codes[rng.integers(len(case.codes))]
            locations = self._class_locations(case).get(str(code))
            if locations is not None and locations.size:
                voxel = np.array(np.unravel_index(locations[rng.integers(locations.size)], case.shape))
                return np.clip(voxel - self.patch_size // 2, low, high)
        return np.array([rng.integers(lo, hi + 1) for lo, hi in zip(low, high, strict=True)])

    def make(self, case: CachedCase, rng: np.random.Generator, foreground: bool) -> dict[str, Any]:
        lower = self.lower_corner(case, rng, foreground)
        image, labels = self._memory_maps(case)
        matrix = self.augmenter.spatial_matrix(rng) if self.augmenter else None
        if self.defer and self.augmenter:
            image_region, label_region, centre = cut_region(image, labels, lower, self.patch_size, matrix)
            return {"region_image": image_region, "region_labels": label_region, "centre": centre,
                    "matrix": torch.from_numpy(np.eye(3) if matrix is None else np.asarray(matrix, dtype=float)),
                    "spatial": matrix is not None, "seed": int(rng.integers(2**31)),
                    "annotated": torch.tensor(case.annotated, dtype=torch.bool), "case": case.key}
        image_patch, label_patch = extract_patch(image, labels, lower, self.patch_size, matrix)
        if self.augmenter:
            image_patch, label_patch = self.augmenter(image_patch, label_patch, int(rng.integers(2**31)))
        return {**finish_patch(image_patch, label_patch, self.strides, self.target_codes),
                "annotated": torch.tensor(case.annotated, dtype=torch.bool), "case": case.key}


def finish_patch(image_patch: torch.Tensor, label_patch: torch.Tensor, strides: list[list[int]] | None,
                 target_codes: bool) -> dict[str, Any]:
    """``image``, ``target`` (classes or codes) and ``targets_ds`` of an augmented patch."""
    codes = label_patch.round().to(torch.uint8) if label_patch.is_floating_point() else label_patch
    target = (codes if target_codes else codes_to_classes(codes)).long()
    sample = {"image": image_patch.float().contiguous(), "target": target}
    if strides is not None:
        sample["targets_ds"] = [target[:, ::sx, ::sy, ::sz].contiguous() for sx, sy, sz in strides]
    return sample


def collate_patches(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """``default_collate``, except that the regions of deferred samples (sizes differ with the drawn
    rotation/scaling) stay lists."""
    if "region_image" not in samples[0]:
        return default_collate(samples)
    lists = ("region_image", "region_labels", "case")
    batch = default_collate([{k: v for k, v in s.items() if k not in lists} for s in samples])
    return {**batch, **{k: [s[k] for s in samples] for k in lists}}


def augment_deferred(batch: dict[str, Any], augmenter: PatchAugmenter, patch_size: Sequence[int],
                     strides: list[list[int]] | None, target_codes: bool) -> dict[str, Any]:
    """A batch of :func:`collate_patches` regions -> the training batch, augmented where the regions are
    (the device, for ``augment_on=gpu``): the same resampling and the same draws (per-sample seeds) as the
    in-worker path, so with the same seeds the batch is the one ``augment_on=cpu`` gives."""
    samples = []
    for k, (image, labels) in enumerate(zip(batch["region_image"], batch["region_labels"], strict=True)):
        if bool(batch["spatial"][k]):
            image, labels = resample_region(image, labels, batch["centre"][k], patch_size, batch["matrix"][k])
        image, labels = augmenter(image.float(), labels, int(batch["seed"][k]))
        samples.append(finish_patch(image, labels, strides, target_codes))
    return {**default_collate(samples), "annotated": batch["annotated"], "case": batch["case"]}


class TrainingPatches(_Patches):
    """Indexed by patch seed (see :class:`EpochSeeds`), not by position; its length is the number of
    patches per epoch."""

    def __init__(self, *args, samples_per_epoch: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.samples_per_epoch = samples_per_epoch

    def __len__(self) -> int:
        return self.samples_per_epoch

    def __getitem__(self, seed: int) -> dict[str, Any]:
        rng = np.random.default_rng(seed)
        case = self.cases[rng.integers(len(self.cases))]
        return self.make(case, rng, bool(rng.random() < self.oversample_foreground))


class ValidationPatches(_Patches):
    """``per_case`` fixed patches per case: the first centred on foreground, the others random."""

    def __init__(self, *args, per_case: int, seed: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.items = [(i, k) for i in range(len(self.cases)) for k in range(per_case)]
        self.seed = seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        case_index, k = self.items[index]
        case = self.cases[case_index]
        rng = np.random.default_rng([self.seed, zlib.crc32(case.key.encode()), k])
        return self.make(case, rng, foreground=k == 0)


def split_cases(keys_by_dataset: dict[str, list[str]], val_cases: float | int | Sequence[str],
                seed: int) -> tuple[list[str], list[str]]:
    """Deterministic hold-out per dataset: a fraction (float < 1) or a number (int) of each dataset's
    cases, chosen by a seeded permutation, or an explicit list of ``dataset/case`` (or bare case) ids.
    A dataset with a single case keeps it for training."""
    train, val = [], []
    if isinstance(val_cases, str | bytes):
        raise ValueError("val_cases must be a number or a list of case ids")
    explicit = set(val_cases) if isinstance(val_cases, Sequence) else None
    for dataset, keys in sorted(keys_by_dataset.items()):
        keys = sorted(keys)
        if explicit is not None:
            held = {k for k in keys if k in explicit or k.split("/", 1)[1] in explicit}
        else:
            if isinstance(val_cases, float) and not 0 <= val_cases < 1:
                raise ValueError(f"val_cases fraction must be in [0, 1), got {val_cases}")
            count = round(val_cases * len(keys)) if isinstance(val_cases, float) else int(val_cases)
            if val_cases and len(keys) > 1:
                count = max(count, 1)
            count = min(count, len(keys) - 1)
            order = np.random.default_rng([seed, zlib.crc32(dataset.encode())]).permutation(len(keys))
            held = {keys[i] for i in order[:count]}
        train += [k for k in keys if k not in held]
        val += [k for k in keys if k in held]
    return train, val


class AEvalDataModule(L.LightningDataModule):
    """Training and validation patches from preprocessing caches built with ``plan``."""

    def __init__(self, cache_dirs: Sequence[str | Path], plan: Plan | Mapping[str, Any], batch_size: int = 2,
                 iterations_per_epoch: int = 250, val_cases: float | int | Sequence[str] = 0.2,
                 num_workers: int = 0, oversample_foreground: float = 0.33,
                 augment: bool | dict[str, Any] = True, deep_supervision: bool = True,
                 val_patches_per_case: int = 2, target_codes: bool = False, seed: int = 0,
                 patch_size: Sequence[int] | None = None, augment_on: str = "cpu"):
        super().__init__()
        if augment_on not in ("cpu", "gpu"):
            raise ValueError(f"data.augment_on must be 'cpu' or 'gpu', got {augment_on!r}")
        self.augment_on = augment_on
        self._augmenter: PatchAugmenter | None = None
        self.cache_dirs = [Path(d) for d in cache_dirs]
        self.plan = plan = Plan.from_dict(plan)
        self.batch_size = int(batch_size)
        self.iterations_per_epoch = int(iterations_per_epoch)
        self.holdout = val_cases
        self.num_workers = int(num_workers)
        self.oversample_foreground = float(oversample_foreground)
        self.augmentation = augmentation_config(augment)
        self.strides = deep_supervision_strides(plan.pool_op_kernel_sizes) if deep_supervision else None
        self.val_patches_per_case = int(val_patches_per_case)
        self.target_codes = target_codes
        self.seed = int(seed)
        self.patch_size = [int(n) for n in (patch_size or plan.patch_size)]
        self.train_cases: list[CachedCase] = []
        self.val_cases: list[CachedCase] = []

    def _index(self) -> dict[str, CachedCase]:
        cases = {}
        for cache_dir in self.cache_dirs:
            manifest_path = cache_dir / CACHE_MANIFEST
            if not manifest_path.exists():
                raise FileNotFoundError(f"{cache_dir}: no {CACHE_MANIFEST} (run preprocessing first)")
            manifest = json.loads(manifest_path.read_text())
            if manifest["plan_hash"] != self.plan.hash:
                raise ValueError(f"{cache_dir}: cache was built for plan {manifest['plan_hash']}, not "
                                 f"{self.plan.hash}; re-run preprocessing")
            annotated = annotated_classes(manifest["label_system"]) | {0}
            for case in manifest["labelled_cases"]:
                properties = load_or_rebuild_case(cache_dir, case, self.plan)
                key = f"{manifest['name']}/{case}"
                cases[key] = CachedCase(
                    key=key, cache_dir=cache_dir, case=case,
                    shape=tuple(int(n) for n in properties["shape_after_resample"]),
                    codes=tuple(sorted(int(c) for c in properties.get("class_locations", {}))),
                    annotated=tuple(c in annotated for c in range(NUM_CLASSES)))
        if not cases:
            raise ValueError(f"no labelled cases in {', '.join(map(str, self.cache_dirs))}")
        return cases

    def setup(self, stage: str | None = None) -> None:
        if self.train_cases:
            return
        cases = self._index()
        by_dataset: dict[str, list[str]] = {}
        for key in cases:
            by_dataset.setdefault(key.split("/", 1)[0], []).append(key)
        train, val = split_cases(by_dataset, self.holdout, self.seed)
        self.train_cases = [cases[k] for k in train]
        self.val_cases = [cases[k] for k in val]

    def _loader(self, dataset: Dataset, sampler: Sampler | None) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, shuffle=False,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          pin_memory=torch.cuda.is_available(), drop_last=False, collate_fn=collate_patches)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        samples = self.iterations_per_epoch * self.batch_size
        self._augmenter = PatchAugmenter(self.augmentation)
        dataset = TrainingPatches(self.train_cases, self.patch_size, self.strides, self.oversample_foreground,
                                  self._augmenter, self.target_codes, defer=self.augment_on == "gpu",
                                  samples_per_epoch=samples)
        return self._loader(dataset, EpochSeeds(samples, self.seed, self._rank_and_world()[0]))

    def val_dataloader(self) -> DataLoader | list:
        self.setup()
        if not self.val_cases:
            return []
        dataset = ValidationPatches(self.val_cases, self.patch_size, self.strides, 0.0, None,
                                    self.target_codes, per_case=self.val_patches_per_case, seed=self.seed)
        rank, world = self._rank_and_world()
        # every process validates its share, padded with repeats like DistributedSampler: no process may
        # be left without batches, or the others would wait for it in the gather of the Dice counts
        shard = [i % len(dataset) for i in range(rank, -(-len(dataset) // world) * world, world)]
        return self._loader(dataset, shard if world > 1 else None)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """``augment_on=gpu``: the spatial and intensity augmentation of a training batch, on the device the
        batch was moved to."""
        if isinstance(batch, dict) and "region_image" in batch and self._augmenter is not None:
            return augment_deferred(batch, self._augmenter, self.patch_size, self.strides, self.target_codes)
        return batch

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
