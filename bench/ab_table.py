#!/usr/bin/env python3
"""The table bench/ab.sh prints: for each benchmark row, each build's median over its rounds
(OUTDIR/NAME-ROUND.json, ferrinfer-bench's --json), and each build against the first.

    python3 bench/ab_table.py OUTDIR NAME [NAME...]

A row a build did not produce (a failed or missing run) shows as "-"; rows whose unit is a time
would read backwards, but every ferrinfer-bench row is a rate (GB/s, TFLOP/s, ...).
"""
import glob
import json
import os
import statistics
import sys


def medians(out, name):
    """Row key -> (median value, unit) over the build's rounds."""
    rows = {}
    for path in sorted(glob.glob(os.path.join(out, f"{glob.escape(name)}-*.json"))):
        round_part = os.path.basename(path)[len(name) + 1 : -len(".json")]
        if not round_part.isdigit():  # another build whose name starts with this one's
            continue
        with open(path) as f:
            for key, row in json.load(f).items():
                rows.setdefault(key, []).append(row)
    return {k: (statistics.median(r["value"] for r in v), v[0]["unit"]) for k, v in rows.items()}


def table(out, names):
    builds = [medians(out, n) for n in names]
    keys = sorted(set().union(*builds))
    width = max([len(k) for k in keys] + [3])
    head = f"{'row':<{width}}  {'unit':<8}" + "".join(f"  {n:>10}" for n in names)
    head += "".join(f"  {n + '/' + names[0]:>14}" for n in names[1:])
    lines = [head]
    for k in keys:
        vals = [b.get(k, (None, None)) for b in builds]
        unit = next((u for _, u in vals if u), "")
        line = f"{k:<{width}}  {unit:<8}"
        line += "".join(f"  {v:>10.1f}" if v is not None else f"  {'-':>10}" for v, _ in vals)
        base = vals[0][0]
        for v, _ in vals[1:]:
            ratio = f"{v / base:.3f}" if v is not None and base else "-"
            line += f"  {ratio:>14}"
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    print(table(sys.argv[1], sys.argv[2:]))
