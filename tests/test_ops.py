"""Every CPU backend of the ops (the reference twins and the compiled kernels) against a
brute-force oracle that materialises every score, and against each other."""

from __future__ import annotations

import math

import pytest
import torch
from _buffers import buffers, exclusions
from conftest import brute_attention, brute_scores, brute_topk, integer_data

import kmem
from kmem import ops
from kmem.ops import reference
from kmem.ops.inputs import Signature

METRICS = ["ip", "l2"]
BACKENDS = ["reference", "cpp"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize(("n", "k"), [(1, 1), (37, 1), (37, 5), (37, 37), (37, 60), (200, 33), (3001, 40)])
@pytest.mark.parametrize("batch", [6, 70])
@pytest.mark.parametrize("exclude", [False, True])
def test_search_matches_brute_force_with_ties(small_chunks, backend, metric, n, k, batch, exclude):
    # Integer data: exact scores and many ties, so the tie rule (lower slot first) is
    # checked exactly. batch 70 takes the C++ BLAS-tile path, 6 its streaming path;
    # 3001 rows span several threads and tiles.
    keys, slot_ids = buffers(n, 5, dead_every=4, data=integer_data)
    q = integer_data(batch, 5)
    ex = exclusions(slot_ids, batch, 4) if exclude and n > 1 else None
    scores, slots = ops.search(q, keys, slot_ids, k, metric=metric, exclude_ids=ex, backend=backend)
    expected = brute_topk(q, keys, slot_ids, k, metric, ex)
    assert torch.equal(slots, expected)
    want = torch.gather(brute_scores(q, keys, metric), 1, expected.clamp(min=0)).float()
    torch.testing.assert_close(scores, want.masked_fill(expected < 0, float("-inf")))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize(("n", "batch"), [(31, 9), (33, 9), (3001, 3), (3001, 17), (3001, 70)])
def test_search_low_precision_keys_exact_on_integers(backend, dtype, metric, n, batch):
    """Even d takes the C++ bf16 dot-product kernel from batch 9 up (the others: streaming
    up to 64, BLAS tiles above); integers stay exact in every path."""
    keys, slot_ids = buffers(n, 20, dead_every=5, data=integer_data)
    q = integer_data(batch, 20)
    _, slots = ops.search(q, keys.to(dtype), slot_ids, 25, metric=metric, backend=backend)
    assert torch.equal(slots, brute_topk(q, keys, slot_ids, 25, metric))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("batch", [1, 9])
def test_search_random_floats_is_exact_topk(backend, metric, batch):
    keys, slot_ids = buffers(3001, 16, dead_every=3)
    q = torch.randn(batch, 16)
    scores, slots = ops.search(q, keys, slot_ids, 20, metric=metric, backend=backend)
    full = brute_scores(q, keys, metric).masked_fill(slot_ids < 0, float("-inf"))
    # Every returned row is live, its score is right, and no live row beats the last one.
    assert bool((slot_ids[slots] >= 0).all())
    torch.testing.assert_close(scores.double(), torch.gather(full, 1, slots), rtol=1e-5, atol=1e-4)
    assert bool((scores[:, :-1] >= scores[:, 1:] - 1e-4).all())
    torch.testing.assert_close(full.topk(20).values.float(), scores, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_search_all_dead_and_empty(backend):
    keys, slot_ids = torch.randn(10, 4), torch.full((10,), -1)
    scores, slots = ops.search(torch.randn(3, 4), keys, slot_ids, 4, backend=backend)
    assert torch.equal(slots, torch.full((3, 4), -1)) and bool(torch.isneginf(scores).all())
    scores, slots = ops.search(torch.randn(3, 4), keys[:0], slot_ids[:0], 2, backend=backend)
    assert slots.shape == (3, 2) and bool((slots == -1).all())


def _backends_for(k, dtype=torch.float32):
    """BACKENDS that declare top-k (k int) or dense (k None) attention on CPU inputs of
    ``dtype``, gradients included."""
    op = "dense_attention" if k is None else "topk_attention"
    sig = Signature("cpu", dtype, dtype, dtype, False, k, True)
    return [
        b for b in BACKENDS if b in ops.REGISTRY.names(op) and not ops.REGISTRY.backends[b].refusals(op, sig)
    ]


@pytest.mark.parametrize(("backend", "k"), [(b, k) for k in (1, 7, 40, None) for b in _backends_for(k)])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("labels", [False, True])
@pytest.mark.parametrize("batch", [5, 12])
def test_attention_matches_brute_force(small_chunks, backend, metric, k, labels, batch):
    keys, slot_ids = buffers(40, 6, dead_every=5)
    values = torch.randint(0, 4, (40,)) if labels else torch.randn(40, 3)
    q = torch.randn(batch, 6)
    ex = exclusions(slot_ids, batch, 3)
    classes = 4 if labels else None
    out = ops.topk_attention(
        q, keys, values, slot_ids, k, metric=metric, exclude_ids=ex, num_classes=classes, backend=backend
    )
    want = brute_attention(q, keys, values, slot_ids, k, 1 / math.sqrt(6), metric, ex, classes)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
    if labels:
        torch.testing.assert_close(out.sum(1), torch.ones(batch))


@pytest.mark.parametrize(("backend", "k"), [(b, k) for k in (3, None) for b in _backends_for(k)])
def test_attention_no_live_rows_gives_zeros(backend, k):
    keys, slot_ids = torch.randn(9, 4), torch.full((9,), -1)
    out = ops.topk_attention(torch.randn(2, 4), keys, torch.randn(9, 5), slot_ids, k, backend=backend)
    assert torch.equal(out, torch.zeros(2, 5))
    # A query whose every live row is excluded gets zeros as well.
    slot_ids = torch.arange(9)
    ex = torch.stack([torch.arange(9), torch.full((9,), -1)])
    out = ops.topk_attention(
        torch.randn(2, 4), keys, torch.randn(9, 5), slot_ids, k, exclude_ids=ex, backend=backend
    )
    assert torch.equal(out[0], torch.zeros(5)) and bool(out[1].abs().sum() > 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_is_applied(backend):
    keys, slot_ids = buffers(30, 4)
    values, q = torch.randn(30, 2), torch.randn(3, 4)
    out = ops.topk_attention(q, keys, values, slot_ids, 10, scale=0.3, backend=backend)
    torch.testing.assert_close(
        out.double(), brute_attention(q, keys, values, slot_ids, 10, 0.3), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch", [3, 20])
def test_low_precision_keys(backend, dtype, batch):
    # k above the live rows: rounding cannot change which rows are chosen (that is
    # checked exactly on integer data above), so this measures the numeric error alone.
    keys, slot_ids = buffers(600, 64)
    values, q = torch.randn(600, 4), torch.randn(batch, 64)
    low = keys.to(dtype)
    out = ops.topk_attention(q, low, values, slot_ids, 640, backend=backend)
    assert out.dtype == torch.float32
    # Error against float32 attention over the exact keys: at most 2x (plus a floor) the
    # error of the same-dtype PyTorch computation (queries and keys rounded to dtype).
    exact = brute_attention(q, keys, values, slot_ids, 640, 1 / 8)
    torch_low = brute_attention(q.to(dtype).float(), low.float(), values, slot_ids, 640, 1 / 8)
    assert (out.double() - exact).abs().max() <= 2 * (torch_low - exact).abs().max() + 1e-5


F64 = torch.float64


@pytest.mark.parametrize(("backend", "k"), [(b, k) for k in (4, None) for b in _backends_for(k, F64)])
@pytest.mark.parametrize("metric", METRICS)
def test_gradcheck_vector_values(small_chunks, backend, metric, k):
    keys, slot_ids = buffers(20, 5, dead_every=6)
    keys = keys.double().requires_grad_()
    values = torch.randn(20, 3, dtype=torch.float64, requires_grad=True)
    q = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    ex = exclusions(slot_ids, 3, 2)

    def f(q, k_, v):
        return ops.topk_attention(q, k_, v, slot_ids, k, metric=metric, exclude_ids=ex, backend=backend)

    assert torch.autograd.gradcheck(f, (q, keys, values))


@pytest.mark.parametrize(("backend", "k"), [(b, k) for k in (4, None) for b in _backends_for(k, F64)])
def test_gradcheck_label_values(small_chunks, backend, k):
    keys, slot_ids = buffers(20, 5, dead_every=6)
    keys = keys.double().requires_grad_()
    labels = torch.randint(0, 3, (20,))
    q = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    f = lambda q, k_: ops.topk_attention(q, k_, labels, slot_ids, k, num_classes=3, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(f, (q, keys))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_reach_only_retrieved_rows(backend):
    keys, slot_ids = buffers(100, 8)
    keys.requires_grad_()
    values = torch.randn(100, 4, requires_grad=True)
    q = torch.randn(3, 8)
    ops.topk_attention(q, keys, values, slot_ids, 5, backend=backend).sum().backward()
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


def test_memory_reads_run_the_compiled_search():
    mem = kmem.KeyMemory(8, 3)
    mem.add(torch.arange(20), torch.randn(20, 8), torch.randn(20, 3))
    layer = kmem.KeyMemoryAttention(8, mem, k=4)
    with ops.trace() as ran:
        mem.search(torch.randn(2, 8), 3)
        mem.attend(torch.randn(2, 8), k=3)
        layer(torch.randn(5, 8))
    assert ran.count("cpp.search") == 3 and "search:reference" not in ran


def test_backend_asked_for_by_name_never_falls_back():
    q, keys, slot_ids = (
        torch.randn(2, 4, device="meta"),
        torch.randn(5, 4, device="meta"),
        torch.arange(5, device="meta"),
    )
    with pytest.raises(kmem.BackendUnavailable, match="cpp: device meta not supported"):
        ops.search(q, keys, slot_ids, 2, backend="cpp")


@pytest.mark.parametrize(
    ("dtypes", "why"),
    [
        ((F64, F64, F64), "queries float64 not supported"),
        ((torch.float32, torch.float32, F64), "values float64 not supported"),
    ],
)
def test_a_combination_the_cpp_attend_does_not_serve_is_refused_by_name_and_explained(dtypes, why):
    """float64 queries or values: the C++ top-k attend has no kernel for them, so
    ``backend="cpp"`` refuses, and ``"auto"`` runs the next backend that declares them -- in the open."""
    q_dtype, k_dtype, v_dtype = dtypes
    q, keys = torch.randn(3, 6, dtype=q_dtype), torch.randn(30, 6, dtype=k_dtype)
    values, slot_ids = torch.randn(30, 2, dtype=v_dtype), torch.arange(30)
    with pytest.raises(kmem.BackendUnavailable, match=why):
        ops.topk_attention(q, keys, values, slot_ids, 4, backend="cpp")
    plan = ops.explain("topk_attention", q, keys, values, slot_ids, k=4)
    # The next backend declaring it: Triton where its interpreter is on, else the reference.
    assert plan.chosen in ("triton", "reference") and why in "; ".join(plan.refused["cpp"])
    assert f"{plan.chosen}: runs it" in str(plan)
    with ops.trace() as ran:
        out = ops.topk_attention(q, keys, values, slot_ids, 4)
    assert ran[0] == f"topk_attention:{plan.chosen}"
    torch.testing.assert_close(out, ops.topk_attention(q, keys, values, slot_ids, 4, backend="reference"))


def test_explain_names_the_compiled_kernel_when_it_serves():
    q, keys, values, slot_ids = torch.randn(3, 6), torch.randn(30, 6), torch.randn(30, 2), torch.arange(30)
    assert ops.explain("topk_attention", q, keys, values, slot_ids, k=4).chosen == "cpp"
    assert ops.explain("topk_attention", q, keys, values, slot_ids, None).chosen == "cpp"
    assert ops.explain("search", q, keys, slot_ids, 4).chosen == "cpp"
    with pytest.raises(ValueError, match="unknown op"):
        ops.explain("nope", q)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("labels", [False, True])
def test_dense_attention_returns_its_log_sum_exp(backend, labels):
    keys, slot_ids = buffers(60, 5, dead_every=4)
    values = torch.randint(0, 3, (60,)) if labels else torch.randn(60, 2)
    q = torch.randn(4, 5)
    ex = exclusions(slot_ids, 4, 3)
    classes = 3 if labels else None
    out, lse = ops.topk_attention(
        q, keys, values, slot_ids, None, scale=0.7, exclude_ids=ex, num_classes=classes, backend=backend,
        return_lse=True,
    )  # fmt: skip
    z = 0.7 * (q.double() @ keys.double().T)
    dead = (slot_ids < 0)[None, :] | (slot_ids[None, None, :] == ex[:, :, None]).any(1)
    torch.testing.assert_close(
        lse.double(), z.masked_fill(dead, float("-inf")).logsumexp(1), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        out,
        ops.topk_attention(
            q, keys, values, slot_ids, None, scale=0.7, exclude_ids=ex, num_classes=classes, backend=backend
        ),
    )
    with pytest.raises(ValueError, match="return_lse is for dense attention"):
        ops.topk_attention(q, keys, values, slot_ids, 3, num_classes=classes, return_lse=True)


@pytest.mark.parametrize(
    ("backend", "k"), [(b, k) for k in (1, 6, None) for b in _backends_for(k) if b != "reference"]
)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("labels", [False, True])
def test_float32_gradients_match_autograd_through_reference(backend, k, metric, labels):
    """The compiled kernels' own backward against autograd through the reference twin."""
    keys, slot_ids = buffers(300, 12, dead_every=7)
    values = torch.randint(0, 5, (300,)) if labels else torch.randn(300, 4)
    classes = 5 if labels else None
    q = torch.randn(9, 12)
    ex = exclusions(slot_ids, 9, 3)
    g = torch.randn(9, 5 if labels else 4)
    grads = {}
    for name in ("reference", backend):
        leaves = [q.clone().requires_grad_(), keys.clone().requires_grad_()]
        if not labels:
            leaves.append(values.clone().requires_grad_())
        v = leaves[2] if not labels else values
        out = ops.topk_attention(
            leaves[0],
            leaves[1],
            v,
            slot_ids,
            k,
            metric=metric,
            exclude_ids=ex,
            num_classes=classes,
            backend=name,
        )
        (out * g).sum().backward()
        grads[name] = [t.grad for t in leaves]
    for got, want in zip(grads[backend], grads["reference"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_compiled_attend_kernels_ran():
    keys, slot_ids = buffers(50, 8)
    values = torch.randn(50, 3, requires_grad=True)
    q = torch.randn(4, 8, requires_grad=True)
    with ops.trace() as ran:
        ops.topk_attention(q, keys, values, slot_ids, 5, backend="cpp").sum().backward()
        ops.topk_attention(q, keys, values, slot_ids, None, backend="cpp").sum().backward()
    kernels = ["search", "attend_forward", "attend_backward", "dense_forward", "dense_backward"]
    assert [e for e in ran if e.startswith("cpp.")] == [f"cpp.{name}" for name in kernels]


@pytest.mark.parametrize("k", [3, None])
def test_triton_backend_through_dispatch(k):
    """Dispatch routes to the Triton kernels (interpreted here) when asked by name."""
    from kmem.kernels._common import LAUNCHES

    keys, slot_ids = buffers(40, 8, dead_every=3)
    values, q = torch.randn(40, 2), torch.randn(3, 8)
    before = sum(LAUNCHES.values())
    out = ops.topk_attention(q, keys, values, slot_ids, k, backend="triton")
    assert sum(LAUNCHES.values()) > before
    torch.testing.assert_close(out, ops.topk_attention(q, keys, values, slot_ids, k, backend="reference"))
    _, slots = ops.search(q, keys, slot_ids, 4, backend="triton")
    assert torch.equal(slots, ops.search(q, keys, slot_ids, 4, backend="reference")[1])


@pytest.mark.parametrize("k", [8, None])
def test_custom_ops_compile_in_one_graph_with_autograd(k):
    """The compiled backends are torch.library ops with fake kernels: torch.compile
    captures them whole (fullgraph) and their own backward runs under it."""
    keys, slot_ids = buffers(100, 8)
    values = torch.randn(100, 3)
    f = torch.compile(
        lambda q: ops.topk_attention(q, keys, values, slot_ids, k, backend="cpp").sum(), fullgraph=True
    )
    q = torch.randn(4, 8, requires_grad=True)
    f(q).backward()
    eager = q.detach().clone().requires_grad_()
    ops.topk_attention(eager, keys, values, slot_ids, k, backend="cpp").sum().backward()
    torch.testing.assert_close(q.grad, eager.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch", [3, 70])
def test_k_4096(backend, batch):
    """SPM-sized retrieval: k = 4096 of 5,000 rows, exact on integer data."""
    keys, slot_ids = buffers(5000, 6, dead_every=9, data=integer_data)
    q = integer_data(batch, 6)
    ex = exclusions(slot_ids, batch, 5)
    _, slots = ops.search(q, keys, slot_ids, 4096, exclude_ids=ex, backend=backend)
    assert torch.equal(slots, brute_topk(q, keys, slot_ids, 4096, "ip", ex))
    values = torch.randn(5000, 3)
    out = ops.topk_attention(q, keys, values, slot_ids, 4096, exclude_ids=ex, backend=backend)
    want = brute_attention(q, keys, values, slot_ids, 4096, 6**-0.5, "ip", ex)
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)  # float32 sums of 4096 terms


@pytest.mark.parametrize("backend", _backends_for(None, F64))
@pytest.mark.parametrize("labels", [False, True])
def test_dense_log_sum_exp_is_differentiable(small_chunks, backend, labels):
    """``return_lse``'s log-sum-exp carries its gradient (what a merge of partial results
    differentiates through), through the backend's own backward."""
    keys, slot_ids = buffers(20, 5, dead_every=6)
    keys = keys.double().requires_grad_()
    q = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    ex = exclusions(slot_ids, 3, 2)
    label_values = torch.randint(0, 3, (20,))

    def f(q, k_, *v):
        return ops.topk_attention(
            q, k_, v[0] if v else label_values, slot_ids, None, scale=0.8, exclude_ids=ex,
            num_classes=3 if labels else None, backend=backend, return_lse=True,
        )  # fmt: skip

    inputs = (q, keys) if labels else (q, keys, torch.randn(20, 2, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(f, inputs)
