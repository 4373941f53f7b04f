#!/usr/bin/env bash
# The AR baseline beside the YAN default: GPT-2 "ar-tiny" (4.34M parameters, within 1% of
# yan-tiny), the same tokenizer, KJV corpus, task formats, batch size and step counts as
# scripts/train_default.sh (scripts/train_common.sh holds them): S1 + S2 steps of infill
# pre-training (paper format + fill-in-the-middle), then FT + FILL + ANNEAL steps on the task
# mixture (+ infill-fim): as many fine-tuning steps as YAN's fine-tunes, the learning rate
# decaying to zero over the last DECAY as YAN's does. Then `yan eval` on the same test
# splits. On 2 CPU cores one step takes ~1 s (GPT-2 decodes the target after the source, so each
# sequence is about twice as long as YAN's target): run it on a GPU.
#
# INIT=CHECKPOINT continues a trained AR baseline (FT + FILL + ANNEAL fine-tuning steps, no
# pre-training), as train_default.sh's INIT continues YAN.
#
# AR_CONFIG is the GPT-2 preset; by default the one sized like CONFIG (YAN's preset, as
# train_default.sh reads it; the pairing is yan_serve.config.AR_PAIRS): yan-small -> ar-small
# (17.5M against yan-small's 19.3M at the KJV's 8,192 vocabulary), yan-paper -> ar-gpt2,
# anything else -> ar-tiny. So RECIPE=both with CONFIG=yan-small trains both sides of the
# comparison at the same size.
#
#   DEVICE=cuda PUBLISH=weights/ar-tiny-kjv bash scripts/train_ar.sh
#   S1=10 S2=10 FT=10 FILL=0 DECAY=5 EVAL_LIMIT=8 bash scripts/train_ar.sh  # smoke run
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${AR_CONFIG:-}" ]]; then  # the pairing yan_serve.config.AR_PAIRS holds
    AR_CONFIG=$("${PY:-python3}" -c 'import sys; from yan_serve.config import ar_preset_for
print(ar_preset_for(sys.argv[1]))' "$(basename "${CONFIG:-yan-tiny}" .json)")
fi
OUT="${OUT:-runs/$AR_CONFIG-${CORPUS:-kjv}}"
source scripts/train_common.sh  # sets TOKENIZER: the one scripts/train_default.sh trains YAN on

INIT="${INIT:-}"  # continue this AR checkpoint: no pre-training, a data order not yet drawn
prev=$INIT seed=2
if [[ -z "$INIT" ]]; then
    capped "$(minutes "${S1_MIN:-}" "${S2_MIN:-}")" yan train ar --tokenizer "$(tokenizer)" \
        --config "$AR_CONFIG" --out "$OUT/pretrain" --steps $((S1 + S2)) --lr 1e-3 --warmup 100 \
        --tasks infill,infill-fim "${common[@]}"
    prev=$OUT/pretrain seed=0
fi
capped "$(minutes "${FT_MIN:-}" "${FILL_MIN:-}" "${ANNEAL_MIN:-}")" yan train ar \
    --init "$prev" --out "$OUT/finetune" --steps $((FT + FILL + ANNEAL)) --lr 3e-4 \
    --warmup 50 --decay "$(decay_for $((FT + FILL + ANNEAL)))" \
    --tasks infill,infill-fim,complete,qa,classify --seed "$seed" "${common[@]}"
finish
