"""The GPU targets' ratio table (issue 17) from a ``bench/test_bench_gpu.py`` JSON file.

Each figure is a median of CUDA-event times (``extra_info["event_ms"]``; pytest-benchmark's
wall-time median where a run has none), every ratio between two figures of the one run.
Prints a Markdown table for BENCHMARKS.md; a figure that did not run reads "not run".

Usage: python bench/gpu_table.py RESULTS.json [MORE.json ...]   (the runs' benchmarks together)
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import NamedTuple


class Target(NamedTuple):
    figure: str
    ours: str  # benchmark name, "{b}" standing for the backend
    floor: str  # the benchmark it is divided by
    bound: float  # met when ours / floor <= bound
    says: str


TARGETS = [
    Target(
        "attend B = 1, fp32", "test_attend[1-{b}]", "test_floor_stream", 1.3, "≤ 1.3x one read of the keys"
    ),
    Target("attend B = 64, fp32", "test_attend[64-{b}]", "test_floor_gemm[64]", 1.5, "≤ 1.5x the fp32 GEMM"),
    Target(
        "attend B = 256, fp32", "test_attend[256-{b}]", "test_floor_gemm[256]", 1.5, "≤ 1.5x the fp32 GEMM"
    ),
    Target(
        "attend B = 64, bf16 keys",
        "test_attend_bf16_keys[{b}]",
        "test_attend_bf16_keys[bf16-gemm]",
        1.5,
        "≤ 1.5x the bf16 GEMM",
    ),
    Target(
        "dense attend B = 64",
        "test_dense_attend[{b}]",
        "test_dense_attend[reference]",
        1.0,
        "faster than the reference",
    ),
    Target(
        "compaction, 25% dead",
        "test_compact_quarter_dead[{b}]",
        "test_compact_quarter_dead[copy-of-live-bytes]",
        1.2,
        "≤ 1.2x a copy of the live bytes",
    ),
    Target(
        "training step N = 100k, B = 256",
        "test_training_step[{b}]",
        "test_training_step[reference]",
        0.5,
        "≥ 2x faster than the reference",
    ),
]
K_SWEEP = [1, 32, 256, 4096]
LEVERS = ["tf32-screen", "fused-topk", "dense-3xtf32"]  # the keys of bench/levers.py's LEVERS


def medians(results: dict) -> dict[str, float]:
    """Benchmark name -> median milliseconds."""
    out = {}
    for run in results["benchmarks"]:
        events = run.get("extra_info", {}).get("event_ms")
        out[run["name"]] = statistics.median(events) if events else run["stats"]["median"] * 1e3
    return out


def _ms(x: float | None) -> str:
    return "not run" if x is None else f"{x:,.3f} ms"


def table(results: dict, backends: tuple[str, ...] = ("cuda", "triton")) -> str:
    """The Markdown ratio table of every target for each backend, then the k sweep, the
    adversarial row order against the stored one, each lever on and off (below 1x: the
    lever pays), and a step on learned rows with dense and sparse gradients against its
    forward alone."""
    ms = medians(results)
    lines = [
        "| figure | backend | ours | floor | ratio | target | |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for t in TARGETS:
        for b in backends:
            ours, floor = ms.get(t.ours.format(b=b)), ms.get(t.floor)
            if ours is None or floor is None:
                ratio, verdict = "—", "not run"
            else:
                ratio, verdict = f"{ours / floor:.2f}x", "met" if ours / floor <= t.bound else "missed"
            lines.append(
                f"| {t.figure} | {b} | {_ms(ours)} | {_ms(floor)} | {ratio} | {t.says} | {verdict} |"
            )
    lines += ["", "| attend B = 64, k | " + " | ".join(backends) + " |", "| --- |" + " --- |" * len(backends)]
    for k in K_SWEEP:
        lines.append(
            f"| {k} | " + " | ".join(_ms(ms.get(f"test_attend_k_sweep[{k}-{b}]")) for b in backends) + " |"
        )
    lines += ["", "| attend B = 1, rows in ascending score order | ascending | stored order | ratio |"]
    lines.append("| --- | --- | --- | --- |")
    for b in backends:
        up, stored = (
            ms.get(f"test_attend_adversarial_order[{b}-{order}]") for order in ("ascending", "random")
        )
        ratio = "—" if up is None or stored is None else f"{up / stored:.2f}x"
        lines.append(f"| {b} | {_ms(up)} | {_ms(stored)} | {ratio} |")
    lines += ["", "| lever | backend | on | off | on / off |", "| --- | --- | --- | --- | --- |"]
    for lever in LEVERS:
        for b in backends:
            on, off = (ms.get(f"test_lever[{b}-{lever}-{state}]") for state in ("on", "off"))
            ratio = "—" if on is None or off is None else f"{on / off:.2f}x"
            lines.append(f"| {lever} | {b} | {_ms(on)} | {_ms(off)} | {ratio} |")
    lines += [
        "",
        "| step on learned rows | dense grads | sparse grads | forward only | dense / sparse |",
        "| --- | --- | --- | --- | --- |",
    ]
    for b in (*backends, "reference"):
        dense, sparse, forward = (
            ms.get(f"test_training_step_of_learned_rows[{g}-{b}]")
            for g in ("dense", "sparse", "forward only")
        )
        ratio = "—" if dense is None or sparse is None else f"{dense / sparse:.2f}x"
        lines.append(f"| {b} | {_ms(dense)} | {_ms(sparse)} | {_ms(forward)} | {ratio} |")
    return "\n".join(lines)


def main(*paths: str) -> None:
    runs = [run for path in paths for run in json.loads(Path(path).read_text())["benchmarks"]]
    print(table({"benchmarks": runs}))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
