#!/bin/bash
# How experiments/sharded-training.md was measured: assumes /tmp/shards-exp holds pc-new (this
# branch's patchcore), coverage (examples/coverage_radius), the reference weights
# (make_weights.py) and the unsharded run of `mvtec runall` in unsharded/.
# Sharded training of full screw (N=4) + merge + evaluation + coverage radii.
set -euo pipefail
cd /tmp/shards-exp
B=./pc-new; W=/tmp/shards-exp/wrn50_seed0.safetensors; D=/work/shared/data/mvtec_ad/screw
O="--weights $W --resize 256 --crop 224 --calibration-ratio 0 -q"
mkdir -p sh
for i in 0 1 2 3; do
  /usr/bin/time -f "shard $i: %e s wall, %M KiB peak" $B train -i $D/train/good -o sh/part$i.faiss --shard $i/4 $O
done
/usr/bin/time -f "merge: %e s wall, %M KiB peak" $B merge -o sh/merged.faiss sh/part0.faiss sh/part1.faiss sh/part2.faiss sh/part3.faiss -q
/usr/bin/time -f "eval: %e s wall" $B mvtec runall --data /work/shared/data/mvtec_ad --category screw --evaluate sh/merged.faiss --out sharded-eval -q
U=$(ls -d unsharded/*/screw)
/usr/bin/time -f "coverage: %e s wall" ./coverage $D/train/good $U/index.faiss sh/merged.faiss
echo DONE
