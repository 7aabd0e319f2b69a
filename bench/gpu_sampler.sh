#!/usr/bin/env bash
# Issue 2's GPU throughput checks in one run on one lent GPU (H100/H200). $STAGES picks, in order:
#   kernels   bench/unet_kernels.py: attention kernels timed on one chunk forward of the full-size
#             SVD-XT UNet, the card's bf16 GEMM ceiling, and a kernel profile by category (~2 min);
#   variants  bench/unet_variants.py, eager: the exact reformulations (cross-attention shortcut,
#             temporal convolution as a GEMM, framewise temporal GroupNorm) against diffusers'
#             formulation, round-robin on one SVD-XT chunk forward (~1.5 min);
#   eager     bench/sampler.py --gpu-full, eager, $EAGER_FLAGS (~1.5 min);
#   compiled  the same with both UNets compiled, $COMPILE_FLAGS (~5 min: compilation ~4 min;
#             default: cuDNN attention, all three reformulations, Inductor freezing, which also
#             concatenates each self-attention's Q/K/V projections into one GEMM);
#   cvariants bench/unet_variants.py --compile $CVARIANT_FLAGS on $CVARIANTS (~2.2 min per variant).
# Default STAGES=variants,compiled (~7 min; limits T_VARIANTS=120, T_COMPILE=420 s). The first
# lease ran kernels,eager,compiled (490 s on an H200, bench/results/gpu_sampler_h200_log.txt).
# TINY=1 PY=.venv/bin/python runs every stage with tiny architectures on the CPU (a dry run).
# Needs: a python3 with torch (CUDA) and, in .whl/, the cp312 wheels the device image lacks
# (diffusers, pydantic, pydantic-core, annotated-types, typing-inspection, importlib_metadata;
# see bench/gpu_checks.sh). Writes its JSON files and log under $OUT.
set -uo pipefail
OUT=${OUT:-runs/gpu}
CHUNK=${CHUNK:-5}
STAGES=${STAGES:-variants,compiled}
EAGER_FLAGS=${EAGER_FLAGS:-}
COMPILE_FLAGS=${COMPILE_FLAGS:---attention cudnn --temporal-conv gemm --temporal-norm framewise --freezing}
CVARIANTS=${CVARIANTS:-reference,all}
PY=${PY:-python3}
TINY=${TINY:+--tiny}  # TINY=1: every step with tiny architectures on the CPU (a dry run of this script)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ -d .whl ] && [ -z "$TINY" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
fi
LOG="$OUT/log.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,temperature.gpu --format=csv,noheader 2>&1 \
  | tee "$LOG"
t0=$(date +%s)
stamp() { echo "== $1 (t=$(( $(date +%s) - t0 )) s)" | tee -a "$LOG"; }
run() {  # run <timeout> <command...>: output to the log, dynamo's warnings dropped
  local limit=$1; shift
  timeout "$limit" "$@" 2>&1 | grep -v -i "warn" | tee -a "$LOG"
}

for stage in ${STAGES//,/ }; do
  case $stage in
    kernels)
      stamp "kernels"
      run "${T_KERNELS:-180}" "$PY" bench/unet_kernels.py --chunk "$CHUNK" $TINY --json "$OUT/kernels.json" ;;
    variants)
      stamp "variants, eager (SVD-XT UNet, chunk 3)"
      run "${T_VARIANTS:-120}" "$PY" bench/unet_variants.py --chunk 3 --repeats 3 --attention cudnn \
        $TINY --json "$OUT/variants_eager.json" ;;
    eager)
      stamp "sampler, eager $EAGER_FLAGS"
      run "${T_EAGER:-150}" "$PY" bench/sampler.py --gpu-full --steps 2 --chunk "$CHUNK" $EAGER_FLAGS \
        $TINY --json "$OUT/sampler_eager.json" ;;
    compiled)
      stamp "sampler, compiled $COMPILE_FLAGS"
      run "${T_COMPILE:-420}" "$PY" bench/sampler.py --gpu-full --steps 2 --chunk "$CHUNK" --compile $COMPILE_FLAGS \
        $TINY --json "$OUT/sampler_compiled.json" ;;
    cvariants)
      stamp "variants, compiled: $CVARIANTS"
      run "${T_CVARIANTS:-300}" "$PY" bench/unet_variants.py --chunk 3 --repeats 3 --attention cudnn --compile \
        ${CVARIANT_FLAGS:-} --variants "$CVARIANTS" $TINY --json "$OUT/variants_compiled.json" ;;
    *) echo "unknown stage $stage (kernels, variants, eager, compiled, cvariants)" | tee -a "$LOG" ;;
  esac
done
stamp "done"
