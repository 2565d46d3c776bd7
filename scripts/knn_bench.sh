#!/usr/bin/env bash
# kNN benchmark on one MVTec category: trains a flat model (paper protocol: --resize 256
# --crop 224, 10% coreset; extra train options after --) unless MODEL exists, then times the
# search of its test images by FAISS, the bf16 shortlist and IVF (examples/knn_bench.rs),
# 2 threads by default, normalised by the bare forward of the same run.
#   bash scripts/knn_bench.sh ../shared/data/mvtec_ad/screw MODEL.faiss [bench options] \
#        [-- train options, e.g. --weights random:0]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
category=$1 model=$2
shift 2
bench=() train=()
while [ $# -gt 0 ] && [ "$1" != -- ]; do bench+=("$1"); shift; done
[ $# -gt 0 ] && shift && train=("$@")
threads=2
for ((i = 0; i < ${#bench[@]}; i++)); do
  [ "${bench[$i]}" = --threads ] && threads=${bench[$((i + 1))]}
done
cargo build --release --locked --example knn_bench >&2
if [ ! -f "$model" ]; then
  target/release/patchcore train -i "$category/train/good" -o "$model" --resize 256 --crop 224 \
    -s 0.1 --calibration-ratio 0 --threads "$threads" -q "${train[@]}"
fi
OMP_NUM_THREADS=$threads exec target/release/examples/knn_bench "$model" "$category" \
  --threads "$threads" "${bench[@]}"
