#!/bin/bash
# Encrypt 64 B and the bench's echo of the same shape driven by h2load (nghttp2's C load
# generator, one thread: far lighter than the bench's tonic client, so the server gets more of
# the two cores), against one server started by serve.sh. Prints, per RPC, req/s, latency
# (p50 and p99 of every call of the window, from h2load's per-request log), the server's cores
# and CPU per call (utime + stime from /proc over the window), the client's, and the calls'
# answers (h2load counts HTTP status only: the audit records the window added, all `ok`
# Encrypts, are the check that the gRPC calls succeeded). Then issue 19's ratios: Encrypt
# against echo, and in `fsync` durability echo's p50 plus one fsync of the data directory
# (4 KiB appended to a scratch file there and fsynced, as the bench's baseline does).
# ROUNDS > 1 alternates the two RPCs' windows that many times and ends with the medians of the
# rounds' ratios: this VM's speed can change by half within seconds, so only ratios of windows
# next to each other compare.
# Needs h2load (`apt-get install nghttp2-client`), python3 and sqlite3.
# usage: h2load.sh BIN_DIR DURABILITY PORT CONCURRENCY [SECONDS [ROUNDS]]
set -euo pipefail
BIN=$1 DUR=$2 PORT=$3 C=$4 SECONDS_=${5:-6} ROUNDS=${6:-1}
command -v h2load > /dev/null || { echo "h2load missing: apt-get install nghttp2-client" >&2; exit 1; }
D=$("$(dirname "$0")/serve.sh" "$BIN" "$DUR" "$PORT")
PID=$(cat "$D/pid")
trap 'kill "$PID" 2> /dev/null || true' EXIT
# The bench's 100 tenants (one short bench load creates them); every h2load call names the first.
"$BIN/tenant-kms-bench" --addr "http://127.0.0.1:$PORT" --token-file "$D/data/admin.token" \
    --scenario encrypt-64 --concurrency 1 --duration 1s --warmup 0s --json > /dev/null 2>&1 || true
TENANT=$(sqlite3 "$D/data/keys.db" "select tenant_id from tenants order by tenant_id limit 1")
# gRPC-framed request bodies: the bench's Encrypt 64 B fields (tenant, context, plaintext, AAD),
# and the same fields to echo with `response_bytes` = 64 + the ciphertext overhead (34).
python3 - "$TENANT" "$D" << 'PY'
import struct, sys
tenant, out = sys.argv[1].encode(), sys.argv[2]
def varint(n):
    b = b""
    while True:
        low, n = n & 0x7F, n >> 7
        if not n:
            return b + bytes([low])
        b += bytes([low | 0x80])
def field(number, data): return varint(number << 3 | 2) + varint(len(data)) + data
common = (field(1, tenant) + field(2, b"bench.customers.email") + field(3, b"\x5a" * 64)
          + field(4, b"row-0000001234"))
frame = lambda message: b"\x00" + struct.pack(">I", len(message)) + message
open(f"{out}/encrypt.bin", "wb").write(frame(common))
open(f"{out}/echo.bin", "wb").write(frame(common + varint(6 << 3) + varint(64 + 34)))
PY
TOKEN=$(cat "$D/data/admin.token")
HZ=$(getconf CLK_TCK)
CONNS=$(( C < 4 ? 1 : 4 ))
load() { # SECONDS PATH BODY [h2load options]
    h2load -D "$1" -c "$CONNS" -m $(( C / CONNS )) -t 1 --data="$3" "${@:4}" \
        -H 'content-type: application/grpc' -H 'te: trailers' -H "authorization: Bearer $TOKEN" \
        "http://127.0.0.1:$PORT$2"
}
cpu() { awk '{print $14 + $15}' "/proc/$PID/stat"; }
records() { sqlite3 "$D/data/audit.db" "select count(*) from audit_events where operation = 'Encrypt' and outcome = 'ok'"; }
# `TIMEFORMAT` makes bash's `time` print the client's user and system seconds for the parser.
TIMEFORMAT=$'user %Us sys %Ss'
one() { # LABEL PATH BODY
    local s0 s1 r0 r1 out
    s0=$(cpu); r0=$(records)
    out=$( { time load "$SECONDS_" "$2" "$3" --log-file="$D/$1.calls"; } 2>&1 )
    s1=$(cpu); r1=$(records)
    report "$1" "$out" "$s0" "$s1" "$r0" "$r1"
}
report() { # one line for people, then `= LABEL req/s p50 p99 cpu` for the ratios
    python3 - "$1" "$C" "$SECONDS_" "$2" "$3" "$4" "$5" "$6" "$HZ" "$D/$1.calls" << 'PY'
import re, sys
label, c, secs, out = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
s0, s1, r0, r1, hz = map(int, sys.argv[5:10])
done = int(re.search(r"^requests: .*?(\d+) succeeded", out, re.M).group(1))
codes = re.search(r"^status codes: (.*)$", out, re.M).group(1)
user, system = map(float, re.search(r"^user (\S+)s sys (\S+)s", out, re.M).group(1, 2))
# h2load's per-request log: start (µs since the epoch), HTTP status, µs to the end of the answer.
took = sorted(int(row.split()[2]) for row in open(sys.argv[10]) if row.strip())
p50, p99 = took[len(took) // 2], took[min(len(took) - 1, len(took) * 99 // 100)]
server, client = (s1 - s0) / hz, user + system
line = (f"{label:8s} @{c}: {done / secs:8.0f} req/s; p50 {p50} µs, p99 {p99} µs; "
        f"server {server / secs:.2f} cores, {server * 1e6 / done:5.1f} µs per call; "
        f"client {client / secs:.2f} cores, {client * 1e6 / done:4.1f} µs per call")
if label == "encrypt":
    line += f"; Encrypt ok in the audit log +{r1 - r0}"
print(line + f"; HTTP {codes}")
print(f"= {label} {done / secs} {p50} {server * 1e6 / done}")
PY
}
fsync_p50() { # µs: 4 KiB appended and fsynced in the data directory, 1 s of them (the bench's baseline)
    python3 - "$D/data/.h2load-fsync" << 'PY'
import os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
took, end = [], time.monotonic() + 1
while time.monotonic() < end:
    start = time.perf_counter_ns()
    os.write(fd, b"\xa5" * 4096)
    os.fsync(fd)
    took.append((time.perf_counter_ns() - start) // 1000)
os.close(fd)
os.unlink(sys.argv[1])
print(sorted(took)[len(took) // 2])
PY
}
ENCRYPT=(/tenantkms.v1.KeyService/Encrypt "$D/encrypt.bin")
ECHO=(/tenantkms.bench.v1.BenchService/Echo "$D/echo.bin")
load 1 "${ENCRYPT[@]}" > /dev/null 2>&1
load 1 "${ECHO[@]}" > /dev/null 2>&1
for round in $(seq "$ROUNDS"); do
    results=$( { one encrypt "${ENCRYPT[@]}"; one echo "${ECHO[@]}"; } )
    grep -v '^= ' <<< "$results"
    FSYNC=$( [ "$DUR" = fsync ] && fsync_p50 || echo 0 )
    grep '^= ' <<< "$results" | sed "s/\$/ $FSYNC/"
done | python3 -c '
import statistics, sys
c, dur = sys.argv[1], sys.argv[2]
rounds, got = [], {}
for line in sys.stdin:
    if not line.startswith("= "):
        print(line, end="")
        continue
    w = line.split()
    got[w[1]] = list(map(float, w[2:]))
    if "echo" in got and "encrypt" in got:
        (er, ep, ec, fsync), (xr, xp, xc, _) = got.pop("encrypt"), got.pop("echo")
        rounds.append((er / xr, ep / xp, ec / xc, ep, xp + fsync, fsync))
        line = (f"Encrypt ÷ echo @{c} {dur}: req/s {er / xr:.2f}, p50 {ep / xp:.2f}, "
                f"server CPU per call {ec / xc:.2f}")
        if fsync:
            line += (f"; p50 {ep:.0f} µs against echo p50 + one fsync "
                     f"{xp:.0f} + {fsync:.0f} = {xp + fsync:.0f} µs")
        print(line, flush=True)
if len(rounds) > 1:
    m = [statistics.median(r[i] for r in rounds) for i in range(6)]
    line = (f"median of {len(rounds)} rounds @{c} {dur}: req/s {m[0]:.2f}, p50 {m[1]:.2f}, "
            f"server CPU per call {m[2]:.2f}")
    if m[5]:
        line += f"; p50 {m[3]:.0f} µs against echo p50 + one fsync {m[4]:.0f} µs"
    print(line)' "$C" "$DUR"
