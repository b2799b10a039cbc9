#!/usr/bin/env bash
# Installs the host packages Atelier needs on Debian 12 (idempotent; root).
# QEMU 10 comes from bookworm-backports, which this adds with Debian's own keyring.
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "error: run as root (apt, loop mounts, debootstrap)" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive
if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
  cat > /etc/apt/sources.list.d/atelier-backports.sources <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi
need_update=1
# Refresh package lists at most once an hour (the image builder resolves kernel versions from them).
if [ -n "$(find /var/lib/apt/lists -maxdepth 1 -name '*backports*Packages*' -mmin -60 2>/dev/null)" ]; then need_update=0; fi
[ "$need_update" = 1 ] && apt-get update -q
# Networking: iproute2 and nftables (bridge, TAPs, NAT, egress rules); the tests
# also run python3 servers in network namespaces, curl, and a local ACME server
# (pebble).
pkgs=(debootstrap xfsprogs e2fsprogs busybox-static cpio xz-utils zstd qemu-utils sqlite3 util-linux mount ca-certificates tmux
      iproute2 nftables python3 curl pebble git)
missing=()
for p in "${pkgs[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
[ ${#missing[@]} -eq 0 ] || apt-get install -y -q "${missing[@]}"
# The dev-base and agents images fetch Node, Bun, OpenCode, ... with the host's npm.
# A Node.js from elsewhere (e.g. NodeSource) already brings npm; else Debian's.
# The unprivileged user that runs the VMs of sandboxes sharing root-owned folders
# (the manager creates it on demand too; see docs/security.md).
id -u atelier-vmm >/dev/null 2>&1 || useradd --system --user-group --no-create-home \
  --home-dir /nonexistent --shell /usr/sbin/nologin --comment "Atelier share VMMs" atelier-vmm
command -v npm >/dev/null || apt-get install -y -q npm
# The dashboard's end-to-end test drives Debian's Chromium (headless) with Playwright;
# only the test run needs it (scripts/test.sh sets ATELIER_NEED_BROWSER=1).
if [ "${ATELIER_NEED_BROWSER:-0}" = 1 ] && ! command -v chromium >/dev/null; then
  apt-get install -y -q chromium
fi
if ! qemu-system-x86_64 --version 2>/dev/null | grep -qE 'version (9|[1-9][0-9])\.'; then
  apt-get install -y -q -t bookworm-backports qemu-system-x86
fi
command -v cargo >/dev/null || { echo "error: cargo (Rust 1.95+) is required; install Rust first" >&2; exit 1; }
if ! command -v cargo-nextest >/dev/null && [ "${ATELIER_NEED_NEXTEST:-0}" = 1 ]; then
  cargo install --locked cargo-nextest
fi
