#!/bin/bash
# The server's CPU per call split into user and kernel time, with its syscalls and context
# switches, for Encrypt 64 B and for echo of the same shape in the same bench run: what a call
# costs the kernel, which callgrind does not see. Starts its own server (serve.sh), runs the
# bench once against it, and samples 4 s in the middle of the Encrypt window and of the echo
# window (utime and stime from /proc/PID/stat, syscalls and switches from perf's software
# tracepoints, which work in this KVM guest). Encrypt calls are the audit records the window
# added; echo calls are the bench's echo req/s times the window (the server counts no echo).
# usage: kernel-share.sh BIN_DIR DURABILITY PORT CONCURRENCY
set -euo pipefail
BIN=$1 DUR=$2 PORT=$3 C=$4
WINDOW=4
D=$("$(dirname "$0")/serve.sh" "$BIN" "$DUR" "$PORT")
PID=$(cat "$D/pid")
trap 'kill "$PID" 2>/dev/null || true' EXIT
records() {
    curl -s "127.0.0.1:$((PORT + 1000))/metrics" \
        | awk '/^tenant_kms_audit_batch_records_sum/ {print $2}'
}
ticks() { awk '{print $14, $15}' "/proc/$PID/stat"; }
# One window: "user_ticks sys_ticks syscalls switches".
sample() {
    local before after
    before=$(ticks)
    perf stat -x, -p "$PID" -o "$D/perf.csv" \
        -e raw_syscalls:sys_enter,context-switches -- sleep "$WINDOW"
    after=$(ticks)
    echo "$before $after" | awk '{printf "%d %d ", $3 - $1, $4 - $2}'
    awk -F, '$1 ~ /^[0-9]+$/ {printf "%d ", $1}' "$D/perf.csv"
    echo
}
# Encrypt first, then echo (the bench's order for its first run of a scenario).
"$BIN/tenant-kms-bench" --addr "http://127.0.0.1:$PORT" --token-file "$D/data/admin.token" \
    --scenario encrypt-64 --concurrency "$C" --duration 10s --warmup 1s --runs 1 \
    --baseline-time 10ms --json > "$D/bench.json" 2>/dev/null &
LOAD=$!
R=$(records)
until [ "$(records)" != "$R" ]; do sleep 0.2; done
sleep 3
R0=$(records); RPC=$(sample); R1=$(records)
# The echo window begins when the records stop.
P=$(records)
while sleep 0.5; do N=$(records); [ "$N" = "$P" ] && break; P=$N; done
sleep 3
ECHO=$(sample)
wait "$LOAD"
ECHO_RPS=$(python3 -c "
import json; t = open('$D/bench.json').read(); r = json.loads(t[t.find('{'):])['results'][0]
print(r['echo_rps'])")
HZ=$(getconf CLK_TCK)
echo "$RPC $((R1 - R0)) $ECHO $ECHO_RPS" | awk -v hz="$HZ" -v w="$WINDOW" '{
    n = $5; e = $10 * w
    printf "encrypt: %d calls; per call user %.1f us, sys %.1f us, %.2f syscalls, %.2f switches\n",
        n, $1 * 1e6 / hz / n, $2 * 1e6 / hz / n, $3 / n, $4 / n
    printf "echo:    %d calls; per call user %.1f us, sys %.1f us, %.2f syscalls, %.2f switches\n",
        e, $6 * 1e6 / hz / e, $7 * 1e6 / hz / e, $8 / e, $9 / e
}'
