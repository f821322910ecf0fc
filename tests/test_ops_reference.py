"""The reference twins against a brute-force oracle that materialises every score."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import brute_attention, brute_scores, brute_topk, integer_data

from kmem import ops
from kmem.ops import reference

METRICS = ["ip", "l2"]


def _memory(n, d, dead_every=0, data=torch.randn):
    keys = data(n, d)
    slot_ids = torch.arange(100, 100 + n)
    if dead_every:
        slot_ids[::dead_every] = -1
        keys[::dead_every] = 0
    return keys, slot_ids


def _exclusions(slot_ids, batch, width):
    """Random live ids, some -1 padding, some ids that are not in the memory."""
    live = slot_ids[slot_ids >= 0]
    ex = live[torch.randint(0, len(live), (batch, width))]
    ex[:, -1] = -1
    ex[0, 0] = 10**9
    return ex


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize(("n", "k"), [(1, 1), (37, 1), (37, 5), (37, 37), (37, 60), (200, 33)])
@pytest.mark.parametrize("exclude", [False, True])
def test_search_matches_brute_force_with_ties(small_chunks, metric, n, k, exclude):
    # Integer data: exact scores and many ties, so the tie rule (lower slot first) is checked exactly.
    keys, slot_ids = _memory(n, 5, dead_every=4, data=integer_data)
    q = integer_data(6, 5)
    ex = _exclusions(slot_ids, 6, 4) if exclude and n > 1 else None
    scores, slots = ops.search(q, keys, slot_ids, k, metric=metric, exclude_ids=ex)
    expected = brute_topk(q, keys, slot_ids, k, metric, ex)
    assert torch.equal(slots, expected)
    want = torch.gather(brute_scores(q, keys, metric), 1, expected.clamp(min=0)).float()
    torch.testing.assert_close(scores, want.masked_fill(expected < 0, float("-inf")))


@pytest.mark.parametrize("metric", METRICS)
def test_search_random_floats_is_exact_topk(metric):
    keys, slot_ids = _memory(3001, 16, dead_every=3)
    q = torch.randn(9, 16)
    scores, slots = ops.search(q, keys, slot_ids, 20, metric=metric)
    full = brute_scores(q, keys, metric).masked_fill(slot_ids < 0, float("-inf"))
    # Every returned row is live, its score is right, and no live row beats the last one.
    assert bool((slot_ids[slots] >= 0).all())
    torch.testing.assert_close(scores.double(), torch.gather(full, 1, slots), rtol=1e-5, atol=1e-4)
    assert bool((scores[:, :-1] >= scores[:, 1:] - 1e-4).all())
    torch.testing.assert_close(full.topk(20).values.float(), scores, rtol=1e-5, atol=1e-4)


def test_search_all_dead_and_empty():
    keys, slot_ids = torch.randn(10, 4), torch.full((10,), -1)
    scores, slots = ops.search(torch.randn(3, 4), keys, slot_ids, 4)
    assert torch.equal(slots, torch.full((3, 4), -1)) and bool(torch.isneginf(scores).all())
    scores, slots = ops.search(torch.randn(3, 4), keys[:0], slot_ids[:0], 2)
    assert slots.shape == (3, 2) and bool((slots == -1).all())


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("k", [1, 7, 40, None])
@pytest.mark.parametrize("labels", [False, True])
def test_attention_matches_brute_force(small_chunks, metric, k, labels):
    keys, slot_ids = _memory(40, 6, dead_every=5)
    values = torch.randint(0, 4, (40,)) if labels else torch.randn(40, 3)
    q = torch.randn(5, 6)
    ex = _exclusions(slot_ids, 5, 3)
    classes = 4 if labels else None
    out = ops.topk_attention(q, keys, values, slot_ids, k, metric=metric, exclude_ids=ex, num_classes=classes)
    want = brute_attention(q, keys, values, slot_ids, k, 1 / math.sqrt(6), metric, ex, classes)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
    if labels:
        torch.testing.assert_close(out.sum(1), torch.ones(5))


@pytest.mark.parametrize("k", [3, None])
def test_attention_no_live_rows_gives_zeros(k):
    keys, slot_ids = torch.randn(9, 4), torch.full((9,), -1)
    out = ops.topk_attention(torch.randn(2, 4), keys, torch.randn(9, 5), slot_ids, k)
    assert torch.equal(out, torch.zeros(2, 5))
    # A query whose every live row is excluded gets zeros as well.
    slot_ids = torch.arange(9)
    ex = torch.stack([torch.arange(9), torch.full((9,), -1)])
    out = ops.topk_attention(torch.randn(2, 4), keys, torch.randn(9, 5), slot_ids, k, exclude_ids=ex)
    assert torch.equal(out[0], torch.zeros(5)) and bool(out[1].abs().sum() > 0)


def test_scale_is_applied():
    keys, slot_ids = _memory(30, 4)
    values, q = torch.randn(30, 2), torch.randn(3, 4)
    out = ops.topk_attention(q, keys, values, slot_ids, 10, scale=0.3)
    torch.testing.assert_close(
        out.double(), brute_attention(q, keys, values, slot_ids, 10, 0.3), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_keys_score_in_float32(dtype):
    keys, slot_ids = _memory(500, 32)
    values, q = torch.randn(500, 4), torch.randn(8, 32)
    low = keys.to(dtype)
    out = ops.topk_attention(q, low, values, slot_ids, 16)
    # The same as float32 attention over the rounded keys: rounding is the only error.
    torch.testing.assert_close(out, ops.topk_attention(q, low.float(), values, slot_ids, 16))
    assert out.dtype == torch.float32


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("k", [4, None])
def test_gradcheck_vector_values(small_chunks, metric, k):
    keys, slot_ids = _memory(20, 5, dead_every=6)
    keys = keys.double().requires_grad_()
    values = torch.randn(20, 3, dtype=torch.float64, requires_grad=True)
    q = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    ex = _exclusions(slot_ids, 3, 2)
    f = lambda q, k_, v: ops.topk_attention(q, k_, v, slot_ids, k, metric=metric, exclude_ids=ex)  # noqa: E731
    assert torch.autograd.gradcheck(f, (q, keys, values))


@pytest.mark.parametrize("k", [4, None])
def test_gradcheck_label_values(small_chunks, k):
    keys, slot_ids = _memory(20, 5, dead_every=6)
    keys = keys.double().requires_grad_()
    labels = torch.randint(0, 3, (20,))
    q = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    f = lambda q, k_: ops.topk_attention(q, k_, labels, slot_ids, k, num_classes=3)  # noqa: E731
    assert torch.autograd.gradcheck(f, (q, keys))


def test_gradients_reach_only_retrieved_rows():
    keys, slot_ids = _memory(100, 8)
    keys.requires_grad_()
    values = torch.randn(100, 4, requires_grad=True)
    q = torch.randn(3, 8)
    ops.topk_attention(q, keys, values, slot_ids, 5).sum().backward()
    _, slots = ops.search(q, keys, slot_ids, 5)
    retrieved = torch.zeros(100, dtype=torch.bool)
    retrieved[slots.flatten()] = True
    assert bool((keys.grad[~retrieved] == 0).all()) and bool((values.grad[~retrieved] == 0).all())
    assert bool((values.grad[retrieved].abs().sum(1) > 0).all())


def test_compaction_reference_is_stable():
    src = torch.arange(30).reshape(10, 3)
    keep = torch.tensor([1, 0, 0, 1, 1, 0, 1, 0, 0, 1], dtype=torch.bool)
    out = torch.full((12, 3), -7)
    assert reference.compact_rows(src, keep, out) == 5
    assert torch.equal(out[:5], src[keep]) and bool((out[5:] == -7).all())


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda q, k, s: ops.search(q, k, s, 0), ValueError),
        (lambda q, k, s: ops.search(q, k, s, 2.0), TypeError),
        (lambda q, k, s: ops.search(q, k, s, 2, metric="cos"), ValueError),
        (lambda q, k, s: ops.search(q.long(), k, s, 2), TypeError),
        (lambda q, k, s: ops.search(q[:, :3], k, s, 2), ValueError),
        (lambda q, k, s: ops.search(q, k, s[:5], 2), ValueError),
        (lambda q, k, s: ops.search(q, k, s.int(), 2), TypeError),
        (lambda q, k, s: ops.search(q * float("nan"), k, s, 2), ValueError),
        (lambda q, k, s: ops.search(q, k, s, 2, exclude_ids=torch.zeros(5, 2)), TypeError),
        (lambda q, k, s: ops.search(q, k, s, 2, exclude_ids=torch.zeros(3, 2, dtype=torch.long)), ValueError),
        (lambda q, k, s: ops.search(q, k, s, 2, backend="nope"), ValueError),
        (lambda q, k, s: ops.topk_attention(q, k, torch.randn(9, 2), s, 2), ValueError),
        (lambda q, k, s: ops.topk_attention(q, k, torch.randn(10, 2), s, 2, num_classes=3), TypeError),
    ],
)
def test_bad_arguments_raise(call, error):
    with pytest.raises(error):
        call(torch.randn(4, 6), torch.randn(10, 6), torch.arange(10))
