"""The Triton backend (``kmem.kernels``) against the reference twins, autograd through
them, and the brute-force oracle.

Without a GPU the kernels run on CPU tensors through Triton's interpreter (conftest sets
``TRITON_INTERPRET=1``), which is slow: sizes stay small. With CUDA they run on the GPU.
"""

from __future__ import annotations

import functools

import pytest
import torch
import triton  # a dev dependency: without it this module must fail, not skip
from _buffers import buffers, exclusions
from conftest import brute_attention, brute_scores, brute_topk, integer_data

import kmem
from kmem.kernels import attend as triton_attend
from kmem.kernels import dense as triton_dense
from kmem.kernels import search as triton_search
from kmem.kernels._common import LAUNCHES
from kmem.ops import composite, reference
from kmem.ops.inputs import AttendInputs, DenseInputs, SearchInputs

METRICS = ["ip", "l2"]
KEY_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(params=["cuda" if torch.cuda.is_available() else "cpu"])
def device(request) -> str:
    return request.param


_memory = functools.partial(buffers, dead_every=4, scrub=False)
_exclusions = functools.partial(exclusions, width=4)


def _kernel_search(q, keys, slot_ids, k, metric, ex):
    """The Triton search kernel itself, on a record."""
    return triton_search.search(SearchInputs(q, keys, slot_ids, ex, k, metric))


def _search(q, keys, slot_ids, k, metric, ex):
    """The Triton search through dispatch, asked for by name."""
    return kmem.ops.search(q, keys, slot_ids, k, metric=metric, exclude_ids=ex, backend="triton")[1]


def _topk(q, keys, values, slot_ids, k, scale, metric, ex, num_classes):
    """Triton top-k attention through dispatch, with :func:`reference.topk_attention`'s signature."""
    return kmem.ops.topk_attention(
        q, keys, values, slot_ids, k, scale=scale, metric=metric, exclude_ids=ex, num_classes=num_classes,
        backend="triton",
    )  # fmt: skip


def _dense(q, keys, values, slot_ids, scale, metric, ex, num_classes):
    """Triton dense attention through dispatch, with :func:`reference.dense_attention`'s signature."""
    return _topk(q, keys, values, slot_ids, None, scale, metric, ex, num_classes)


def _values(n, labels, width=3):
    return torch.randint(0, 4, (n,)) if labels else torch.randn(n, width)


def _grads(fn, tensors, device):
    """``fn`` output and the gradients of a fixed weighting of it w.r.t. the float tensors."""
    leaves = [t.to(device).requires_grad_(t.is_floating_point()) for t in tensors]
    out = fn(*leaves)
    weight = torch.linspace(-1.0, 2.0, out.numel(), dtype=out.dtype, device=device).view_as(out)
    floats = [t for t in leaves if t.requires_grad]
    return out.detach(), torch.autograd.grad((out * weight).sum(), floats)


def _close(got, want, dtype=torch.float32):
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(got.cpu().to(want.dtype), want.cpu(), **tol)


# ------------------------------------------------------------------------- search
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize(
    ("n", "k", "batch"), [(1, 1, 3), (37, 1, 5), (37, 5, 5), (37, 60, 5), (201, 33, 19), (300, 256, 5)]
)
@pytest.mark.parametrize("exclude", [False, True])
def test_search_matches_brute_force_with_ties(device, metric, n, k, batch, exclude):
    # Integer data: exact scores and many ties, so the tie rule (lower slot first) is
    # checked exactly; odd sizes leave ragged tiles, k = 60 > live rows pads with -1.
    keys, slot_ids = _memory(n, 5, data=integer_data)
    q = integer_data(batch, 5)
    ex = _exclusions(slot_ids, batch) if exclude and n > 1 else None
    on = [t.to(device) if t is not None else None for t in (q, keys, slot_ids, ex)]
    slots = _kernel_search(*on[:3], k, metric, on[3])
    expected = brute_topk(q, keys, slot_ids, k, metric, ex)
    assert torch.equal(slots.cpu(), expected)
    assert torch.equal(slots.cpu(), reference.search_slots(q, keys, slot_ids, k, metric, ex))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", KEY_DTYPES)
@pytest.mark.parametrize("query_dtype", [torch.float32, torch.float64])
def test_search_key_and_query_dtypes(device, metric, dtype, query_dtype):
    # Small integers are exact in every dtype, so the upcast keys give the exact answer.
    keys, slot_ids = _memory(77, 6, data=integer_data)
    q = integer_data(4, 6).to(query_dtype)
    slots = _search(q.to(device), keys.to(dtype).to(device), slot_ids.to(device), 9, metric, None)
    assert torch.equal(slots.cpu(), brute_topk(q, keys, slot_ids, 9, metric))


@pytest.mark.parametrize("metric", METRICS)
def test_search_random_floats_is_topk(device, metric):
    keys, slot_ids = _memory(201, 32, dead_every=3)
    q = torch.randn(6, 32)
    slots = _kernel_search(q.to(device), keys.to(device), slot_ids.to(device), 20, metric, None)
    slots = slots.cpu()
    full = brute_scores(q, keys, metric).masked_fill(slot_ids < 0, float("-inf"))
    assert bool((slot_ids[slots] >= 0).all())
    torch.testing.assert_close(torch.gather(full, 1, slots), full.topk(20).values, rtol=1e-5, atol=1e-4)


def test_search_splits_loop_over_several_tiles(device, monkeypatch):
    # Cap the candidates so each program merges several tiles into its running top-k.
    monkeypatch.setattr(triton_search, "_CANDIDATES", 16)
    keys, slot_ids = _memory(301, 5, data=integer_data)
    q = integer_data(5, 5)
    assert triton_search._grid_shape(5, 301, 8)[2] < triton.cdiv(301, 64)
    for k in (1, 8):
        slots = _kernel_search(q.to(device), keys.to(device), slot_ids.to(device), k, "ip", None)
        assert torch.equal(slots.cpu(), brute_topk(q, keys, slot_ids, k))


def test_search_largest_k(device):
    # k = 4096, the largest supported, over 4200 rows of which 3150 are live: -1 padding.
    keys, slot_ids = _memory(4200, 4, data=integer_data)
    q = integer_data(2, 4)
    ex = _exclusions(slot_ids, 2)
    on = [t.to(device) for t in (q, keys, slot_ids, ex)]
    slots = _kernel_search(*on[:3], 4096, "l2", on[3])
    assert torch.equal(slots.cpu(), brute_topk(q, keys, slot_ids, 4096, "l2", ex))


def test_search_all_dead_and_empty(device):
    keys, slot_ids = torch.randn(10, 4, device=device), torch.full((10,), -1, device=device)
    q = torch.randn(3, 4, device=device)
    assert bool((_kernel_search(q, keys, slot_ids, 4, "ip", None) == -1).all())
    slots = _kernel_search(q, keys[:0], slot_ids[:0], 2, "l2", None)
    assert slots.shape == (3, 2) and bool((slots == -1).all())


# ------------------------------------------------------- top-k and dense attention
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("labels", [False, True])
@pytest.mark.parametrize("dtype", KEY_DTYPES)
@pytest.mark.parametrize(
    ("k", "n", "batch", "exclude"),
    [(1, 37, 5, False), (6, 37, 5, True), (60, 37, 5, True), (None, 37, 5, True), (None, 70, 19, False)],
)
def test_attention_forward_and_gradients(device, metric, labels, dtype, k, n, batch, exclude):
    # k = None is dense attention; k = 60 > live rows pads the top-k with no row.
    keys, slot_ids = _memory(n, 7)
    keys = keys.to(dtype)
    values, q = _values(n, labels), torch.randn(batch, 7)
    ex = _exclusions(slot_ids, batch) if exclude else None
    num_classes = 4 if labels else None

    def run(backend):
        return lambda q, keys, values: kmem.ops.topk_attention(
            q, keys, values, slot_ids.to(device), k, scale=0.7, metric=metric,
            exclude_ids=None if ex is None else ex.to(device), num_classes=num_classes, backend=backend,
        )  # fmt: skip

    out, grads = _grads(run("triton"), (q, keys, values), device)
    want, want_grads = _grads(run("reference"), (q, keys, values), device)
    _close(out, want)
    for got, exp in zip(grads, want_grads, strict=True):
        _close(got, exp, dtype)
    oracle = brute_attention(q, keys.float(), values, slot_ids, k, 0.7, metric, ex, num_classes)
    _close(out, oracle.float())


def test_attend_kernels_match_composite(device):
    keys, slot_ids = _memory(41, 5)
    q, values = torch.randn(4, 5, device=device), torch.randn(41, 2, device=device)
    keys, slot_ids = keys.to(device), slot_ids.to(device)
    slots = reference.search_slots(q, keys, slot_ids, 7, "l2")
    slots[1, 3:] = -1  # a query with fewer rows than k
    a = AttendInputs(q, keys, values, slot_ids, None, 0.3, "l2", 0, k=7)
    got, want = triton_attend.attend_forward(a, slots), composite.attend_forward(a, slots)
    for x, y in zip(got, want, strict=True):
        _close(x, y)
    g = torch.randn(4, 2, device=device)
    back = (a, slots, want[1], g)
    for x, y in zip(triton_attend.attend_backward(*back), composite.attend_backward(*back), strict=True):
        _close(x, y)
    dq, dk, dv = triton_attend.attend_backward(*back, needs_keys=False, needs_values=False)
    assert dk is None and dv is None
    _close(dq, composite.attend_backward(*back)[0])


# ---------------------------------------------------------------- dense attention
def test_dense_lse_is_logsumexp_of_attended_rows(device):
    keys, slot_ids = _memory(45, 6)
    q, values = torch.randn(3, 6), torch.randn(45, 2)
    ex = _exclusions(slot_ids, 3)
    on = [t.to(device) for t in (q, keys, values, slot_ids, ex)]
    _, lse = triton_dense.dense_forward(DenseInputs(*on, 0.4, "l2", 0))
    s = 0.4 * brute_scores(q, keys, "l2")
    dropped = (slot_ids < 0) | (slot_ids[None, :, None] == ex[:, None, :]).any(-1)
    _close(lse, torch.logsumexp(s.masked_fill(dropped, float("-inf")), 1).float())


# ------------------------------------------------------------------ corner cases
@pytest.mark.parametrize("labels", [False, True])
def test_no_live_rows_gives_zeros_and_zero_gradients(device, labels):
    keys, slot_ids = torch.randn(9, 4), torch.full((9,), -1)
    values, q = _values(9, labels), torch.randn(3, 4)
    num_classes = 4 if labels else None
    topk = _topk
    out, grads = _grads(
        lambda *t: topk(*t, slot_ids.to(device), 3, 1.0, "ip", None, num_classes), (q, keys, values), device
    )
    assert bool((out == 0).all()) and all(bool((g == 0).all()) for g in grads)
    dense = _dense
    out, grads = _grads(
        lambda *t: dense(*t, slot_ids.to(device), 1.0, "l2", None, num_classes), (q, keys, values), device
    )
    assert bool((out == 0).all()) and all(bool((g == 0).all()) for g in grads)
    on = [t.to(device) for t in (q, keys, values, slot_ids)]
    _, lse = triton_dense.dense_forward(DenseInputs(*on, None, 1.0, "ip", num_classes or 0))
    assert bool(torch.isneginf(lse).all())


@pytest.mark.parametrize("metric", METRICS)
def test_float64_matches_reference_and_gradcheck(device, metric):
    # float64 runs through the same kernels in float64; 0.5 is exact as the kernels' float32 scale.
    keys, slot_ids = _memory(11, 3)
    keys, values, q = (
        keys.double(),
        torch.randn(11, 2, dtype=torch.float64),
        torch.randn(2, 3, dtype=torch.float64),
    )
    ids = slot_ids.to(device)
    for backend_fn, ref_fn, extra in (
        (_topk, reference.topk_attention, (4,)),
        (_dense, reference.dense_attention, ()),
    ):

        def f(q, keys, values, fn=backend_fn, extra=extra):
            return fn(q, keys, values, ids, *extra, 0.5, metric, None, None)

        out, grads = _grads(f, (q, keys, values), device)
        want, want_grads = _grads(
            lambda q, keys, values, fn=ref_fn, extra=extra: fn(
                q, keys, values, ids, *extra, 0.5, metric, None, None
            ),
            (q, keys, values),
            device,
        )
        assert out.dtype == torch.float64
        for a, b in zip((out, *grads), (want, *want_grads), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
        inputs = [t.to(device).requires_grad_() for t in (q, keys, values)]
        assert torch.autograd.gradcheck(f, inputs)


def test_triton_kernels_ran(device, monkeypatch):
    # The reference and composite paths raise, so every result below came from Triton.
    def refuse(*args, **kwargs):
        raise AssertionError("reference path called")

    for module, name in (
        (reference, "search_slots"),
        (reference, "dense_attention"),
        (reference, "topk_attention"),
        (composite, "attend_forward"),
        (composite, "attend_backward"),
    ):
        monkeypatch.setattr(module, name, refuse)
    LAUNCHES.clear()
    keys, slot_ids = _memory(20, 4)
    values = torch.randn(20, 2)
    inputs = [t.to(device).requires_grad_() for t in (torch.randn(3, 4), keys, values)]
    out = _topk(*inputs, slot_ids.to(device), 3, 1.0, "ip", None, None)
    out = out + _dense(*inputs, slot_ids.to(device), 1.0, "ip", None, None)
    out.sum().backward()
    assert set(LAUNCHES) == {
        "_search_kernel",
        "_weights_kernel",
        "_weighted_values_kernel",
        "_dlogits_kernel",
        "_dq_dkeys_kernel",
        "_dvalues_kernel",
        "_dense_fwd_kernel",
        "_dense_dq_kernel",
        "_dense_dkv_kernel",
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool])
@pytest.mark.parametrize(("rows", "row_shape"), [(0, (3,)), (1, ()), (257, (5,)), (300, (2, 3))])
def test_compaction_matches_reference(device, dtype, rows, row_shape):
    src = (torch.randn(rows, *row_shape) * 10).to(dtype).to(device)
    keep = (torch.rand(rows) < 0.6).to(device)
    out, want = torch.zeros_like(src), torch.zeros_like(src)
    before = LAUNCHES["_scatter_kernel"]
    n = kmem.ops.compact_rows(src, keep, out, backend="triton")
    assert n == reference.compact_rows(src, keep, want) and torch.equal(out, want)
    assert LAUNCHES["_scatter_kernel"] == before + (rows > 0)
