#!/usr/bin/env bash
# Issue 14's GPU checks in one run (about 7 minutes on one H100/H200), for the device tool:
#   bash experiments/benchmarks/gpu_issue14.sh        (from the repository root; logs and JSON go to $OUT)
# 1. a STU-Net-S trained for 60 s on synthetic CTs, then aeval's predictor (bf16) against nnU-Net 2.8's
#    nnUNetPredictor (perform_everything_on_device) end to end with 8-flip TTA: the time ratio (target >= 2x)
#    and the label agreement (>= 99.9 %). The reference side needs nnunetv2 importable: carry its wheels
#    (`pip download nnunetv2==2.8.1` and its dependencies except torch) in .whl/ with the others.
# 2. augmentation in the loader workers vs on the GPU (data.augment_on=gpu) at 128^3, batch 2, with the
#    STU-Net-S training step: ms per iteration of both.
set -u
source experiments/benchmarks/gpu_env.sh

echo "== trained STU-Net-S: aeval bf16 vs nnUNetPredictor, 8 flips, end to end"
timeout 300 $PYTHON experiments/benchmarks/gpu_nnunet_parity.py 2>&1 | tee "$OUT/gpu_nnunet_parity.txt"

echo "== data.augment_on=cpu vs gpu, 128^3 batch 2, STU-Net-S step"
timeout 240 $PYTHON experiments/benchmarks/augment_on.py --device cuda --workers 8 --size s \
  --out "$OUT/augment_on_cuda.json" 2>&1 | tee "$OUT/augment_on_cuda.txt"
