#!/bin/bash
# Starts a bench server (`tenant-kms-bench serve`, the same binary and flags the bench's own
# child uses) in the background for hand measurements, with the limits that would cap a load
# test switched off (no rate limit, no admission cap, every tenant cached).
# usage: serve.sh BIN_DIR DURABILITY PORT        (BIN_DIR: e.g. ./target/release)
# Data in /tmp/kms-srv-PORT/data, the pid in /tmp/kms-srv-PORT/pid, metrics on PORT+1000.
set -euo pipefail
BIN=$1 DUR=$2 PORT=$3
D=/tmp/kms-srv-$PORT
rm -rf "$D"; mkdir -p "$D"
printf 'cache_tenants = 100000\nrate_limit_per_second = 0.0\nmax_concurrent_requests = 100000\n' > "$D/serve.toml"
setsid "$BIN/tenant-kms-bench" serve --data-dir "$D/data" --listen "127.0.0.1:$PORT" \
    --audit-durability "$DUR" --min-deletion-window 0s --log warn --config "$D/serve.toml" \
    --metrics-listen "127.0.0.1:$((PORT + 1000))" > "$D/log" 2>&1 < /dev/null &
echo $! > "$D/pid"
for _ in $(seq 100); do [ -f "$D/data/admin.token" ] && break; sleep 0.1; done
[ -f "$D/data/admin.token" ] || { echo "server did not start: $D/log" >&2; exit 1; }
sleep 0.5
echo "$D"
