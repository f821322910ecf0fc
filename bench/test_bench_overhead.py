"""Per-call overhead of the memory's reads on a tiny memory, beside the overhead of a
plain ``nn.Linear`` call measured in the same run (issue 16's target: ``attend`` and
``search`` on a 16-row memory each at most 3x an ``nn.Linear(16, 4)`` call).

At 16 rows the kernels' work is a few hundred FLOPs: what is timed is the Python,
the checks and the dispatch on the way to the kernel. One thread, so the figures do
not measure OpenMP's start-up. The group's ratios are the figure to quote, from a run
with nothing else on the machine.
"""

from __future__ import annotations

import pytest
import torch

import kmem

ROWS, DIM, BATCH, K = 16, 16, 4, 4


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    """A 16-row memory (value width 4), a batch of 4 queries and an nn.Linear(16, 4)."""
    gen = torch.Generator().manual_seed(0)
    mem = kmem.KeyMemory(DIM, 4, capacity=ROWS)
    mem.add(torch.arange(ROWS), torch.randn(ROWS, DIM, generator=gen), torch.randn(ROWS, 4, generator=gen))
    return mem, torch.randn(BATCH, DIM, generator=gen), torch.nn.Linear(DIM, 4)


CALLS = {
    "nn.Linear(16, 4)": lambda mem, q, linear: linear(q),
    "KeyMemory.attend k=4": lambda mem, q, linear: mem.attend(q, k=K),
    "KeyMemory.attend dense": lambda mem, q, linear: mem.attend(q, k=None),
    "KeyMemory.search k=4": lambda mem, q, linear: mem.search(q, K),
}


@pytest.mark.parametrize("call", list(CALLS))
def test_call_overhead(benchmark, one_thread, tiny, call):
    benchmark.group = "call overhead: 16-row memory, 4 queries, one thread"
    fn = CALLS[call]
    with torch.no_grad():
        benchmark(fn, *tiny)
