#!/usr/bin/env bash
# Ours against ours: builds that differ in their kernel headers (FERRINFER_KERNEL_DIR), their
# environment (FERRINFER_SM90_OVERLAP, ...) or their benchmark binary, on the same keys. Within a
# round the builds run one after another on every key, so each is warmed and timed in the same
# thermal state as the others (an H200 at its 700 W cap moves a few percent with how warm it is:
# BENCHMARKS.md, "Power and clocks"); the rounds alternate the order.
#
# Usage, on the GPU machine from the repository root with .gpu staged (tools/gpu-stage):
#   bench/ab.sh OUTDIR ROUNDS FILTER BUILD [BUILD...]
# FILTER is ferrinfer-bench's --filter list. A BUILD is NAME or NAME:VAR=VALUE[,VAR=VALUE...]: the
# variables are set for that build's runs; BENCH=PATH picks its binary (.gpu/bin/ferrinfer-bench
# by default). Each build has its own NVRTC cache. Environment: WARM_MS (1000), TIME_MS (2000),
# IMPLS (ferrinfer-bench's --impls: the rows timed, e.g. ferrinfer-fa3; all when unset).
# Writes OUTDIR/NAME-ROUND.{json,log} and OUTDIR/ab.txt: each row's median over the rounds, per
# build, and each build against the first.
#
# Example: main against a header branch, in order and overlapped:
#   git archive fa3-kv-split kernels/cuda | tar -x -C /tmp/split     (before staging)
#   bench/ab.sh out 2 "=prefill_single_s8192_full" main \
#     split:FERRINFER_KERNEL_DIR=/tmp/split/kernels/cuda \
#     split-ov:FERRINFER_KERNEL_DIR=/tmp/split/kernels/cuda,FERRINFER_SM90_OVERLAP=1
set -uo pipefail
if [ $# -lt 4 ]; then
  sed -n '2,/^set /{/^#/p}' "$0" >&2  # this header
  exit 2
fi
out=$1 rounds=$2 filter=$3
shift 3
builds=("$@")
names=()
for b in "${builds[@]}"; do names+=("${b%%:*}"); done
# A name is its runs' file prefix: two builds of one name would overwrite each other's rows.
if [ "$(printf '%s\n' "${names[@]}" | sort | uniq -d)" ]; then
  echo "ab.sh: build names must differ: ${names[*]}" >&2
  exit 2
fi
warm=${WARM_MS:-1000} timed=${TIME_MS:-2000}
mkdir -p "$out"
run_build() {  # run_build BUILD ROUND
  local name=${1%%:*} vars=() bench=.gpu/bin/ferrinfer-bench
  if [[ $1 == *:* ]]; then
    IFS=, read -ra vars <<< "${1#*:}"
  fi
  local env_args=("FERRINFER_CACHE_DIR=${TMPDIR:-/tmp}/ab-cache-$name")
  for v in "${vars[@]}"; do
    case $v in
      BENCH=*) bench=${v#BENCH=} ;;
      *=*) env_args+=("$v") ;;
      *) echo "ab.sh: '$v' in build '$1' is not VAR=VALUE" >&2; return 2 ;;
    esac
  done
  env "${env_args[@]}" timeout 600 "$bench" --filter "$filter" ${IMPLS:+--impls "$IMPLS"} --warm-ms "$warm" \
    --time-ms "$timed" --json "$out/$name-$2.json" > "$out/$name-$2.log" 2>&1
}
for r in $(seq 1 "$rounds"); do
  order=("${builds[@]}")
  if (( r % 2 == 0 )); then  # every other round backwards: no build always runs first
    order=()
    for (( i=${#builds[@]}-1; i>=0; i-- )); do order+=("${builds[i]}"); done
  fi
  for b in "${order[@]}"; do
    run_build "$b" "$r" || echo "ab.sh: build '${b%%:*}' round $r failed (see its log)" >&2
  done
done
python3 "$(dirname "$0")/ab_table.py" "$out" "${names[@]}" | tee "$out/ab.txt"
