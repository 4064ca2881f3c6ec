#!/usr/bin/env bash
# Install the server programs the remote-source tests start on 127.0.0.1 (Debian packages):
# nginx (static files + the dav module for PUT) and a single-node Ceph RADOS Gateway.
# Idempotent: does nothing when every program is already there. Needs root (or sudo).
set -euo pipefail
need=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v radosgw >/dev/null 2>&1 || need+=(radosgw)
command -v ceph-mon >/dev/null 2>&1 || need+=(ceph-mon)
command -v ceph-osd >/dev/null 2>&1 || need+=(ceph-osd)
command -v curl >/dev/null 2>&1 || need+=(curl)
if [ ${#need[@]} -eq 0 ]; then
    echo "server programs present"
    exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "installing: ${need[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# The packages may start a system nginx on port 80; the tests use their own instances only.
$SUDO nginx -s stop >/dev/null 2>&1 || true
