#!/usr/bin/env bash
# Starts the bundled InCountry sandbox and the proxy configured against it
# (config/sandbox.yaml), prints two curl commands to try, and stops both on exit.
set -euo pipefail
BIN=${BIN:-.venv/bin}
PROXY_PORT=${PROXY_PORT:-8080}
SANDBOX_PORT=${SANDBOX_PORT:-9000}
export PROXY_PORT SANDBOX_PORT

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 0' INT TERM

wait_for() {  # url, name
  for _ in $(seq 1 200); do
    if "$BIN/python" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)" "$1" 2>/dev/null; then
      return 0
    fi
    sleep 0.05
  done
  echo "{\"event\": \"$2 did not start\", \"level\": \"error\", \"logger\": \"make-run\"}" >&2
  exit 1
}

"$BIN/incountry-proxy" sandbox --port "$SANDBOX_PORT" --config config/sandbox.yaml &
pids+=($!)
wait_for "http://127.0.0.1:$SANDBOX_PORT/_sandbox/stats" sandbox

"$BIN/incountry-proxy" serve --config config/sandbox.yaml &
pids+=($!)
wait_for "http://127.0.0.1:$PROXY_PORT/_proxy/health" proxy

cat <<MSG

incountry-proxy is running on http://127.0.0.1:$PROXY_PORT against the sandbox on :$SANDBOX_PORT.
Try it (Ctrl-C stops both):

curl -s -X POST http://127.0.0.1:$PROXY_PORT/de/api/records/find -H 'Content-Type: application/json' -d '{"filter": {}, "options": {"limit": 10}}'
curl -s -X POST http://127.0.0.1:$PROXY_PORT/api/records/find -H 'X-InCountry-Country: DE' -H 'Content-Type: application/json' -d '{"filter": {}, "options": {"limit": 10}}'

MSG
wait -n "${pids[@]}"
