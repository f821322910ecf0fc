"""Memory benchmarks: delete latency (flat in N), compaction, and the reference twins'
search/attend at ImageNet size beside the hardware floors they are judged against.

Ratios are only meaningful between figures of one run (shared, noisy machine).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import make_memory

from kmem import ops


@pytest.mark.parametrize("which", ["small", "rows"])
def test_delete_one_id(benchmark, sizes, which):
    """One ``delete`` of a single id; auto-compaction off so only the O(1) delete is timed."""
    n = sizes[which]
    mem = make_memory(n, sizes["dim"], compact_threshold=None)
    benchmark.group = "delete one id"
    benchmark.extra_info["rows"] = n
    victims = itertools.count()
    rounds = min(500, n)
    benchmark.pedantic(lambda: mem.delete(next(victims)), rounds=rounds, iterations=1, warmup_rounds=0)
    assert len(mem) < n


def test_compact_quarter_dead(benchmark, sizes):
    """Stable compaction with 25% dead rows, beside a plain copy of the live key bytes."""
    n, dim = sizes["rows"], sizes["dim"]
    src = torch.randn(n, dim)
    keep = torch.rand(n) >= 0.25
    out = torch.empty_like(src)
    benchmark.group = "compaction (25% dead)"
    benchmark.pedantic(lambda: ops.compact_rows(src, keep, out), rounds=5, iterations=1, warmup_rounds=1)


def test_copy_live_bytes(benchmark, sizes):
    n, dim = sizes["rows"], sizes["dim"]
    live = torch.randn(int(0.75 * n), dim)
    out = torch.empty_like(live)
    benchmark.group = "compaction (25% dead)"
    benchmark.pedantic(lambda: out.copy_(live), rounds=5, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("batch", [1, 64])
def test_search_reference(benchmark, large_memory, batch):
    keys, _, slot_ids = large_memory.buffers()
    q = torch.randn(batch, keys.shape[1])
    benchmark.group = f"search/attend B={batch}"
    benchmark.pedantic(lambda: ops.search(q, keys, slot_ids, 32, backend="reference"), rounds=3, iterations=1)


@pytest.mark.parametrize("batch", [1, 64])
def test_attend_reference(benchmark, large_memory, batch):
    keys, values, slot_ids = large_memory.buffers()
    q = torch.randn(batch, keys.shape[1])
    benchmark.group = f"search/attend B={batch}"
    benchmark.pedantic(
        lambda: ops.topk_attention(q, keys, values, slot_ids, 32, backend="reference"), rounds=3, iterations=1
    )


@pytest.mark.parametrize("batch", [1, 64])
def test_floor_scores_only(benchmark, large_memory, batch):
    """The bare ``queries @ keys.T`` (B=64: the compute floor) -- what any exact search must at least do."""
    keys, _, _ = large_memory.buffers()
    q = torch.randn(batch, keys.shape[1])
    benchmark.group = f"search/attend B={batch}"
    benchmark.pedantic(lambda: q @ keys.T, rounds=3, iterations=1)


def test_floor_stream_read(benchmark, large_memory):
    """One streaming read of the key bytes: the bandwidth floor of a B=1 search."""
    keys, _, _ = large_memory.buffers()
    benchmark.group = "search/attend B=1"
    benchmark.pedantic(lambda: keys.sum(), rounds=3, iterations=1)
