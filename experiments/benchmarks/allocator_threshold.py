"""Peak memory and CPU time of one STU-Net-S forward at 128^3 (one thread) for glibc mmap thresholds of the tuned
inference allocator (``aeval.cpu.inference_allocator``): the numbers behind ``BAND_MMAP_THRESHOLD``.

    PYTHONPATH=. python experiments/benchmarks/allocator_threshold.py            # 256, 128, 64, 32 MiB
Each threshold runs in its own process (VmHWM is per process); best of 3 forwards.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path


def status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(threshold_mib: int) -> None:
    import torch

    from aeval.cpu import inference_allocator
    from aeval.models.stunet import build_stunet

    torch.set_num_threads(1)
    net = build_stunet("s", 1, 14, pool_op_kernel_sizes=[[2, 2, 2]] * 5).eval()
    x = torch.zeros(1, 1, 128, 128, 128)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM counts from here
    before = status_mib("VmRSS:")
    seconds = []
    with torch.inference_mode(), inference_allocator(True, threshold_mib << 20):
        for _ in range(3):
            start = time.process_time()
            net(x)
            seconds.append(time.process_time() - start)
    print(f"mmap threshold {threshold_mib:4d} MiB: peak grew {status_mib('VmHWM:') - before:5.0f} MiB, "
          f"forward {min(seconds):.2f} CPU s")


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(int(sys.argv[2]))
        return 0
    for threshold in (256, 128, 64, 32):
        subprocess.run([sys.executable, __file__, "--child", str(threshold)], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
