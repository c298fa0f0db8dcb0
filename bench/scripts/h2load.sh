#!/bin/bash
# Encrypt 64 B and the bench's echo of the same shape driven by h2load (nghttp2's C load
# generator, one thread: far lighter than the bench's tonic client, so the server gets more of
# the two cores), against one server started by serve.sh. Prints, per RPC, req/s, the server's
# cores and CPU per call (utime + stime from /proc over the window), the client's, and the
# calls' answers (h2load counts HTTP status only: the audit records the window added, all
# `ok` Encrypts, are the check that the gRPC calls succeeded).
# Needs h2load (`apt-get install nghttp2-client`), python3 and sqlite3.
# usage: h2load.sh BIN_DIR DURABILITY PORT CONCURRENCY [SECONDS]
set -euo pipefail
BIN=$1 DUR=$2 PORT=$3 C=$4 SECONDS_=${5:-6}
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
load() { # SECONDS PATH BODY
    h2load -D "$1" -c "$CONNS" -m $(( C / CONNS )) -t 1 --data="$3" \
        -H 'content-type: application/grpc' -H 'te: trailers' -H "authorization: Bearer $TOKEN" \
        "http://127.0.0.1:$PORT$2"
}
cpu() { awk '{print $14 + $15}' "/proc/$PID/stat"; }
records() { sqlite3 "$D/data/audit.db" "select count(*) from audit_events where operation = 'Encrypt' and outcome = 'ok'"; }
# `TIMEFORMAT` makes bash's `time` print the client's user and system seconds for the parser.
TIMEFORMAT=$'user %Us sys %Ss'
one() { # LABEL PATH BODY
    load 1 "$2" "$3" > /dev/null 2>&1
    local s0 s1 r0 r1 out
    s0=$(cpu); r0=$(records)
    out=$( { time load "$SECONDS_" "$2" "$3"; } 2>&1 )
    s1=$(cpu); r1=$(records)
    report "$1" "$out" "$s0" "$s1" "$r0" "$r1"
}
report() {
    python3 - "$1" "$C" "$SECONDS_" "$2" "$3" "$4" "$5" "$6" "$HZ" << 'PY'
import re, sys
label, c, secs, out = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
s0, s1, r0, r1, hz = map(int, sys.argv[5:])
done = int(re.search(r"^requests: .*?(\d+) succeeded", out, re.M).group(1))
codes = re.search(r"^status codes: (.*)$", out, re.M).group(1)
user, system = map(float, re.search(r"^user (\S+)s sys (\S+)s", out, re.M).group(1, 2))
server, client = (s1 - s0) / hz, user + system
line = (f"{label:8s} @{c}: {done / secs:8.0f} req/s; server {server / secs:.2f} cores, "
        f"{server * 1e6 / done:5.1f} µs per call; client {client / secs:.2f} cores, "
        f"{client * 1e6 / done:4.1f} µs per call")
if label == "encrypt":
    line += f"; Encrypt ok in the audit log +{r1 - r0}"
print(line + f"; HTTP {codes}")
PY
}
one encrypt /tenantkms.v1.KeyService/Encrypt "$D/encrypt.bin"
one echo /tenantkms.bench.v1.BenchService/Echo "$D/echo.bin"
