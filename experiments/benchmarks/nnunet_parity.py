"""Side by side, end to end: nnU-Net 2.8's nnUNetPredictor vs aeval's official-checkpoint path, same STU-Net
weights (fixed random init, saved as an nnU-Net v2 model folder), same real CT, fp32 on CPU, one thread each,
in one process.

    OMP_NUM_THREADS=1 PYTHONPATH=. python experiments/benchmarks/nnunet_parity.py \
        [--image ../shared/data/real/example_ct_sm.nii.gz] [--size s] [--spacing 3] [--patch 32,64,64] [--no-mirror]
        [--fp32-accumulators] [--nnunet-tuned-allocator] [--profile]

Each side reads the file, preprocesses, predicts (8 flips unless --no-mirror), restores and writes a NIfTI:
nnU-Net with ``predict_from_files_sequential`` (its whole pipeline, no worker processes), aeval with
``aeval.prediction.predict_file``. nnU-Net runs first, so the allocator setting aeval uses while predicting
(``inference.cpu_allocator=tuned``) is not in force for it; ``--nnunet-tuned-allocator`` runs nnU-Net inside
the same setting, to show what that lever alone is worth. Prints wall and CPU seconds of both, their ratio, and
the voxel agreement of the written label maps. nnU-Net 2.8 accumulates blended logits in fp16 (also on a
CPU), and so does aeval for nnU-Net checkpoints (``inference.accumulate=auto``); ``--fp32-accumulators`` runs
both in fp32 (nnU-Net's ``torch.half`` swapped while it predicts). ``--profile`` adds aeval's cProfile top lines.
nnunetv2 is the reference (pip install -e '.[nnunet]' torch==2.13.0)."""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import platform
import pstats
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from nnunet_reference import dataset_json, nnunet_predictor, tiny_net, v2_plans, write_v2_model  # noqa: E402

from aeval.cpu import inference_allocator  # noqa: E402
from aeval.models.load import load_model  # noqa: E402
from aeval.prediction import make_predictor, predict_file  # noqa: E402

REAL = Path(__file__).resolve().parents[3] / "shared" / "data" / "real"


@contextlib.contextmanager
def clock(times: dict, key: str):
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    times[key] = (time.perf_counter() - wall, time.process_time() - cpu)


def run_nnunet(net, plans, image: Path, out: Path, mirror: bool, fp32: bool, tuned: bool) -> None:
    predictor = nnunet_predictor(net, plans, dataset_json(), mirror)
    half = torch.half
    if fp32:
        torch.half = torch.float32
    try:
        with inference_allocator(tuned):
            predictor.predict_from_files_sequential([[str(image)]], [str(out)], save_probabilities=False)
    finally:
        torch.half = half


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--image", type=Path, default=REAL / "example_ct_sm.nii.gz")
    parser.add_argument("--size", default="s")
    parser.add_argument("--spacing", type=float, default=3.0)
    parser.add_argument("--patch", default="32,64,64")
    parser.add_argument("--no-mirror", action="store_true")
    parser.add_argument("--fp32-accumulators", action="store_true")
    parser.add_argument("--nnunet-tuned-allocator", action="store_true")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    mirror = not args.no_mirror
    patch = [int(p) for p in args.patch.split(",")]
    pools = [[2, 2, 2]] * 5
    plans = v2_plans([args.spacing] * 3, patch, pools)
    net = tiny_net(pools, size=args.size, seed=0)
    times: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = load_model(write_v2_model(tmp / "model", net, plans))
        with clock(times, "nnunet"):
            run_nnunet(net, plans, args.image, tmp / "nnunet", mirror, args.fp32_accumulators,
                       args.nnunet_tuned_allocator)
        reference = np.asarray(nib.load(tmp / "nnunet.nii.gz").dataobj)
        inference = {"precision": "fp32", "mirror_axes": [0, 1, 2] if mirror else [],
                     "accumulate": "fp32" if args.fp32_accumulators else "auto"}
        profiler = cProfile.Profile() if args.profile else None
        with clock(times, "aeval"):
            predictor = make_predictor(model, inference)
            if profiler:
                profiler.enable()
            predict_file(predictor, model, args.image, tmp / "aeval.nii.gz")
            if profiler:
                profiler.disable()
        ours = np.asarray(nib.load(tmp / "aeval.nii.gz").dataobj)
    img = nib.load(args.image)
    (nw, nc), (aw, ac) = times["nnunet"], times["aeval"]
    print(f"date {time.strftime('%Y-%m-%d %H:%M')}, {platform.processor() or platform.machine()}, "
          f"{len(os.sched_getaffinity(0))} cores, load average {os.getloadavg()[0]:.2f}, torch {torch.__version__}")
    print(f"image {args.image.name} {img.shape}, STU-Net {args.size}, patch {patch}, mirror "
          f"{'8 flips' if mirror else 'off'}, fp32, 1 thread, accumulators "
          f"{'fp32 (both)' if args.fp32_accumulators else 'fp16 (stock nnU-Net 2.8.1; aeval auto)'}, nnU-Net allocator "
          f"{'tuned' if args.nnunet_tuned_allocator else 'stock'}")
    print(f"voxel agreement {100 * (ours == reference).mean():.4f} %  ({int((ours != reference).sum())} of "
          f"{ours.size} voxels differ)")
    print(f"end to end: nnU-Net {nw:.1f} s wall / {nc:.1f} s CPU, aeval {aw:.1f} s wall / {ac:.1f} s CPU; "
          f"speed-up nnU-Net/aeval {nw / aw:.2f}x wall, {nc / ac:.2f}x CPU")
    if profiler:
        stream = io.StringIO()
        pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(12)
        print(stream.getvalue())


if __name__ == "__main__":
    main()
