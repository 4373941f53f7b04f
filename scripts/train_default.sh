#!/usr/bin/env bash
# Reproduces the shipped default checkpoint weights/yan-tiny-kjv from a clean checkout:
# KJV corpus -> stage 1 (denoising autoencoder) -> stage 2 (MoE-FM NLL + CE) -> multi-task
# fine-tune (infill, last-word completion, bAbI-style QA, KJV section classification) -> eval.
#
#   PUBLISH=weights/yan-tiny-kjv bash scripts/train_default.sh   # the shipped run (CPU, ~1 h)
#   S1=20 S2=20 FT=20 EVAL_LIMIT=16 bash scripts/train_default.sh   # smoke run (CI test)
#
# Knobs (environment): CONFIG, OUT, and those of scripts/train_common.sh (CORPUS, DATA, S1, S2,
# FT, BS, EVAL_LIMIT, DEVICE, PUBLISH).
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG="${CONFIG:-yan-tiny}"  # or yan-mamba-tiny: same data and budget
OUT="${OUT:-runs/$CONFIG-${CORPUS:-kjv}}"
source scripts/train_common.sh

yan train stage1 --config "$CONFIG" --out "$OUT/stage1" --steps "$S1" --lr 1e-3 --warmup 100 \
    "${common[@]}"
yan train stage2 --init "$OUT/stage1" --out "$OUT/stage2" --steps "$S2" --lr 1e-3 --warmup 100 \
    --fm-weight 0.1 --ce-weight 1 "${common[@]}"
yan train finetune --init "$OUT/stage2" --out "$OUT/finetune" --steps "$FT" --lr 3e-4 \
    --warmup 50 --fm-weight 0.1 --ce-weight 1 "${common[@]}"
evaluate --steps 1,2,3,4,6
publish config.json model.safetensors tokenizer.json labels.json
