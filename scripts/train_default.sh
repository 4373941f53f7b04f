#!/usr/bin/env bash
# Reproduces the shipped default checkpoint weights/yan-tiny-kjv from a clean checkout:
# KJV corpus -> stage 1 (denoising autoencoder) -> stage 2 (MoE-FM NLL + CE) -> multi-task
# fine-tune (infill, last-word completion, bAbI-style QA, KJV section classification) in the
# paper's infill layout (one <mask> per span) -> FILL more fine-tuning steps in the serving
# layout (one <mask> per target position of a span: `--infill-masks per_position`) -> ANNEAL
# steps more, the learning rate taken linearly to zero over their second half (FOCUS_WEIGHT > 1
# weights the CE of the positions a task asks for, infill spans and QA answers, that many times
# the copied ones) -> eval.
#
#   TOKENIZER=weights/yan-tiny-kjv PUBLISH=weights/yan-tiny-kjv bash scripts/train_default.sh  # the shipped run (CPU, ~3.5 h)
#   S1=20 S2=20 FT=20 FILL=20 ANNEAL=20 EVAL_LIMIT=16 bash scripts/train_default.sh # smoke run
#
# Knobs (environment): CONFIG, OUT, and those of scripts/train_common.sh (CORPUS, DATA,
# TOKENIZER, S1, S2, FT, FILL, ANNEAL, FOCUS_WEIGHT, BS, EVAL_LIMIT, DEVICE, PUBLISH); S1_MIN
# S2_MIN FT_MIN FILL_MIN ANNEAL_MIN cap a stage's wall time (minutes); EVAL=0 skips the
# test-split evaluation. FILL=0 stops after the paper-layout fine-tune, ANNEAL=0 after the fill
# stage; FILL_UNFREEZE=1 also trains the encoder, decoder and embeddings in the fill stage.
# INIT=CHECKPOINT continues a trained model instead (a lent GPU's few minutes on top of the
# shipped weights): only the fill and anneal stages run, the first from INIT, each on a data
# order the full recipe never drew.
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG="${CONFIG:-yan-tiny}"  # or yan-mamba-tiny: same data and budget
OUT="${OUT:-runs/$CONFIG-${CORPUS:-kjv}}"
source scripts/train_common.sh

INIT="${INIT:-}"
prev=$INIT seeds=(2 3)  # the fill and anneal stages' data orders when continuing INIT
if [[ -z "$INIT" ]]; then
    capped "${S1_MIN:-}" yan train stage1 --config "$CONFIG" --out "$OUT/stage1" --steps "$S1" \
        --tokenizer "$(tokenizer)" --lr 1e-3 --warmup 100 "${common[@]}"
    capped "${S2_MIN:-}" yan train stage2 --init "$OUT/stage1" --out "$OUT/stage2" \
        --steps "$S2" --lr 1e-3 --warmup 100 --fm-weight 0.1 --ce-weight 1 "${common[@]}"
    capped "${FT_MIN:-}" yan train finetune --init "$OUT/stage2" --out "$OUT/finetune" \
        --steps "$FT" --lr 3e-4 --warmup 50 --fm-weight 0.1 --ce-weight 1 "${common[@]}"
    prev=$OUT/finetune seeds=(0 1)  # every earlier stage drew seed 0's order
    ((FILL > 0)) || ANNEAL=0        # FILL=0: the paper-layout fine-tune is the last stage
elif ((FILL + ANNEAL == 0)); then
    echo "train_default: INIT=$INIT continues with the fill and anneal stages: set FILL or ANNEAL" >&2
    exit 2
fi
if ((FILL > 0)); then
    unfreeze=()
    [[ "${FILL_UNFREEZE:-0}" != 1 ]] || unfreeze=(--unfreeze)
    capped "${FILL_MIN:-}" yan train finetune --init "$prev" --out "$OUT/fill" \
        --steps "$FILL" --lr 3e-4 --warmup 50 --fm-weight 0.1 --ce-weight 1 \
        --infill-masks per_position --seed "${seeds[0]}" "${unfreeze[@]}" "${common[@]}"
    prev=$OUT/fill FINAL=fill
fi
if ((ANNEAL > 0)); then
    capped "${ANNEAL_MIN:-}" yan train finetune --init "$prev" --out "$OUT/anneal" \
        --steps "$ANNEAL" --lr 3e-4 --warmup 50 --decay $((ANNEAL / 2)) --fm-weight 0.1 \
        --ce-weight 1 --focus-weight "$FOCUS_WEIGHT" --infill-masks per_position \
        --seed "${seeds[1]}" "${common[@]}"
    FINAL=anneal
fi
finish --steps 1,2,3,4,6
