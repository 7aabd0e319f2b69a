#!/usr/bin/env bash
# Issue 6 on one GPU: train the miniature priors on CUDA within a time budget, then run the
# composition experiment (and the s0 x k ablation) on CUDA. Everything lands under $OUT.
#
#   OUT=$OUT MINUTES=3 bash scripts/miniature_gpu.sh        (about MINUTES + 3 minutes in all)
#
# Inputs: the rendered training set (carry .d2cache/train; 16 px, 8 frames, 600 scenes), a
# Python with the project's dependencies ($PY). Outputs: $OUT/priors/{video,multiview}
# (copy to data/priors and commit), $OUT/priors/train.json, $OUT/composition/{results.md,
# results.json,ablation.md,ablation_grid.png,images/}, $OUT/mlflow.db (training curves).
set -euo pipefail
OUT=${OUT:-runs/gpu}
MINUTES=${MINUTES:-3}
DATASET=${DATASET:-.d2cache/train/train16_600.pt}
PY=${PY:-.venv/bin/python}
EXP_ARGS=${EXP_ARGS:---oracle-orbit --ablation-seeds 0}  # e.g. "--no-ablation" to save a minute; "--steps 25" is fixed below
mkdir -p "$OUT"
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$(realpath "$OUT")/mlflow.db}
export D2_MLFLOW_ARTIFACTS=${D2_MLFLOW_ARTIFACTS:-$(realpath "$OUT")/mlruns}
export MLFLOW_DISABLE_TELEMETRY=true HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
test -f "$DATASET" || { echo "missing $DATASET (carry .d2cache/train)"; exit 2; }
"$PY" -m d2.train.priors --out "$OUT/priors" --device cuda --precision bf16 --batch-size 128 --lr 6e-4 \
  --ema-decay 0.999 --steps 100000 --max-minutes "$MINUTES" --dataset "$DATASET" --threads 8 --no-progress \
  2>&1 | grep -v -i "warn\|Loading weights\|Writing model" | tee "$OUT/train.log"
"$PY" -m d2.train.experiment --priors "$OUT/priors" --out "$OUT/composition" --device cuda --threads 8 \
  --steps 25 --rollback 5 $EXP_ARGS --no-progress \
  2>&1 | grep -v -i "warn\|Loading weights" | tee "$OUT/experiment.log"
du -sh "$OUT"/priors/*
