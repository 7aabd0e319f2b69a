#!/usr/bin/env bash
# Issue 2's GPU throughput checks in one run on one lent GPU (H100/H200), ~8 minutes:
#   1. bench/unet_kernels.py: the attention kernels timed on one chunk forward of the full-size
#      SVD-XT UNet, the card's bf16 GEMM ceiling, and a kernel profile by category;
#   2. bench/sampler.py --gpu-full, eager, torch's default attention (the baseline on this card);
#   3. the same with the fastest attention kernel of step 1 (when that is not the default);
#   4. the same with both UNets compiled (torch.compile; the warm-up step includes compilation),
#      plus $COMPILE_FLAGS (e.g. COMPILE_FLAGS=--channels-last).
# Measured: 490 s on one H200 (bench/results/gpu_sampler_h200_log.txt).
# Needs: a python3 with torch (CUDA) and, in .whl/, the cp312 wheels the device image lacks
# (diffusers, pydantic, pydantic-core, annotated-types, typing-inspection, importlib_metadata;
# see bench/gpu_checks.sh). Writes its JSON files and log under $OUT.
set -uo pipefail
OUT=${OUT:-runs/gpu}
CHUNK=${CHUNK:-5}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
fi
LOG="$OUT/log.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,temperature.gpu --format=csv,noheader | tee "$LOG"
t0=$(date +%s)
stamp() { echo "== $1 (t=$(( $(date +%s) - t0 )) s)" | tee -a "$LOG"; }

stamp "kernels"
timeout "${T_KERNELS:-180}" python3 bench/unet_kernels.py --chunk "$CHUNK" --json "$OUT/kernels.json" 2>&1 \
  | grep -v -i "warn" | tee -a "$LOG"
BEST=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['best_attention'])" "$OUT/kernels.json" \
  2>/dev/null || echo auto)
echo "fastest attention: $BEST" | tee -a "$LOG"

stamp "sampler, eager, default attention"
timeout "${T_EAGER:-150}" python3 bench/sampler.py --gpu-full --steps 2 --chunk "$CHUNK" \
  --json "$OUT/sampler_eager.json" 2>&1 | grep -v -i "warn" | tee -a "$LOG"
if [ "$BEST" != auto ]; then
  stamp "sampler, eager, $BEST attention"
  timeout "${T_EAGER:-150}" python3 bench/sampler.py --gpu-full --steps 2 --chunk "$CHUNK" --attention "$BEST" \
    --json "$OUT/sampler_eager_$BEST.json" 2>&1 | grep -v -i "warn" | tee -a "$LOG"
fi
stamp "sampler, compiled, $BEST attention"
timeout "${T_COMPILE:-330}" python3 bench/sampler.py --gpu-full --steps 2 --chunk "$CHUNK" --attention "$BEST" \
  --compile ${COMPILE_FLAGS:-} --json "$OUT/sampler_compile_$BEST.json" 2>&1 | grep -v -i "warn" | tee -a "$LOG"
stamp "done"
