# shellcheck shell=bash
# The recipe knobs and steps that train_default.sh (YAN) and train_ar.sh (the AR baseline)
# share, so both models see the same corpus, batch size, step counts and evaluation. Sourced by
# them (and ablation_ce.sh) after they set OUT; every knob is an environment variable.
CORPUS="${CORPUS:-kjv}"  # what `yan data` builds into DATA when it is missing: kjv or english
DATA="${DATA:-data/$CORPUS}"
# Steps per stage. The default: a long stage 1 (the denoiser the flow is conditioned on keeps
# improving to ~12,000 steps), stage 2, then straight to the per-position fill stage. The shipped
# checkpoints before 2026-11-27 ran S1=3000 FT=4200 ANNEAL=4000 (their cards say so).
S1="${S1:-12000}"; S2="${S2:-2500}"
FT="${FT:-0}"  # YAN: multi-task fine-tune in the paper's infill layout (one mask per span)
FILL="${FILL:-6000}"  # fine-tune steps after FT: YAN's per-position infill layout; AR: more FT
ANNEAL="${ANNEAL:-0}"  # then more fill steps on a fresh data order, the LR decaying to 0
DECAY="${DECAY:-2000}"  # the final stage's last DECAY steps (at most all) take the LR to 0
FOCUS_WEIGHT="${FOCUS_WEIGHT:-1}"  # YAN's anneal: CE weight of infill spans and QA answers
# YAN's anneal: its task mixture (`yan train --tasks`; NAME:W gives a task W batches per round)
ANNEAL_TASKS="${ANNEAL_TASKS:-infill,complete,qa,classify}"
FINAL=finetune  # the stage that is evaluated and published (train_default.sh: fill when FILL > 0)
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
# PREFETCH: batches built ahead in a worker process (`yan train --prefetch`; unset: its default,
# 4 on CUDA, 0 on the CPU)
[[ -z "${PREFETCH:-}" ]] || common+=(--prefetch "$PREFETCH")
# COMPILE=1: YAN's stage 2 and fine-tuning losses under torch.compile (`yan train --compile`)
[[ "${COMPILE:-0}" == 0 ]] || common+=(--compile)

[[ -f "$DATA/train.jsonl" ]] || yan data "$CORPUS" --out "$DATA"
# TOKENIZER: the BPE that a from-scratch YAN (stage 1) and AR baseline share, built once per
# corpus and config (`yan data tokenizer`: the training passages and QA stories). The shipped
# checkpoints before 2026-11-27 (the AR and Mamba ones) have a tokenizer trained on the KJV
# passages alone: TOKENIZER=weights/ar-tiny-kjv rebuilds them as they were.
TOKENIZER="${TOKENIZER:-$DATA/tokenizer-$(basename "${CONFIG:-yan-tiny}" .json)}"

# tokenizer: prints TOKENIZER, building it first if it is missing (only runs from scratch ask)
tokenizer() {
    [[ -f "$TOKENIZER/tokenizer.json" ]] ||
        yan data tokenizer --data "$DATA" --config "${CONFIG:-yan-tiny}" --out "$TOKENIZER" >&2
    echo "$TOKENIZER"
}

# evaluate [FLAG...]: `yan eval` the final checkpoint (or EVAL_CKPT) on the test split into
# $OUT/eval.json.
evaluate() {
    yan eval "${EVAL_CKPT:-$OUT/$FINAL}" --data "$DATA" --device "$DEVICE" "$@" \
        ${EVAL_LIMIT:+--limit "$EVAL_LIMIT"} --json "$OUT/eval.json"
}

# decay_for STEPS: DECAY, at most STEPS (a stage of STEPS steps that ends the recipe)
decay_for() { echo $((DECAY < $1 ? DECAY : $1)); }

# capped MINUTES CMD...: CMD with `--max-minutes MINUTES` when MINUTES is set (<STAGE>_MIN)
capped() {
    local minutes=$1
    shift
    if [[ -n "$minutes" ]]; then "$@" --max-minutes "$minutes"; else "$@"; fi
}

# minutes A B [C]: the sum of optional stage caps (empty when none is set)
minutes() {
    [[ -z "${1:-}${2:-}${3:-}" ]] ||
        awk -v a="${1:-0}" -v b="${2:-0}" -v c="${3:-0}" 'BEGIN { print a + b + c }'
}

# finish [EVAL FLAG...]: with PUBLISH set, export the final stage there (weights in bf16: half
# the bytes, loaded as fp32; SERVE_STEPS, when set, the Euler time points it serves with) and
# evaluate those weights, else the final stage itself; EVAL=0 skips the evaluation.
finish() {
    if [[ -n "${PUBLISH:-}" ]]; then
        yan export "$OUT/$FINAL" "$PUBLISH" --dtype bfloat16 ${SERVE_STEPS:+--steps "$SERVE_STEPS"}
        EVAL_CKPT="$PUBLISH"
    fi
    if [[ "${EVAL:-1}" == 1 ]]; then
        evaluate "$@"
        publish eval.json
    fi
}

# publish FILE...: with PUBLISH set, copy these files there: eval.json from $OUT, the others from
# the final checkpoint.
publish() {
    [[ -n "${PUBLISH:-}" ]] || return 0
    mkdir -p "$PUBLISH"
    for f in "$@"; do
        if [[ "$f" == eval.json ]]; then src="$OUT"; else src="$OUT/$FINAL"; fi
        cp "$src/$f" "$PUBLISH/"
    done
    echo "published $OUT/$FINAL to $PUBLISH"
}
