#!/usr/bin/env bash
# Stop the Ceph daemons scripts/ceph-up.sh started under DIR: radosgw, then the OSD, then the
# monitor, each by its pid file (SIGTERM, then SIGKILL after 10 s). A daemon whose pid file was
# never written (ceph-up.sh failed half-way) is found by its command line, which names DIR's
# own ceph.conf; no other process is touched. Safe to run twice.
set -uo pipefail
if [ $# -ne 1 ]; then
    echo "usage: $0 DIR" >&2
    exit 2
fi
[ -d "$1" ] || exit 0
D=$(cd "$1" && pwd)
CONF=$D/ceph.conf

stop() { # pid
    local pid=$1
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.2
    done
    kill -9 "$pid" 2>/dev/null || true
}

for f in rgw.a osd.0 mon.a; do
    p=$D/run/$f.pid
    [ -s "$p" ] || continue
    stop "$(cat "$p")"
    rm -f "$p"
done

# Stragglers: our daemons are started with "-c DIR/ceph.conf".
for proc in /proc/[0-9]*; do
    cmd=$({ tr '\0' ' ' <"$proc/cmdline"; } 2>/dev/null) || continue
    case "$cmd" in
    ceph-mon\ -c\ "$CONF"\ * | ceph-osd\ -c\ "$CONF"\ * | radosgw\ -c\ "$CONF"\ * | \
        */ceph-mon\ -c\ "$CONF"\ * | */ceph-osd\ -c\ "$CONF"\ * | */radosgw\ -c\ "$CONF"\ *)
        stop "${proc#/proc/}"
        ;;
    esac
done
exit 0
