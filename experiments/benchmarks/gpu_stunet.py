"""STU-Net training-step speed and peak GPU memory for S/B/L at 128^3, batch 2, bf16 autocast.

Self-contained: needs only torch, and loads ``aeval/models/stunet.py`` by file path, so it runs on a bare
GPU machine from a copy of the repository. The reference is the STU-Net authors' published VRAM use
(S 5.2 GB, B 8.8 GB, L 26.5 GB on an A100). One step = forward, deep-supervision cross-entropy, backward
and an SGD (Nesterov, momentum 0.99) update, as in nnU-Net training; peak memory is
``torch.cuda.max_memory_allocated`` (tensors only; nvidia-smi also shows the caching allocator's reserve
and the CUDA context, so "reserved" is printed too). Fits in about 4 minutes on one H100/H200.

    python experiments/benchmarks/gpu_stunet.py                         # S, B, L on cuda
    python experiments/benchmarks/gpu_stunet.py --device cpu --size tiny --patch 32   # CPU smoke run
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

PUBLISHED_VRAM_GB = {"s": 5.2, "b": 8.8, "l": 26.5}
DS_WEIGHTS = [1, 1 / 2, 1 / 4, 1 / 8, 0]  # nnU-Net: halving per scale, lowest scale off, then normalised


def load_stunet_module():
    path = Path(__file__).resolve().parents[2] / "aeval" / "models" / "stunet.py"
    spec = importlib.util.spec_from_file_location("stunet_standalone", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pools_for_patch(patch: list[int], stages: int = 5) -> list[list[int]]:
    """Halve each axis while it stays >= 2 voxels (instance norm needs more than 1); 128^3 -> [[2,2,2]]*5."""
    sizes, pools = list(patch), []
    for _ in range(stages):
        step = [2 if s // 2 >= 2 and s % 2 == 0 else 1 for s in sizes]
        sizes = [s // k for s, k in zip(sizes, step, strict=True)]
        pools.append(step)
    return pools


def train_step(model, optimizer, x, targets, device_type: str) -> None:
    weights = torch.tensor(DS_WEIGHTS) / sum(DS_WEIGHTS)
    with torch.autocast(device_type, dtype=torch.bfloat16):
        outs = model(x)
        loss = sum(w * F.cross_entropy(o.float(), t) for w, o, t in zip(weights, outs, targets, strict=True)
                   if w > 0)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 12)
    optimizer.step()


def benchmark(stunet, size: str, patch: list[int], batch: int, num_classes: int, iters: int, warmup: int,
              device: torch.device) -> dict[str, float]:
    """Iterations/s of full training steps and peak memory (GiB; NaN on CPU)."""
    pools = pools_for_patch(patch)
    with device:  # initialise on the device: building L on the CPU first takes longer than timing it
        model = stunet.build_stunet(size, 1, num_classes, pool_op_kernel_sizes=pools)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.99, nesterov=True, weight_decay=3e-5)
    x = torch.randn(batch, 1, *patch, device=device)
    shapes = [list(patch)]
    for p in pools[:-1]:
        shapes.append([s // k for s, k in zip(shapes[-1], p, strict=True)])
    targets = [torch.randint(0, num_classes, (batch, *s), device=device) for s in shapes]
    cuda = device.type == "cuda"
    for _ in range(warmup):
        train_step(model, optimizer, x, targets, device.type)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(iters):
        train_step(model, optimizer, x, targets, device.type)
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    result = {"it_per_s": iters / seconds,
              "peak_alloc_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan"),
              "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30 if cuda else float("nan"),
              "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    del model, optimizer, x, targets
    if cuda:
        torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sizes", default="s,b,l")
    parser.add_argument("--size", help="a single size (overrides --sizes), e.g. tiny for the CPU smoke run")
    parser.add_argument("--patch", default="128", help="edge length, or three comma-separated sizes")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--num-classes", type=int, default=105, help="105: TotalSegmentator, as published")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=200, help="skip remaining sizes after this")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as nnU-Net trains
    patch = [int(v) for v in args.patch.split(",")]
    patch = patch * 3 if len(patch) == 1 else patch
    sizes = [args.size] if args.size else args.sizes.split(",")
    stunet = load_stunet_module()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# STU-Net train step on {name}, torch {torch.__version__}, patch {'x'.join(map(str, patch))}, "
          f"batch {args.batch}, bf16 autocast, {args.num_classes} classes, {args.iters} timed steps")
    print("| size | params (M) | it/s | peak allocated (GiB) | peak reserved (GiB) | published (GB, A100) |")
    print("|---|---|---|---|---|---|")
    rows, start = [], time.perf_counter()
    for size in sizes:
        if time.perf_counter() - start > args.budget_s:
            print(f"| {size.upper()} | skipped: time budget of {args.budget_s:.0f} s spent | | | | |")
            continue
        try:
            r = benchmark(stunet, size, patch, args.batch, args.num_classes, args.iters, args.warmup, device)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            print(f"| {size.upper()} | out of memory | | | | |")
            continue
        published = PUBLISHED_VRAM_GB.get(size)
        print(f"| {size.upper()} | {r['params_m']:.2f} | {r['it_per_s']:.2f} | {r['peak_alloc_gib']:.2f} | "
              f"{r['peak_reserved_gib']:.2f} | {published if published else '-'} |", flush=True)
        rows.append({"size": size, **r})
    print(f"total {time.perf_counter() - start:.0f} s")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
