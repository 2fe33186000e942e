#!/usr/bin/env bash
# Predicted vs measured throughput of fixed policies (BENCHMARKS.md, "Policy search").
# For each spec: policy_search predicts the policy (--json, from the saved profile), then
# flex_opt runs it on dummy weights under tools/memcap.sh (cap "none": no cap). Results go to
# $OUT/<name>.pred.json and $OUT/<name>.json.
#
#   tools/policy_check.sh "name cap model prompt gen gbs ngb wg wc cg cc hg hc [flags...]" ...
#
# e.g. tools/policy_check.sh "w25 6G facebook/opt-6.7b 16 8 16 2 25 0 100 0 100 0"
# PEXTRA / FEXTRA: extra flags for policy_search / flex_opt only (e.g. --compress-weight on /
# --compress-weight). OFFLOAD_DIR (default /tmp/flexgen_offload_dir) and OUT (default
# target/policy_check). Needs root for a cap; build first: cargo build --release --examples.
set -euo pipefail
cd "$(dirname "$0")/.."
F=target/release/examples/flex_opt
P=target/release/examples/policy_search
OD=${OFFLOAD_DIR:-/tmp/flexgen_offload_dir}
OUT=${OUT:-target/policy_check}
mkdir -p "$OUT" "$OD"
one() {
  local name=$1 cap=$2 model=$3 pl=$4 gl=$5 gbs=$6 ngb=$7
  shift 7
  local pct=("$1" "$2" "$3" "$4" "$5" "$6")
  shift 6
  local common=(--model "$model" --prompt-len "$pl" --gen-len "$gl" --gpu-batch-size "$gbs"
    --num-gpu-batches "$ngb" --percent "${pct[@]}" --offload-dir "$OD")
  local limit=()
  [ "$cap" != none ] && limit=(--ram-limit "$cap")
  # shellcheck disable=SC2086
  $P "${common[@]}" "${limit[@]}" --json ${PEXTRA:-} "$@" >"$OUT/$name.pred.json"
  local run=("$F" "${common[@]}" --path _DUMMY_ --warmup 0 --json)
  # shellcheck disable=SC2086
  if [ "$cap" = none ]; then
    "${run[@]}" ${FEXTRA:-} "$@" >"$OUT/$name.json"
  else
    bash tools/memcap.sh "$cap" -- "${run[@]}" ${FEXTRA:-} "$@" >"$OUT/$name.json"
  fi
  python3 - "$OUT/$name.pred.json" "$OUT/$name.json" "$name" <<'PY'
import json, sys
p = json.load(open(sys.argv[1])); p = p.get("prediction", p)
m = json.load(open(sys.argv[2]))
print(f"{sys.argv[3]}: predicted {p['prefill_s']:.1f} / {p['decode_s']:.1f} s, "
      f"{p['total_throughput']:.3f} tok/s; measured {m['prefill_latency_s']:.1f} / "
      f"{m['decode_latency_s']:.1f} s, {m['total_throughput_tok_s']:.3f} tok/s; "
      f"measured / predicted {m['total_throughput_tok_s'] / p['total_throughput']:.2f}")
PY
}
for spec in "$@"; do
  # shellcheck disable=SC2086
  one $spec
done
