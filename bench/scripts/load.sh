#!/bin/bash
# Runs the bench's load (Encrypt 64 B unless a scenario is named) against a server started by
# serve.sh, with echo in the same run; prints the bench's JSON.
# usage: load.sh BIN_DIR PORT CONCURRENCY DURATION [SCENARIO]
set -euo pipefail
BIN=$1 PORT=$2 C=$3 DURATION=$4 SCENARIO=${5:-encrypt-64}
exec "$BIN/tenant-kms-bench" --addr "http://127.0.0.1:$PORT" \
    --token-file "/tmp/kms-srv-$PORT/data/admin.token" --scenario "$SCENARIO" \
    --concurrency "$C" --duration "$DURATION" --warmup 1s --json
