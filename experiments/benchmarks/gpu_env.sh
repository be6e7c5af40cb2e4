# Sourced by the GPU check scripts (gpu_session.sh, gpu_train_step.sh, gpu_issue14.sh): $OUT for the logs,
# $PYTHON, the wheels carried in .whl/ installed into /tmp/site (the GPU image has torch and lightning), the
# GPU's name and driver in $OUT/gpu.txt.
OUT=${OUT:-/tmp/gpu_out}
export PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 WANDB_MODE=offline
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PYTHON -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
