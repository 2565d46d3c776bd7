#!/usr/bin/env bash
# Runs the whole test suite (unit, parity against PyTorch/SciPy, end to end, bad input, weights
# download over loopback, and the MVTec screw subset when ../shared/data/mvtec_ad is there; with
# CI=true, a test that misses its data or a program fails instead of skipping).
# Sets up first (idempotent: quick when everything is installed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
cargo test --release --locked "$@"
