#!/usr/bin/env bash
# The main job on the bundled synthetic sample: train on data/sample/train, predict
# data/sample/test, leave verdicts, heatmaps, masks and the HTML report in demo-output/.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release/patchcore
out=${1:-demo-output}
[ -x "$bin" ] || bash scripts/setup.sh

train() { "$bin" train -i data/sample/train -o "$out/index.faiss" "$@"; }
if ! train --weights imagenet; then
  cat >&2 <<'MSG'

  !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
  !!  The ImageNet weights could not be had (see the error above).                        !!
  !!  FALLING BACK TO RANDOM WEIGHTS (--weights random:0): the pipeline runs end to end,   !!
  !!  but these are NOT the scores of a pretrained PatchCore. See SETUP.md, "Weights".     !!
  !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!

MSG
  train --weights random:0
fi
"$bin" predict -i data/sample/test -o "$out/predictions" --index "$out/index.faiss"
echo "results ($out/predictions/results.csv):"
column -t -s, "$out/predictions/results.csv" 2>/dev/null || cat "$out/predictions/results.csv"
echo "per image: $out/predictions/{good,scratch,spot}/NNN.jpg (overlay), NNN.npy (heatmap),"
echo "  NNN_mask.png (defect mask), NNN.json (verdict, regions); report: $out/predictions/index.html"
