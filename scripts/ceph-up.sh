#!/usr/bin/env bash
# Start a private single-node Ceph cluster with an S3 gateway on 127.0.0.1, for the S3-source
# tests and benchmarks:
#
#   scripts/ceph-up.sh DIR RGW_PORT    # prints the endpoint once radosgw answers and the user exists
#   scripts/ceph-down.sh DIR           # stops every daemon this started
#
# One monitor, one OSD on memstore (objects live in the OSD's memory; nothing on disk but logs
# and the monitor's small store) and one radosgw (beast frontend). No systemd, no manager, no
# cephx: the cluster listens on 127.0.0.1 only. The gateway still checks S3 signatures, against
# one user created here with the access and secret key from CEPH_S3_ACCESS_KEY and
# CEPH_S3_SECRET_KEY (test-only defaults below).
#
# Tuning (environment):
#   MEMSTORE_BYTES   capacity of the memstore OSD (default 1 GiB; data stays in RAM)
#   CEPH_MON_PORT    monitor port (default: a free port chosen at random)
#
# Everything lives under DIR (config, pid files, admin sockets, logs); DIR is emptied first.
# On failure the script stops what it started, prints the tail of each log and exits non-zero.
# Pitfalls met while writing it (Ceph 16, Debian packages):
#   - radosgw asks the monitor for "secure" mode by default; with auth none that can never
#     succeed and radosgw hangs: `ms mon client mode = crc secure` fixes it.
#   - the monitor refuses to run pools of size 1 unless `mon allow pool size one` is set, and
#     a full-ish disk makes it stop the cluster unless `mon data avail crit = 0`.
#   - radosgw creates its pools on first start; with the default pg count per pool it hits
#     the per-OSD PG limit on one OSD, so pools get 8 PGs and autoscaling is off.
#   - radosgw forks before it answers HTTP; readiness is polled on the port, not the pid.
#   - every pool radosgw creates is one monitor map change, and the monitor batches changes
#     once a second by default (paxos propose interval): radosgw took 9 s to answer. With
#     0.05 s the whole start takes about 2 s.
set -euo pipefail
if [ $# -ne 2 ]; then
    echo "usage: $0 DIR RGW_PORT" >&2
    exit 2
fi
for prog in ceph-mon ceph-osd radosgw radosgw-admin ceph monmaptool ceph-authtool curl python3; do
    if ! command -v "$prog" >/dev/null 2>&1; then
        echo "$prog not found (install the servers: scripts/install-servers.sh)" >&2
        exit 3
    fi
done
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p "$1"
D=$(cd "$1" && pwd)
PORT=$2
AK=${CEPH_S3_ACCESS_KEY:-asyncload-test-access}
SK=${CEPH_S3_SECRET_KEY:-asyncload-test-secret}
MEM=${MEMSTORE_BYTES:-1073741824}
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
MON_PORT=${CEPH_MON_PORT:-$(free_port)}

rm -rf "${D:?}"/{mon.a,osd.0,run,log,rgw.a,ceph.conf,monmap,mon.keyring,endpoint}
mkdir -p "$D"/{mon.a,osd.0,run,log,rgw.a}

fail() {
    echo "ceph-up: $*" >&2
    for f in "$D"/log/*.log; do
        [ -s "$f" ] || continue
        echo "--- $f (last lines)" >&2
        tail -n 15 "$f" >&2
    done
    "$here/ceph-down.sh" "$D" >&2 || true
    exit 1
}
trap 'fail "a command failed (line $LINENO)"' ERR

# Wait until "$@" succeeds, polling every 0.2 s, for at most $1 seconds.
wait_for() {
    local secs=$1 what=$2
    shift 2
    local deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || fail "$what not ready after ${secs}s"
        sleep 0.2
    done
}

FSID=$(python3 -c 'import uuid; print(uuid.uuid4())')
CONF=$D/ceph.conf
export CEPH_CONF=$CONF
cat >"$CONF" <<EOF
[global]
fsid = $FSID
mon host = v2:127.0.0.1:$MON_PORT
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind ipv6 = false
auth cluster required = none
auth service required = none
auth client required = none
run dir = $D/run
admin socket = $D/run/\$name.asok
log file = $D/log/\$name.log
log to stderr = false
err to stderr = true
mon data = $D/mon.\$id
osd data = $D/osd.\$id
osd objectstore = memstore
memstore device bytes = $MEM
osd memory target = 939524096
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon warn on pool no redundancy = false
mon data avail crit = 0
mon data avail warn = 0
paxos propose interval = 0.05
paxos min wait = 0.01
[client.rgw.a]
ms mon client mode = crc secure
rgw frontends = beast endpoint=127.0.0.1:$PORT
rgw data = $D/rgw.a
rgw init timeout = 90
rgw enable usage log = false
rgw enable ops log = false
EOF

monmaptool --create --fsid "$FSID" --addv a "[v2:127.0.0.1:$MON_PORT]" "$D/monmap" >/dev/null
ceph-authtool --create-keyring "$D/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
ceph-mon -c "$CONF" --mkfs -i a --monmap "$D/monmap" --keyring "$D/mon.keyring" 2>>"$D/log/mkfs.log"
ceph-mon -c "$CONF" -i a --pid-file "$D/run/mon.a.pid" 2>>"$D/log/start.log" # forks
wait_for 60 "monitor" ceph --connect-timeout 5 mon stat

OSD_UUID=$(python3 -c 'import uuid; print(uuid.uuid4())')
OSD_ID=$(ceph osd new "$OSD_UUID")
ceph-osd -c "$CONF" -i "$OSD_ID" --mkfs --osd-uuid "$OSD_UUID" 2>>"$D/log/mkfs.log"
ceph-osd -c "$CONF" -i "$OSD_ID" --pid-file "$D/run/osd.$OSD_ID.pid" 2>>"$D/log/start.log" # forks
osd_up() { ceph osd stat 2>/dev/null | grep -q "1 up"; }
wait_for 60 "OSD" osd_up

radosgw -c "$CONF" -n client.rgw.a --pid-file "$D/run/rgw.a.pid" 2>>"$D/log/start.log" # forks
wait_for 90 "radosgw on port $PORT" curl -sf -o /dev/null "http://127.0.0.1:$PORT/"
radosgw-admin user create --uid=asyncload-test --display-name=asyncload-test \
    --access-key="$AK" --secret-key="$SK" >/dev/null 2>>"$D/log/admin.log"
echo "http://127.0.0.1:$PORT" >"$D/endpoint"
trap - ERR
echo "rgw ready on http://127.0.0.1:$PORT (monitor 127.0.0.1:$MON_PORT, data in $D)"
