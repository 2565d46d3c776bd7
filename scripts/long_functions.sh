#!/usr/bin/env bash
# Lists the functions in src/ longer than LIMIT lines (default 100) outside test modules, and
# the files longer than FILE_LIMIT lines (default 900) before their test module, longest first:
#   bash scripts/long_functions.sh [LIMIT [FILE_LIMIT]]
# A function runs from its `fn` line to the closing brace at its indentation (rustfmt's layout);
# a test module is `#[cfg(test)]` followed by `mod NAME {`, skipped to its closing brace.
# Exit status 1 when anything is listed. tests/code_size.rs runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
limit=${1:-100}
file_limit=${2:-900}
found=$(find src -name '*.rs' | sort | xargs awk -v limit="$limit" -v flimit="$file_limit" '
function report_file() {
  if (file != "" && code > flimit) printf "file %s: %d lines before its tests\n", file, code
}
FNR == 1 { report_file(); file = FILENAME; code = 0; skip = ""; cfg = 0; open = "" }
{
  line = $0
  if (skip != "") { if (line == skip) skip = ""; next }
  if (line ~ /^[ \t]*#\[cfg\(test\)\]/) { cfg = 1; next }
  if (cfg && match(line, /^[ \t]*(pub(\([a-z]+\))? )?mod [a-z_]+ \{$/)) {
    indent = line; sub(/[^ \t].*/, "", indent); skip = indent "}"; cfg = 0; next
  }
  if (line !~ /^[ \t]*#\[/) cfg = 0
  code = FNR
  if (open == "" && match(line, /^[ \t]*(pub(\([a-z]+\))? )?((const|async|unsafe|extern "C") )*fn [A-Za-z0-9_]+/)) {
    indent = line; sub(/[^ \t].*/, "", indent)
    name = line; sub(/^[^f]*fn /, "", name); sub(/[^A-Za-z0-9_].*/, "", name)
    start = FNR; open = "sig"
  }
  if (open == "sig") {
    if (line ~ /\{$/) open = "body"
    else if (line ~ /;$/ || line ~ /\}$/) open = ""
    if (open == "body" && line ~ /\}$/ && FNR == start) open = ""
    next
  }
  if (open == "body" && line == indent "}") {
    n = FNR - start + 1
    if (n > limit) printf "fn %s:%d %s: %d lines\n", FILENAME, start, name, n
    open = ""
  }
}
END { report_file() }
')
[ -z "$found" ] || { echo "$found"; exit 1; }
