"""Side by side: nnU-Net 2.8's nnUNetPredictor vs aeval's official-checkpoint path, same STU-Net weights
(fixed random init), same real CT, fp32 on CPU with one thread each, in one process.

    OMP_NUM_THREADS=1 PYTHONPATH=. python experiments/benchmarks/nnunet_parity.py \
        [--image ../shared/data/real/example_ct_sm.nii.gz] [--size s] [--spacing 3] [--patch 32,64,64] [--no-mirror]
        [--fp32-accumulators]

Prints voxel agreement, per-class logit correlation (preprocessed space), the max softmax difference, and
both wall times with their ratio. nnU-Net 2.8 accumulates the blended logits in fp16 (also on CPU);
``--fp32-accumulators`` runs nnU-Net with fp32 accumulators instead (its ``torch.half`` swapped while it predicts)
to separate that rounding from any difference in what the two compute.
nnunetv2 is the reference (pip install -e '.[nnunet]' torch==2.13.0)."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from nnunet_reference import (  # noqa: E402
    dataset_json,
    nnunet_predict,
    nnunet_predictor,
    tiny_net,
    v2_plans,
    write_v2_model,
)

from aeval.data.nnunet_preprocess import preprocess_nnunet, restore_nnunet  # noqa: E402
from aeval.models.load import load_model  # noqa: E402
from aeval.prediction import make_predictor  # noqa: E402

REAL = Path(__file__).resolve().parents[3] / "shared" / "data" / "real"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--image", type=Path, default=REAL / "example_ct_sm.nii.gz")
    parser.add_argument("--size", default="s")
    parser.add_argument("--spacing", type=float, default=3.0)
    parser.add_argument("--patch", default="32,64,64")
    parser.add_argument("--no-mirror", action="store_true")
    parser.add_argument("--fp32-accumulators", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    mirror = not args.no_mirror
    patch = [int(p) for p in args.patch.split(",")]
    pools = [[2, 2, 2]] * 5
    plans = v2_plans([args.spacing] * 3, patch, pools)
    net = tiny_net(pools, size=args.size, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        model = load_model(write_v2_model(Path(tmp) / "model", net, plans))
    img = nib.load(args.image)

    predictor = nnunet_predictor(net, plans, dataset_json(), mirror)
    half = torch.half
    if args.fp32_accumulators:
        torch.half = torch.float32
    try:
        start = time.perf_counter()
        reference, _, ref_logits = nnunet_predict(predictor, args.image)
        t_nnunet = time.perf_counter() - start
    finally:
        torch.half = half

    start = time.perf_counter()
    image, properties = preprocess_nnunet(img, model.plan)
    logits = make_predictor(model, {"precision": "fp32", "mirror_axes": [0, 1, 2] if mirror else []})(
        torch.from_numpy(image))
    ours = restore_nnunet(logits, properties)
    t_aeval = time.perf_counter() - start

    ref_logits = ref_logits.float()
    corr = [float(np.corrcoef(ref_logits[c].ravel(), logits[c].ravel())[0, 1]) for c in range(logits.shape[0])]
    softmax = float((logits.softmax(0) - ref_logits.softmax(0)).abs().max())
    print(f"image {args.image.name} {img.shape} -> preprocessed {tuple(image.shape[1:])}, STU-Net {args.size}, "
          f"patch {patch}, mirror {'8 flips' if mirror else 'off'}, fp32, 1 thread, nnU-Net accumulators "
          f"{'fp32' if args.fp32_accumulators else 'fp16 (stock)'}")
    print(f"voxel agreement {100 * (ours == reference).mean():.3f} %  ({int((ours != reference).sum())} of "
          f"{ours.size} voxels differ)")
    print(f"logit correlation per class: min {min(corr):.6f}, mean {np.mean(corr):.6f}; max |logit diff| "
          f"{float((logits - ref_logits).abs().max()):.4f}; max |softmax diff| {softmax:.4f}")
    print(f"time nnU-Net {t_nnunet:.1f} s, aeval {t_aeval:.1f} s, ratio aeval/nnU-Net {t_aeval / t_nnunet:.2f}")


if __name__ == "__main__":
    main()
