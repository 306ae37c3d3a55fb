#!/usr/bin/env bash
# Builds the base image the Dockerfiles name (tern/debian-base:bookworm) without any registry:
# debootstrap a minimal Debian 12 into a folder and `docker import` it. Idempotent: does nothing if
# the image exists (FORCE=1 rebuilds). Needs root, debootstrap and a Debian mirror.
set -euo pipefail
IMAGE=${IMAGE:-tern/debian-base:bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
if [ -z "${FORCE:-}" ] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "base image $IMAGE exists"
  exit 0
fi
command -v debootstrap >/dev/null || { echo "need debootstrap (apt-get install debootstrap)"; exit 1; }
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
# What the server and agent images need at run time; nothing else.
debootstrap --variant=minbase \
  --include=ca-certificates,curl,iproute2,nftables,iputils-ping,procps \
  bookworm "$root" "$MIRROR" >/dev/null
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import -c 'CMD ["/bin/bash"]' - "$IMAGE" >/dev/null
echo "base image $IMAGE built ($(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"
