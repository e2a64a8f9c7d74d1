"""Probe (issue 14, v6): time per iteration by XLA op of a trace from ``profile_chunk.py``
(YNNPACK fusions, Eigen dots, everything else). Tracing adds ~1 us per op.

    .venv/bin/python scripts/results/bench_sac/v6_probes/profile_summary.py /tmp/sac6/trace_car_head 8
"""

import collections
import glob
import re
import sys

import jax

d = sys.argv[1]
n_iter = int(sys.argv[2])
f = sorted(glob.glob(f"{d}/**/*.xplane.pb", recursive=True))[-1]
pd = jax.profiler.ProfileData.from_file(f)
tot = collections.Counter()
cnt = collections.Counter()
for plane in pd.planes:
    for line in plane.lines:
        if "XLAEigen" not in line.name and "PjRtCpuClient" not in line.name:
            continue
        for ev in line.events:
            tot[ev.name] += ev.duration_ns
            cnt[ev.name] += 1
skip = re.compile(r"^(ThunkExecutor|while|cond|call|conditional)")
cats = collections.Counter()
for n, t in tot.items():
    if skip.match(n):
        continue
    c = "ynn" if n.startswith("ynn_fusion") else "dot" if n.startswith("dot") or "dot" in n else "other"
    cats[c] += t
print(
    {k: round(v / 1e6 / n_iter, 2) for k, v in cats.items()},
    "ms/iter; sum",
    round(sum(cats.values()) / 1e6 / n_iter, 2),
)
print(
    "containers:",
    {n: round(t / 1e6 / n_iter, 2) for n, t in tot.items() if skip.match(n) and t / 1e6 / n_iter > 0.5},
)
other = [
    (t, n) for n, t in tot.items() if not skip.match(n) and not n.startswith("ynn_fusion") and "dot" not in n
]
other.sort(reverse=True)
print("n other ops per iter:", sum(cnt[n] for _, n in other) / n_iter)
for t, n in other[:25]:
    print(f"{t / 1e6 / n_iter:7.3f} ms {cnt[n] / n_iter:6.1f}x  {n}")
