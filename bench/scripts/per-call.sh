#!/bin/bash
# Syscalls and context switches per audited call, counted by perf's tracepoints (which work
# in this KVM guest where the hardware counters do not) on a server started by serve.sh, over
# a 3 s window of the bench's load; divided by the audit records the window added.
# usage: per-call.sh BIN_DIR PORT CONCURRENCY
set -euo pipefail
BIN=$1 PORT=$2 C=$3
D=/tmp/kms-srv-$PORT; PID=$(cat "$D/pid")
records() {
    curl -s "127.0.0.1:$((PORT + 1000))/metrics" \
        | awk '/^tenant_kms_audit_batch_records_sum/ {print $2}'
}
"$(dirname "$0")/load.sh" "$BIN" "$PORT" "$C" 6s > /dev/null 2>&1 &
LOAD=$!
sleep 2
R0=$(records)
perf stat -x, -p "$PID" -o "$D/perf.csv" \
    -e 'syscalls:sys_enter_pwrite64,syscalls:sys_enter_pread64,syscalls:sys_enter_fcntl' \
    -e 'syscalls:sys_enter_futex,syscalls:sys_enter_fdatasync,syscalls:sys_enter_sendto' \
    -e 'syscalls:sys_enter_epoll_wait,sched:sched_switch,sched:sched_wakeup' -- sleep 3
R1=$(records)
wait "$LOAD" || true
awk -F, -v n="$((R1 - R0))" \
    '$1 ~ /^[0-9]+$/ {sub(/.*:/, "", $3); printf "%s %.2f\n", $3, $1 / n}' "$D/perf.csv"
echo "records $((R1 - R0))"
