"""bench/levers.py: each lever of the GPU benchmarks, turned off, takes the other path --
checked on the CUDA kernels through their simulator and on Triton through its
interpreter, since the benchmarks themselves run only on a GPU."""

from __future__ import annotations

import os

import _cuda_sim
import pytest
import torch
from _bench_modules import bench_module
from _buffers import buffers

from kmem import ops
from kmem.kernels import dense, search

levers = bench_module("levers")

BACKENDS = ["triton", _cuda_sim.NAME]


def _kernels_run(backend: str, k: int | None) -> list[str]:
    """The kernels of ``backend`` one small attention call runs."""
    keys, slot_ids = buffers(200, 8)
    with ops.trace() as ran:
        ops.topk_attention(torch.randn(3, 8), keys, torch.randn(200, 2), slot_ids, k, backend=backend)
    return [e.split(".", 1)[1] for e in ran if e.startswith(f"{backend}.")]


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_topk_off_runs_search_then_attend(backend, monkeypatch):
    assert _kernels_run(backend, 4) == ["topk_forward"]
    with monkeypatch.context() as m:
        levers.lever_off(backend, "fused-topk", m)
        assert _kernels_run(backend, 4) == ["search", "attend_forward"]
    assert _kernels_run(backend, 4) == ["topk_forward"]  # undone with the monkeypatch


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lever", ["tf32-screen", "dense-3xtf32"])
def test_tensor_core_levers_off_turn_to_float32(backend, lever, monkeypatch):
    levers.lever_off(backend, lever, monkeypatch)
    if backend == _cuda_sim.NAME:  # one switch, read by the kernels at each call
        assert os.environ["KMEM_CUDA_TENSOR_CORES"] == "0"
    elif lever == "tf32-screen":
        assert search.TENSOR_CORE_BATCH > 1 << 20
    else:
        assert dense.precision(torch.float32) == "ieee"
    assert _kernels_run(backend, None) == ["dense_forward"]  # and calls still run


def test_the_table_prints_every_lever():
    assert list(levers.LEVERS) == bench_module("gpu_table").LEVERS
