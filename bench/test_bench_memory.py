"""Memory benchmarks: delete latency (flat in N), compaction, and the reference twins'
search/attend at ImageNet size beside the hardware floors they are judged against.

Ratios are only meaningful between figures of one run (shared, noisy machine).
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from conftest import make_memory, quarter_dead_buffers

import kmem
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


@pytest.mark.parametrize("what", ["delete", "zero the rows' bytes"])
def test_forget_a_tenth_of_a_loaded_label_memory(benchmark, sizes, what):
    """A forget request as SPM-style meets it at full size: 10% of a 60,000 x 128 label
    memory (Fashion-MNIST), freshly loaded from its state (cold, as after a checkpoint
    load), deleted in one call -- beside the floor of scrubbing those rows' key bytes."""
    n, dim = min(sizes["rows"], 60_000), 128
    gen = torch.Generator().manual_seed(0)
    keys, labels = torch.randn(n, dim, generator=gen), torch.randint(0, 10, (n,), generator=gen)
    state = None

    def fresh():
        nonlocal state
        mem = kmem.KeyMemory(dim, num_classes=10, capacity=n)
        if state is None:
            mem.add(torch.arange(n), keys, labels)
            state = copy.deepcopy(mem.state_dict())
        mem.load_state_dict(copy.deepcopy(state))
        ids = torch.randperm(n, generator=gen)[: n // 10]
        return (mem, ids), {}

    benchmark.group = "forget 10% of a loaded 60,000 x 128 label memory"
    if what == "delete":
        benchmark.pedantic(lambda mem, ids: mem.delete(ids), setup=fresh, rounds=20, iterations=1)
    else:
        benchmark.pedantic(
            lambda mem, ids: ops.zero_rows(mem._keys, ids), setup=fresh, rounds=20, iterations=1
        )


def test_compact_quarter_dead(benchmark, sizes):
    """Stable compaction of a memory's keys, values and ids (one call) with 25% dead rows."""
    buffers, keep, outs, _, _ = quarter_dead_buffers(sizes["rows"], sizes["dim"])
    benchmark.group = "compaction (25% dead)"
    benchmark.pedantic(lambda: ops.compact_rows(buffers, keep, outs), rounds=5, iterations=1, warmup_rounds=1)


def test_copy_live_bytes(benchmark, sizes):
    """The floor: a plain copy of the same three buffers' live rows."""
    _, _, _, live, outs = quarter_dead_buffers(sizes["rows"], sizes["dim"])
    benchmark.group = "compaction (25% dead)"
    benchmark.pedantic(
        lambda: [o.copy_(x) for o, x in zip(outs, live, strict=True)], rounds=5, iterations=1, warmup_rounds=1
    )


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
