#!/usr/bin/env bash
# Builds the dashboard (web/ -> web/dist, embedded in the `atelier` binary at compile
# time): `npm ci` from the lock file (the npm registry only; Playwright never
# downloads a browser: the tests use Debian's Chromium), then `vite build`.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v npm >/dev/null || {
  echo "error: npm is required to build the dashboard (web/); install Node.js 20+ with npm (e.g. from NodeSource) and run this again" >&2
  exit 1
}
# Vite, ESLint's TypeScript parser and Playwright need Node.js 20 (Debian 12 ships 18).
node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)' || {
  echo "error: Node.js 20+ is required to build and test the dashboard (web/); found $(node --version); install a newer Node.js (e.g. from NodeSource) and run this again" >&2
  exit 1
}
echo "==> dashboard (npm ci, vite build)"
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm_config_fund=false npm_config_audit=false npm_config_update_notifier=false
# Reinstall only when the lock file changed since the last install.
if [ ! -f web/node_modules/.package-lock.json ] || ! cmp -s web/package-lock.json web/node_modules/.atelier-lock; then
  npm --prefix web ci --no-progress </dev/null
  cp web/package-lock.json web/node_modules/.atelier-lock
fi
npm --prefix web run build </dev/null
