#!/usr/bin/env bash
# Fuzz the HTTP API against its own OpenAPI document (GET /openapi.json) with schemathesis:
# any 5xx, any status the document does not list, or any body or content type that
# contradicts it fails the run. Runs the debug binary, built first if out of date.
#
#   tests/schemathesis.sh [extra schemathesis arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

# The version this script was last run green with; bump it deliberately.
SCHEMATHESIS_VERSION=4.32.5
venv=target/venv-schemathesis
bin=target/debug/oonode

if ! "$venv/bin/schemathesis" --version 2>/dev/null | grep -qF "$SCHEMATHESIS_VERSION"; then
  echo "== installing schemathesis $SCHEMATHESIS_VERSION in $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi
cargo build --quiet --bin oonode

work=$(mktemp -d)
node_pid=
cleanup() {
  if [ -n "$node_pid" ]; then
    kill "$node_pid" 2>/dev/null || true
    wait "$node_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

"$bin" host --agent echo --port 0 --bind 127.0.0.1 --co-dir "$work/co" --no-relay --no-p2p \
  --ready-json >"$work/ready" 2>"$work/node.log" &
node_pid=$!

# The first stdout line is the ready event: {"event":"ready",…,"http":"http://127.0.0.1:PORT"}.
url=
for _ in $(seq 1 100); do
  url=$(python3 -c 'import json,sys
line = open(sys.argv[1]).readline()
print(json.loads(line)["http"] if line.endswith("\n") else "")' "$work/ready" 2>/dev/null || true)
  [ -n "$url" ] && break
  if ! kill -0 "$node_pid" 2>/dev/null; then
    echo "the node exited before it was ready:" >&2
    cat "$work/node.log" >&2
    exit 1
  fi
  sleep 0.1
done
[ -n "$url" ] || { echo "no ready line from the node in 10 s" >&2; cat "$work/node.log" >&2; exit 1; }
echo "== schemathesis against $url/openapi.json"

status=0
# From the scratch directory: schemathesis leaves its files in the current one.
(cd "$work" && timeout 300 "$root/$venv/bin/schemathesis" run "$url/openapi.json" \
  --checks "${SCHEMATHESIS_CHECKS:-not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance}" \
  --max-examples 50 \
  --request-timeout 10 \
  --seed "${SCHEMATHESIS_SEED:-1}" \
  --generation-database none \
  "$@") || status=$?
if [ "$status" -ne 0 ]; then
  echo "== schemathesis failed (exit $status); the node's log:" >&2
  tail -n 50 "$work/node.log" >&2
fi
exit "$status"
