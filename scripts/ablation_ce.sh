#!/usr/bin/env bash
# Stage-2 ablation from the paper: MoE-FM NLL + CE (the default recipe) vs NLL alone, from the
# same stage-1 checkpoint, same steps and seed; infill ROUGE on the KJV test books at T=3.
#   bash scripts/ablation_ce.sh   (after scripts/train_default.sh has written $OUT/stage1)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/yan-tiny-kjv}"
source scripts/train_common.sh
yan train stage2 --init "$OUT/stage1" --out "$OUT/ablation-nll-only" --steps "$S2" --lr 1e-3 \
    --warmup 100 --fm-weight 0.1 --ce-weight 0 "${common[@]}"
while [[ ! -f "$OUT/finetune/config.json" && ! -f "$OUT/stage2-done" ]]; do
    # the main recipe's stage 2 must be finished (it is saved every 500 steps while it runs)
    grep -q "done: stage2" "${MAIN_LOG:-runs/train_default.log}" 2>/dev/null && break
    sleep 15
done
for run in stage2 ablation-nll-only; do
    yan eval "$OUT/$run" --data "$DATA" --tasks infill --steps 3 --json "$OUT/$run-infill.json"
done
