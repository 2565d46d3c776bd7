#!/usr/bin/env bash
# Builds a relocatable bundle of patchcore for machines without Python, a compiler or internet:
#   dist/patchcore-VERSION-linux-x86_64.tar.gz
#     bin/patchcore     the release binary, RUNPATH $ORIGIN/../lib
#     lib/              every shared library it needs that a minimal Debian/Ubuntu lacks,
#                       each with RUNPATH $ORIGIN
#     licenses/         the licences of what lib/ holds, and of FAISS (linked into the binary)
#     README.md         how to run it
#
#   bash scripts/bundle.sh [--out DIR] [--no-build]
#
# The libraries are found by walking DT_NEEDED from the binary down (each name resolved as the
# loader resolves it for the object that asks for it, `ldd`), not from a hand list. Only the
# C/C++ runtime that every Debian/Ubuntu install has (glibc, libgcc_s, libstdc++: apt itself
# needs them) stays out. libtorch_cuda and the CUDA libraries only it needs are not linked by
# the binary (runtime::load_cuda opens them for --device cuda), so they stay out: the bundle is
# CPU-only. libtorch_cpu itself links libcudart and libcupti, which therefore come along.
#
# Honours CARGO_TARGET_DIR. Needs patchelf, readelf, objdump (binutils); scripts/setup.sh
# installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

out=dist
build=true
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --no-build) build=false; shift ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "bundle.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
log() { echo "[bundle] $*" >&2; }
for tool in patchelf readelf objdump ldd; do
  command -v "$tool" >/dev/null || { echo "bundle.sh: $tool not found (scripts/setup.sh installs it)" >&2; exit 1; }
done

target="${CARGO_TARGET_DIR:-target}"
if "$build"; then
  log "cargo build --release --locked (target: $target)"
  cargo build --release --locked
fi
binary="$target/release/patchcore"
[ -x "$binary" ] || { echo "bundle.sh: $binary not found: build it first or drop --no-build" >&2; exit 1; }
version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)"
name="patchcore-$version-linux-x86_64"

# In every Debian/Ubuntu install, minimal ones included (libc6, libgcc-s1, libstdc++6).
is_base_system() {
  case "$1" in
    ld-linux-x86-64.so.2|libc.so.6|libm.so.6|libdl.so.2|libpthread.so.0|librt.so.1|libutil.so.1) return 0 ;;
    libgcc_s.so.1|libstdc++.so.6) return 0 ;;
  esac
  return 1
}

stage="$(mktemp -d "${TMPDIR:-/tmp}/patchcore-bundle.XXXXXX")"
trap 'rm -rf "$stage"' EXIT
root="$stage/$name"
mkdir -p "$root/bin" "$root/lib" "$root/licenses"
cp "$binary" "$root/bin/patchcore"
strip --strip-debug "$root/bin/patchcore"

# name -> resolved path, filled by the walk (the soname is the file name in lib/).
declare -A found=()
walk() {
  local object="$1" needed path
  local resolved
  resolved="$(ldd "$object")"
  for needed in $(readelf -d "$object" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
    is_base_system "$needed" && continue
    [ -n "${found[$needed]:-}" ] && continue
    path="$(awk -v n="$needed" '$1 == n && $2 == "=>" { print $3 }' <<<"$resolved")"
    if [ -z "$path" ] || [ "$path" = "not" ]; then
      echo "bundle.sh: $object needs $needed, which the loader cannot find" >&2
      exit 1
    fi
    found[$needed]="$(readlink -f "$path")"
    walk "${found[$needed]}"
  done
}
walk "$binary"

# The licence of each library: its pip package's licence folder (libtorch, the CUDA runtime
# wheels), or its Debian package's copyright file.
site_packages_of() { sed -n 's|^\(.*/site-packages\)/.*|\1|p' <<<"$1"; }
licence_for() {
  local path="$1" sp rel record pkg
  sp="$(site_packages_of "$path")"
  if [ -n "$sp" ]; then
    rel="${path#"$sp"/}"
    record="$(grep -l -F "$rel," "$sp"/*.dist-info/RECORD 2>/dev/null | head -n1 || true)"
    if [ -n "$record" ]; then
      local dist; dist="$(dirname "$record")"
      if [ ! -e "$root/licenses/$(basename "$dist" .dist-info)" ]; then
        if [ -d "$dist/licenses" ]; then
          cp -r "$dist/licenses" "$root/licenses/$(basename "$dist" .dist-info)"
        else
          mkdir -p "$root/licenses/$(basename "$dist" .dist-info)"
          cp "$dist"/LICENSE* "$dist"/License* "$root/licenses/$(basename "$dist" .dist-info)/" 2>/dev/null || true
        fi
      fi
      echo "$(basename "$dist" .dist-info)"
      return
    fi
  fi
  pkg="$(dpkg -S "$path" 2>/dev/null || dpkg -S "${path#/usr}" 2>/dev/null || true)"
  pkg="${pkg%%:*}"
  if [ -n "$pkg" ] && [ -f "/usr/share/doc/$pkg/copyright" ]; then
    mkdir -p "$root/licenses/$pkg"
    cp "/usr/share/doc/$pkg/copyright" "$root/licenses/$pkg/copyright"
    echo "$pkg"
    return
  fi
  echo "bundle.sh: no licence found for $path" >&2
  exit 1
}

manifest="$root/licenses/MANIFEST"
echo "# library  <-  where it came from  (licence folder)" >"$manifest"
for soname in $(printf '%s\n' "${!found[@]}" | sort); do
  src="${found[$soname]}"
  cp "$src" "$root/lib/$soname"
  chmod u+w "$root/lib/$soname"
  patchelf --set-rpath '$ORIGIN' "$root/lib/$soname"
  echo "$soname  <-  $src  ($(licence_for "$src"))" >>"$manifest"
done
patchelf --set-rpath '$ORIGIN/../lib' "$root/bin/patchcore"

# FAISS is linked statically into the binary.
faiss_licence="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/faiss-sys-*/faiss/LICENSE 2>/dev/null | sort | tail -n1 || true)"
[ -n "$faiss_licence" ] || { echo "bundle.sh: FAISS's LICENSE not found in the cargo registry" >&2; exit 1; }
mkdir -p "$root/licenses/faiss"
cp "$faiss_licence" "$root/licenses/faiss/LICENSE"
echo "(static in bin/patchcore)  <-  FAISS 1.12 via faiss-sys  (faiss)" >>"$manifest"

# The oldest C library and C++ runtime it runs on: the highest symbol versions anything asks for.
highest() {
  objdump -T "$root/bin/patchcore" "$root"/lib/* 2>/dev/null \
    | grep -o "$1_[0-9][0-9.]*" | sed "s/^$1_//" | sort -t. -k1,1n -k2,2n -k3,3n -u | tail -n1
}
glibc="$(highest GLIBC)"
glibcxx="$(highest GLIBCXX)"

cat >"$root/README.md" <<EOF
# patchcore $version (linux x86_64, CPU)

A relocatable build: run \`bin/patchcore\` from wherever this folder is; it finds its libraries
in \`lib/\` by itself (RUNPATH \`\$ORIGIN/../lib\`). Nothing else is needed beyond a Linux with
glibc >= $glibc and libstdc++ >= GLIBCXX_$glibcxx (Debian 12, Ubuntu 22.04 or newer): no
Python, no compiler, no internet.

    bin/patchcore --version
    bin/patchcore predict --index model/index.faiss -i images/ -o out/
    bin/patchcore serve --index model/index.faiss --listen 0.0.0.0:8080

Models: make them self-contained on the training machine (\`patchcore export --index
index.faiss -o model/\`, or \`train --self-contained\`): the folder then holds the backbone
weights too, and loading it never touches the network. A model that names its weights
\`imagenet\` without them would try to download them.

CPU only: \`--device cuda\` is not available from this bundle. licenses/ holds the licences of
the libraries in lib/ and of FAISS, which is linked into the binary; licenses/MANIFEST says
where each library came from.
EOF

mkdir -p "$out"
tarball="$out/$name.tar.gz"
log "writing $tarball"
tar -C "$stage" -czf "$tarball.tmp" "$name"
mv "$tarball.tmp" "$tarball"
unpacked="$(du -sm "$root" | cut -f1)"
packed="$(du -m "$tarball" | cut -f1)"
echo "bundle: $tarball ($packed MB; $unpacked MB unpacked; ${#found[@]} libraries: $(printf '%s ' "${!found[@]}" | tr ' ' '\n' | sort | tr '\n' ' '))"
echo "needs: glibc >= $glibc, libstdc++ >= GLIBCXX_$glibcxx"
