"""Forward+backward time and peak memory of STU-Net tiny and S on CPU (fp32, default pools).

Each size runs in a fresh subprocess so that its peak resident memory (``ru_maxrss``) is its own; the
table also shows the meta-device estimate of activation memory (``aeval.models.stunet.forward_cost``)
next to the measured growth of resident memory during the steps, as a check of that estimate.

    python experiments/benchmarks/stunet_speed.py --sizes tiny,s --patch 64 --batch 2 \
        --out experiments/benchmarks/results/stunet_speed_cpu.md --note "machine shared with other jobs"
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch
from torch.nn import functional as F

from aeval.models.stunet import build_stunet, count_parameters, forward_cost
from aeval.nifti import write_text_atomic


def rss_mib() -> float:
    with open("/proc/self/status") as fh:
        kib = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
    return kib / 1024


def measure(size: str, patch: int, batch: int, iters: int, warmup: int, num_classes: int = 14) -> dict:
    """Seconds per forward+backward step (deep-supervision CE loss) and memory figures in MiB."""
    torch.manual_seed(0)
    model = build_stunet(size, 1, num_classes)
    x = torch.randn(batch, 1, patch, patch, patch)
    targets = [torch.randint(0, num_classes, (batch,) + (patch >> d,) * 3) for d in range(5)]
    estimate = forward_cost(model, (patch,) * 3, batch)["activation_bytes"] / 2**20
    baseline = rss_mib()

    def step() -> None:
        model.zero_grad(set_to_none=True)
        outs = model(x)
        loss = sum(F.cross_entropy(o, t) / 2**i for i, (o, t) in enumerate(zip(outs, targets, strict=True)))
        loss.backward()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"size": size, "params": count_parameters(model), "s_per_step": min(times),
            "s_per_step_median": sorted(times)[len(times) // 2], "peak_rss_mib": peak,
            "step_growth_mib": peak - baseline, "estimate_mib": estimate}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")


def table(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [f"# STU-Net forward+backward on CPU, {args.patch}^3, batch {args.batch}, fp32",
             "", f"- date: {datetime.date.today().isoformat()}", f"- machine: {machine()}",
             f"- command: `python experiments/benchmarks/stunet_speed.py --sizes {args.sizes} "
             f"--patch {args.patch} --batch {args.batch} --iters {args.iters} --warmup {args.warmup}`"]
    if args.note:
        lines.append(f"- note: {args.note}")
    lines += ["", "| size | params | s/step (best) | s/step (median) | peak RSS (MiB) | RSS growth in steps "
              "(MiB) | activation estimate (MiB) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['params']:,} | {r['s_per_step']:.2f} | "
                     f"{r['s_per_step_median']:.2f} | {r['peak_rss_mib']:.0f} | {r['step_growth_mib']:.0f} | "
                     f"{r['estimate_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,s")
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", help="write the Markdown table here")
    parser.add_argument("--note", default="", help="a line recorded with the result (e.g. machine load)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.patch, args.batch, args.iters, args.warmup)))
        return ""
    rows = []
    for size in args.sizes.split(","):
        cmd = [sys.executable, __file__, "--child", size, "--patch", str(args.patch), "--batch",
               str(args.batch), "--iters", str(args.iters), "--warmup", str(args.warmup)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{size}: {rows[-1]['s_per_step']:.2f} s/step", flush=True)
    text = table(rows, args)
    print(text)
    if args.out:
        write_text_atomic(args.out, text)
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
