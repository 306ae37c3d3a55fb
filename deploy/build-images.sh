#!/usr/bin/env bash
# Builds tern/server, tern/agent (and with POSTGRES=1 tern/postgres) from binaries compiled on the
# host: `cargo build --release` then a small staged context per image. Needs the base image
# (deploy/build-base.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${TERN_VERSION:-local}
cargo build -q --release --bin tern-server --bin tern
TARGET=${CARGO_TARGET_DIR:-$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')}
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp "$TARGET/release/tern-server" "$TARGET/release/tern" deploy/postgres-entrypoint.sh "$ctx/"
cp deploy/Dockerfile.* "$ctx/"
docker build -q -t "tern/server:$TAG" -f "$ctx/Dockerfile.server" "$ctx" >/dev/null
docker build -q -t "tern/agent:$TAG" -f "$ctx/Dockerfile.agent" "$ctx" >/dev/null
if [ -n "${POSTGRES:-}" ]; then
  docker build -q -t "tern/postgres:$TAG" -f "$ctx/Dockerfile.postgres" "$ctx" >/dev/null
fi
docker images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep '^tern/' 
