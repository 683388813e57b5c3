#!/usr/bin/env bash
# Cold and warm start of the service: seconds from process start until /health answers 200, first
# with an empty cache directory (weights converted, every bucket compiled), then again with the
# same directory (both read back). Prints /health's compile counters for each start.
#
#   bash scripts/measure_warm_start.sh [configs/cpu-tiny.toml] [port]
set -euo pipefail
config=${1:-configs/cpu-tiny.toml}
port=${2:-8765}
cache=$(mktemp -d)
trap 'rm -rf "$cache"' EXIT

for start in cold warm; do
  began=$(date +%s.%N)
  JAX_REALTIME_CACHE=$cache jax-realtime serve --config "$config" --port "$port" >"$cache/$start.log" 2>&1 &
  pid=$!
  until health=$(curl -sf "http://127.0.0.1:$port/health"); do
    kill -0 "$pid" 2>/dev/null || { echo "the service stopped; its log:" >&2; cat "$cache/$start.log" >&2; exit 1; }
    sleep 0.2
  done
  ready=$(date +%s.%N)
  compile=$(python3 -c 'import json, sys; print(json.loads(sys.argv[1]).get("compile"))' "$health")
  awk -v s="$start" -v a="$began" -v b="$ready" -v c="$compile" 'BEGIN { printf "%s: %.1f s to healthy; %s\n", s, b - a, c }'
  kill -TERM "$pid"
  wait "$pid" || true
done
