"""bench/gpu_table.py: the GPU targets' ratio table from a benchmark JSON file (no GPU needed)."""

from __future__ import annotations

import json

from _bench_modules import bench_module

gpu_table = bench_module("gpu_table")


def _run(name: str, events: list[float] | None = None, median_s: float = 1.0) -> dict:
    return {
        "name": name,
        "stats": {"median": median_s},
        "extra_info": {} if events is None else {"event_ms": events},
    }


def test_ratios_use_event_medians_and_say_met_missed_or_not_run(tmp_path, capsys):
    runs = [
        _run("test_attend[1-cuda]", [1.0, 1.2, 9.0]),  # median 1.2 ms
        _run("test_floor_stream", [1.0, 1.0, 1.0]),
        _run("test_attend[64-cuda]", [3.0, 3.0, 3.0]),
        _run("test_floor_gemm[64]", [1.0, 1.0, 1.0]),
        _run("test_dense_attend[cuda]", median_s=0.002),  # no events: wall time, 2 ms
        _run("test_dense_attend[reference]", median_s=0.004),
        _run("test_attend_k_sweep[4096-cuda]", [7.5]),
        _run("test_attend_adversarial_order[cuda-ascending]", [1.5]),
        _run("test_attend_adversarial_order[cuda-random]", [1.0]),
        _run("test_lever[triton-fused-topk-on]", [1.0]),
        _run("test_lever[triton-fused-topk-off]", [4.0]),
        _run("test_training_step_of_learned_rows[dense-cuda]", [6.0]),
        _run("test_training_step_of_learned_rows[sparse-cuda]", [2.0]),
    ]
    text = gpu_table.table({"benchmarks": runs})
    rows = {
        tuple(c.strip() for c in line.split("|")[1:3]): line
        for line in text.splitlines()
        if line.startswith("| ")
    }
    assert "| 1.20x | ≤ 1.3x one read of the keys | met |" in rows["attend B = 1, fp32", "cuda"]
    assert "| 3.00x | ≤ 1.5x the fp32 GEMM | missed |" in rows["attend B = 64, fp32", "cuda"]
    assert "| 0.50x | faster than the reference | met |" in rows["dense attend B = 64", "cuda"]
    assert rows["attend B = 256, fp32", "cuda"].endswith("| not run |")
    assert rows["attend B = 1, fp32", "triton"].endswith("| not run |")
    assert "| 4096 | 7.500 ms | not run |" in text
    assert "| cuda | 1.500 ms | 1.000 ms | 1.50x |" in text and "| triton | not run | not run | — |" in text
    assert (
        "| fused-topk | triton | 1.000 ms | 4.000 ms | 0.25x |" in text
        and "| tf32-screen | cuda | not run | not run | — |" in text
    )
    assert "| cuda | 6.000 ms | 2.000 ms | not run | 3.00x |" in text
    assert "| reference | not run | not run | not run | — |" in text
    first, second = tmp_path / "bench-targets.json", tmp_path / "bench-others.json"
    first.write_text(json.dumps({"benchmarks": runs[:4]}))
    second.write_text(json.dumps({"benchmarks": runs[4:]}))
    gpu_table.main(str(first), str(second))  # two runs' figures, one table
    assert capsys.readouterr().out.strip() == text
