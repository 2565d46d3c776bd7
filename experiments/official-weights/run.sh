#!/usr/bin/env bash
# Full MVTec screw with the official reference's seeded WideResNet-50-2 weights
# (../shared/reference/official-screw/make_weights.py), paper protocol, 10% coreset, with the
# official code's BatchNorm probe (the default) and without it. Writes the runs under
# experiments/runs/ (not committed) and copies each result.json to experiments/official-weights/.
#   bash experiments/official-weights/run.sh [MVTEC_ROOT] [extra runall options]
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
data=${1:-../shared/data/mvtec_ad}
shift || true
weights=experiments/runs/wrn50_seed0.safetensors
mkdir -p experiments/runs experiments/official-weights
if [ ! -f "$weights" ]; then
  "$PATCHCORE_PYTHON" ../shared/reference/official-screw/make_weights.py "$weights"
fi
bin=target/release/patchcore
for mode in probe no-probe; do
  extra=()
  [ "$mode" = no-probe ] && extra=(--no-batchnorm-probe)
  "$bin" mvtec runall --data "$data" --category screw --weights "$weights" \
    --out "experiments/runs/official-weights-$mode" "${extra[@]}" "$@"
  cp experiments/runs/official-weights-$mode/*/screw/result.json \
    "experiments/official-weights/screw-$mode.json"
done
