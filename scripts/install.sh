#!/usr/bin/env bash
# Installs Atelier on a fresh Debian 12 host and runs the manager in the foreground:
# host packages, the `atelier` and `atelier-bench` binaries, the static guest agent, Swagger UI, the
# default `minimal` image; then `atelier serve` (embedded SQLite in /var/lib/atelier).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
echo "==> building atelier and atelier-bench (release)"
cargo build --release --locked -p atelier -p atelier-bench
agent=$(bash scripts/build-agent.sh)
install -D -m 0755 target/release/atelier /usr/local/bin/atelier
# `atelier bench` runs the benchmarks binary found beside `atelier`.
install -D -m 0755 target/release/atelier-bench /usr/local/bin/atelier-bench
install -D -m 0755 "$agent" /usr/local/lib/atelier/atelier-agent
if command -v npm >/dev/null && [ ! -f /usr/local/share/atelier/swagger-ui/swagger-ui-bundle.js ]; then
  echo "==> installing Swagger UI (npm swagger-ui-dist)"
  tmp=$(mktemp -d)
  (cd "$tmp" && npm_config_yes=true npm install --no-audit --no-fund --silent swagger-ui-dist@5 >/dev/null) \
    && install -d /usr/local/share/atelier/swagger-ui \
    && cp "$tmp"/node_modules/swagger-ui-dist/{swagger-ui.css,swagger-ui-bundle.js} /usr/local/share/atelier/swagger-ui/ \
    || echo "warning: Swagger UI not installed; /api/openapi.json still works" >&2
  rm -rf "$tmp"
fi
echo "==> building the default image (cached after the first time)"
/usr/local/bin/atelier image build minimal --agent /usr/local/lib/atelier/atelier-agent
echo "==> starting the manager on ${ATELIER_LISTEN:-127.0.0.1:7070} (Ctrl-C stops it; sandboxes keep running)"
exec /usr/local/bin/atelier serve
