"""Seconds per 512x512x300 CT volume for STU-Net S/B/L: sliding window (128^3 patches, overlap 0.5, Gaussian
blending), 8-flip mirror TTA batched through the network, bf16 autocast, random weights.

Needs torch, monai and the aeval package (``pip install -e .``, which brings monai); loads
``aeval/inference.py`` and ``aeval/models/stunet.py`` by file path from the copy of the repository it runs in.
A timed volume starts as a host tensor (as after preprocessing) and ends as uint8 labels in host memory:
host-to-device copy, all windows, stitching, argmax and the copy back are included. On a
GPU each size is warmed up first on one patch-sized volume (cuDNN autotuning). Right after its timing,
the first size is also run in fp32 (TF32 off) to report how many voxels keep their bf16 label, and with the
logits stitched in host memory (the path for volumes too large for the GPU) against GPU stitching.
Fits in about 4 minutes on one H100/H200; sizes that would not fit the time budget are skipped.

    python experiments/benchmarks/gpu_inference.py                                  # S, B, L on cuda
    python experiments/benchmarks/gpu_inference.py --device cpu --size tiny --shape 64,64,48   # CPU smoke
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
# Multiply-accumulates per 128^3 patch (STU-Net paper's "FLOPs"), to predict a size's time from the last one.
TERA_MACS_128 = {"tiny": 0.008, "s": 0.13, "b": 0.51, "l": 3.81, "h": 12.60}


def load_module(name: str, relative: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def count_windows(shape: list[int], patch: list[int], overlap: float) -> int:
    """Windows MONAI visits: per axis, steps of int(patch*(1-overlap)) until the window reaches the end."""
    total = 1
    for size, p in zip(shape, patch, strict=True):
        step = max(int(p * (1 - overlap)), 1)
        total *= 1 if size <= p else math.ceil((size - p) / step) + 1
    return total


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def predict_labels(predictor, image: torch.Tensor) -> torch.Tensor:
    return predictor(image).argmax(0).to(torch.uint8).cpu()


def time_size(inference, stunet, size: str, args, image: torch.Tensor, device: torch.device) -> tuple:
    """One timed volume (after a warm-up on GPU): the table row, the model and its labels."""
    torch.manual_seed(0)
    model = stunet.build_stunet(size, 1, args.num_classes)
    predictor = inference.SlidingWindowPredictor(model, args.patch, overlap=0.5, precision=args.precision,
                                                 device=device, network_batch_size=args.network_batch_size)
    if device.type == "cuda":  # cuDNN autotuning happens on the first batch of each shape
        predict_labels(predictor, torch.zeros(1, *args.patch))
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    labels = predict_labels(predictor, image)
    sync(device)
    seconds = time.perf_counter() - start
    stitch = predictor.stitch_device_for(image.shape[1:]).type
    row = {"size": size, "seconds": seconds, "windows": count_windows(list(image.shape[1:]), args.patch, 0.5),
           "precision": predictor.precision, "stitch": stitch,
           "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan"),
           "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    return row, model, labels


def bf16_agreement(inference, model, image: torch.Tensor, labels: torch.Tensor, args, device) -> float:
    """Share of voxels whose bf16 label equals the true-fp32 label (TF32 off for the reference)."""
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        fp32 = inference.SlidingWindowPredictor(model, args.patch, precision="fp32", device=device)
        reference = predict_labels(fp32, image)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    return (reference == labels).float().mean().item()


def host_stitching(inference, model, image: torch.Tensor, labels: torch.Tensor, args, device) -> tuple:
    """Seconds with the logits stitched in host memory (the path large volumes take) and the share of voxels
    whose label matches GPU stitching."""
    predictor = inference.SlidingWindowPredictor(model, args.patch, precision=args.precision, device=device,
                                                 stitch_device="cpu")
    sync(device)
    start = time.perf_counter()
    host = predict_labels(predictor, image)
    sync(device)
    return time.perf_counter() - start, (host == labels).float().mean().item()


def run_checks(inference, model, image: torch.Tensor, labels: torch.Tensor, row: dict, args,
               device: torch.device) -> None:
    """On the first (smallest) size, right after its timing: bf16-vs-fp32 labels and host stitching."""
    if row["precision"] == "bf16":
        row["agreement"] = bf16_agreement(inference, model, image, labels, args, device)
        print(f"  {row['size'].upper()}: bf16 and fp32 (TF32 off) give the same label on "
              f"{100 * row['agreement']:.3f}% of voxels (random weights: small logit margins)", flush=True)
    if row["stitch"] != "cpu":
        row["host_seconds"], row["host_agreement"] = host_stitching(inference, model, image, labels, args,
                                                                    device)
        print(f"  {row['size'].upper()} stitched in host memory (buffered slabs): {row['host_seconds']:.1f} s, "
              f"same label as GPU stitching on {100 * row['host_agreement']:.4f}% of voxels", flush=True)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sizes", default="s,b,l")
    parser.add_argument("--size", help="a single size (overrides --sizes), e.g. tiny for the CPU smoke run")
    parser.add_argument("--shape", default="512,512,300", help="volume X,Y,Z")
    parser.add_argument("--patch", help="X,Y,Z; default 128,128,128 (64,64,64 for tiny)")
    parser.add_argument("--num-classes", type=int, default=14, help="14: FLARE22 organs + background")
    parser.add_argument("--precision", default="auto", help="auto = bf16 where the hardware has it")
    parser.add_argument("--budget-s", type=float, default=200, help="skip sizes predicted to overrun this")
    parser.add_argument("--network-batch-size", type=int, help="samples per forward (default: all 8 flips)")
    parser.add_argument("--no-checks", action="store_true",
                        help="skip the fp32 label-agreement and host-stitching runs of the first size")
    args = parser.parse_args(argv)

    try:
        inference = load_module("aeval_inference_standalone", "aeval/inference.py")
    except ModuleNotFoundError as err:
        raise SystemExit(f"{err}: this benchmark needs torch and monai (pip install monai)") from None
    stunet = load_module("aeval_stunet_standalone", "aeval/models/stunet.py")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    sizes = [args.size] if args.size else args.sizes.split(",")
    shape = [int(v) for v in args.shape.split(",")]
    default_patch = "64,64,64" if sizes == ["tiny"] else "128,128,128"
    args.patch = [int(v) for v in (args.patch or default_patch).split(",")]
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(1, *shape, generator=gen)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    windows = count_windows(shape, args.patch, 0.5)
    print(f"# STU-Net sliding-window inference on {name}, torch {torch.__version__}, volume "
          f"{'x'.join(map(str, shape))}, patch {'x'.join(map(str, args.patch))}, overlap 0.5, {windows} windows "
          f"x 8 flips, {args.num_classes} classes, random weights")
    print("| size | params (M) | precision | stitched on | s / volume | windows/s | peak allocated (GiB) |")
    print("|---|---|---|---|---|---|---|")
    rows, start = [], time.perf_counter()
    per_tmac: float | None = None
    for size in sizes:
        left = args.budget_s - (time.perf_counter() - start)
        predicted = per_tmac * TERA_MACS_128[size] if per_tmac is not None else 0.0
        if left <= 0 or predicted > left:
            print(f"| {size.upper()} | skipped: predicted {predicted:.0f} s, {max(left, 0):.0f} s of the "
                  f"budget left | | | | | |")
            continue
        try:
            row, model, labels = time_size(inference, stunet, size, args, image, device)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            print(f"| {size.upper()} | out of memory (try --network-batch-size 4) | | | | | |")
            continue
        per_tmac = row["seconds"] / TERA_MACS_128[size] * 1.3  # margin: warm-up and model build
        print(f"| {size.upper()} | {row['params_m']:.2f} | {row['precision']} | {row['stitch']} | "
              f"{row['seconds']:.1f} | {row['windows'] / row['seconds']:.2f} | {row['peak_gib']:.2f} |",
              flush=True)
        rows.append(row)
        if len(rows) == 1 and not args.no_checks:
            run_checks(inference, model, image, labels, row, args, device)
        del model, labels
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"total {time.perf_counter() - start:.0f} s")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
