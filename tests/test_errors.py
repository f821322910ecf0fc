"""Bad input raises a clear error naming the argument, and changes nothing."""

from __future__ import annotations

import pytest
import torch
from conftest import filled_memory

import kmem


def _snapshot(mem):
    return (mem.version, len(mem), *(t.clone() for t in mem.buffers()))


def _unchanged(mem, before):
    after = _snapshot(mem)
    assert before[:2] == after[:2]
    assert all(torch.equal(x, y) for x, y in zip(before[2:], after[2:], strict=True))


ADD_CASES = [
    # (ids, keys, values, error, words in the message)
    (torch.tensor([50, 50]), torch.randn(2, 8), torch.randn(2, 3), ValueError, "repeats"),
    (torch.tensor([3]), torch.randn(1, 8), torch.randn(1, 3), ValueError, "already"),
    (torch.tensor([-4]), torch.randn(1, 8), torch.randn(1, 3), ValueError, ">= 0"),
    (torch.tensor([60], dtype=torch.int32), torch.randn(1, 8), torch.randn(1, 3), TypeError, "ids"),
    (torch.tensor([[60]]), torch.randn(1, 8), torch.randn(1, 3), ValueError, "ids"),
    ([60], torch.randn(1, 8), torch.randn(1, 3), TypeError, "ids"),
    (torch.tensor([60]), torch.randn(1, 7), torch.randn(1, 3), ValueError, "keys"),
    (torch.tensor([60, 61]), torch.randn(1, 8), torch.randn(2, 3), ValueError, "keys"),
    (torch.tensor([60]), torch.ones(1, 8, dtype=torch.long), torch.randn(1, 3), TypeError, "keys"),
    (torch.tensor([60]), torch.full((1, 8), float("nan")), torch.randn(1, 3), ValueError, "NaN"),
    (torch.tensor([60]), torch.full((1, 8), float("inf")), torch.randn(1, 3), ValueError, "Inf"),
    (torch.tensor([60]), torch.randn(1, 8), torch.randn(1, 4), ValueError, "values"),
    (torch.tensor([60]), torch.randn(1, 8), torch.tensor([1]), TypeError, "values"),
    (torch.tensor([60]), torch.randn(1, 8), torch.full((1, 3), float("nan")), ValueError, "values"),
]


@pytest.mark.parametrize(("ids", "keys", "values", "error", "words"), ADD_CASES)
def test_bad_add_changes_nothing(ids, keys, values, error, words):
    mem, *_ = filled_memory(50)
    before = _snapshot(mem)
    with pytest.raises(error, match=words):
        mem.add(ids, keys, values)
    _unchanged(mem, before)


@pytest.mark.parametrize(
    ("labels", "error"),
    [(torch.tensor([5]), ValueError), (torch.tensor([-1]), ValueError), (torch.tensor([0.5]), TypeError)],
)
def test_bad_labels(labels, error):
    mem, *_ = filled_memory(10, num_classes=5)
    before = _snapshot(mem)
    with pytest.raises(error, match="values"):
        mem.add(torch.tensor([99]), torch.randn(1, 8), labels)
    _unchanged(mem, before)


def test_unknown_id_in_delete_deletes_nothing():
    mem, *_ = filled_memory(20)
    before = _snapshot(mem)
    with pytest.raises(KeyError, match="nothing was deleted"):
        mem.delete([1, 2, 999])
    _unchanged(mem, before)
    assert 1 in mem and 2 in mem


@pytest.mark.parametrize(
    ("ids", "error"), [([4, 4], ValueError), (torch.tensor([1.0]), TypeError), (["a"], TypeError)]
)
def test_bad_delete_deletes_nothing(ids, error):
    mem, *_ = filled_memory(20)
    before = _snapshot(mem)
    with pytest.raises(error):
        mem.delete(ids)
    _unchanged(mem, before)


def test_deleted_id_is_unknown():
    mem, *_ = filled_memory(20, compact_threshold=None)
    mem.delete([4])
    with pytest.raises(KeyError):
        mem.delete([4])


@pytest.mark.parametrize(
    ("call", "error", "words"),
    [
        (lambda m: m.search(torch.randn(2, 8), 0), ValueError, "k"),
        (lambda m: m.attend(torch.randn(2, 8), k=0), ValueError, "k"),
        (lambda m: m.search(torch.randn(2, 8), 1.5), TypeError, "k"),
        (lambda m: m.search(torch.randn(2, 7), 2), ValueError, "queries"),
        (lambda m: m.search(torch.randn(8), 2), ValueError, "queries"),
        (lambda m: m.search(torch.ones(2, 8, dtype=torch.long), 2), TypeError, "queries"),
        (lambda m: m.search(torch.full((2, 8), float("nan")), 2), ValueError, "queries"),
        (lambda m: m.search(torch.randn(2, 8), 2, exclude_ids=torch.zeros(2, 3)), TypeError, "exclude_ids"),
        (
            lambda m: m.search(torch.randn(2, 8), 2, exclude_ids=torch.zeros(3, 1, dtype=torch.long)),
            ValueError,
            "exclude_ids",
        ),
        (lambda m: m.search(torch.randn(2, 8, device="meta"), 2), ValueError, "queries is on meta"),
    ],
)
def test_bad_reads(call, error, words):
    mem, *_ = filled_memory(20)
    with pytest.raises(error, match=words):
        call(mem)


def test_wrong_device_in_add():
    mem, *_ = filled_memory(5)
    with pytest.raises(ValueError, match="keys"):
        mem.add(torch.tensor([9]), torch.randn(1, 8, device="meta"), torch.randn(1, 3))


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"key_dim": 4}, ValueError),
        ({"key_dim": 4, "value_dim": 2, "num_classes": 3}, ValueError),
        ({"key_dim": 0, "value_dim": 2}, ValueError),
        ({"key_dim": 4, "value_dim": 2, "metric": "cosine"}, ValueError),
        ({"key_dim": 4, "value_dim": 2, "dtype": torch.int32}, TypeError),
        ({"key_dim": 4, "value_dim": 2, "compact_threshold": 0.0}, ValueError),
        ({"key_dim": 4, "value_dim": 2, "capacity": 0}, ValueError),
    ],
)
def test_bad_construction(kwargs, error):
    with pytest.raises(error):
        kmem.KeyMemory(**kwargs)


def test_explicit_backend_that_cannot_run_raises_with_reasons():
    src = torch.randn(4, 2, device="meta")
    with pytest.raises(kmem.BackendUnavailable, match="device meta not supported"):
        kmem.ops.compact_rows(src, torch.ones(4, dtype=torch.bool, device="meta"), src, backend="cpp")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_finite_check_is_exact_where_a_sum_overflows(dtype):
    """The check's fast path is one sum: values whose sum overflows are still finite
    and pass; a NaN or an Inf anywhere fails."""
    from kmem import _checks

    big = torch.full((4, 3), torch.finfo(dtype).max / 2, dtype=dtype)
    _checks.finite("queries", big)  # the sum overflows; every value is finite
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = big.clone()
        x[2, 1] = bad
        with pytest.raises(ValueError, match="queries contains NaN or Inf"):
            _checks.finite("queries", x)
    keys = torch.full((4, 3), torch.finfo(torch.float32).max / 2)  # through a memory too
    mem = kmem.KeyMemory(3, 1)
    mem.add(torch.arange(4), keys, torch.zeros(4, 1))
    assert mem.search(keys, 1)[1].shape == (4, 1)
