#!/usr/bin/env bash
# Issue 17, part 4: the seed project's two comparisons (backbones; pretrainings of ResNet-50)
# redone with `patchcore mvtec runall` on MVTec AD screw, then `mvtec summarize` into
# experiments/backbones/. Paper protocol (--resize 256 --crop 224, 1% coreset, every training
# image in the bank), 2 threads. Weights: random:0 for every network, because no pretrained
# weights can be downloaded on the machine this was run on; with internet, drop --weights
# (ImageNet) or pass coco / ssl / swsl.
#   bash experiments/backbones/run.sh [DATA_DIR]      # default ../shared/data/mvtec_ad
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${1:-../shared/data/mvtec_ad}
source scripts/env.sh
PATCHCORE_BIN=${PATCHCORE_BIN:-target/release/patchcore}
[ -n "${SKIP_BUILD:-}" ] || cargo build --release --locked >&2
RUNS=${RUNS:-target/tmp/backbone-runs}
BACKBONES=(resnet18 resnet50 wide_resnet50_2 resnext50_32x4d resnext101_32x8d
  densenet121 densenet161 densenet169 densenet201
  vgg11 vgg11_bn vgg13 vgg13_bn vgg16 vgg16_bn vgg19 vgg19_bn
  deeplabv3_resnet50 deeplabv3_resnet101)
args=()
for b in "${BACKBONES[@]}"; do args+=(--backbone "$b"); done
WEIGHTS=${WEIGHTS:-random:0}
"$PATCHCORE_BIN" mvtec runall --data "$DATA" --category screw "${args[@]}" \
  --weights "$WEIGHTS" -s 0.01 --out "$RUNS" -q
"$PATCHCORE_BIN" mvtec summarize --runs "$RUNS" --out experiments/backbones
