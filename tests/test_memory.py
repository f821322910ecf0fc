"""KeyMemory: adding, O(1) deletion with scrubbing, stable compaction, reads."""

from __future__ import annotations

import pytest
import torch
from conftest import brute_attention, brute_topk, filled_memory

import kmem


def _fresh_like(mem, ids, keys, values):
    """A memory with mem's settings that only ever received these rows."""
    other = kmem.KeyMemory(
        mem.key_dim, mem.value_dim, num_classes=mem.num_classes, metric=mem.metric, dtype=mem.dtype
    )
    other.add(ids, keys, values)
    return other


def _assert_same_state(a, b):
    for x, y in zip(a.state(), b.state(), strict=True):
        assert x.dtype == y.dtype and torch.equal(x, y)


def test_add_len_contains_and_growth():
    mem = kmem.KeyMemory(4, 2, capacity=2)
    for start in range(0, 100, 10):
        mem.add(torch.arange(start, start + 10), torch.randn(10, 4), torch.randn(10, 2))
    assert len(mem) == 100 and 7 in mem and 100 not in mem and "x" not in mem
    assert mem.capacity >= 100
    assert torch.equal(mem.ids(), torch.arange(100))
    # Geometric growth: far fewer reallocations than adds of one row.
    mem = kmem.KeyMemory(4, 2, capacity=1)
    capacities = set()
    for i in range(1000):
        mem.add(torch.tensor([i]), torch.randn(1, 4), torch.randn(1, 2))
        capacities.add(mem.capacity)
    assert len(capacities) < 25


def test_delete_marks_dead_and_scrubs_bytes():
    mem = kmem.KeyMemory(4, 3, compact_threshold=None)
    mem.add(torch.arange(10), torch.full((10, 4), 7.0), torch.full((10, 3), 9.0))
    assert mem.delete(torch.tensor([2, 5])) == 2
    assert len(mem) == 8 and 2 not in mem and mem.num_dead == 2
    keys, values, slot_ids = mem.buffers()
    # The slots are tombstoned and their bytes gone before compaction.
    assert slot_ids[2] == -1 and slot_ids[5] == -1
    assert bool((keys[[2, 5]] == 0).all()) and bool((values[[2, 5]] == 0).all())
    assert bool((keys[[0, 1, 3, 4, 6]] == 7).all())
    _, ids = mem.search(torch.ones(1, 4), 10)
    assert 2 not in ids.tolist() and 5 not in ids.tolist() and ids[0, -2:].tolist() == [-1, -1]


def test_delete_accepts_int_list_and_tensor():
    mem, *_ = filled_memory(20, compact_threshold=None)
    assert mem.delete(3) == 1
    assert mem.delete([4, 5]) == 2
    assert mem.delete(torch.tensor([6])) == 1
    assert mem.delete([]) == 0
    assert len(mem) == 16


@pytest.mark.parametrize("num_classes", [None, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_compaction_equals_never_inserted_memory(num_classes, dtype):
    mem, ids, keys, values = filled_memory(300, num_classes=num_classes, dtype=dtype, compact_threshold=None)
    gone = torch.randperm(300)[:120]
    mem.delete(gone)
    keep = torch.ones(300, dtype=torch.bool)
    keep[gone] = False
    assert mem.compact() == 120 and mem.num_dead == 0 and mem.compact() == 0
    never = _fresh_like(mem, ids[keep], keys[keep], values[keep])
    _assert_same_state(mem, never)
    # Bit for bit, including the buffers the ops read.
    for x, y in zip(mem.buffers(), never.buffers(), strict=True):
        assert torch.equal(x, y)
    q = torch.randn(4, 8)
    assert torch.equal(mem.search(q, 9)[1], never.search(q, 9)[1])
    assert torch.equal(mem.attend(q, k=9), never.attend(q, k=9))


def test_results_before_compaction_equal_never_inserted():
    mem, ids, keys, values = filled_memory(200, compact_threshold=None)
    mem.delete(torch.arange(0, 200, 3))
    keep = torch.arange(200) % 3 != 0
    never = _fresh_like(mem, ids[keep], keys[keep], values[keep])
    q = torch.randn(5, 8)
    assert torch.equal(mem.search(q, 12)[1], never.search(q, 12)[1])
    torch.testing.assert_close(mem.attend(q, k=12), never.attend(q, k=12))
    torch.testing.assert_close(mem.attend(q, k=None), never.attend(q, k=None))


def test_auto_compaction_threshold():
    mem, *_ = filled_memory(100, compact_threshold=0.25)
    mem.delete(torch.arange(25))
    assert mem.num_dead == 25  # at the threshold, not past it
    mem.delete([25])
    assert mem.num_dead == 0 and len(mem) == 74 and torch.equal(mem.ids(), torch.arange(26, 100))
    manual, *_ = filled_memory(100, compact_threshold=None)
    manual.delete(torch.arange(90))
    assert manual.num_dead == 90


def test_compaction_ran_the_compiled_kernel():
    ext = kmem._ext.compiled()
    assert ext is not None, kmem._ext.missing_reason()
    mem, *_ = filled_memory(50, compact_threshold=None)
    mem.delete([1, 2])
    with kmem.ops.trace() as ran:
        mem.compact()
    assert ran.count("cpp.compact_rows") == 1  # keys, values and slot ids in one call


def test_readd_after_delete_and_version():
    mem, *_ = filled_memory(10)
    v = mem.version
    mem.delete([3])
    mem.add(torch.tensor([3]), torch.zeros(1, 8), torch.zeros(1, 3))
    assert 3 in mem and mem.version == v + 2
    assert mem.ids().tolist()[-1] == 3


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("num_classes", [None, 4])
def test_search_and_attend_match_brute_force(metric, num_classes):
    mem, _ids, _keys, _values = filled_memory(
        120, num_classes=num_classes, metric=metric, compact_threshold=None
    )
    mem.delete(torch.arange(0, 120, 7))
    keys_b, values_b, slot_ids = mem.buffers()
    q = torch.randn(6, 8)
    ex = torch.randint(0, 120, (6, 3))
    _scores, got = mem.search(q, 10, exclude_ids=ex)
    slots = brute_topk(q, keys_b, slot_ids, 10, metric, ex)
    assert torch.equal(got, torch.where(slots >= 0, slot_ids[slots.clamp(min=0)], -1))
    assert not set(got.flatten().tolist()) & set(range(0, 120, 7))
    for row, excluded in zip(got.tolist(), ex.tolist(), strict=True):
        assert not set(row) & set(excluded)
    out = mem.attend(q, k=10, exclude_ids=ex)
    want = brute_attention(q, keys_b, values_b, slot_ids, 10, 8**-0.5, metric, ex, num_classes)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)


def test_empty_memory_reads():
    for mem in (kmem.KeyMemory(4, 3), kmem.KeyMemory(4, num_classes=2)):
        scores, ids = mem.search(torch.randn(2, 4), 3)
        assert torch.equal(ids, torch.full((2, 3), -1)) and bool(torch.isneginf(scores).all())
        assert torch.equal(mem.attend(torch.randn(2, 4)), torch.zeros(2, mem.out_dim))
        assert torch.equal(mem.attend(torch.randn(2, 4), k=None), torch.zeros(2, mem.out_dim))
        assert len(mem) == 0 and mem.compact() == 0


@pytest.mark.parametrize("capacity", [5, 6, 64])
def test_k_larger_than_live_rows(capacity):
    # Capacity 5: the buffer is full, so slot -1 cannot be read as its (live) last slot.
    mem, *_ = filled_memory(5, capacity=capacity)
    assert mem.capacity == capacity
    scores, ids = mem.search(torch.randn(2, 8), 9)
    assert ids.shape == (2, 9) and bool((ids[:, 5:] == -1).all())
    assert sorted(ids[0, :5].tolist()) == list(range(5)) and sorted(ids[1, :5].tolist()) == list(range(5))
    assert bool(torch.isneginf(scores[:, 5:]).all())
    q = torch.randn(2, 8)
    torch.testing.assert_close(mem.attend(q, k=9), mem.attend(q, k=None))


def test_attend_is_differentiable_in_queries():
    mem, *_ = filled_memory(40)
    q = torch.randn(3, 8, requires_grad=True)
    mem.attend(q, k=5).pow(2).sum().backward()
    assert q.grad is not None and bool(q.grad.abs().sum() > 0)


def test_repr_mentions_state():
    mem, *_ = filled_memory(10, compact_threshold=None)
    mem.delete([0])
    assert "rows=9" in repr(mem) and "dead=1" in repr(mem)


def test_fingerprint_tracks_content_not_history():
    mem, ids, keys, values = filled_memory(40, compact_threshold=None)
    full = mem.fingerprint()
    mem.delete([5, 6])
    keep = ~torch.isin(ids, torch.tensor([5, 6]))
    never = _fresh_like(mem, ids[keep], keys[keep], values[keep])
    assert mem.fingerprint() == never.fingerprint() != full
    mem.compact()
    assert mem.fingerprint() == never.fingerprint()
    never.add(torch.tensor([5]), keys[5:6], values[5:6])
    assert mem.fingerprint() != never.fingerprint()
