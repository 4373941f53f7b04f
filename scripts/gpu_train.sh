#!/usr/bin/env bash
# Train the default recipe (scripts/train_default.sh, or the AR baseline's: RECIPE=train_ar) on a
# lent GPU within one call, and bring the weights back; then unpack them here and evaluate on the
# CPU.
#
#   on the GPU machine (device `run`, carry ["data/kjv"], timeout_s ~590):
#       MINUTES=7 CONFIG=yan-tiny bash scripts/gpu_train.sh
#   here, with the folder the call's files came back in:
#       bash scripts/gpu_train.sh --unpack FILES_AT/gpu-train weights/NEW_NAME
#       yan eval weights/NEW_NAME --data data/kjv --steps 1,2,3,4,6 --json weights/NEW_NAME/eval.json
#
# The GPU image has torch, transformers, tokenizers and safetensors but not this package: the
# repository goes on PYTHONPATH and `yan` runs as `python3 -m yan_serve.cli`. It has no `bible`
# program either, so the corpus is carried in (`yan data kjv --out data/kjv` here first; 6 MB).
# Every stage runs until its step count or its share of MINUTES, whichever comes first (a
# constant learning rate after warm-up, so a stage may end at any step; the anneal stage decays
# its learning rate over the second half of whichever of its steps and minutes runs out first);
# the trainer logs say how many steps each made. Nothing is evaluated there.
#
# What comes back, in $OUT/gpu-train/ (8 files at most, 16 MiB each): config.json,
# tokenizer.json, labels.json (AR: also generation_config.json), the bf16 weights cut into 15 MiB
# parts
# (model.safetensors.part-aa, -ab, ...), and train.tar.gz (each stage's training_log.jsonl and
# trainer_state.json, and the run's output). The optimizer state stays behind (too large to
# carry back): to continue, start a stage from the returned weights with --init.
#
# RECIPE=both trains the YAN default and the AR baseline at once, as two processes on the one GPU
# (at these sizes each step is launch-bound), each with the whole of MINUTES: one call gives both
# sides of the quality comparison, the AR sized like CONFIG (train_ar.sh: yan-small -> ar-small).
# On an H200 (2026-11-27, batch 64, yan-tiny) YAN made ~6 steps/s and the AR ~25 sharing the GPU.
# YAN's step dispatches ~1,900 kernel-launching operators to the AR's ~350 and then also waited
# for the host ~15 times a step (counted on the CPU; those waits are gone since).
# `python -m yan_serve.bench train` measures both steps alone. What comes
# back then is each run's folder above packed as yan.tar / ar.tar and cut into 15 MiB parts
# (yan.tar.part-aa, ...), plus both.out (the two runs' output); unpack with
#       bash scripts/gpu_train.sh --unpack FILES_AT/gpu-train weights/YAN_NAME weights/AR_NAME
#
# Knobs (defaults in brackets): RECIPE [train_default], train_ar or both; CONFIG [yan-tiny]
# (YAN); BS [64];
# MINUTES [7]; SPLIT ["20 30 20 15 15"]: the percent of MINUTES for stage 1, stage 2, fine-tune,
# fill and anneal (the AR recipe: pre-training = the first two, fine-tuning = the last three);
# S1 S2 FT FILL ANNEAL [100000 each]: step caps; DECAY [ANNEAL / 2]: the last stage's decay
# steps (a share of its step cap when its minutes end it first); FOCUS_WEIGHT [1]; ANNEAL_TASKS
# [infill,complete,qa,classify]; DATA [data/kjv];
# PYTHON [python3]; INIT (RECIPE=both: and AR_INIT) [unset]: continue a trained checkpoint, e.g.
# the shipped weights/yan-tiny-kjv (and weights/ar-tiny-kjv), instead of training from scratch;
# COMPILE [0]: 1 puts YAN's stage-2 and fine-tuning losses under torch.compile; PREFETCH [4 on
# CUDA]: batches built ahead in a worker process.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

if [[ "${1:-}" == --unpack ]]; then
    src=${2:?usage: gpu_train.sh --unpack FOLDER CHECKPOINT_DIR [AR_CHECKPOINT_DIR]}
    dst=${3:?usage: gpu_train.sh --unpack FOLDER CHECKPOINT_DIR [AR_CHECKPOINT_DIR]}
    if [[ -f "$src/yan.tar.part-aa" ]]; then  # RECIPE=both: two packed runs
        ar_dst=${4:?gpu_train: $src holds two runs (RECIPE=both): name a second, AR, checkpoint dir}
        [[ -f "$src/ar.tar.part-aa" ]] || { echo "gpu_train: no ar.tar.part-aa in $src" >&2; exit 2; }
        tmp=$(mktemp -d "${TMPDIR:-/tmp}/yan-gpu-unpack.XXXXXX")
        trap 'rm -rf "$tmp"' EXIT
        for run in yan ar; do
            mkdir -p "$tmp/$run"
            cat "$src/$run".tar.part-* | tar -x -C "$tmp/$run"
        done
        bash "$REPO/scripts/gpu_train.sh" --unpack "$tmp/yan" "$dst"
        bash "$REPO/scripts/gpu_train.sh" --unpack "$tmp/ar" "$ar_dst"
        [[ ! -f "$src/both.out" ]] || cp "$src/both.out" "$dst/"
        exit 0
    fi
    # Everything is checked before anything in $dst is touched, and the weights are assembled
    # into a temporary file that replaces $dst/model.safetensors only once it is whole.
    for f in config.json tokenizer.json; do
        [[ -f "$src/$f" ]] || { echo "gpu_train: no $f in $src" >&2; exit 2; }
    done
    parts=("$src"/model.safetensors.part-*)
    [[ -f "${parts[0]}" ]] || {
        echo "gpu_train: no model.safetensors.part-* in $src (nothing to unpack)" >&2
        exit 2
    }
    mkdir -p "$dst"
    part_tmp=$(mktemp "$dst/.model.safetensors.XXXXXX")
    trap 'rm -f "$part_tmp"' EXIT
    cat "${parts[@]}" >"$part_tmp"
    chmod "$(printf '%o' $((0666 & ~$(umask))))" "$part_tmp"  # mktemp made it 0600
    cp "$src/config.json" "$src/tokenizer.json" "$dst/"
    for f in labels.json generation_config.json; do
        [[ ! -f "$src/$f" ]] || cp "$src/$f" "$dst/"
    done
    mv -f "$part_tmp" "$dst/model.safetensors"
    [[ ! -f "$src/train.tar.gz" ]] || tar -xzf "$src/train.tar.gz" -C "$dst"
    echo "unpacked $src to $dst ($(du -h "$dst/model.safetensors" | cut -f1) of weights)"
    exit 0
fi

cd "$REPO"
RESULTS=${OUT:?gpu_train: set OUT (the device machine sets it)}/gpu-train
WORK=$(mktemp -d "${TMPDIR:-/tmp}/yan-gpu-train.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 DEVICE=${DEVICE:-cuda} CONFIG=${CONFIG:-yan-tiny} BS=${BS:-64}
export DATA=${DATA:-data/kjv} EVAL=0 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export S1=${S1:-100000} S2=${S2:-100000} FT=${FT:-100000} FILL=${FILL:-100000}
export ANNEAL=${ANNEAL:-100000}
export DECAY=${DECAY:-$((ANNEAL / 2))}
MINUTES=${MINUTES:-7}
RECIPE=${RECIPE:-train_default}
case $RECIPE in
    train_default | train_ar | both) ;;
    *) echo "gpu_train: RECIPE must be train_default, train_ar or both, got '$RECIPE'" >&2; exit 2 ;;
esac
# INIT / AR_INIT: continue these checkpoints (the recipes' INIT: only the fine-tuning stages run,
# so MINUTES goes to them: SPLIT defaults to "0 0 0 50 50"). RECIPE=both takes both or neither.
INIT=${INIT:-} AR_INIT=${AR_INIT:-}
if [[ $RECIPE == both && -n "$INIT$AR_INIT" && (-z "$INIT" || -z "$AR_INIT") ]]; then
    echo "gpu_train: RECIPE=both continues both models or neither: set INIT and AR_INIT" >&2
    exit 2
fi
[[ $RECIPE != train_ar || -n "$INIT" ]] || INIT=$AR_INIT  # alone, the AR takes either name
export INIT
split="20 30 20 15 15"
[[ -z "$INIT$AR_INIT" ]] || split="0 0 0 50 50"
read -r p1 p2 p3 p4 p5 <<<"${SPLIT:-$split}"
share() { awk -v m="$MINUTES" -v p="${1:-0}" 'BEGIN { printf "%.2f", m * p / 100 }'; }
S1_MIN=$(share "$p1") S2_MIN=$(share "$p2") FT_MIN=$(share "$p3") FILL_MIN=$(share "$p4")
ANNEAL_MIN=$(share "$p5")
export S1_MIN S2_MIN FT_MIN FILL_MIN ANNEAL_MIN

[[ -f "$DATA/train.jsonl" ]] || {
    echo "gpu_train: no $DATA/train.jsonl: build it here (yan data kjv --out $DATA) and carry it" >&2
    exit 2
}
mkdir -p "$WORK/pp" "$RESULTS"
ln -sfn "$REPO/kernels" "$WORK/pp/yan_kernels"
export PYTHONPATH="$WORK/pp:$REPO${PYTHONPATH:+:$PYTHONPATH}"
# shellcheck disable=SC2317  # called by train_default.sh, which inherits the exported function
yan() { "$PY" -m yan_serve.cli "$@"; }
export -f yan
export PY

if [[ $RECIPE == both ]]; then
    # Each run is this script with its own OUT; both start together and share the GPU. From
    # scratch they share one tokenizer, built here first so that neither run races to build it.
    export TOKENIZER=${TOKENIZER:-$WORK/tokenizer}
    if [[ -z "$INIT" && ! -f "$TOKENIZER/tokenizer.json" ]]; then
        yan data tokenizer --data "$DATA" --config "$CONFIG" --out "$TOKENIZER"
    fi
    pids=()
    for run in yan ar; do
        recipe=train_default
        [[ $run == yan ]] || recipe=train_ar
        mkdir -p "$WORK/$run"
        init=$INIT
        [[ $run == yan ]] || init=$AR_INIT
        OUT="$WORK/$run" RECIPE=$recipe INIT=$init AR_INIT='' SPLIT="$p1 $p2 $p3 $p4 $p5" \
            bash "$REPO/scripts/gpu_train.sh" >"$WORK/$run.out" 2>&1 &
        pids+=($!)
    done
    status=0
    for i in 0 1; do wait "${pids[$i]}" || status=$?; done
    for run in yan ar; do
        echo "=== $run ===" >>"$RESULTS/both.out"
        cat "$WORK/$run.out" >>"$RESULTS/both.out"
        tail -n 25 "$WORK/$run.out" | sed "s/^/[$run] /"
        # a run that failed still returns its train.tar.gz (the full log); only one with
        # config.json has weights to unpack
        if [[ -n "$(ls -A "$WORK/$run/gpu-train" 2>/dev/null)" ]]; then
            tar -C "$WORK/$run/gpu-train" -cf - . | split -b 15m - "$RESULTS/$run.tar.part-"
        fi
    done
    ls -la "$RESULTS"
    exit "$status"
fi

echo "gpu_train: $RECIPE, $CONFIG, batch $BS, $MINUTES min" \
    "($S1_MIN/$S2_MIN/$FT_MIN/$FILL_MIN/$ANNEAL_MIN) on" \
    "$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || echo "$DEVICE")"
status=0
OUT="$WORK/run" PUBLISH="$WORK/ckpt" bash "scripts/$RECIPE.sh" >"$WORK/train.out" 2>&1 || status=$?
# every stage's summary line (none when the first stage failed: the tail and train.tar.gz below
# still carry the error back)
grep -E '^(done|[a-z0-9]+: time limit)' "$WORK/train.out" || true
tail -n 20 "$WORK/train.out"

if [[ -f "$WORK/ckpt/model.safetensors" ]]; then
    cp "$WORK/ckpt/config.json" "$WORK/ckpt/tokenizer.json" "$RESULTS/"
    for f in labels.json generation_config.json; do
        [[ ! -f "$WORK/ckpt/$f" ]] || cp "$WORK/ckpt/$f" "$RESULTS/"
    done
    split -b 15m "$WORK/ckpt/model.safetensors" "$RESULTS/model.safetensors.part-"
fi
(
    cd "$WORK"
    logs=(train.out)
    for stage in stage1 stage2 finetune fill anneal pretrain; do
        for f in training_log.jsonl trainer_state.json; do
            [[ ! -f "run/$stage/$f" ]] || { mkdir -p "logs/$stage" && cp "run/$stage/$f" "logs/$stage/"; }
        done
    done
    [[ ! -d logs ]] || logs+=(logs)
    tar -czf "$RESULTS/train.tar.gz" "${logs[@]}"
)
ls -la "$RESULTS"
exit "$status"
