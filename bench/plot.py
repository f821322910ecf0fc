"""Plot attend time against memory size (log-log) from a pytest-benchmark JSON file.

Usage: python bench/plot.py bench/results.json bench/attend_vs_rows.png
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main(results: str, out: str) -> None:
    runs = json.loads(Path(results).read_text())["benchmarks"]
    series: dict[tuple[str, int], list[tuple[int, float]]] = defaultdict(list)
    for run in runs:
        info = run.get("extra_info", {})
        if run["name"].startswith("test_attend_vs_rows"):
            series[info["backend"], info["batch"]].append((info["rows"], run["stats"]["median"]))
    if not series:
        raise SystemExit(f"{results} has no test_attend_vs_rows results")
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for (backend, batch), points in sorted(series.items()):
        rows, seconds = zip(*sorted(points), strict=True)
        style = "-" if backend == "cpp" else "--"
        ax.loglog(rows, [1e3 * s for s in seconds], style, marker="o", label=f"{backend}, B={batch}")
    ax.set_xlabel("live rows N (key_dim 256, fp32)")
    ax.set_ylabel("attend, top-32 (ms, median)")
    ax.set_title("kmem attend: fused C++ vs reference twin")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
