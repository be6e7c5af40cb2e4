#!/usr/bin/env bash
# Issue 5's GPU check (about 4-5 minutes on one H100/H200), run from the repository root:
#   bash experiments/benchmarks/gpu_train_step.sh
# 1. iterations/s and peak memory of a full STU-Net S/B/L training step at 128^3, batch 2, bf16 autocast
#    (experiments/benchmarks/gpu_stunet.py; compare with the published S 5.2 / B 8.8 / L 26.5 GB);
# 2. one real `python -m aeval.train` run on the synthetic mini with trainer=gpu (bf16-mixed), STU-Net-S at
#    the recipe's 128^3 patch and batch 2: the Lightning loop, the loader and checkpointing on a GPU.
# Needs torch (step 1) and lightning (step 2) installed; the other packages may come as wheels in .whl/
# (as in gpu_session.sh). Logs and result.json go to $OUT (default /tmp/gpu_out).
set -u
WORK=${WORK:-/tmp/aeval_gpu_train}
source experiments/benchmarks/gpu_env.sh

echo "== STU-Net S/B/L training step, 128^3, batch 2, bf16 autocast"
timeout 200 $PYTHON experiments/benchmarks/gpu_stunet.py --device cuda --sizes s,b,l --patch 128 --batch 2 \
  --iters 10 --warmup 3 --budget-s 150 2>&1 | tee "$OUT/gpu_train_step.md"

echo "== python -m aeval.train, trainer=gpu, STU-Net-S, patch 128^3, batch 2, 1 epoch of 20 steps"
if ! $PYTHON -c "import lightning, monai, hydra, nibabel" 2>/dev/null; then
  echo "skipped: lightning/monai/hydra/nibabel not importable" | tee "$OUT/gpu_train_run.txt"
  exit 0
fi
start=$(date +%s)
timeout 120 bash -c "$PYTHON -m aeval.prepare synthetic=true only=[flare22] paths.root_dir=$WORK >/dev/null &&
  $PYTHON -m aeval.train dataset=flare22 model=stu_s trainer=gpu logger=csv paths.root_dir=$WORK \
    trainer.max_epochs=1 data.iterations_per_epoch=20 data.batch_size=2 data.num_workers=8 \
    plan.patch_size=[128,128,128] trainer.enable_progress_bar=false" 2>&1 | tail -15 | tee "$OUT/gpu_train_run.txt"
echo "prepare + train wall time: $(( $(date +%s) - start )) s" | tee -a "$OUT/gpu_train_run.txt"
cp "$WORK"/outputs/logs/train/individual/flare22/stu_s/result.json "$OUT/" 2>/dev/null \
  && cat "$OUT/result.json"
