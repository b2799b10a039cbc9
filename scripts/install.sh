#!/usr/bin/env bash
# Installs Atelier on a fresh Debian 12 host and runs the manager: host packages, the
# dashboard (web/, embedded in the binary), the `atelier` and `atelier-bench` binaries, the static guest agent, Swagger UI, the
# default `minimal` image; then `atelier serve` (embedded SQLite in /var/lib/atelier)
# as a systemd service where systemd is PID 1, else in the foreground (containers,
# CI). ATELIER_FOREGROUND=1 forces the foreground. Running it again upgrades.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
# The dashboard (web/dist) is embedded in the binary: build it first.
bash scripts/build-web.sh
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
data_dir=${ATELIER_DATA_DIR:-/var/lib/atelier}
if [ "${ATELIER_FOREGROUND:-0}" != 1 ] && [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ] \
   && command -v systemctl >/dev/null; then
  echo "==> installing and (re)starting the atelier service"
  install -D -m 0644 scripts/atelier.service /etc/systemd/system/atelier.service
  mkdir -p /etc/atelier
  # Settings for the service (ATELIER_LISTEN, ATELIER_DOMAIN, ...; see docs/configuration.md).
  if [ ! -f /etc/atelier/atelier.env ]; then
    printf 'ATELIER_DATA_DIR=%s\n' "$data_dir" > /etc/atelier/atelier.env
    [ -z "${ATELIER_LISTEN:-}" ] || printf 'ATELIER_LISTEN=%s\n' "$ATELIER_LISTEN" >> /etc/atelier/atelier.env
  fi
  systemctl daemon-reload
  systemctl enable --quiet atelier.service
  # A restart (upgrade) keeps sandboxes running: the unit kills only the manager.
  systemctl restart atelier.service
  systemctl is-active --quiet atelier.service || {
    echo "error: the atelier service did not start; see: journalctl -u atelier" >&2
    exit 1
  }
  echo "atelier is running as a service (systemctl status atelier; logs: journalctl -u atelier -f)"
  echo "API: http://${ATELIER_LISTEN:-127.0.0.1:7070}/  admin token: $data_dir/admin-token (as root the CLI reads it)"
  exit 0
fi
echo "==> starting the manager on ${ATELIER_LISTEN:-127.0.0.1:7070} (Ctrl-C stops it; sandboxes keep running)"
exec /usr/local/bin/atelier serve
