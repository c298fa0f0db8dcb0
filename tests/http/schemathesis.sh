#!/usr/bin/env bash
# Property-based run of schemathesis against the HTTP/JSON API's served OpenAPI document
# (src/service/rest): it generates requests for every operation from the document and fails
# on any 5xx, any response whose status, content type, headers or body the document does not
# describe, and any call that succeeds without a token. Run by .ci/run after the release build;
# by hand: tests/http/schemathesis.sh [path/to/tenant-kms] (default target/release/tenant-kms).
# Examples per operation: SCHEMATHESIS_EXAMPLES (default 10: 262 calls, about 2 minutes on this
# shared 2-core machine).
set -euo pipefail
cd "$(dirname "$0")/../.."

# hypothesis is pinned with it: later hypothesis releases break schemathesis 3.39 at run time
# ("'many' object has no attribute 'more'").
version=3.39.16
hypothesis=6.120.0
if ! python3 -c "import schemathesis, hypothesis, sys; sys.exit(schemathesis.__version__ != '$version' or hypothesis.__version__ != '$hypothesis')" 2>/dev/null; then
  python3 -m pip install --quiet "schemathesis==$version" "hypothesis==$hypothesis"
fi

bin=${1:-target/release/tenant-kms}
work=$(mktemp -d)
pid=
cleanup() {
  if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

"$bin" serve --data-dir "$work/data" --listen 127.0.0.1:0 --min-deletion-window 0s \
  --audit-durability process \
  >"$work/stdout" 2>"$work/server.log" &
pid=$!
for _ in $(seq 1 100); do
  grep -q '^listening on ' "$work/stdout" 2>/dev/null && break
  kill -0 "$pid" 2>/dev/null || { cat "$work/server.log"; exit 1; }
  sleep 0.1
done
addr=$(sed -n 's/^listening on //p' "$work/stdout")
[ -n "$addr" ] || { echo "the server did not start"; cat "$work/server.log"; exit 1; }
token=$(cat "$work/data/admin.token")

# A tenant and a blind index, so generated calls naming them reach past NOT_FOUND.
python3 - "$addr" "$token" <<'PY'
import json, sys, urllib.request
addr, token = sys.argv[1], sys.argv[2]
for path, body in [("/v1/tenants", {"tenantId": "acme"}),
                   ("/v1/blindIndexes", {"name": "email", "bits": 32, "normalization": "exact"})]:
    request = urllib.request.Request(f"http://{addr}{path}", data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    urllib.request.urlopen(request).read()
PY

status=0
schemathesis run "http://$addr/openapi.json" \
  --header "Authorization: Bearer $token" \
  --checks all \
  --hypothesis-max-examples "${SCHEMATHESIS_EXAMPLES:-10}" \
  --hypothesis-seed 1 \
  --hypothesis-database none \
  --hypothesis-deadline 5000 \
  --hypothesis-suppress-health-check all \
  --request-timeout 10000 \
  --no-color || status=$?
if [ "$status" -ne 0 ]; then
  echo "== server log (tail)"; tail -n 50 "$work/server.log"
fi
exit "$status"
