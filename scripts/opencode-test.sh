#!/usr/bin/env bash
# Installs the pinned OpenCode the client tests run on the host (no VM) into a test
# cache, idempotently: `opencode-ai` into CACHE/opencode (its platform binary is
# CACHE/opencode/node_modules/opencode-linux-x64/bin/opencode) and OpenCode's plugin
# package into CACHE/opencode-plugin (the tests pre-seed OpenCode's config dir with it,
# so a start runs no `npm install`). Usage: opencode-test.sh CACHE
set -euo pipefail
cache=${1:?usage: opencode-test.sh CACHE_DIR}
version=1.18.33
# npm on Node 20 silently picks the newest version whose `engines` fit: pin exactly and
# check what was installed.
npm_install() {
  local prefix=$1 pkg=$2
  rm -rf "$prefix"
  mkdir -p "$prefix"
  npm install --prefix "$prefix" --save-exact --no-audit --no-fund --prefer-offline \
    --cache "$cache/npm/cache" "$pkg@$version" >&2
}
bin=$cache/opencode/node_modules/opencode-linux-x64/bin/opencode
if [ "$("$bin" --version 2>/dev/null)" != "$version" ]; then
  npm_install "$cache/opencode" opencode-ai
  got=$("$bin" --version 2>/dev/null || true)
  [ "$got" = "$version" ] || { echo "opencode-ai@$version installed a binary saying '$got'" >&2; exit 1; }
fi
plugin=$cache/opencode-plugin
plugin_version() {
  node -p "require('$plugin/node_modules/@opencode-ai/plugin/package.json').version" 2>/dev/null || true
}
if [ "$(plugin_version)" != "$version" ]; then
  npm_install "$plugin" @opencode-ai/plugin
  [ "$(plugin_version)" = "$version" ] || { echo "@opencode-ai/plugin@$version did not install" >&2; exit 1; }
fi
echo "$bin"
