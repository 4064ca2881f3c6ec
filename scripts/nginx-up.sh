#!/usr/bin/env bash
# Start a private nginx serving DIR/www on 127.0.0.1:PORT, for the HTTP-source tests and benchmarks.
#
#   scripts/nginx-up.sh DIR PORT     # prints the base URL once nginx answers
#   scripts/nginx-down.sh DIR        # stops it
#
# Not the system nginx: its own config, pid, logs and temp dirs live under DIR. Reads are
# static files (ranged GETs, sendfile); the whole root also accepts WebDAV PUT and DELETE
# (`create_full_put_path` makes parent dirs; a PUT lands in a temp file under DIR and is
# renamed into place, so an object appears whole or not at all). No body-size limit.
# NGINX_WORKERS (default 1) sets worker_processes. NGINX_BIN (default: nginx on PATH, else
# /usr/sbin/nginx) picks the binary. (Not NGINX: nginx itself reads that variable.)
# NGINX_LIMIT_RATE (e.g. 100m) caps each connection's send rate, to model a server of bounded
# bandwidth in benchmarks (bench/bench_remote.py --server-rate).
set -euo pipefail
if [ $# -ne 2 ]; then
    echo "usage: $0 DIR PORT" >&2
    exit 2
fi
dir=$(mkdir -p "$1" && cd "$1" && pwd)
port=$2
nginx=${NGINX_BIN:-$(command -v nginx || echo /usr/sbin/nginx)}
if [ ! -x "$nginx" ]; then
    echo "nginx not found (install it: scripts/install-servers.sh)" >&2
    exit 3
fi
mkdir -p "$dir/www" "$dir/tmp/body" "$dir/tmp/proxy" "$dir/tmp/fastcgi" "$dir/tmp/uwsgi" "$dir/tmp/scgi" "$dir/logs"
# Workers run as the invoking user (the directive is ignored, with a notice, when not root).
user=$(id -un)
group=$(id -gn)
cat >"$dir/nginx.conf" <<CONF
daemon on;
master_process on;
worker_processes ${NGINX_WORKERS:-1};
user $user $group;
pid $dir/nginx.pid;
error_log $dir/logs/error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 65s;
    keepalive_requests 100000;
    client_body_temp_path $dir/tmp/body;
    proxy_temp_path $dir/tmp/proxy;
    fastcgi_temp_path $dir/tmp/fastcgi;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;
    default_type application/octet-stream;
    types { application/json json; }
    server {
        listen 127.0.0.1:$port;
        server_name localhost;
        root $dir/www;
        client_max_body_size 0;
        location / {
            dav_methods PUT DELETE;
            create_full_put_path on;
            dav_access user:rw group:r;
            limit_rate ${NGINX_LIMIT_RATE:-0};
        }
    }
}
CONF
"$nginx" -p "$dir" -c "$dir/nginx.conf" -e "$dir/logs/error.log" -t -q
# The daemon must not hold the caller's stdout/stderr open (a caller reading them would wait forever).
"$nginx" -p "$dir" -c "$dir/nginx.conf" -e "$dir/logs/error.log" </dev/null >>"$dir/logs/start.log" 2>&1 || {
    cat "$dir/logs/start.log" >&2
    exit 1
}
# Wait (bounded) until it answers; curl when present, else bash's /dev/tcp.
for _ in $(seq 1 100); do
    if command -v curl >/dev/null 2>&1; then
        curl -s -o /dev/null "http://127.0.0.1:$port/" && { echo "http://127.0.0.1:$port/"; exit 0; }
    elif (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "http://127.0.0.1:$port/"
        exit 0
    fi
    sleep 0.05
done
echo "nginx did not answer on 127.0.0.1:$port; log: $dir/logs/error.log" >&2
tail -n 20 "$dir/logs/error.log" >&2 || true
exit 1
