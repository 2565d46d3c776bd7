# Sourced by the other scripts: where the cached Python environment and libtorch live.
# PATCHCORE_CACHE (default ~/.cache/patchcore) holds everything installed outside the repo.
export PATCHCORE_CACHE="${PATCHCORE_CACHE:-$HOME/.cache/patchcore}"
export PATCHCORE_PYTHON="${PATCHCORE_PYTHON:-$PATCHCORE_CACHE/py/bin/python}"
if [ -z "${LIBTORCH:-}" ] && [ -x "$PATCHCORE_PYTHON" ]; then
  LIBTORCH="$("$PATCHCORE_PYTHON" -c 'import os, torch; print(os.path.dirname(torch.__file__))' 2>/dev/null || true)"
  export LIBTORCH
fi
