#!/bin/bash
# How experiments/sharded-training/README.md was measured: N = 4 shards of full MVTec screw, the merge
# and the evaluation of the merged model, once per shard mode given (`all`: the default, every
# patch kept; a number F: --shard-oversample F).
#
#   B=target/release/patchcore W=wrn50_seed0.safetensors experiments/sharded-training/run.sh OUT all 4 2
#
# W: the official reference's seeded weights (../shared/reference/official-screw/make_weights.py).
# The unsharded run to compare with: `$B mvtec runall --data $DATA --category screw --weights $W`
# (add --seed S for the seed noise). Coverage radii: `cargo run --release --example
# coverage_radius -- $DATA/screw/train/good UNSHARDED/index.faiss OUT/osF/merged.faiss`.
set -euo pipefail
B=$(realpath "${B:-target/release/patchcore}"); W=$(realpath "$W")
DATA=${DATA:-$(realpath ../shared/data/mvtec_ad)}; D=$DATA/screw
OUT=$1; shift
O="--weights $W --resize 256 --crop 224 --calibration-ratio 0 -q"
for F in "$@"; do
  R=$OUT/os$F; mkdir -p "$R"
  for i in 0 1 2 3; do
    /usr/bin/time -f "os$F shard $i: %e s wall, %M KiB peak" "$B" train -i "$D/train/good" \
      -o "$R/part$i.faiss" --shard $i/4 $( [ "$F" = all ] || echo --shard-oversample "$F") $O
  done
  /usr/bin/time -f "os$F merge: %e s wall, %M KiB peak" "$B" merge -o "$R/merged.faiss" \
    "$R"/part0.faiss "$R"/part1.faiss "$R"/part2.faiss "$R"/part3.faiss
  /usr/bin/time -f "os$F eval: %e s wall" "$B" mvtec runall --data "$DATA" --category screw \
    --evaluate "$R/merged.faiss" --out "$R-eval" -q
done
