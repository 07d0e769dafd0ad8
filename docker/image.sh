#!/usr/bin/env bash
# Builds a container image of a tidemark binary built on this machine, with no base
# image to pull: a root filesystem of the binary, the shared libraries `ldd` names and
# an empty /data and /tmp, turned into an image by `docker import`.
#
#   docker/image.sh [BIN] [TAG]     (defaults: target/release/tidemark, tidemark:local)
set -euo pipefail
BIN="${1:-${CARGO_TARGET_DIR:-target}/release/tidemark}"
TAG="${2:-tidemark:local}"
ROOT="$(mktemp -d)"
trap 'rm -rf "$ROOT"' EXIT
mkdir -p "$ROOT/data" "$ROOT/tmp" "$ROOT/etc"
chmod 1777 "$ROOT/tmp"
cp "$BIN" "$ROOT/tidemark"
# Every library the binary loads, at the path the loader looks for it.
ldd "$BIN" | grep -o '/[^ ]*' | while read -r lib; do
  mkdir -p "$ROOT$(dirname "$lib")"
  cp -L "$lib" "$ROOT$lib"
done
echo "root:x:0:0:root:/:/tidemark" > "$ROOT/etc/passwd"
tar -C "$ROOT" -c . | docker import \
  --change 'ENTRYPOINT ["/tidemark"]' \
  --change 'CMD ["serve", "--data-dir", "/data", "--listen", "0.0.0.0:5433"]' \
  --change 'EXPOSE 5433 7000' \
  - "$TAG" > /dev/null
echo "$TAG"
