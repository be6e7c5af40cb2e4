"""Training loader throughput against nnU-Net's, per worker: patches/s at 128^3, batch 2, the recipe's
augmentation.

Builds a synthetic CT case (blob organs for all 13 FLARE22 classes) as a unified dataset, plans it with a
128^3 patch, preprocesses it, then, in this one process with one torch thread:

- nnU-Net v2: its ``nnUNetDataLoader`` over the same cached arrays (symlinked, with the class locations as
  nnU-Net's ``.pkl``), with ``nnUNetTrainer.get_training_transforms`` (rotation +-30 deg, scaling, noise,
  blur, brightness, contrast, low resolution, gamma, mirroring, deep-supervision targets) and its initial
  (oversized) patch; ``next(loader)`` is what one of its augmenter workers does per batch;
- aeval: ``AEvalDataModule.train_dataloader()`` with ``num_workers=0`` (the same work, in-process), and the
  extra worker counts asked for (wall time only: the workers' CPU time is not this process's).

Prints patches/s (wall and CPU) of both and the ratio; writes the result with the machine, date, load
average and command to ``results/loader_speed.json``.

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python experiments/benchmarks/loader_speed.py \
        [--workers 1] [--batches 20] [--gpu-step-s 0.35]   # a measured GPU step time: loader/GPU ratio
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import monai
import nibabel as nib
import numpy as np
import torch

from aeval.data.augment import AUGMENTATION_DEFAULTS
from aeval.data.cache import CACHE_MANIFEST, preprocess_dataset
from aeval.data.datamodule import AEvalDataModule, deep_supervision_strides
from aeval.data.planner import plan_datasets
from aeval.nifti import write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"


def synthetic_cache(root: Path, shape: tuple[int, int, int]) -> tuple[dict, Path]:
    """One synthetic CT case planned at patch 128^3 and preprocessed under ``root``: the plan and the cache."""
    write_synthetic_case(root / "unified", shape, (0.8, 0.8, 1.5))
    plan_dir = plan_datasets(["bench"], root / "unified", root / "pre", patch_size=[128, 128, 128])
    plan = json.loads((plan_dir / "plans.json").read_text())
    return plan, preprocess_dataset(root / "unified" / "bench", plan_dir / "plans.json")


def write_synthetic_case(root: Path, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> Path:
    """One CT case in the unified layout: a body ellipse of soft tissue in air, 13 ellipsoid organs."""
    rng = np.random.default_rng(0)
    grid = np.meshgrid(*[(np.arange(n) + 0.5) / n for n in shape], indexing="ij", sparse=True)
    labels = np.zeros(shape, np.uint8)
    for organ in range(1, 14):
        centre = rng.uniform(0.25, 0.75, 3)
        radius = rng.uniform(0.04, 0.15, 3)
        inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radius, strict=True)) <= 1
        labels[inside] = organ
    body = ((grid[0] - 0.5) / 0.45) ** 2 + ((grid[1] - 0.5) / 0.4) ** 2 <= 1
    image = np.where(body, 40.0, -1000.0).astype(np.float32) + labels * 15
    image += rng.normal(0, 10, shape).astype(np.float32)
    affine = np.diag([*spacing, 1.0])
    out = root / "bench"
    for folder, name, data in (("imagesTr", "bench_000_0000", image), ("labelsTr", "bench_000", labels)):
        (out / folder).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(data, affine), str(out / folder / f"{name}.nii.gz"))
    (out / "dataset.json").write_text(json.dumps({
        "name": "bench", "modality": "CT", "label_system": "flare22", "channel_names": {"0": "CT"},
        "labels": {"background": 0}, "numTraining": 1, "numTest": 0, "file_ending": ".nii.gz"}))
    (out / "splits.json").write_text(json.dumps({"train": ["bench_000"], "test": []}))
    return out


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                  if line.startswith("model name")]
        cpu = models[0] if models else cpu
    return {"cpu": cpu, "logical_cores": os.cpu_count(), "load_average_1min": os.getloadavg()[0],
            "python": platform.python_version(), "torch": torch.__version__, "monai": monai.__version__,
            "torch_threads": torch.get_num_threads()}


def _timed_batches(loader, batches: int, warmup: int) -> tuple[dict, dict]:
    """Wall and CPU seconds for ``batches`` batches after ``warmup``; the last batch for a shape check."""
    for _ in range(warmup):
        next(loader)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(batches):
        batch = next(loader)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {"batches": batches, "seconds": round(wall, 2), "cpu_seconds": round(cpu, 2),
            "patches_per_s": round(2 * batches / wall, 2), "patches_per_cpu_s": round(2 * batches / cpu, 2),
            "batch_ms": round(1000 * wall / batches, 1)}, batch


def time_loader(cache: Path, plan: dict, workers: int, batches: int, warmup: int) -> dict:
    augment = {name: True for name in AUGMENTATION_DEFAULTS if name != "elastic"}  # nnU-Net's defaults
    module = AEvalDataModule([cache], plan, batch_size=2, iterations_per_epoch=warmup + batches, val_cases=0,
                             num_workers=workers, augment=augment, seed=0)
    run, batch = _timed_batches(iter(module.train_dataloader()), batches, warmup)
    assert batch["image"].shape == (2, 1, 128, 128, 128)
    return {"loader": "aeval", "workers": workers, **run}


def nnunet_folder(cache: Path, plan: dict, out: Path) -> list[str]:
    """The aeval cache as an nnU-Net v2 preprocessed folder: the same .npy arrays (symlinked) and a .pkl of
    properties whose class locations are nnU-Net's (N, 4) voxel lists."""
    from batchgenerators.utilities.file_and_folder_operations import write_pickle

    out.mkdir(parents=True, exist_ok=True)
    cases = json.loads((cache / CACHE_MANIFEST).read_text())["labelled_cases"]
    for case in cases:
        for suffix in (".npy", "_seg.npy"):
            (out / f"{case}{suffix}").symlink_to(cache / f"{case}{suffix}")
        properties = json.loads((cache / f"{case}.json").read_text())
        shape = tuple(properties["shape_after_resample"])
        locations = {}
        for code, flat in properties.get("class_locations", {}).items():
            voxels = np.stack(np.unravel_index(np.asarray(flat, dtype=np.int64), shape), axis=1)
            locations[int(code)] = np.concatenate([np.zeros((len(voxels), 1), np.int64), voxels], axis=1)
        write_pickle({**properties, "class_locations": locations}, str(out / f"{case}.pkl"))
    return cases


def time_nnunet(cache: Path, plan: dict, root: Path, batches: int, warmup: int) -> dict:
    """nnU-Net's own loader and training transforms on the same arrays (its trainer's defaults for a 3D
    isotropic patch: rotation +-30 deg, mirroring over all axes, 33 % foreground, deep supervision)."""
    from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetNumpy
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    cases = nnunet_folder(cache, plan, root / "nnunet_preprocessed")
    patch = [128, 128, 128]
    rotation = (-30.0 / 360 * 2 * np.pi, 30.0 / 360 * 2 * np.pi)
    initial = get_patch_size(patch, rotation, rotation, rotation, (0.85, 1.25))
    scales = [list(1 / np.asarray(s, dtype=float)) for s in deep_supervision_strides(plan["pool_op_kernel_sizes"])]
    transforms = nnUNetTrainer.get_training_transforms(patch, rotation, scales, (0, 1, 2), False)
    labels = LabelManager({"background": 0, **{f"class_{c}": c for c in range(1, 14)}}, None)
    dataset = nnUNetDatasetNumpy(str(root / "nnunet_preprocessed"), cases)
    loader = nnUNetDataLoader(dataset, 2, initial, patch, labels, oversample_foreground_percent=0.33,
                              transforms=transforms)
    np.random.seed(0)
    run, batch = _timed_batches(loader, batches, warmup)
    assert tuple(batch["data"].shape) == (2, 1, 128, 128, 128), batch["data"].shape
    return {"loader": "nnU-Net v2 (nnUNetDataLoader + get_training_transforms)", "workers": 0,
            "initial_patch": [int(n) for n in initial], **run}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="*", default=[1],
                        help="aeval worker counts to time besides the in-process one (0)")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (nnU-Net's workers use 1)")
    parser.add_argument("--shape", type=int, nargs=3, default=[320, 320, 200])
    parser.add_argument("--gpu-step-s", type=float, default=None, help="measured GPU step time (s) for the ratio")
    parser.add_argument("--out", type=Path, default=RESULTS / "loader_speed.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        plan, cache = synthetic_cache(root, tuple(args.shape))
        reference = time_nnunet(cache, plan, root, args.batches, args.warmup)
        runs = [time_loader(cache, plan, workers, args.batches, args.warmup)
                for workers in [0, *[w for w in args.workers if w]]]
    for run in [reference, *runs]:
        if args.gpu_step_s:
            run["loader_to_gpu_step_ratio"] = round(run["batch_ms"] / 1000 / args.gpu_step_s, 2)
        print(f"{run['loader']}, workers {run['workers']}: {run['patches_per_s']} patches/s wall, "
              f"{run['patches_per_cpu_s']} per CPU second ({run['batch_ms']} ms per batch of 2)")
    ours = runs[0]
    ratio = {"wall": round(ours["patches_per_s"] / reference["patches_per_s"], 2),
             "cpu": round(ours["patches_per_cpu_s"] / reference["patches_per_cpu_s"], 2)}
    print(f"per worker, aeval / nnU-Net: {ratio['wall']}x (wall), {ratio['cpu']}x (CPU time)")
    result = {
        "what": "training loader per worker at patch 128^3, batch 2, nnU-Net's default augmentation "
                "(rotation, scaling, noise, blur, brightness, contrast, low resolution, gamma, mirroring; "
                "elastic off): aeval's AEvalDataModule vs nnU-Net v2's nnUNetDataLoader + "
                "nnUNetTrainer.get_training_transforms on the same cached arrays, one process",
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "PYTHONPATH=. OMP_NUM_THREADS=1 python " + " ".join(sys.argv),
        "machine": {**machine(), "load_average_1min_before": load_before},
        "case_shape": args.shape, "case_spacing": [0.8, 0.8, 1.5],
        "gpu_step_s": args.gpu_step_s,
        "ratio_aeval_to_nnunet_per_worker": ratio,
        "runs": [reference, *runs],
    }
    write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
