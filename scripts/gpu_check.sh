#!/usr/bin/env bash
# One-shot GPU check for a lent GPU machine: GPU tests, kernel/sampler/scan benchmarks and the
# served smoke/load test, each under its own timeout, results in one dated folder.
#
#   bash scripts/gpu_check.sh                         # every stage, default arguments
#   STAGES="tests smoke" bash scripts/gpu_check.sh    # some stages, in the order given
#   SAMPLER_ARGS="--batches 1,8 --lengths 128" KERNELS_ARGS=--quick bash scripts/gpu_check.sh
#   STAGES="versus loadtest" bash scripts/gpu_check.sh   # YAN vs the fused AR: bench, served
#
# The GPU image has torch/triton/transformers but not the server's web stack nor this package,
# so the wheels carried in .whl/ are unpacked into $SITE and the repository is put on
# PYTHONPATH, with kernels/ reachable as `yan_kernels` through a symlink (no pip install -e).
#
# Results: $OUT/<date>-<gpu>/ (gpu_results/<date>-<gpu>/ in the repository when OUT is unset).
# Only 8 files come back from $OUT, so the folder holds exactly: summary.txt, one log per stage
# (tests, kernels, sampler, scan, smoke by default), results.json (bench JSON + smoke rows and
# load-test rows merged) and extras.tar.gz (each bench's own JSON, the smoke JSON lines, the
# load test's folder, the server logs, the setup log). The extra stages `versus` (bench versus),
# `loadtest` (loadtests/run.py with its built-in client: no Locust) and `train` (bench train:
# training steps per second, YAN vs the AR) are not in the default list: five stages at most
# keep the folder within 8 files.
#
# Environment knobs (defaults in brackets):
#   STAGES ["tests kernels sampler scan smoke"]  DEVICE [cuda]  BUDGET_S [450]: the whole run
#   (stages: tests kernels sampler scan smoke versus loadtest train)
#   <STAGE>_TIMEOUT seconds: TESTS [200] KERNELS [90] SAMPLER [150] SCAN [45] SMOKE [150]
#   VERSUS [240] LOADTEST [300] TRAIN [150]
#   PYTEST_ARGS KERNELS_ARGS SAMPLER_ARGS SCAN_ARGS SMOKE_ARGS VERSUS_ARGS LOADTEST_ARGS
#   TRAIN_ARGS: appended to each command (loadtest: defaults --users 1,4,16,64 --duration 5,
#   every endpoint)
#   TEST_PATHS ["tests/kernels tests/engine tests/ar tests/train tests/test_gpu_train.py"]: what
#   the tests stage collects, in order (the last: the training call of a lease, a few steps on
#   CUDA)
#   TEST_MARK [gpu]: the tests stage's -m expression (one word: word splitting applies)
#   TEST_TIMEOUT_EACH [90]: seconds per test when pytest-timeout is installed
#   TEST_WORKERS [auto]: pytest-xdist processes for the tests stage (auto: 4 when xdist is
#   installed, as on the GPU image, else 1 = no xdist)
#   PYTEST_MAXFAIL [3]: failures (import errors included) before pytest stops; 1 acts as -x
#   INSTALL [auto]: 1 always install .whl/, 0 never, auto when fastapi/uvicorn/pydantic are
#   missing; SITE [/tmp/yan-site]: where the wheels go; COMMIT: shown when git is unavailable
set -u

START=$(date +%s)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 1

STAGES=${STAGES:-"tests kernels sampler scan smoke"}
DEVICE=${DEVICE:-cuda}
BUDGET_S=${BUDGET_S:-450}
TESTS_TIMEOUT=${TESTS_TIMEOUT:-200}
KERNELS_TIMEOUT=${KERNELS_TIMEOUT:-90}
SAMPLER_TIMEOUT=${SAMPLER_TIMEOUT:-150}
SCAN_TIMEOUT=${SCAN_TIMEOUT:-45}
SMOKE_TIMEOUT=${SMOKE_TIMEOUT:-150}
VERSUS_TIMEOUT=${VERSUS_TIMEOUT:-240}
LOADTEST_TIMEOUT=${LOADTEST_TIMEOUT:-300}
TRAIN_TIMEOUT=${TRAIN_TIMEOUT:-150}
INSTALL=${INSTALL:-auto}
SITE=${SITE:-/tmp/yan-site}
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

for s in $STAGES; do
    case $s in
        tests | kernels | sampler | scan | smoke | versus | loadtest | train) ;;
        *) echo "gpu_check: unknown stage '$s' (tests kernels sampler scan smoke versus loadtest train)" >&2; exit 2 ;;
    esac
done

# ------------------------------------------------------------------------ results folder
gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
slug=$(printf '%s' "${gpu_name:-$DEVICE}" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' \
    | sed 's/^-*//; s/-*$//')
RESULTS=${OUT:-$REPO/gpu_results}/$(date +%Y-%m-%d)-${slug:-unknown}
mkdir -p "$RESULTS"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/yan-gpu-check.XXXXXX")
SETUP=$WORK/setup.log
: >"$SETUP"

# --------------------------------------------------------------------------------- setup
{
    echo "== install ($INSTALL)"
    need=0
    case $INSTALL in
        1) need=1 ;;
        0) need=0 ;;
        *) "$PY" -c "import fastapi, uvicorn, pydantic" 2>/dev/null || need=1 ;;
    esac
    if [ "$need" = 1 ]; then
        if ! ls .whl/*.whl >/dev/null 2>&1; then
            echo "no wheels in .whl/: run scripts/gpu_wheels.sh where the index is reachable, and carry .whl"
        else
            rm -rf "$SITE" && mkdir -p "$SITE"
            # Dependencies the image may already have at a working version (httpx and the
            # image's own tools rely on them) are only installed when missing or too old;
            # the web stack itself is always installed.
            wheels=$("$PY" - .whl <<'EOF'
import importlib.metadata as md
import re
import sys
from pathlib import Path

IF_MISSING = {"anyio": ((4, 1), (5,)), "h11": ((0, 8), (1,)), "idna": ((2, 8), (4,)),
              "click": ((7, 0), (9,))}


def ver(text):
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


for whl in sorted(Path(sys.argv[1]).glob("*.whl")):
    dist = whl.name.split("-")[0].lower().replace("_", "-")
    if dist in IF_MISSING:
        lo, hi = IF_MISSING[dist]
        try:
            have = md.version(dist)
        except md.PackageNotFoundError:
            have = None
        if have and lo <= ver(have) < hi:
            print(f"keep the image's {dist} {have}", file=sys.stderr)
            continue
    print(whl)
EOF
            )
            # shellcheck disable=SC2086  # one wheel path per word
            if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
                --disable-pip-version-check --root-user-action=ignore \
                --target "$SITE" $wheels; then
                echo "pip failed: unpacking the wheels directly"
                for w in $wheels; do "$PY" -m zipfile -e "$w" "$SITE"; done
            fi
        fi
    else
        echo "the web stack imports already: nothing installed"
    fi
    mkdir -p "$WORK/pp"
    ln -sfn "$REPO/kernels" "$WORK/pp/yan_kernels"
} >>"$SETUP" 2>&1
if [ "$need" = 1 ]; then
    export PYTHONPATH="$SITE:$WORK/pp:$REPO${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$WORK/pp:$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi

COMMIT_ID=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo "${COMMIT:-unknown}")
{
    echo "== environment"
    echo "date:    $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "commit:  $COMMIT_ID"
    echo "host:    $(hostname) ($(nproc) cores)"
    echo "results: $RESULTS"
    echo "stages:  $STAGES (budget ${BUDGET_S} s)"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi -L
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    else
        echo "nvidia-smi: not available"
    fi
    "$PY" - <<'EOF'
import importlib
import importlib.metadata as md
import platform

print(f"python:  {platform.python_version()}")
for name in ("torch", "triton", "transformers", "fastapi", "starlette", "pydantic", "uvicorn",
             "anyio", "yan_kernels", "yan_serve"):
    try:
        m = importlib.import_module(name)
    except Exception as e:  # report and go on: the stages will show what breaks
        print(f"{name:<13} IMPORT FAILED: {type(e).__name__}: {e}")
        continue
    try:
        version = getattr(m, "__version__", None) or md.version(name)
    except md.PackageNotFoundError:
        version = "-"
    print(f"{name:<13} {version:<14} {getattr(m, '__file__', '') or ''}")
import torch

if torch.cuda.is_available():
    print(f"cuda:    {torch.version.cuda}, {torch.cuda.get_device_name(0)}, "
          f"capability {torch.cuda.get_device_capability(0)}")
else:
    print("cuda:    not available")
EOF
} >>"$SETUP" 2>&1
cat "$SETUP"

# -------------------------------------------------------------------------------- stages
declare -A RC SECS NOTE LOGS
timed_out=()
order=()

run_stage() {  # name timeout command...
    local name=$1 limit=$2
    shift 2
    local elapsed=$(($(date +%s) - START))
    local left=$((BUDGET_S - elapsed - 20)) # keep time to write the summary
    local log=$RESULTS/$name.log
    order+=("$name")
    LOGS[$name]=$log
    if [ "$left" -lt 15 ]; then
        RC[$name]=-
        SECS[$name]=0
        NOTE[$name]="skipped: budget spent"
        echo "skipped: ${elapsed} s of the ${BUDGET_S} s budget spent" >"$log"
        echo "== $name: skipped (budget)"
        return
    fi
    if [ "$left" -lt "$limit" ]; then
        NOTE[$name]="timeout cut to ${left} s by the budget"
        limit=$left
    fi
    echo "== $name (timeout ${limit} s): $*"
    {
        echo "\$ $*"
        echo "# timeout ${limit} s, started $(date -u '+%H:%M:%S UTC')"
    } >"$log"
    local t0 rc ms
    t0=$(date +%s%N)
    timeout -k 10 "$limit" "$@" >>"$log" 2>&1
    rc=$?
    ms=$((($(date +%s%N) - t0) / 1000000))
    SECS[$name]=$((ms / 1000)).$(((ms % 1000) / 100))
    RC[$name]=$rc
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        timed_out+=("$name")
        NOTE[$name]="TIMED OUT after ${limit} s${NOTE[$name]:+; ${NOTE[$name]}}"
        echo "# TIMED OUT after ${limit} s" >>"$log"
    fi
    echo "   rc $rc in ${SECS[$name]} s"
}

# Word splitting of *_ARGS is wanted: each is a list of flags.
# shellcheck disable=SC2086
for stage in $STAGES; do
    case $stage in
        tests)
            # Not -x: a one-shot run should show a few failures, and with -x a single module
            # that fails to import stops the session before any test runs. A per-test limit
            # (pytest-timeout, on the GPU image) turns a stuck test into a failure with a trace.
            per_test=()
            "$PY" -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout "${TEST_TIMEOUT_EACH:-90}")
            # Most of a GPU test's time is Triton compiling on the CPU: with pytest-xdist (on the
            # GPU image) TEST_WORKERS processes share the 16 cores and Triton's on-disk cache. One
            # test file stays in one worker (--dist loadfile), so a file's big-memory shapes
            # never run side by side.
            workers=()
            tw=${TEST_WORKERS:-auto}
            if [ "$tw" = auto ]; then
                tw=1
                "$PY" -c "import xdist" 2>/dev/null && tw=4
            fi
            [ "$tw" -gt 1 ] && workers=(-n "$tw" --dist loadfile)
            run_stage tests "$TESTS_TIMEOUT" "$PY" -m pytest -q -m "${TEST_MARK:-gpu}" \
                -p no:cacheprovider --maxfail="${PYTEST_MAXFAIL:-3}" \
                --continue-on-collection-errors -rfE "${per_test[@]}" "${workers[@]}" \
                ${TEST_PATHS:-tests/kernels tests/engine tests/ar tests/train tests/test_gpu_train.py} ${PYTEST_ARGS:-}
            ;;
        kernels)
            run_stage kernels "$KERNELS_TIMEOUT" "$PY" -m yan_serve.bench kernels \
                --device "$DEVICE" --json "$WORK/kernels.json" ${KERNELS_ARGS:-}
            ;;
        sampler)
            run_stage sampler "$SAMPLER_TIMEOUT" "$PY" -m yan_serve.bench sampler \
                --device "$DEVICE" --json "$WORK/sampler.json" ${SAMPLER_ARGS:-}
            ;;
        scan)
            run_stage scan "$SCAN_TIMEOUT" "$PY" -m yan_serve.bench scan \
                --device "$DEVICE" --json "$WORK/scan.json" ${SCAN_ARGS:-}
            ;;
        smoke)
            # The smoke client gets a budget under the stage timeout, so it stops its servers
            # and prints its table itself instead of being killed mid-burst.
            smoke_limit=$SMOKE_TIMEOUT
            left=$((BUDGET_S - ($(date +%s) - START) - 20))
            [ "$left" -lt "$smoke_limit" ] && smoke_limit=$left
            run_stage smoke "$smoke_limit" "$PY" scripts/gpu_smoke.py --device "$DEVICE" \
                --out "$WORK/smoke.jsonl" --log-dir "$WORK" --budget $((smoke_limit - 12)) \
                ${SMOKE_ARGS:-}
            ;;
        train)
            run_stage train "$TRAIN_TIMEOUT" "$PY" -m yan_serve.bench train \
                --device "$DEVICE" --json "$WORK/train.json" ${TRAIN_ARGS:-}
            ;;
        versus)
            run_stage versus "$VERSUS_TIMEOUT" "$PY" -m yan_serve.bench versus \
                --device "$DEVICE" --json "$WORK/versus.json" ${VERSUS_ARGS:-}
            ;;
        loadtest)
            # Both servers on the device, one at a time; the built-in client needs no Locust,
            # and the shipped payload file no KJV corpus on the image. Table in the log, the
            # whole results folder (table, plot, raw latencies) in extras.tar.gz.
            run_stage loadtest "$LOADTEST_TIMEOUT" "$PY" loadtests/run.py --device "$DEVICE" \
                --client builtin --payload-file loadtests/payloads-kjv-test.json \
                --out "$WORK/loadtest" --users 1,4,16,64 --duration 5 ${LOADTEST_ARGS:-}
            ;;
    esac
done

# ------------------------------------------------------------------------------- summary
"$PY" - "$WORK" "$RESULTS/results.json" "$COMMIT_ID" "${gpu_name:-$DEVICE}" <<'EOF' \
    >>"$SETUP" 2>&1
import json
import sys
from pathlib import Path

work, out, commit, gpu = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
merged = {"commit": commit, "gpu": gpu}
for name in ("kernels", "sampler", "scan", "versus", "train"):
    p = work / f"{name}.json"
    try:
        merged[name] = json.loads(p.read_text()) if p.exists() else None
    except ValueError as e:
        merged[name] = {"error": f"unreadable {p.name}: {e}"}
p = work / "smoke.jsonl"
merged["smoke"] = [json.loads(x) for x in p.read_text().splitlines() if x.strip()] \
    if p.exists() else None
p = work / "loadtest" / "results.json"
merged["loadtest"] = json.loads(p.read_text()) if p.exists() else None
out.write_text(json.dumps(merged, indent=1))
EOF

total=$(($(date +%s) - START))
{
    echo "yan-serve GPU check: commit $COMMIT_ID, ${gpu_name:-no GPU ($DEVICE)}, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "total ${total} s of a ${BUDGET_S} s budget"
    echo
    printf '%-9s %6s %9s  %s\n' stage rc seconds note
    for s in "${order[@]}"; do
        printf '%-9s %6s %9s  %s\n' "$s" "${RC[$s]}" "${SECS[$s]}" "${NOTE[$s]:-}"
    done
    if [ "${#timed_out[@]}" -gt 0 ]; then
        echo "timed out: ${timed_out[*]}"
    else
        echo "timed out: none"
    fi
    echo
    cat "$SETUP"
    for s in "${order[@]}"; do
        echo
        echo "================================================================ $s (tail)"
        case $s in
            smoke | loadtest) tail -n 45 "${LOGS[$s]}" ;;
            tests) tail -n 30 "${LOGS[$s]}" ;;
            *) tail -n 40 "${LOGS[$s]}" ;;
        esac
    done
} >"$RESULTS/summary.txt"

tar -czf "$RESULTS/extras.tar.gz" -C "$WORK" --exclude=pp . 2>/dev/null
rm -rf "$WORK"

n=$(find "$RESULTS" -type f | wc -l)
echo
echo "== $n files in $RESULTS (8 come back)"
ls -la "$RESULTS"
[ "$n" -gt 8 ] && echo "WARNING: more than 8 files in $RESULTS: some will not come back"
head -n 12 "$RESULTS/summary.txt"

fail=0
for s in "${order[@]}"; do
    [ "${RC[$s]}" = 0 ] || fail=1
done
exit $fail
