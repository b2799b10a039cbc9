#!/usr/bin/env bash
# Runs every test: unit tests and integration tests that boot real VMs (KVM where it
# works, TCG otherwise). Installs host packages, builds the static guest agent and
# the `minimal` and `minimal-opencode` test images (cached in /var/cache/atelier-test;
# rebuilt only when their inputs change), then lint and the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
ATELIER_NEED_NEXTEST=1 ATELIER_NEED_BROWSER=1 bash scripts/deps.sh
# A clean checkout gains nothing from incremental artifacts; they double the disk use.
[ "${CI:-}" = true ] && export CARGO_INCREMENTAL=0
export ATELIER_TEST_CACHE=${ATELIER_TEST_CACHE:-/var/cache/atelier-test}
export ATELIER_TEST_IMAGES_DIR=$ATELIER_TEST_CACHE/images
# The dashboard first: the binary embeds web/dist.
bash scripts/build-web.sh
echo "==> dashboard: lint, types, unit tests (the browser test runs in crates/atelier/tests/dashboard.rs)"
npm --prefix web run lint
npm --prefix web run typecheck
npm --prefix web test
export CHROMIUM_PATH=${CHROMIUM_PATH:-$(command -v chromium || echo /usr/bin/chromium)}
echo "==> lint"
cargo fmt --all -- --check
cargo clippy --locked --workspace --all-targets -- -D warnings
echo "==> static guest agent"
agent=$(bash scripts/build-agent.sh)
echo "==> minimal test image"
cargo build --locked -p atelier
target/debug/atelier --images-dir "$ATELIER_TEST_IMAGES_DIR" image build minimal \
  --agent "$agent" --cache-dir "$ATELIER_TEST_CACHE"
echo "==> minimal-opencode test image (minimal plus OpenCode, for the warm-prebuild test)"
target/debug/atelier --images-dir "$ATELIER_TEST_IMAGES_DIR" image build minimal-opencode \
  --agent "$agent" --cache-dir "$ATELIER_TEST_CACHE"
echo "==> API fuzzer (schemathesis, pinned, in a venv of the test cache)"
venv=$ATELIER_TEST_CACHE/venv
if ! "$venv/bin/st" --version 2>/dev/null | grep -q 4.32.5; then
  rm -rf "$venv"
  python3 -m venv "$venv" 2>/dev/null || { apt-get install -y -q python3-venv && python3 -m venv "$venv"; }
  "$venv/bin/pip" install --quiet "schemathesis==4.32.5"
fi
export ATELIER_SCHEMATHESIS=$venv/bin/st
echo "==> OpenCode for the client tests (pinned, on the host)"
export ATELIER_TEST_OPENCODE=$(bash scripts/opencode-test.sh "$ATELIER_TEST_CACHE")
export ATELIER_TEST_OPENCODE_PLUGIN=$ATELIER_TEST_CACHE/opencode-plugin
echo "==> tests"
cargo nextest run --locked --workspace --no-fail-fast "$@"
