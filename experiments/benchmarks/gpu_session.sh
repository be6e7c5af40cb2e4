#!/usr/bin/env bash
# The GPU checks of issues 3, 5 and 6 in one short run (about 6 minutes on one H100/H200), for the device
# tool: `bash experiments/benchmarks/gpu_session.sh` from the repository root, with the wheels of monai,
# nibabel, omegaconf, hydra-core and antlr4 in .whl/ (the GPU image has torch and lightning). Logs go to $OUT.
set -u
source experiments/benchmarks/gpu_env.sh

echo "== STU-Net training step, 128^3 batch 2 bf16 (issues 3, 5)"
timeout 170 $PYTHON experiments/benchmarks/gpu_stunet.py --budget-s 120 2>&1 | tee "$OUT/gpu_stunet.txt"

echo "== sliding window + 8-flip TTA on 512x512x300, bf16 (issue 6)"
timeout 170 $PYTHON experiments/benchmarks/gpu_inference.py --budget-s 120 2>&1 | tee "$OUT/gpu_inference.txt"

echo "== ours vs 8 MONAI passes, fp32 and bf16, STU-Net-S (issue 6)"
timeout 100 $PYTHON experiments/benchmarks/inference_speed.py --device cuda --shape 256,256,160 \
  --patch 128,128,128 --repeats 2 2>&1 | tee "$OUT/inference_speed_gpu.txt"

echo "== aeval.train on the synthetic mini with trainer=gpu (bf16-mixed), STU-Net-S"
timeout 150 bash -c '$PYTHON -m aeval.prepare synthetic=true only=[flare22] paths.root_dir=/tmp/aeval >/dev/null &&
  $PYTHON -m aeval.train dataset=flare22 model=stu_s trainer=gpu logger=csv paths.root_dir=/tmp/aeval \
    trainer.max_epochs=2 data.iterations_per_epoch=25 data.num_workers=4 plan.patch_size=[64,64,64] \
    trainer.enable_progress_bar=false' 2>&1 | tail -25 | tee "$OUT/gpu_train.txt"
