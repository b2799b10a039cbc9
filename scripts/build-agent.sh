#!/usr/bin/env bash
# Builds the static guest agent (gnu target with crt-static; no musl toolchain needed)
# and prints its path. The separate --target keeps these flags off host binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${ATELIER_AGENT_PROFILE:-release}
RUSTFLAGS="-C target-feature=+crt-static" cargo build --quiet --locked \
  --profile "$profile" --target x86_64-unknown-linux-gnu -p atelier-agent
out="target/x86_64-unknown-linux-gnu/$profile/atelier-agent"
if ldd "$out" 2>&1 | grep -q '=>'; then
  echo "error: $out is dynamically linked" >&2
  exit 1
fi
echo "$PWD/$out"
