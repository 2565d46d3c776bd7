#!/usr/bin/env bash
# Load test of `patchcore serve` on loopback: trains a model on data/sample/train (or uses
# MODEL), serves it, and lets CLIENTS clients POST REQUESTS images each (data/sample/test,
# cycled) with examples/serve_load.rs; prints throughput and p50/p99 latency as JSON, then
# stops the server with SIGTERM and checks it exits 0. Bounded: CLIENTS x REQUESTS requests,
# none started after SECONDS.
#   bash scripts/serve_load.sh [CLIENTS=4] [REQUESTS=50] [SECONDS=600] [-- serve options]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
clients=${1:-4}; requests=${2:-50}; seconds=${3:-600}
shift $(( $# < 3 ? $# : 3 )); [ "${1:-}" = "--" ] && shift
bin=target/release/patchcore
cargo build --release --quiet --bin patchcore --example serve_load
work=$(mktemp -d); trap 'kill "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
model=${MODEL:-}
if [ -z "$model" ]; then
  model=$work/index.faiss
  "$bin" train -q -i data/sample/train -o "$model" --weights "${WEIGHTS:-imagenet}" \
    || "$bin" train -q -i data/sample/train -o "$model" --weights random:0
fi
"$bin" serve --index "$model" --listen 127.0.0.1:0 "$@" 2> "$work/serve.log" &
pid=$!
for _ in $(seq 600); do
  url=$(grep -o 'http://[0-9.:]*' "$work/serve.log" | head -1 || true)
  [ -n "$url" ] && break
  kill -0 "$pid" || { cat "$work/serve.log" >&2; exit 1; }
  sleep 0.5
done
echo "serving on $url ($(nproc) cores)" >&2
status=0
target/release/examples/serve_load "$url" data/sample/test "$clients" "$requests" "$seconds" || status=$?
kill -TERM "$pid"; wait "$pid" || { echo "serve exited with $?" >&2; exit 1; }
exit $status
