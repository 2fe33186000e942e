#!/usr/bin/env bash
# Measures HF transformers (fp32, bf16) and CTranslate2 (int8, fp32) on the same workload as
# flex_opt, on the same random OPT checkpoint, and prints one table with ratios.
#
#   tools/peers/run_peers.sh [--model-size 1.3b] [--prompt-len 128] [--gen-len 32] [--batches 1,8,32]
#
# Creates tools/peers/.venv (PyPI only), builds target/peers/opt-<size>-random (safetensors,
# f16) once, builds flex_opt in release, then runs every engine with 2 threads.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="${PEERS_VENV:-$here/.venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
fi
"$venv/bin/pip" install -q -r "$here/requirements.txt"
(cd "$root" && cargo build --release --example flex_opt)
exec "$venv/bin/python" "$here/peers.py" --flex-opt "$root/target/release/examples/flex_opt" \
  --work "$root/target/peers" "$@"
