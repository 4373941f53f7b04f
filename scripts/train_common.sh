# shellcheck shell=bash
# The recipe knobs and steps that train_default.sh (YAN) and train_ar.sh (the AR baseline)
# share, so both models see the same corpus, batch size, step counts and evaluation. Sourced by
# them (and ablation_ce.sh) after they set OUT; every knob is an environment variable.
CORPUS="${CORPUS:-kjv}"  # what `yan data` builds into DATA when it is missing: kjv or english
DATA="${DATA:-data/$CORPUS}"
S1="${S1:-3000}"; S2="${S2:-2500}"; FT="${FT:-4200}"
BS="${BS:-16}"
EVAL_LIMIT="${EVAL_LIMIT:-}"
DEVICE="${DEVICE:-auto}"
# One intra-op thread: on a 2-core machine shared with anything else, torch's default of two
# OpenMP threads thrashes (7.6 s/step vs 0.6 s/step measured for stage 1). Raise it on an idle
# many-core host.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# --resume: a stage saved in its --out continues from its last checkpoint (weights, optimizer,
# RNG and batch-stream position), so an interrupted run is re-started by running the script
# again.
# shellcheck disable=SC2034  # used by the scripts that source this one
common=(--data "$DATA" --batch-size "$BS" --device "$DEVICE" --eval-every 250 --save-every 500
        --resume)

[[ -f "$DATA/train.jsonl" ]] || yan data "$CORPUS" --out "$DATA"

# evaluate [FLAG...]: `yan eval` the fine-tuned checkpoint on the test split into $OUT/eval.json.
evaluate() {
    yan eval "$OUT/finetune" --data "$DATA" --device "$DEVICE" "$@" \
        ${EVAL_LIMIT:+--limit "$EVAL_LIMIT"} --json "$OUT/eval.json"
}

# publish FILE...: with PUBLISH set, copy these files of the fine-tuned checkpoint and
# eval.json there.
publish() {
    [[ -n "${PUBLISH:-}" ]] || return 0
    mkdir -p "$PUBLISH"
    for f in "$@"; do
        cp "$OUT/finetune/$f" "$PUBLISH/"
    done
    cp "$OUT/eval.json" "$PUBLISH/"
    echo "published $OUT/finetune to $PUBLISH"
}
