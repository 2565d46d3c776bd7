#!/usr/bin/env bash
# Load test of `patchcore serve` on loopback: trains a model on data/sample/train (or uses
# MODEL), serves it, and lets CLIENTS clients POST REQUESTS images each (data/sample/test,
# cycled) with examples/serve_load.rs; prints throughput and p50/p99 latency as JSON, then
# stops the server with SIGTERM and checks it exits 0. Bounded: CLIENTS x REQUESTS requests,
# none started after SECONDS.
#   bash scripts/serve_load.sh [CLIENTS=4] [REQUESTS=50] [SECONDS=600] [-- serve options]
# Soak (SOAK=1): 10 rounds of 500 requests (CLIENTS clients), a SIGHUP reload at the start of
# every round after the first (9 reloads, while requests arrive); prints each round's
# figures and the server's RSS and peak RSS after it, and fails unless every request was
# answered 200, every reload succeeded, and the peak RSS after the last round is within 10%
# of the peak after round 2 (round 1 is the warm-up).
# SOAK_ROUND=N makes a round N requests instead (a shorter soak on a busy machine).
#   SOAK=1 MODEL=model/index.faiss bash scripts/serve_load.sh 4 0 [SECONDS] [-- serve options]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
clients=${1:-4}; requests=${2:-50}; seconds=${3:-600}
shift $(( $# < 3 ? $# : 3 )); [ "${1:-}" = "--" ] && shift
cargo build --release --quiet --bin patchcore --example serve_load
client=${CARGO_TARGET_DIR:-target}/release/examples/serve_load
bin=${CARGO_TARGET_DIR:-target}/release/patchcore
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
kib() { awk -v k="$1:" '$1 == k {print $2}' "/proc/$pid/status"; }
if [ "${SOAK:-0}" = 1 ]; then
  rounds=10; per_client=$(( ${SOAK_ROUND:-500} / clients ))
  for round in $(seq "$rounds"); do
    [ "$round" -gt 1 ] && kill -HUP "$pid"
    figures=$("$client" "$url" data/sample/test "$clients" "$per_client" "$seconds") || status=1
    peak=$(kib VmHWM)
    [ "$round" -eq 2 ] && warm_peak=$peak
    echo "{\"round\": $round, \"rss_kib\": $(kib VmRSS), \"peak_rss_kib\": $peak, \"load\": $figures}"
  done
  sleep 2
  reloads=$(grep -c 'reloaded ' "$work/serve.log" || true)
  failed=$(grep -c 'reload of .* failed' "$work/serve.log" || true)
  growth=$(awk -v a="$warm_peak" -v b="$peak" 'BEGIN {printf "%.1f", 100 * (b - a) / a}')
  echo "{\"reloads\": $reloads, \"failed_reloads\": $failed, \"peak_rss_growth_after_warmup_pct\": $growth}"
  [ "$reloads" -eq $(( rounds - 1 )) ] && [ "$failed" -eq 0 ] || { echo "reloads: $reloads of $(( rounds - 1 ))" >&2; status=1; }
  awk -v g="$growth" 'BEGIN {exit !(g <= 10)}' || { echo "peak RSS grew $growth% after warm-up" >&2; status=1; }
else
  "$client" "$url" data/sample/test "$clients" "$requests" "$seconds" || status=$?
fi
kill -TERM "$pid"; wait "$pid" || { echo "serve exited with $?" >&2; exit 1; }
exit $status
