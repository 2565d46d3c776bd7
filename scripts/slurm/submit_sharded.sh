#!/bin/bash
# Submits a sharded training: an array of N shard jobs (train_sharded.sbatch) and the merge
# (merge.sbatch) that starts only when every shard succeeded (--dependency=afterok). Prints
# the two job ids (array, merge).
#   scripts/slurm/submit_sharded.sh INPUT OUTPUT N [patchcore train options...]
# Partial models go to OUTPUT.parts/; SBATCH_* variables (e.g. SBATCH_PARTITION) apply to
# both jobs; $PATCHCORE names the binary (default: `patchcore` on the PATH).
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 INPUT OUTPUT N [train options...]" >&2
  exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
input=$1 output=$2 n=$3
shift 3
parts="$output.parts"
mkdir -p "$parts"
array=$(sbatch --parsable --array="0-$((n - 1))" --chdir="$PWD" \
  "$here/train_sharded.sbatch" "$input" "$parts" "$@")
array=${array%%;*}
merge=$(sbatch --parsable --dependency="afterok:$array" --chdir="$PWD" \
  "$here/merge.sbatch" "$output" "$parts" "$n")
echo "$array ${merge%%;*}"
