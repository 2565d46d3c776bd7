#!/usr/bin/env bash
# Benchmark on one MVTec-style category: train + predict with the real binary, per-stage wall
# seconds, seconds per image, peak RSS, sizes and image AUROC, as a table and as JSON.
#   bash scripts/benchmark.sh ../shared/data/mvtec_ad/screw [--json FILE] [--augment N] \
#        [-- extra train options, e.g. --weights random:0 -s 0.01 --precision bf16]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
cargo build --release --locked --examples >&2
exec target/release/examples/benchmark "$@"
