"""Sizes for the benchmark suites, from the command line.

Full size (the figures in BENCHMARKS.md): ``pytest bench``. CI runs every benchmark
once at a tiny size so the suites never rot: ``pytest bench --benchmark-disable --rows 3000``.
"""

from __future__ import annotations

import pytest
import torch

import kmem

IMAGENET_ROWS = 1_281_167


def pytest_addoption(parser):
    group = parser.getgroup("kmem benchmarks")
    group.addoption("--rows", type=int, default=IMAGENET_ROWS, help="rows of the large memory")
    group.addoption("--small-rows", type=int, default=10_000, help="rows of the small memory")
    group.addoption("--dim", type=int, default=256, help="key dimension")


@pytest.fixture(scope="session")
def sizes(request):
    opt = request.config.getoption
    return {"rows": opt("--rows"), "small": min(opt("--small-rows"), opt("--rows")), "dim": opt("--dim")}


def quarter_dead_buffers(rows: int, dim: int, device: str = "cpu"):
    """A memory's keys ``[rows, dim]``, values ``[rows, 16]`` and ids ``[rows]`` with 25% of
    rows dead: ``(buffers, keep, outs, live, live_outs)`` -- what compaction moves, and the
    live bytes alone with room to copy them (the floor it is compared with)."""
    gen = torch.Generator().manual_seed(0)
    buffers = [
        torch.randn(rows, dim, generator=gen),
        torch.randn(rows, 16, generator=gen),
        torch.arange(rows),
    ]
    buffers = [b.to(device) for b in buffers]
    keep = (torch.rand(rows, generator=gen) >= 0.25).to(device)
    kept = int(keep.sum())
    live = [b[:kept].clone() for b in buffers]
    return buffers, keep, [torch.empty_like(b) for b in buffers], live, [torch.empty_like(b) for b in live]


def make_memory(rows: int, dim: int, value_dim: int = 16, **kw) -> kmem.KeyMemory:
    """A vector memory with ids 0..rows-1 and Gaussian keys, preallocated to its size."""
    mem = kmem.KeyMemory(dim, value_dim, capacity=rows, **kw)
    gen = torch.Generator().manual_seed(0)
    step = 1 << 16
    for start in range(0, rows, step):
        n = min(step, rows - start)
        mem.add(
            torch.arange(start, start + n),
            torch.randn(n, dim, generator=gen),
            torch.randn(n, value_dim, generator=gen),
        )
    return mem


LEARNED_ROW_GRADS = ["dense", "sparse", "forward only"]


def learned_rows_step(rows: int, dim: int, grads: str, backend: str, device: str = "cpu", k: int = 32):
    """One SGD step on learned memory rows (keys ``[rows, dim]`` and values ``[rows, 16]``
    are parameters) at B = 256, as a function: ``grads`` "dense" zero-fills and updates
    every row, "sparse" (``sparse_grad=True``) only the B k retrieved ones, "forward
    only" is the step's floor, its read alone."""
    gen = torch.Generator(device).manual_seed(0)
    keys = torch.nn.Parameter(torch.randn(rows, dim, generator=gen, device=device))
    values = torch.nn.Parameter(torch.randn(rows, 16, generator=gen, device=device))
    slot_ids, q = torch.arange(rows, device=device), torch.randn(256, dim, generator=gen, device=device)
    opt = torch.optim.SGD([keys, values], lr=1e-3)
    sparse = grads == "sparse"

    def step():
        opt.zero_grad()
        with torch.set_grad_enabled(grads != "forward only"):
            out = kmem.ops.topk_attention(q, keys, values, slot_ids, k, backend=backend, sparse_grad=sparse)
        if out.requires_grad:
            out.pow(2).mean().backward()
            opt.step()

    return step


@pytest.fixture(scope="session")
def large_memory(sizes):
    """The targets' memory: every tenth row deleted (tombstones, scrubbed, not compacted
    away), as issue 18 measures."""
    mem = make_memory(sizes["rows"], sizes["dim"], compact_threshold=None)
    mem.delete(torch.arange(0, sizes["rows"], 10))
    return mem
