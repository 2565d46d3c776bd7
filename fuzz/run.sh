#!/usr/bin/env bash
# Fuzzes the sidecar parser and the model loader with libFuzzer (cargo-fuzz), each for
# SECONDS (default 600), seeded with a real model trained on the bundled sample.
#   bash fuzz/run.sh [SECONDS]
# Needs `cargo install cargo-fuzz`. cargo-fuzz wants a nightly compiler; RUSTC_BOOTSTRAP=1
# lets the stable one accept the flags it passes. No sanitizer: libtorch is not built with
# one, so ASan would only report its allocations; panics and aborts are still findings.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
secs=${1:-600}
seeds=$(mktemp -d)
target/release/patchcore train -q -i data/sample/train -o "$seeds/index.faiss" --weights random:0 -s 0.02
mkdir -p fuzz/corpus/sidecar fuzz/corpus/model_loader
cp "$seeds/index.faiss.json" fuzz/corpus/sidecar/seed.json
{ cat "$seeds/index.faiss.json"; printf '\377'; cat "$seeds/index.faiss"; } > fuzz/corpus/model_loader/seed
# The fuzz binaries are not linked by our build script, so they find libtorch this way.
export LD_LIBRARY_PATH="$LIBTORCH/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
for t in sidecar model_loader; do
  RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer none --release "$t" -- \
    -max_total_time="$secs" -max_len=1048576 -rss_limit_mb=4096 -print_final_stats=1
done
