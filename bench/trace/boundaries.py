"""Medians of the FA3 kernel's item-boundary steps, from the `T cta role item [8 stamps]` lines of
a traced run (bench/trace/sm90_trace.py): clock64 cycles of one SM, per consumer warpgroup and item.

    python3 bench/trace/boundaries.py trace.log
"""
import collections
import re
import statistics
import sys

rows = collections.defaultdict(dict)
for line in open(sys.argv[1]):
    m = re.match(r"T (\d+) (\d+) (\d+) \[(.*)\]", line)
    if m:
        rows[int(m[1])][(int(m[2]), int(m[3]))] = [int(x) for x in m[4].split(",")]

# Consumer stamps: 0 Q landed, 1 first S done, 2 last S done, 3 last P V done, 4 epilogue done,
# 5 the item's first S issued under the last epilogue (the item-crossing S of the kernel that
# session 18 traced; 0 on main since), 6 tiles. Producer: 0 item read, 1 Q slot free, 2 Q issued, 3 last tile issued.
steps = collections.defaultdict(list)
for cta in rows.values():
    for role in (1, 2):
        n = 0
        while (role, n + 1) in cta and cta[(role, n + 1)][0]:
            a, b = cta[(role, n)], cta[(role, n + 1)]
            tiles, ahead = a[6], b[5]
            if tiles >= 2:
                steps["a tile of the loop (first S to last S)"].append((a[2] - a[1]) / (tiles - 1))
                steps[f"last S -> last P V done (next ahead={ahead})"].append(a[3] - a[2])
            steps[f"epilogue (next ahead={ahead})"].append(a[4] - a[3])
            if not ahead:
                steps["epilogue -> next Q seen"].append(b[0] - a[4])
                steps["next Q seen -> its first S done"].append(b[1] - b[0])
            last_s = a[2] if tiles >= 2 else a[1]
            steps["last S -> next item's first S done"].append(b[1] - last_s)
            n += 1
    n = 0
    while (0, n + 1) in cta:
        a = cta[(0, n)]
        if a[2]:
            steps["producer: Q slot free -> Q issued"].append(a[2] - a[1])
        n += 1
for name, v in steps.items():
    med, mean = statistics.median(v), statistics.mean(v)
    print(f"{name:44s} n={len(v):4d} median={med:7.0f} mean={mean:7.0f}")
