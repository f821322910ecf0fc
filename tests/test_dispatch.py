"""Dispatch: which backend serves a call, what a backend asked for by name refuses (and
why), bad arguments, traces, and the custom ops under torch.compile. What every
backend computes is checked in ``test_kernels.py``."""

from __future__ import annotations

import pytest
import torch
from _buffers import buffers

import kmem
from kmem import ops
from kmem.ops import reference
from kmem.ops.inputs import CompactInputs

F64 = torch.float64


def test_compaction_reference_is_stable():
    src = torch.arange(30).reshape(10, 3)
    keep = torch.tensor([1, 0, 0, 1, 1, 0, 1, 0, 0, 1], dtype=torch.bool)
    out = torch.full((12, 3), -7)
    assert reference.compact_rows(CompactInputs((src,), keep, (out,))) == 5
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
        (lambda q, k, s: ops.topk_attention(q, k, torch.randn(10, 2), s, 2, return_lse=True), ValueError),
        (lambda q, k, s: ops.topk_attention(q, k, torch.randn(10, 2), s, None, sparse_grad=True), ValueError),
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


def test_sparse_gradients_compile_in_one_graph():
    """sparse_grad=True under torch.compile(fullgraph=True): the fake backward gives the
    per-retrieval shapes, and the learned rows get the eager run's sparse gradients."""
    keys, slot_ids = buffers(100, 8)
    values, q = torch.randn(100, 3), torch.randn(4, 8)

    def grads(fn) -> list[torch.Tensor]:
        leaves = [keys.clone().requires_grad_(), values.clone().requires_grad_()]
        fn(*leaves).square().sum().backward()
        return [leaf.grad for leaf in leaves]

    def attend(k_, v_):
        return ops.topk_attention(q, k_, v_, slot_ids, 5, backend="cpp", sparse_grad=True)

    for got, want in zip(grads(torch.compile(attend, fullgraph=True)), grads(attend), strict=True):
        assert got.is_sparse and got._nnz() == 4 * 5
        torch.testing.assert_close(got.to_dense(), want.to_dense())


def test_auto_passes_by_a_combination_measured_slower():
    """A combination declared slower than a backend after it (a measured crossover) is
    skipped by "auto", said so by explain, and still runs when asked for by name."""
    from kmem.ops.inputs import Signature

    sig = Signature("cuda", torch.float32, torch.float32, torch.float32, False, None, False)
    for name in ("cuda", "triton"):
        backend = ops.REGISTRY.backends[name]
        declared = [c for c in backend.serves["dense_attention"] if "cuda" in c.devices]
        assert declared and all(c.slower and "BENCHMARKS.md" in c.slower for c in declared)
        assert not any(c.refusals(sig) for c in declared[:1])  # by name: served
        assert any("auto passes it by" in r for r in declared[0].refusals(sig, auto=True))
    # Triton runs under its interpreter here: by name it serves dense attention on the CPU.
    q, keys, values, slot_ids = torch.randn(2, 4), torch.randn(9, 4), torch.randn(9, 2), torch.arange(9)
    with ops.trace() as ran:
        ops.topk_attention(q, keys, values, slot_ids, None, backend="triton")
    assert ran[0] == "dense_attention:triton"
