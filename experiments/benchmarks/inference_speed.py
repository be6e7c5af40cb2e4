"""Sliding-window TTA inference on CPU: aeval's SlidingWindowPredictor against the plain baseline.

Same network (STU-Net-S, random weights, seed 0, 14 classes), same volume. Baseline: MONAI
``sliding_window_inference`` called once per flip (8 times; each window flipped, run and flipped back, which
is nnU-Net's mirroring and equals flipping the volume when the window grid is symmetric), fp32, the eight
stitched volumes averaged. Ours: one sliding-window pass with each window's 8 flips batched through the
network, fp32 and (where the CPU has AMX/AVX-512-BF16, or with ``--bf16 force``) bf16 autocast. Reports
wall seconds and process CPU seconds (user+sys of all threads; on a machine shared with other jobs the
wall clock mostly measures their load, CPU time much less so), each the best of ``--repeats`` with the
variants interleaved; peak RSS per variant (VmHWM, reset between variants via /proc/self/clear_refs); max
|logit difference| and argmax agreement with the baseline.

    python experiments/benchmarks/inference_speed.py                      # 1x96x96x64, patch 64^3
    python experiments/benchmarks/inference_speed.py --shape 160,160,96 --patch 96,96,96 --repeats 2
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import time
from pathlib import Path

import torch
from monai.inferers import sliding_window_inference

from aeval.inference import SlidingWindowPredictor, cpu_has_native_bf16, mirror_flips
from aeval.models import build_stunet

TOLERANCE = 1e-4


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (Linux >= 4.0); False where not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.inference_mode()
def baseline(model, image: torch.Tensor, patch, mirror_axes=(0, 1, 2)) -> torch.Tensor:
    flips = mirror_flips(mirror_axes)
    total = None
    for dims in flips:
        def predictor(w, dims=dims):
            return model(w.flip(dims)).flip(dims) if dims else model(w)
        out = sliding_window_inference(image[None], patch, 1, predictor, overlap=0.5, mode="gaussian",
                                       sigma_scale=0.125)[0]
        total = out if total is None else total.add_(out)
        del out
    return total.div_(len(flips))


def bf16_probe(channels: int = 16, edge: int = 32, batch: int = 2) -> tuple[float, float]:
    """Seconds of one 3x3x3 convolution (STU-Net-S first-stage width) in fp32 and under bf16 autocast."""
    conv = torch.nn.Conv3d(channels, channels, 3, padding=1).eval()
    x = torch.randn(batch, channels, edge, edge, edge)
    times = []
    with torch.inference_mode():
        for enabled in (False, True):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
                conv(x)
                start = time.perf_counter()
                conv(x)
                times.append(time.perf_counter() - start)
    return times[0], times[1]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="96,96,64", help="volume X,Y,Z (1 channel)")
    parser.add_argument("--patch", default="64,64,64")
    parser.add_argument("--size", default="s", help="STU-Net size")
    parser.add_argument("--num-classes", type=int, default=14)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--network-batch-size", type=int,
                        help="also time ours fp32 with at most this many samples per forward (less memory)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (on a GPU the speed-ups use wall time)")
    parser.add_argument("--bf16", choices=("auto", "force", "off"), default="auto",
                        help="auto: only where the CPU has native bf16 (elsewhere it is ~100x slower)")
    args = parser.parse_args(argv)
    shape = [int(v) for v in args.shape.split(",")]
    patch = [int(v) for v in args.patch.split(",")]

    torch.manual_seed(0)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if on_gpu:  # true fp32 for the fp32 variants (TF32 convolutions differ from fp32 by ~1e-2 in the logits)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    model = build_stunet(args.size, 1, args.num_classes).eval().to(device)
    model.deep_supervision = False
    image = torch.randn(1, *shape, generator=torch.Generator().manual_seed(1)).to(device)
    native = cpu_has_native_bf16() or (on_gpu and torch.cuda.is_bf16_supported())
    run_bf16 = args.bf16 == "force" or (args.bf16 == "auto" and native)

    variants = {"baseline fp32 (8 MONAI passes)": lambda: baseline(model, image, patch),
                "ours fp32 (flips batched)": SlidingWindowPredictor(model, patch, precision="fp32", device=device)}
    if args.network_batch_size:
        variants[f"ours fp32, {args.network_batch_size} per forward"] = SlidingWindowPredictor(
            model, patch, precision="fp32", device=device, network_batch_size=args.network_batch_size)
    if run_bf16:
        variants["ours bf16"] = SlidingWindowPredictor(model, patch, precision="bf16", device=device)

    print(f"# STU-Net-{args.size.upper()} ({args.num_classes} classes, random weights), volume 1x"
          f"{'x'.join(map(str, shape))}, patch {'x'.join(map(str, patch))}, overlap 0.5, 8 flips")
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"native bf16: {native}")
    with torch.inference_mode():  # one-off oneDNN primitive set-up for both batch sizes, outside the timings
        for batch in (1, len(mirror_flips((0, 1, 2)))):
            model(torch.zeros(batch, 1, *patch, device=device))
    seconds = {name: float("inf") for name in variants}
    cpu_seconds = dict(seconds)
    peaks: dict[str, float] = {}
    outputs: dict[str, torch.Tensor] = {}
    resettable = True
    for _ in range(args.repeats):
        for name, run in variants.items():
            outputs.pop(name, None)
            resettable = reset_peak_rss() and resettable
            if on_gpu:
                torch.cuda.synchronize()
            start, cpu_start = time.perf_counter(), time.process_time()
            outputs[name] = (run(image) if isinstance(run, SlidingWindowPredictor) else run()).cpu()
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            if on_gpu:
                cpu = wall  # host CPU time says nothing about GPU work
            seconds[name], cpu_seconds[name] = min(seconds[name], wall), min(cpu_seconds[name], cpu)
            peaks[name] = max(peaks.get(name, 0.0), peak_rss_mib())
            print(f"  {name}: {wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)

    base_name = next(iter(variants))
    reference = outputs[base_name]
    ref_labels = reference.argmax(0)
    print("\n| variant | wall s | CPU s | speed-up (CPU time) | speed-up (wall) | peak RSS (MiB) | "
          "max abs logit diff | same label |")
    print("|---|---|---|---|---|---|---|---|")
    result = {}
    for name in variants:
        diff = (outputs[name] - reference).abs().max().item()
        agree = (outputs[name].argmax(0) == ref_labels).float().mean().item()
        speedup = cpu_seconds[base_name] / cpu_seconds[name]
        wall_speedup = seconds[base_name] / seconds[name]
        result[name] = {"seconds": seconds[name], "cpu_seconds": cpu_seconds[name], "speedup": speedup,
                        "wall_speedup": wall_speedup, "peak_mib": peaks[name], "diff": diff, "agree": agree}
        print(f"| {name} | {seconds[name]:.1f} | {cpu_seconds[name]:.1f} | {speedup:.2f}x | {wall_speedup:.2f}x "
              f"| {peaks[name]:.0f} | {diff:.2e} | {100 * agree:.3f}% |")
    if not resettable:
        print("(peak RSS could not be reset between variants: each value is the process peak so far)")

    ours = result["ours fp32 (flips batched)"]
    print(f"\nfp32: max |logit diff| {ours['diff']:.2e} (limit {TOLERANCE:g}); time ratio ours/baseline "
          f"{1 / ours['speedup']:.3f} in CPU time ({'not slower' if ours['speedup'] >= 1 else 'SLOWER'}), "
          f"{1 / ours['wall_speedup']:.3f} in wall time")
    if "ours bf16" in result:
        bf16 = result["ours bf16"]
        print(f"bf16: {bf16['speedup']:.2f}x the fp32 baseline in CPU time, {bf16['wall_speedup']:.2f}x in wall "
              f"time (target >= 1.5x: "
              f"{'met' if bf16['speedup'] >= 1.5 else 'NOT met'}), same label on {100 * bf16['agree']:.3f}% "
              f"of voxels (target >= 99.9%: {'met' if bf16['agree'] >= 0.999 else 'NOT met'})")
    else:
        fp32_s, bf16_s = bf16_probe()
        print(f"bf16: not run, this CPU has no AMX/AVX-512-BF16 (native bf16: {native}). Probe, one 16-channel "
              f"3x3x3 conv on 2x32^3: fp32 {1000 * fp32_s:.0f} ms, bf16 autocast {1000 * bf16_s:.0f} ms "
              f"({bf16_s / fp32_s:.0f}x slower); use --bf16 force to time it anyway")
        result["bf16_probe"] = {"fp32_s": fp32_s, "bf16_s": bf16_s}
    if ours["diff"] > TOLERANCE:
        raise SystemExit(f"fp32 output differs from the baseline by {ours['diff']:.2e} > {TOLERANCE:g}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
