"""Peak memory of ``aeval.prediction.predict_file`` on a 512x512x400 CT with STU-Net-S on CPU (issue 6's target:
within 6 GB peak RSS without TTA; issue 14's: within 4 GB at native spacing with 8-flip TTA, 14 classes).

A synthetic CT (air around an elliptic body of soft tissue with brighter organs and a spine, int16, written
uncompressed) is predicted end to end as a user's file would be: read, reoriented, cropped to the body,
normalised, resampled to the plan's target spacing, sliding-window inference (patch 128^3, overlap 0.5,
Gaussian weighting), logits resampled back and argmaxed, written as uint8 NIfTI. The network is STU-Net-S
with random weights and 14 classes. ``--mirror`` adds the 8-flip TTA (on a CPU a 128^3 window's flips go
through the network one per forward, ``inference.network_batch_size`` auto), which multiplies the time by 8
and adds one window's summed logits, not another full-volume buffer. ``--accumulate`` is
``inference.accumulate``. A volume whose fp32 logits would exceed ``inference.SLAB_LOGITS_ABOVE`` (1 GiB) is blended
in a band one patch deep and restored as its rows become final (``SlidingWindowPredictor.slabs``);
``--check-labels`` predicts it a second time holding the whole volume's fp32 logits (the path without bands) and
prints that run's peak and the share of voxels whose labels agree.

The prediction runs in a child process, so its peak RSS (``ru_maxrss``, and VmHWM) does not include
building the volume; the child also reports its RSS after imports and model construction.

    python experiments/benchmarks/predict_memory.py                                  # target 1.5 mm iso
    python experiments/benchmarks/predict_memory.py --target-spacing 0.8,0.8,2.5 --net pointwise
    python experiments/benchmarks/predict_memory.py --threads 1 --net pointwise --target-spacing 0.8,0.8,1.0 \
        --mirror --check-labels                                                      # issue 14's 4 GB target
``--net pointwise`` swaps STU-Net-S for a 1x1x1 convolution to 14 classes: every buffer of the pipeline
stays the same, only the network's per-window activations and its compute go, so large resampled volumes
can be measured in minutes (add STU-Net-S's per-window activations, printed with ``--net s``).
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
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def triple(text: str, kind=float) -> list:
    values = [kind(v) for v in text.split(",")]
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated values, got {text!r}")
    return values


def vm_hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> None:
    """Reset VmHWM (Linux >= 4.0) so the peak counts from here; RSS already resident stays counted."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def write_volume(path: Path, shape: list[int], spacing: list[float], seed: int = 0) -> None:
    """CT-like int16 volume: -1000 HU air, an elliptic body (80% x 64% of the field of view) of ~40 HU soft
    tissue with noise, a brighter liver-like and kidney-like region, a 400 HU spine. Built a slab at a time."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    nx, ny, nz = shape
    x = (np.arange(nx) + 0.5) / nx - 0.5
    y = (np.arange(ny) + 0.5) / ny - 0.5
    xx, yy = np.meshgrid(x, y, indexing="ij")
    body = (xx / 0.4) ** 2 + (yy / 0.32) ** 2 <= 1
    liver = ((xx + 0.15) / 0.14) ** 2 + ((yy + 0.05) / 0.12) ** 2 <= 1
    kidney = ((xx - 0.15) / 0.05) ** 2 + ((yy - 0.12) / 0.06) ** 2 <= 1
    spine = (xx / 0.04) ** 2 + ((yy - 0.2) / 0.04) ** 2 <= 1
    volume = np.empty(shape, dtype=np.int16)
    for z0 in range(0, nz, 50):
        z1 = min(nz, z0 + 50)
        slab = np.where(body, 40.0, -1000.0)[..., None] + rng.normal(0, 12, (nx, ny, z1 - z0))
        slab += (60.0 * liver + 120.0 * kidney + 360.0 * spine)[..., None]
        volume[..., z0:z1] = np.clip(slab, -1024, 3071).astype(np.int16)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])  # LPS-style storage, as many scanners write
    img = nib.Nifti1Image(volume, affine)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))


def benchmark_plan(target_spacing: list[float], patch: list[int]) -> dict:
    from aeval.data.planner import plan_hash

    plan = {"datasets": [{"name": "synthetic", "modality": "CT", "label_system": "flare22"}],
            "axis_order": "RAS", "label_space": "flare22", "num_classes": 14,
            "target_spacing": target_spacing,
            "normalization": {"scheme": "ct", "clip": [-160.0, 240.0], "mean": 60.0, "std": 70.0},
            "crop": {"ct_threshold": -500.0, "other": "nonzero"},
            "patch_size": patch, "pool_op_kernel_sizes": [[2, 2, 2]] * 5}
    plan["hash"] = plan_hash(plan)
    return plan


def child(args: argparse.Namespace) -> dict:
    """Predict the volume once; report peak RSS and seconds."""
    import torch
    from torch import nn

    from aeval import inference
    from aeval.cpu import inference_allocator
    from aeval.data.geometry import resampled_shape
    from aeval.models.load import LoadedModel
    from aeval.models.stunet import build_stunet
    from aeval.prediction import make_predictor, predict_file

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.whole:  # the reference: the whole volume's logits held in fp32, no bands
        inference.SLAB_LOGITS_ABOVE = float("inf")
    torch.manual_seed(0)
    plan = benchmark_plan(args.target_spacing, args.patch)
    if args.net == "pointwise":
        net = nn.Conv3d(1, 14, 1)
    else:
        net = build_stunet(args.net, 1, 14, pool_op_kernel_sizes=plan["pool_op_kernel_sizes"])
    model = LoadedModel(net, plan, "flare22")
    mirror_axes = (args.mirror_axes or [0, 1, 2]) if args.mirror else []
    predictor = make_predictor(model, {"mirror_axes": mirror_axes, "precision": args.precision, "device": "cpu",
                                       "accumulate": "fp32" if args.whole else args.accumulate})
    net.eval()
    window_activation_mib = None
    if args.net != "pointwise":  # the network's own share: RSS growth of one window's forward
        reset_peak_rss()
        before = rss_mib()
        with torch.inference_mode(), inference_allocator():
            predictor.window_predictor(torch.zeros(1, 1, *args.patch))
        window_activation_mib = vm_hwm_mib() - before
    rss_ready = rss_mib()
    start = time.perf_counter()
    target = predict_file(predictor, model, Path(args.volume), Path(args.out))
    seconds = time.perf_counter() - start
    resampled = resampled_shape(args.shape, args.spacing, args.target_spacing)
    return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "vm_hwm_mib": vm_hwm_mib(),
            "rss_before_predict_mib": rss_ready, "window_forward_growth_mib": window_activation_mib,
            "seconds": seconds, "cpu_seconds": time.process_time(), "precision": predictor.precision,
            "threads": torch.get_num_threads(), "flips": len(predictor.flips), "accumulate": args.accumulate,
            "resampled_shape_before_crop": resampled, "written": str(target)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=lambda t: triple(t, int), default=[512, 512, 400])
    parser.add_argument("--spacing", type=triple, default=[0.8, 0.8, 1.0], help="mm, array order")
    parser.add_argument("--target-spacing", type=triple, default=[1.5, 1.5, 1.5],
                        help="the plan's target spacing (RAS order); default STU-Net's published 1.5 mm")
    parser.add_argument("--patch", type=lambda t: triple(t, int), default=[128, 128, 128])
    parser.add_argument("--net", default="s", help="STU-Net size (s, b, ...) or 'pointwise'")
    parser.add_argument("--precision", default="fp32", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--mirror", action="store_true", help="8-flip mirror TTA")
    parser.add_argument("--mirror-axes", type=lambda t: [int(a) for a in t.split(",")],
                        help="with --mirror: these axes only (e.g. 0: 2 flips, the same buffers as 8 at a 128^3 "
                             "patch, where the flips go through the network one at a time, in a quarter of the time)")
    parser.add_argument("--accumulate", default="auto", choices=["auto", "fp32", "fp16"])
    parser.add_argument("--check-labels", action="store_true",
                        help="predict again holding the whole volume's fp32 logits; compare the labels")
    parser.add_argument("--whole", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/aeval_predict_memory"))
    parser.add_argument("--volume", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.volume:  # the child
        print(json.dumps(child(args)), flush=True)
        return 0
    args.workdir.mkdir(parents=True, exist_ok=True)
    volume = args.workdir / f"ct_{'x'.join(map(str, args.shape))}_{'x'.join(map(str, args.spacing))}.nii"
    if not volume.exists():
        print(f"writing {volume}", flush=True)
        write_volume(volume, args.shape, args.spacing)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--check-labels"]
    runs = {"this": []} | ({"whole volume, fp32": ["--whole"]} if args.check_labels else {})
    reports = {}
    for name, extra in runs.items():
        out = args.workdir / f"pred_{'whole' if extra else 'this'}.nii.gz"
        command = [sys.executable, __file__, "--volume", str(volume), "--out", str(out), *forwarded, *extra]
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        if result.returncode:
            print(result.stdout + result.stderr, file=sys.stderr)
            return result.returncode
        reports[name] = json.loads(result.stdout.strip().splitlines()[-1])
    report = reports["this"]
    print(f"date {datetime.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"volume {args.shape} at {args.spacing} mm -> target {args.target_spacing} mm "
          f"(resampled before the body crop: {report['resampled_shape_before_crop']}), patch {args.patch}, "
          f"net {args.net}, {report['precision']}, {report['threads']} thread(s), {report['flips']} flip(s), "
          f"accumulate {args.accumulate}")
    for name, run in reports.items():
        print(f"{name}: peak RSS {run['peak_rss_mib']:.0f} MiB (VmHWM {run['vm_hwm_mib']:.0f}); "
              f"RSS before predicting {run['rss_before_predict_mib']:.0f} MiB; "
              f"one window's forward grew RSS by {run['window_forward_growth_mib'] or 0:.0f} MiB; "
              f"{run['seconds']:.0f} s")
    if args.check_labels:
        import nibabel as nib

        this, whole = (np.asarray(nib.load(reports[name]["written"]).dataobj) for name in reports)
        report["labels_agree_with_whole_fp32"] = float((this == whole).mean())
        report["whole_fp32_peak_rss_mib"] = reports["whole volume, fp32"]["peak_rss_mib"]
        print(f"labels equal to the whole-volume fp32 path on {100 * report['labels_agree_with_whole_fp32']:.4f} % "
              f"of {this.size} voxels ({int((this != whole).sum())} differ)")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
