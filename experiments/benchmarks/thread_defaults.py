"""Default thread and worker counts (aeval.cpu) against hand-set ones on this machine: predicting a small CT
with ``inference.threads`` 1, 2, ... and the default, and scoring a folder with ``num_workers`` 1, 2, ... and
the default. Issue 14's target: the defaults within 10 % of the best hand-set setting (wall time, best of the
interleaved repeats, since threads trade CPU time for wall time).

    PYTHONPATH=. python experiments/benchmarks/thread_defaults.py [--repeats 3] [--cases 6]

OMP_NUM_THREADS is removed from this process's environment first (an exported value is itself an explicit
setting the defaults respect).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("OMP_NUM_THREADS", None)

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from nnunet_reference import synthetic_ct  # noqa: E402  (the parity tests' CT phantom)

from aeval.cpu import available_cores, default_workers, threads_per_worker  # noqa: E402
from aeval.data.planner import plan_hash  # noqa: E402
from aeval.models.load import LoadedModel  # noqa: E402
from aeval.models.stunet import build_stunet  # noqa: E402
from aeval.prediction import predict_files  # noqa: E402
from aeval.scoring import score_folder  # noqa: E402


def small_model() -> LoadedModel:
    plan = {"datasets": [{"name": "synthetic", "modality": "CT", "label_system": "flare22"}],
            "axis_order": "RAS", "label_space": "flare22", "num_classes": 14, "target_spacing": [1.5, 1.5, 1.5],
            "normalization": {"scheme": "ct", "clip": [-160.0, 240.0], "mean": 60.0, "std": 70.0},
            "crop": {"ct_threshold": -500.0, "other": "nonzero"}, "patch_size": [64, 64, 64],
            "pool_op_kernel_sizes": [[2, 2, 2]] * 5}
    plan["hash"] = plan_hash(plan)
    torch.manual_seed(0)
    return LoadedModel(build_stunet("s", 1, 14, pool_op_kernel_sizes=plan["pool_op_kernel_sizes"]), plan, "flare22")


def best_of(settings, run, repeats: int) -> dict:
    """Wall seconds per setting, best of ``repeats`` rounds, the settings interleaved within each round."""
    times = {s: float("inf") for s in settings}
    for _ in range(repeats):
        for setting in settings:
            start = time.perf_counter()
            run(setting)
            times[setting] = min(times[setting], time.perf_counter() - start)
    return times


def report(name: str, times: dict, default_label: str) -> bool:
    best = min(v for k, v in times.items() if k is not None)
    default = times[None]
    cells = ", ".join(f"{default_label if k is None else k}: {v:.2f} s" for k, v in times.items())
    ok = default <= 1.10 * best
    print(f"{name}: {cells}; default / best hand-set {default / best:.3f} ({'within' if ok else 'NOT within'} 10 %)")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", type=int, default=6)
    args = parser.parse_args()
    cores = available_cores()
    hand = sorted({1, 2, cores})
    print(f"date {time.strftime('%Y-%m-%d %H:%M')}, {platform.processor() or platform.machine()}, {cores} cores "
          f"(affinity), load average {os.getloadavg()[0]:.2f}, torch {torch.__version__}")
    print(f"defaults here: inference.threads -> {threads_per_worker()}, score num_workers -> "
          f"{default_workers(None, args.cases)} with {threads_per_worker(None, default_workers(None, args.cases))} "
          "thread(s) each")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        image = tmp / "ct_0000.nii.gz"
        nib.save(nib.Nifti1Image(synthetic_ct((96, 96, 64)), np.diag([1.5, 1.5, 1.5, 1])), image)
        model = small_model()

        def predict(threads):
            predict_files(model, [image], tmp / f"pred_{threads}", inference={
                "mirror_axes": [], "precision": "fp32", "device": "cpu", "threads": threads})
        predict(1)  # warm-up
        ok &= report("predict 96x96x64, STU-Net-S, patch 64^3, no TTA (inference.threads)",
                     best_of([*hand, None], predict, args.repeats), "default")

        rng = np.random.default_rng(0)
        for folder in ("gt", "pred"):
            (tmp / folder).mkdir()
        for case in range(args.cases):
            labels = np.zeros((160, 160, 120), np.uint8)
            for organ in range(1, 9):
                centre = rng.integers(30, 130, 3)
                labels[tuple(slice(c - 12, c + 12) for c in centre[:2]) + (slice(centre[2] - 10, centre[2] + 10),)] \
                    = organ
            nib.save(nib.Nifti1Image(labels, np.eye(4)), tmp / "gt" / f"case{case}.nii.gz")
            shifted = np.roll(labels, 2, axis=0)
            nib.save(nib.Nifti1Image(shifted, np.eye(4)), tmp / "pred" / f"case{case}.nii.gz")

        def score(workers):
            score_folder(tmp / "pred", tmp / "gt", "aeval8", "aeval8", num_workers=workers, progress=False,
                         quiet=True)
        ok &= report(f"score {args.cases} cases of 160x160x120 (num_workers)",
                     best_of([*hand, None], score, args.repeats), "default")
    print(f"load average after {os.getloadavg()[0]:.2f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
