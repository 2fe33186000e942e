#!/usr/bin/env bash
# End-to-end checks of the `serve` example with real clients, all on loopback:
#   1. the official `openai` Python client (from PyPI, in a venv) against a fixture checkpoint;
#   2. headless Chromium (Debian's chromium + chromium-driver) driving the chat page, against
#      dummy OPT-125m (its 2048 positions fit the chat template; the fixtures have 64).
# Installs what is missing; any failed install step fails the run.
#
#   tools/e2e/run.sh                 # what CI runs
#   E2E_SCREENSHOT=docs/chat-streaming.png tools/e2e/run.sh   # also save a mid-reply screenshot
set -euo pipefail
cd "$(dirname "$0")/../.."

VENV=${E2E_VENV:-target/e2e-venv}
PYTHON=${PYTHON:-python3}

if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  echo "e2e: installing chromium and chromium-driver (Debian packages)"
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver
fi
command -v chromium >/dev/null && command -v chromedriver >/dev/null || {
  echo "e2e: error: chromium / chromedriver still missing after apt-get install" >&2
  exit 1
}

if [ ! -x "$VENV/bin/python" ]; then
  echo "e2e: creating the venv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --disable-pip-version-check -q -r tools/e2e/requirements.txt

cargo build --release --example serve
SERVE=target/release/examples/serve
LOGS=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$LOGS"
}
trap cleanup EXIT

# start_server NAME ARGS...: starts serve on a free loopback port; sets URL.
start_server() {
  local name=$1
  shift
  "$SERVE" "$@" --host 127.0.0.1 --port 0 >"$LOGS/$name.out" 2>"$LOGS/$name.err" &
  PIDS+=($!)
  local pid=$!
  for _ in $(seq 1 600); do
    URL=$(grep -o 'http://127\.0\.0\.1:[0-9]*' "$LOGS/$name.out" | head -n1 || true)
    [ -n "$URL" ] && return 0
    if ! kill -0 "$pid" 2>/dev/null; then break; fi
    sleep 0.1
  done
  echo "e2e: error: server '$name' did not start" >&2
  cat "$LOGS/$name.out" "$LOGS/$name.err" >&2
  exit 1
}

KEY=sk-e2e-$RANDOM
start_server fixture --model tests/fixtures/tiny-preln-f32 --api-key "$KEY"
"$VENV/bin/python" tools/e2e/openai_client.py --base-url "$URL/v1" --api-key "$KEY"

start_server dummy --dummy facebook/opt-125m
BROWSER_ARGS=()
if [ -n "${E2E_SCREENSHOT:-}" ]; then
  BROWSER_ARGS=(--screenshot "$E2E_SCREENSHOT" --max-tokens 64 --mid-chunks 12)
fi
"$VENV/bin/python" tools/e2e/browser_test.py --url "$URL" "${BROWSER_ARGS[@]}"
