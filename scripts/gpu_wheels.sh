#!/usr/bin/env bash
# Fetch the server's web stack as wheels for the GPU image into .whl/ (gitignored), the folder a
# lent GPU call carries (`carry: [".whl"]`) and scripts/gpu_check.sh unpacks there.
#
#   bash scripts/gpu_wheels.sh          # once, on this machine (it needs the package index)
#
# The GPU image runs CPython 3.12 on x86-64 manylinux with torch, triton, transformers, httpx,
# anyio, click, h11, idna and prometheus-client, but not fastapi, starlette, pydantic, uvicorn or
# what they need beyond that; nothing can be downloaded there. The pins are the versions this
# project's CI tests with. pydantic pins pydantic-core exactly: they move together.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEST=${DEST:-$REPO/.whl}
PY=${PYTHON:-python3}
PINS=(
    fastapi==0.165.0 starlette==1.10.0 annotated-doc==0.0.7 opentelemetry-api==1.45.2
    pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2
    typing-extensions==4.16.0 uvicorn==0.54.0
    # on the image already: gpu_check.sh installs these only where its versions are missing
    # or outside fastapi's and uvicorn's ranges
    anyio==4.16.0 h11==0.16.0 idna==3.20 click==8.5.1
)
PLATFORMS=()
for n in 17 24 27 28 31 34 35; do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)

mkdir -p "$DEST"
"$PY" -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp "${PLATFORMS[@]}" -d "$DEST" "${PINS[@]}"
# one version of each package: two would stop the install on the GPU machine
dupes=$(cd "$DEST" && ls -1 ./*.whl | sed -E 's|^\./([^-]+)-.*|\1|' | tr 'A-Z-' 'a-z_' | sort |
    uniq -d)
if [[ -n "$dupes" ]]; then
    echo "gpu_wheels: more than one version in $DEST of: $dupes (remove the old ones)" >&2
    exit 1
fi
echo "gpu_wheels: $(ls -1 "$DEST"/*.whl | wc -l) wheels, $(du -sh "$DEST" | cut -f1), in $DEST"
