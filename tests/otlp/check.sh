#!/usr/bin/env bash
# The optional OTLP trace exporter (cargo feature `otlp`, src/telemetry.rs) against a real OTLP/gRPC
# receiver (tests/otlp/receiver.py, on the OpenTelemetry project's `opentelemetry-proto` stubs):
# builds `serve` with the feature, points OTEL_EXPORTER_OTLP_ENDPOINT at the receiver, makes a
# call carrying a W3C traceparent through the HTTP/JSON API, stops the server with SIGTERM (which
# flushes the exporter), and checks that the call's span arrived inside the caller's trace, as a
# child of the caller's span, with its request id, operation and tenant, and no token.
#
# Not run by .ci/run: the feature build compiles the server crate a second time (about 5 minutes
# on the 2-core CI machine, which CI's 20-minute budget has no room for). Run it by hand:
#   tests/otlp/check.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! python3 -c "import grpc; from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc" 2>/dev/null; then
  python3 -m pip install --quiet grpcio opentelemetry-proto
fi

work=$(mktemp -d)
server_pid=
receiver_pid=
cleanup() {
  for pid in $server_pid $receiver_pid; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

cargo build --release --quiet --features otlp --bin tenant-kms
cp target/release/tenant-kms "$work/tenant-kms-otlp"
# Put the default build back where the tests and other scripts look for it.
cargo build --release --quiet --bin tenant-kms

python3 tests/otlp/receiver.py "$work/spans.json" >"$work/receiver.out" &
receiver_pid=$!
for _ in $(seq 1 100); do
  grep -q '^port ' "$work/receiver.out" 2>/dev/null && break
  sleep 0.1
done
port=$(sed -n 's/^port //p' "$work/receiver.out")
[ -n "$port" ] || { echo "the OTLP receiver did not start"; exit 1; }

OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:$port" \
  "$work/tenant-kms-otlp" serve --data-dir "$work/data" --listen 127.0.0.1:0 \
  --audit-durability process >"$work/stdout" 2>"$work/server.log" &
server_pid=$!
for _ in $(seq 1 100); do
  grep -q '^listening on ' "$work/stdout" 2>/dev/null && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$work/server.log"; exit 1; }
  sleep 0.1
done
addr=$(sed -n 's/^listening on //p' "$work/stdout")
[ -n "$addr" ] || { echo "the server did not start"; cat "$work/server.log"; exit 1; }
token=$(cat "$work/data/admin.token")

trace_id=4bf92f3577b34da6a3ce929d0e0e4736
parent_id=00f067aa0ba902b7
request_id=$(python3 - "$addr" "$token" "$trace_id" "$parent_id" <<'PY'
import json, sys, urllib.request
addr, token, trace_id, parent_id = sys.argv[1:5]
request = urllib.request.Request(
    f"http://{addr}/v1/tenants", data=json.dumps({"tenantId": "otlp-check"}).encode(),
    headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json",
             "traceparent": f"00-{trace_id}-{parent_id}-01"})
with urllib.request.urlopen(request) as answer:
    print(answer.headers["x-request-id"])
PY
)

kill -TERM "$server_pid"
wait "$server_pid" || { echo "serve did not stop cleanly on SIGTERM"; cat "$work/server.log"; exit 1; }
server_pid=
kill -TERM "$receiver_pid"
wait "$receiver_pid"
receiver_pid=

python3 - "$work/spans.json" "$trace_id" "$parent_id" "$request_id" "$token" <<'PY'
import json, sys
spans_file, trace_id, parent_id, request_id, token = sys.argv[1:6]
spans = json.load(open(spans_file))
calls = [s for s in spans if s["trace_id"] == trace_id and s["parent_span_id"] == parent_id]
assert calls, f"no span of the caller's trace {trace_id} under {parent_id} among {len(spans)}: {spans}"
call = calls[0]
values = set(call["attributes"].values())
assert request_id in values, f"the call's span lacks request id {request_id}: {call}"
assert "otlp-check" in values, f"the call's span lacks its tenant: {call}"
assert "CreateTenant" in values, f"the call's span lacks its operation: {call}"
assert token not in json.dumps(spans), "a span carries the bearer token"
print(f"OK: {len(spans)} span(s) exported; the CreateTenant call's span '{call['name']}' is a "
      f"child of the caller's span {parent_id} in trace {trace_id}, request id {request_id}")
PY
