#!/usr/bin/env bash
# The one install path shared by CI (.ci/run), users (README) and the Dockerfile:
# pin torch first (an unpinned torch can resolve to a build that drags in GBs of CUDA wheels),
# then install the package with the requested extras.
#
#   bash scripts/install.sh            # torch + yan-serve[dev] (tests, lint)
#   EXTRAS=test bash scripts/install.sh
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/install.sh   # CPU wheels
#   EXTRAS= bash scripts/install.sh    # set but empty: the package alone, no extras (the Dockerfile)
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
EXTRAS="${EXTRAS-dev}"  # unset: dev; set but empty: no extras

pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

# The tests build a corpus from the King James Bible (Debian's bible-kjv): install it when the
# test extras are wanted and apt is usable (root or sudo); otherwise say how.
if [[ "$EXTRAS" == *dev* || "$EXTRAS" == *test* ]] && ! command -v bible >/dev/null; then
    SUDO=""; [[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null && SUDO="sudo"
    if command -v apt-get >/dev/null && { [[ $(id -u) -eq 0 ]] || [[ -n "$SUDO" ]]; }; then
        echo "installing bible-kjv (apt) for the corpus tests"
        $SUDO apt-get update -qq && $SUDO apt-get install -y -qq bible-kjv >/dev/null
    else
        echo "note: install Debian's bible-kjv for the KJV corpus tests (apt-get install bible-kjv)"
    fi
fi

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null; then
    echo "installing torch==$TORCH_VERSION"
    if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
        pip_install "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX_URL" --extra-index-url https://pypi.org/simple
    else
        pip_install "torch==$TORCH_VERSION"
    fi
fi
echo "installing yan-serve${EXTRAS:+[$EXTRAS]}"
if [[ -n "$EXTRAS" ]]; then
    pip_install -e ".[$EXTRAS]"
else
    pip_install -e .  # pip rejects an empty extras list ".[]"
fi
# The compile guard also compiles every kernel with the GPU image's Triton (older than the CPU's):
# that version alone, no dependencies, in a folder of its own that nothing imports by default.
if [[ "$EXTRAS" == *dev* || "$EXTRAS" == *test* ]]; then
    GPU_TRITON=$("$PY" -c "from yan_kernels.aot import GPU_IMAGE_TRITON; print(GPU_IMAGE_TRITON)")
    if [[ -z "$GPU_TRITON" ]]; then
        echo "note: no GPU_IMAGE_TRITON from yan_kernels.aot: the compile guard's second Triton is not installed"
    elif [[ ! -f ".cache/triton-$GPU_TRITON/triton/__init__.py" ]]; then
        echo "installing triton==$GPU_TRITON into .cache/triton-$GPU_TRITON (the compile guard's GPU Triton)"
        rm -rf ".cache/triton-$GPU_TRITON"
        pip_install --no-deps --target ".cache/triton-$GPU_TRITON" "triton==$GPU_TRITON"
    fi
fi
"$PY" -c "import torch, yan_serve; print(f'yan-serve {yan_serve.__version__} on torch {torch.__version__}')"
