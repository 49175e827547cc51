#!/usr/bin/env bash
# Ours and FlashInfer on the same keys (prefill: its FA3; decode: both its decode paths), one key
# at a time, alternating, each row warmed before it is timed (BENCHMARKS.md, "Power and clocks"):
# an H200 boosts for about the first 100 ms of a dense kernel and then holds its 700 W cap at
# lower clocks, so a short run from a cool GPU (FlashInfer's rows after its JIT) and one from a
# hot GPU (ours, back to back) are not the same measurement. Here both sides run the same
# schedule, in the same thermal state.
#
# Usage, on the GPU machine from the repository root with .gpu staged (tools/gpu-stage):
#   bench/anchor/interleave.sh OUTDIR ROUNDS KEY [KEY...]
# Environment: WARM_MS (1000) and TIME_MS (3000) for both sides, BENCH (.gpu/bin/ferrinfer-bench),
# IMPLS (our rows timed, ferrinfer-bench's --impls, e.g. ferrinfer-auto; all when unset).
# Writes OUTDIR/{fi,ours}-KEY-ROUND.json and .log (FlashInfer's JIT runs once first, jit.*), each
# side's medians over rounds as OUTDIR/ours.json and OUTDIR/anchor.json, and compare.py's table
# as OUTDIR/compare.txt.
set -uo pipefail
out=$1 rounds=$2
shift 2
warm=${WARM_MS:-1000} timed=${TIME_MS:-3000}
bench=${BENCH:-.gpu/bin/ferrinfer-bench}
anchor=$(dirname "$0")/flashinfer_anchor.py
mkdir -p "$out"
fi_run() {  # fi_run OUT.json FILTER WARM_MS TIME_MS
  ANCHOR_ONLY_FLASHINFER=1 ANCHOR_PREFILL_BACKENDS=fa3 ANCHOR_WARM_MS=$3 ANCHOR_TIME_MS=$4 \
    timeout 600 python3 "$anchor" "$1" "$2" > "${1%.json}.log" 2>&1
}
all=$(printf '=%s,' "$@")
fi_run "$out/jit.json" "${all%,}" 0 20
for r in $(seq 1 "$rounds"); do
  for k in "$@"; do
    fi_run "$out/fi-$k-$r.json" "=$k" "$warm" "$timed"
    "$bench" --filter "=$k" ${IMPLS:+--impls "$IMPLS"} --warm-ms "$warm" --time-ms "$timed" \
      --json "$out/ours-$k-$r.json" \
      > "$out/ours-$k-$r.log" 2>&1
  done
done
# Each side's rows, the median over rounds, as one JSON each, and the side-by-side table.
python3 - "$out" <<'PY'
import glob, json, statistics, sys
out = sys.argv[1]
for side, name in (("ours", "ours.json"), ("fi", "anchor.json")):
    rows = {}
    for path in sorted(glob.glob(f"{out}/{side}-*-*.json")):
        for key, row in json.load(open(path)).items():
            rows.setdefault(key, []).append(row)
    merged = {k: {"value": statistics.median(r["value"] for r in v), "unit": v[0]["unit"],
                  "ms": statistics.median(r["ms"] for r in v)} for k, v in rows.items()}
    json.dump(merged, open(f"{out}/{name}", "w"), indent=1, sort_keys=True)
PY
python3 "$(dirname "$0")/compare.py" "$out/ours.json" "$out/anchor.json" | tee "$out/compare.txt"
