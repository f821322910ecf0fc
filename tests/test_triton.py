"""What belongs to the Triton backend alone: its tiling, its kernels against the
composite attend step, and which kernels launch. The contract every backend keeps
(results, ties, gradients, dtypes) is in ``test_kernels.py``.

Without a GPU the kernels run on CPU tensors through Triton's interpreter (conftest sets
``TRITON_INTERPRET=1``), which is slow: sizes stay small. With CUDA they run on the GPU.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import triton  # a dev dependency: without it this module must fail, not skip
from _buffers import buffers
from conftest import brute_topk, integer_data

import kmem
from kmem.kernels import attend as triton_attend
from kmem.kernels import dense as triton_dense
from kmem.kernels import search as triton_search
from kmem.kernels import topk as triton_topk
from kmem.kernels._common import LAUNCHES
from kmem.ops import composite, reference
from kmem.ops.inputs import AttendGrads, AttendInputs, DenseGrads, DenseInputs, SearchInputs


@pytest.fixture(params=["cuda" if torch.cuda.is_available() else "cpu"])
def device(request) -> str:
    return request.param


def _memory(n: int, d: int, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    return buffers(n, d, dead_every=4, scrub=False, **kw)


def _close(got, want):
    torch.testing.assert_close(got.cpu().to(want.dtype), want.cpu(), rtol=1e-4, atol=1e-5)


def test_search_splits_loop_over_several_tiles(device, monkeypatch):
    # Cap the candidates so each program merges several tiles into its running top-k.
    monkeypatch.setattr(triton_search, "_CANDIDATES", 16)
    keys, slot_ids = _memory(301, 5, data=integer_data)
    q = integer_data(5, 5)
    assert triton_search._grid_shape(5, 301, 8)[2] < triton.cdiv(301, 64)
    on = [t.to(device) for t in (q, keys, slot_ids)]
    for k in (1, 8):
        scores, slots = triton_search.search(SearchInputs(*on, None, k, "ip"))
        assert torch.equal(slots.cpu(), brute_topk(q, keys, slot_ids, k))
        assert scores.dtype == torch.float32 and bool((scores[:, :-1] >= scores[:, 1:]).all())
    # Exclusions, checked only in tiles that pass the running threshold: each query
    # excludes its own 8 best ids, so they would pass it.
    best = brute_topk(q, keys, slot_ids, 8)
    ex = slot_ids[best.clamp(min=0)]
    _, slots = triton_search.search(SearchInputs(*on, ex.to(device), 8, "ip"))
    assert torch.equal(slots.cpu(), brute_topk(q, keys, slot_ids, 8, "ip", ex))


@pytest.mark.parametrize("order", ["ascending", "descending"])
def test_search_skips_tiles_below_the_running_threshold(device, monkeypatch, order):
    """Rows sorted by score: descending, every tile after the first falls below the
    query's shared threshold and skips the sort; ascending (the adversarial order), only
    what falls below a threshold another program set before does. Both return the
    exact top-k."""
    monkeypatch.setattr(triton_search, "_CANDIDATES", 16)  # one program walks many tiles
    n = 301
    keys = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 3)
    if order == "descending":
        keys = keys.flip(0)
    slot_ids = torch.arange(n)
    slot_ids[::7] = -1
    q = torch.ones(2, 3)
    sorts = []
    if device == "cpu":  # the interpreter runs the kernel as Python: count the sorts
        top = triton_search._top
        monkeypatch.setattr(triton_search, "_top", lambda *a, **kw: sorts.append(1) or top(*a, **kw))
    on = [t.to(device) for t in (q, keys, slot_ids)]
    for k in (1, 8):
        _, slots = triton_search.search(SearchInputs(*on, None, k, "ip"))
        assert torch.equal(slots.cpu(), brute_topk(q, keys, slot_ids, k))
    if device == "cpu":
        # The interpreter runs the programs one after another, split 0 first. k = 1: five
        # programs of one tile -- descending, only the first sorts; ascending, each beats
        # the last. k = 8: two programs over five tiles (0, 2, 4 and 1, 3) -- descending,
        # tile 0 alone sorts; ascending, the first program sorts all three of its tiles,
        # the second none: its tiles lie below the threshold tile 4 set.
        assert [triton_search._grid_shape(2, n, k) for k in (1, 8)] == [(1, 64, 5), (8, 64, 2)]
        assert len(sorts) == (1 + 1 if order == "descending" else 5 + 3)


def test_tf32_screen_rescores_what_tf32_cannot_tell_apart(device, monkeypatch):
    """Rows A (first tile) and B (fourth) differ only below TF32's 10 mantissa bits: in
    TF32 they tie, in float32 B wins. The screen must send B's tile to the float32
    scorer: with the error bound set to 0 it does not, and A comes back instead."""
    monkeypatch.setattr(triton_search, "TENSOR_CORE_BATCH", 0)
    monkeypatch.setattr(triton_search, "_CANDIDATES", 1)  # one program walks the tiles in order
    d, n = 16, 300
    keys = -torch.ones(n, d)
    keys[0] = 1.0
    keys[200] = 1.0 + 2.0**-20
    q = torch.full((2, d), 1.0 + 2.0**-15)
    slot_ids = torch.arange(n)
    on = [t.to(device) for t in (q, keys, slot_ids)]
    exact = []
    if device == "cpu":  # the interpreter runs the kernel as Python: count exact tile scorings
        scorer = triton_search._tile_scores
        monkeypatch.setattr(triton_search, "_tile_scores", lambda *a: exact.append(1) or scorer(*a))
    _, slots = triton_search.search(SearchInputs(*on, None, 1, "ip"))
    assert slots.cpu().flatten().tolist() == [200, 200]
    assert device != "cpu" or len(exact) == 2  # of 5 tiles: A's (the first) and B's
    monkeypatch.setattr(triton_search, "tf32_slack", lambda d, l2: 0.0)
    _, slots = triton_search.search(SearchInputs(*on, None, 1, "ip"))
    assert slots.cpu().flatten().tolist() == [0, 0]


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tf32_screen_gives_the_float32_result_bit_for_bit(device, monkeypatch, metric, dtype):
    """Random floats, dead rows, exclusions: the search through the TF32 screen returns
    the very scores and slots of the float32-only kernel."""
    monkeypatch.setattr(triton_search, "_CANDIDATES", 16)  # programs walk several tiles
    keys, slot_ids = _memory(1200, 24)
    keys = keys.to(dtype)
    q = torch.randn(5, 24)
    ex = slot_ids[torch.randint(0, 1200, (5, 6))]
    on = [t.to(device) for t in (q, keys, slot_ids, ex)]
    search = SearchInputs(*on[:3], on[3], 4, metric)
    want = triton_search.search(search)
    monkeypatch.setattr(triton_search, "TENSOR_CORE_BATCH", 0)
    got = triton_search.search(search)
    for x, y in zip(got, want, strict=True):
        assert torch.equal(x, y)
    assert torch.equal(got[1].cpu(), brute_topk(q, keys, slot_ids, 4, metric, ex))


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_dense_forward_streams_wide_keys_in_chunks(device, metric):
    """d = 100: the forward's logits over three whole 32-column chunks and a ragged
    fourth, against the reference."""
    keys, slot_ids = _memory(90, 100)
    q, values = torch.randn(5, 100), torch.randn(90, 3)
    d = DenseInputs(q, keys, values, slot_ids, None, 0.05, metric, 0)
    want_out, want_lse = reference.dense_attention(d)
    got_out, got_lse = triton_dense.dense_forward(
        DenseInputs(*(t.to(device) for t in (q, keys, values, slot_ids)), None, 0.05, metric, 0)
    )
    _close(got_out, want_out)
    _close(got_lse, want_lse)


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("labels", [False, True])
def test_dense_backward_in_column_chunks(device, metric, labels):
    """d = 100 and values 70 wide (or 40 classes): each backward program writes one
    64-column chunk of dq, dkeys and dvalues (the second ragged) and sums scores and
    g . v over 32-column chunks, one-hot labels included; 20 queries (two blocks), some
    rows excluded, gradient reaching lse too. Against autograd through the reference."""
    keys, slot_ids = _memory(90, 100)
    q = torch.randn(20, 100)
    values = torch.randint(0, 40, (90,)) if labels else torch.randn(90, 70)
    exclude = slot_ids[torch.randint(0, 90, (20, 3))]
    classes = 40 if labels else 0
    leaves = [q.clone().requires_grad_(), keys.clone().requires_grad_()]
    if not labels:
        leaves.append(values.clone().requires_grad_())
    rows = (*leaves[:2], leaves[2] if not labels else values, slot_ids, exclude)
    out, lse = reference.dense_attention(DenseInputs(*rows, 0.1, metric, classes))
    g_out, g_lse = torch.randn_like(out), torch.randn_like(lse)
    torch.autograd.backward([out, lse], [g_out, g_lse])
    d = DenseInputs(*(t.to(device) for t in (q, keys, values, slot_ids, exclude)), 0.1, metric, classes)
    got_out, got_lse = triton_dense.dense_forward(d)
    grads = DenseGrads(d, got_out, got_lse, g_out.to(device), g_lse.to(device))
    got = triton_dense.dense_backward(grads)
    for g, leaf in zip(got, leaves, strict=False):
        _close(g, leaf.grad)
    assert (got[2] is None) == labels


def test_dense_splits_combine_by_log_sum_exp(device):
    """Dense forward over several splits of the rows, the first all dead and one query
    with no row at all: out and lse as the reference's."""
    keys, slot_ids = _memory(200, 5)
    slot_ids[:100] = -1
    q, values = torch.randn(3, 5), torch.randn(200, 2)
    exclude = torch.full((3, 200), -1)
    exclude[2] = slot_ids  # query 2 excludes every row's id
    assert triton_dense._splits(3, 200, torch.device(device))[1] > 1
    d = DenseInputs(q, keys, values, slot_ids, exclude, 0.3, "ip", 0)
    want_out, want_lse = reference.dense_attention(d)
    got_out, got_lse = triton_dense.dense_forward(
        DenseInputs(*(t.to(device) for t in (q, keys, values, slot_ids, exclude)), 0.3, "ip", 0)
    )
    _close(got_out, want_out)
    _close(got_lse, want_lse)
    assert got_lse[2] == float("-inf") and bool((got_out[2] == 0).all())


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("labels", [False, True])
@pytest.mark.parametrize(
    ("batch", "n", "k", "splits_cap"), [(3, 400, 5, 16), (20, 300, 40, 128), (2, 7, 9, 1 << 16)]
)
def test_fused_topk_attention_is_search_then_attend(
    device, monkeypatch, metric, labels, batch, n, k, splits_cap
):
    """One launch -- scan, the last program's merge, softmax and values -- gives the very
    bits of the search followed by the attend step: several splits, a second query
    block, k above the rows (7 rows, k = 9), dead rows, exclusions, labels."""
    monkeypatch.setattr(triton_search, "_CANDIDATES", splits_cap)
    keys, slot_ids = _memory(n, 6)
    q = torch.randn(batch, 6)
    values = torch.randint(0, 5, (n,)) if labels else torch.randn(n, 3)
    ex = slot_ids[torch.randint(0, n, (batch, 4))]
    on = [t.to(device) for t in (q, keys, values, slot_ids, ex)]
    a = AttendInputs(*on, 0.7, metric, 5 if labels else 0, k=k)
    LAUNCHES.clear()
    out, slots, weights = triton_topk.topk_forward(a)
    assert dict(LAUNCHES) == {"_topk_attention_kernel": 1}
    _, want_slots = triton_search.search(a.search())
    want_out, want_weights = triton_attend.attend_forward(a, want_slots)
    assert (
        torch.equal(slots, want_slots) and torch.equal(weights, want_weights) and torch.equal(out, want_out)
    )
    assert triton_search._grid_shape(batch, n, k)[2] > 1 or n < 64
    _, ref_slots = reference.search(a.search())
    assert torch.equal(slots.cpu(), ref_slots.cpu())
    _close(out, reference.topk_attention(a))


def test_attend_kernels_match_composite(device):
    keys, slot_ids = _memory(41, 5)
    q, values = torch.randn(4, 5, device=device), torch.randn(41, 2, device=device)
    keys, slot_ids = keys.to(device), slot_ids.to(device)
    _, slots = reference.search(SearchInputs(q, keys, slot_ids, None, 7, "l2"))
    slots[1, 3:] = -1  # a query with fewer rows than k
    a = AttendInputs(q, keys, values, slot_ids, None, 0.3, "l2", 0, k=7)
    got, want = triton_attend.attend_forward(a, slots), composite.attend_forward(a, slots)
    for x, y in zip(got, want, strict=True):
        _close(x, y)
    back = AttendGrads(a, slots, want[1], torch.randn(4, 2, device=device))
    for x, y in zip(triton_attend.attend_backward(back), composite.attend_backward(back), strict=True):
        _close(x, y)
    dq, dk, dv = triton_attend.attend_backward(replace(back, needs_keys=False, needs_values=False))
    assert dk is None and dv is None
    _close(dq, composite.attend_backward(back)[0])


def test_triton_kernels_ran(device, monkeypatch):
    # The reference and composite paths raise, so every result below came from Triton.
    def refuse(*args, **kwargs):
        raise AssertionError("reference path called")

    for module, name in (
        (reference, "search"),
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
    ids = slot_ids.to(device)
    out = kmem.ops.topk_attention(*inputs, ids, 3, backend="triton")
    out = out + kmem.ops.topk_attention(*inputs, ids, None, backend="triton")
    out.sum().backward()
    assert set(LAUNCHES) == {
        "_topk_attention_kernel",
        "_dlogits_kernel",
        "_dq_dkeys_kernel",
        "_dvalues_kernel",
        "_scatter_rows_kernel",
        "_dense_fwd_kernel",
        "_dense_dq_kernel",
        "_dense_dkv_kernel",
    }
