#!/usr/bin/env bash
# All of the project's GPU checks in one run on one lent GPU (H100/H200), ~9 minutes:
#   1. gsplat's CUDA JIT build, in the background on the CPUs;
#   2. bench/sampler.py --gpu-full (full-size SVD-XT + SV3D_p, random bf16 weights, 21 x 25 at 576);
#   3. the miniature priors trained on the GPU for MINUTES (issue 6);
#   4. bench/fit.py --gpu (gsplat fit of a 21 x 25 matrix at 576, 5k iterations; torch vs gsplat agreement).
# Needs: a python3 with torch (CUDA) and, in .whl/, the cp312 manylinux wheels of what the device image
# lacks: diffusers, gsplat, pydantic, pydantic-core, annotated-types, typing-inspection, plyfile,
# importlib_metadata (`make gpu-wheels`), the training set .d2cache/train/train16_600.pt. No MP4
# writer fits in what a call carries (imageio-ffmpeg 68 MB, PyAV 35 MB), so bench/fit.py skips
# the turntable video there. Writes at most 8 files under $OUT.
set -uo pipefail
OUT=${OUT:-runs/gpu}
MINUTES=${MINUTES:-2.5}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
fi
LOG="$OUT/log.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$LOG"
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" | tee -a "$LOG"
NVCC=$(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(readlink -f "$NVCC")")")}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-14}
echo "CUDA_HOME=$CUDA_HOME" | tee -a "$LOG"

t0=$(date +%s)
( python3 bench/fit.py --gpu --compile-only --json "$OUT/fit_compile.json" > "$OUT/gsplat_build.log" 2>&1 ) &
BUILD=$!

echo "== sampler (t=$(( $(date +%s) - t0 )) s)" | tee -a "$LOG"
timeout 240 python3 bench/sampler.py --gpu-full --json "$OUT/sampler_gpu.json" 2>&1 | grep -v -i "warn" | tee -a "$LOG"

echo "== miniature priors training, $MINUTES min (t=$(( $(date +%s) - t0 )) s)" | tee -a "$LOG"
python3 -m d2.train.priors --out /tmp/priors --device cuda --precision bf16 --batch-size 128 --lr 6e-4 \
  --ema-decay 0.999 --steps 100000 --max-minutes "$MINUTES" --dataset .d2cache/train/train16_600.pt \
  --threads 8 --no-progress --no-mlflow 2>&1 | grep -v -i "warn\|Loading weights\|Writing model" | tail -n 30 | tee -a "$LOG"
[ -d /tmp/priors ] && tar czf "$OUT/priors_gpu.tgz" -C /tmp/priors .

echo "== waiting for the gsplat build (t=$(( $(date +%s) - t0 )) s)" | tee -a "$LOG"
wait $BUILD
tail -n 5 "$OUT/gsplat_build.log" | tee -a "$LOG"
echo "== fit (t=$(( $(date +%s) - t0 )) s)" | tee -a "$LOG"
timeout 300 python3 bench/fit.py --gpu --json "$OUT/fit_gpu.json" 2>&1 | grep -v -i "warn" | tee -a "$LOG"
echo "== done (t=$(( $(date +%s) - t0 )) s)" | tee -a "$LOG"
