"""Training loader throughput: patches/s at 128^3, batch 2, full augmentation, per worker count.

Builds a synthetic CT case (blob organs for all 13 FLARE22 classes) as a unified dataset, plans it with a
128^3 patch, preprocesses it, then times ``AEvalDataModule.train_dataloader()`` for each worker count
(after a warm-up). Writes the result with the machine and date to ``results/loader_speed.json``.

    .venv/bin/python experiments/benchmarks/loader_speed.py [--workers 0 1 2] [--batches 20]
        [--gpu-step-s 0.35]   # a measured GPU step time: reports the loader/GPU ratio
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import monai
import nibabel as nib
import numpy as np
import torch

from aeval.data.augment import AUGMENTATION_DEFAULTS
from aeval.data.cache import preprocess_dataset
from aeval.data.datamodule import AEvalDataModule
from aeval.data.planner import plan_datasets
from aeval.nifti import write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"


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


def time_loader(cache: Path, plan: dict, workers: int, batches: int, warmup: int) -> dict:
    augment = {name: True for name in AUGMENTATION_DEFAULTS if name != "elastic"}  # nnU-Net's defaults
    module = AEvalDataModule([cache], plan, batch_size=2, iterations_per_epoch=warmup + batches, val_cases=0,
                             num_workers=workers, augment=augment, seed=0)
    loader = iter(module.train_dataloader())
    for _ in range(warmup):
        next(loader)
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(loader)
    seconds = time.perf_counter() - start
    assert batch["image"].shape == (2, 1, 128, 128, 128)
    return {"workers": workers, "batches": batches, "seconds": round(seconds, 2),
            "patches_per_s": round(2 * batches / seconds, 2), "batch_ms": round(1000 * seconds / batches, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--shape", type=int, nargs=3, default=[320, 320, 200])
    parser.add_argument("--gpu-step-s", type=float, default=None, help="measured GPU step time (s) for the ratio")
    parser.add_argument("--out", type=Path, default=RESULTS / "loader_speed.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_synthetic_case(root / "unified", tuple(args.shape), (0.8, 0.8, 1.5))
        plan_dir = plan_datasets(["bench"], root / "unified", root / "pre", patch_size=[128, 128, 128])
        plan = json.loads((plan_dir / "plans.json").read_text())
        cache = preprocess_dataset(root / "unified" / "bench", plan_dir / "plans.json")
        runs = []
        for workers in args.workers:
            run = time_loader(cache, plan, workers, args.batches, args.warmup)
            if args.gpu_step_s:
                run["loader_to_gpu_step_ratio"] = round(run["batch_ms"] / 1000 / args.gpu_step_s, 2)
            runs.append(run)
            print(f"workers {workers}: {run['patches_per_s']} patches/s ({run['batch_ms']} ms per batch of 2)")
    result = {
        "what": "AEvalDataModule training loader, patch 128^3, batch 2, nnU-Net default augmentation "
                "(rotation, scaling, noise, blur, brightness, contrast, low resolution, gamma, mirroring; "
                "elastic off)",
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "case_shape": args.shape, "case_spacing": [0.8, 0.8, 1.5],
        "gpu_step_s": args.gpu_step_s,
        "runs": runs,
    }
    write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
