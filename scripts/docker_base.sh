#!/usr/bin/env bash
# A local base image for the Dockerfile's CPU variant, for hosts that reach Debian's archive but no
# image registry: debootstrap a minimal Debian with Python into a folder and `docker import` it.
# An image of that name already there is reused (delete it to rebuild). Prints the image name on
# stdout, progress on stderr, so it composes with a build (docs/deploy.md, "Building without a
# registry"):
#
#   docker build --network host --build-arg VARIANT=cpu \
#       --build-arg CPU_IMAGE="$(bash scripts/docker_base.sh)" -t yan-serve:cpu .
#
#   SUITE=trixie bash scripts/docker_base.sh   # another Debian release (its Python 3.x)
#   MIRROR=http://mirror.example/debian bash scripts/docker_base.sh
#   DOCKER=/usr/bin/docker IMAGE=my/base:tag bash scripts/docker_base.sh
#
# The image holds what the CPU stage expects of python:3.12-slim: python3 with venv, CA
# certificates, bash, and useradd/groupadd. The host's own added CAs (/usr/local/share/
# ca-certificates/*.crt, e.g. that of a TLS-inspecting proxy between the build and PyPI) are added
# to the image's trust store, so pip in the build trusts what pip on the host trusts; HOST_CA=0
# leaves them out. Keep such an image local. Needs root (debootstrap), which apt-get installs here
# when it is missing.
set -euo pipefail

SUITE="${SUITE:-bookworm}"
MIRROR="${MIRROR:-}"  # empty: debootstrap's default Debian mirror
IMAGE="${IMAGE:-yan-base:debian-$SUITE}"
DOCKER="${DOCKER:-docker}"
PACKAGES="python3,python3-venv,ca-certificates"

say() { echo "docker_base: $*" >&2; }

if "$DOCKER" image inspect "$IMAGE" >/dev/null 2>&1; then
    say "$IMAGE is already there (docker image rm $IMAGE to rebuild it)"
    echo "$IMAGE"
    exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
    say "debootstrap needs root"
    exit 1
fi
if ! command -v debootstrap >/dev/null; then
    say "installing debootstrap (apt)"
    apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null
fi

root="$(mktemp -d "${TMPDIR:-/tmp}/yan-base.XXXXXX")"
trap 'rm -rf "$root"' EXIT
chmod 755 "$root"  # becomes the image's /: mktemp's 0700 would lock every non-root user out
start=$(date +%s)
say "debootstrap $SUITE (minbase + $PACKAGES) into $root"
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root" ${MIRROR:+"$MIRROR"} >&2
# what a container base leaves out: downloaded .debs, package lists, logs
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/var/log/*.log
if [[ "${HOST_CA:-1}" != 0 ]] && compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    say "adding the host's CAs: $(cd /usr/local/share/ca-certificates && echo *.crt)"
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
    chroot "$root" update-ca-certificates >&2
fi
python="$(chroot "$root" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')"

say "docker import -> $IMAGE (Python $python)"
tar --numeric-owner -C "$root" -c . | "$DOCKER" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["bash"]' \
    --change "LABEL org.opencontainers.image.description=\"debootstrap $SUITE minbase + python3 $python\"" \
    --message "scripts/docker_base.sh: debootstrap $SUITE minbase + $PACKAGES" \
    - "$IMAGE" >&2
say "done in $(($(date +%s) - start)) s"
echo "$IMAGE"
