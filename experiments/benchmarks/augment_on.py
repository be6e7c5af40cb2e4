"""Iteration time with the augmentation in the loader workers (``data.augment_on=cpu``) vs on the device
after the batch transfer (``data.augment_on=gpu``), at the recipe's 128^3 patch, batch 2, STU-Net training
step included.

Same synthetic CT case as ``loader_speed.py`` (planned and preprocessed here), nnU-Net's default
augmentation (elastic off). For each mode: ``--workers`` loader workers, then per iteration: next batch,
transfer, ``AEvalDataModule.on_after_batch_transfer`` (the deferred augmentation for ``gpu``), one training
step of STU-Net (forward, deep-supervision cross-entropy, backward, SGD; bf16 autocast on CUDA), all timed
with the device synchronised. Prints ms per iteration for both modes, the time spent waiting for the
loader and in the device-side augmentation, and the ratio. On a GPU node (about 3-4 minutes):

    PYTHONPATH=. python experiments/benchmarks/augment_on.py --device cuda --workers 4 --size s
    PYTHONPATH=. OMP_NUM_THREADS=1 python experiments/benchmarks/augment_on.py --device cpu --workers 1 \\
        --size tiny --batches 10 --warmup 2 --no-step   # the CPU-safe part: loading + augmentation only

On the CPU the ``gpu`` mode only moves the augmentation from the worker into the main process (a second
core), so the CPU numbers say that the path works, not what a GPU gains.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.fabric.utilities.apply_func import move_data_to_device
from loader_speed import RESULTS, machine, synthetic_cache  # same folder

from aeval.data.augment import AUGMENTATION_DEFAULTS
from aeval.data.datamodule import AEvalDataModule
from aeval.models.stunet import build_stunet


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model, optimizer, batch: dict, device: torch.device) -> None:
    """nnU-Net's step: deep-supervision cross-entropy (weights halving per scale), clip 12, SGD."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        outs = model(batch["image"])
        outs = outs if isinstance(outs, list | tuple) else [outs]
        pairs = list(zip(outs, batch.get("targets_ds") or [batch["target"]], strict=False))
        weights = [0.5 ** k for k in range(len(pairs))]
        loss = sum(w * F.cross_entropy(o.float(), t[:, 0]) for w, (o, t) in zip(weights, pairs, strict=True))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 12)
    optimizer.step()


def time_mode(mode: str, cache: Path, plan: dict, args, device: torch.device) -> dict:
    augment = {name: True for name in AUGMENTATION_DEFAULTS if name != "elastic"}
    module = AEvalDataModule([cache], plan, batch_size=2, iterations_per_epoch=args.warmup + args.batches,
                             val_cases=0, num_workers=args.workers, augment=augment, seed=0, augment_on=mode)
    with device:
        model = build_stunet(args.size, 1, 14, pool_op_kernel_sizes=plan["pool_op_kernel_sizes"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.99, nesterov=True, weight_decay=3e-5)
    loader = iter(module.train_dataloader())
    waits, augments, totals = [], [], []
    for k in range(args.warmup + args.batches):
        _sync(device)
        start = time.perf_counter()
        batch = move_data_to_device(next(loader), device)
        _sync(device)
        loaded = time.perf_counter()
        batch = module.on_after_batch_transfer(batch, 0)
        _sync(device)
        augmented = time.perf_counter()
        if not args.no_step:
            train_step(model, optimizer, batch, device)
        _sync(device)
        if k >= args.warmup:
            waits.append(loaded - start)
            augments.append(augmented - loaded)
            totals.append(time.perf_counter() - start)
    assert batch["image"].shape == (2, 1, 128, 128, 128) and batch["image"].device.type == device.type
    n = len(totals)
    return {"augment_on": mode, "workers": args.workers, "iterations": n,
            "iteration_ms": round(1000 * sum(totals) / n, 1), "loader_wait_ms": round(1000 * sum(waits) / n, 1),
            "device_augment_ms": round(1000 * sum(augments) / n, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--size", default="s", help="STU-Net size of the training step (tiny for a CPU run)")
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-step", action="store_true", help="time loading + augmentation only")
    parser.add_argument("--shape", type=int, nargs=3, default=[320, 320, 200])
    parser.add_argument("--out", type=Path, default=None, help="JSON (default: results/augment_on_<device>.json)")
    args = parser.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        plan, cache = synthetic_cache(root, tuple(args.shape))
        runs = [time_mode(mode, cache, plan, args, device) for mode in ("cpu", "gpu")]
    for run in runs:
        print(f"augment_on={run['augment_on']}: {run['iteration_ms']} ms per iteration (loader wait "
              f"{run['loader_wait_ms']} ms, device-side augmentation {run['device_augment_ms']} ms), "
              f"{run['workers']} worker(s), device {device}")
    ratio = round(runs[0]["iteration_ms"] / runs[1]["iteration_ms"], 2)
    print(f"iteration time cpu / gpu augmentation: {ratio}x")
    result = {"what": "iteration time (loader + transfer + augmentation + STU-Net step) with augment_on=cpu vs gpu, "
                      "patch 128^3, batch 2, nnU-Net default augmentation (elastic off)",
              "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": "PYTHONPATH=. python " + " ".join(sys.argv), "device": str(device),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "machine": {**machine(), "cpu_count_affinity": len(os.sched_getaffinity(0))},
              "model": f"stu_{args.size}", "train_step": not args.no_step, "ratio_cpu_to_gpu": ratio, "runs": runs}
    out = args.out or RESULTS / f"augment_on_{device.type}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
