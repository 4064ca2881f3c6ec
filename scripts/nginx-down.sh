#!/usr/bin/env bash
# Stop the private nginx that scripts/nginx-up.sh started under DIR (waits until it has exited).
set -euo pipefail
if [ $# -ne 1 ]; then
    echo "usage: $0 DIR" >&2
    exit 2
fi
pidfile="$1/nginx.pid"
[ -f "$pidfile" ] || exit 0
pid=$(cat "$pidfile")
kill -QUIT "$pid" 2>/dev/null || { rm -f "$pidfile"; exit 0; }
for _ in $(seq 1 200); do
    kill -0 "$pid" 2>/dev/null || exit 0
    sleep 0.05
done
kill -TERM "$pid" 2>/dev/null || true
