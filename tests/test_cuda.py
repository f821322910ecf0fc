"""The CUDA backend against the brute-force oracle and the reference twins.

The kernel tests need a CUDA GPU and a CUDA build of kmem._C; without one they skip
and say why. One test always runs: on a machine without them, the backend says why it
is unavailable instead of failing obscurely.
"""

from __future__ import annotations

import math

import pytest
import torch
from _buffers import buffers, exclusions
from conftest import brute_attention, brute_scores, brute_topk, integer_data

import kmem
from kmem import ops
from kmem.ops import reference
from kmem.ops.backends import cuda

DEVICE = "cuda"
METRICS = ["ip", "l2"]

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason=f"needs a CUDA GPU: {cuda.missing()}")


def _on(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.to(DEVICE) for t in tensors]


def _cuda_search(q, keys, slot_ids, k, metric, exclude_ids):
    return ops.search(q, keys, slot_ids, k, metric=metric, exclude_ids=exclude_ids, backend="cuda")[1]


def _cuda_topk(q, keys, values, slot_ids, k, scale, metric, exclude_ids, num_classes, **kw):
    """CUDA top-k (``k`` int) or dense (``k=None``) attention, asked for by name."""
    return ops.topk_attention(
        q, keys, values, slot_ids, k, scale=scale, metric=metric, exclude_ids=exclude_ids,
        num_classes=num_classes, backend="cuda", **kw,
    )  # fmt: skip


def _cuda_dense(q, keys, values, slot_ids, scale, metric, exclude_ids, num_classes):
    return _cuda_topk(q, keys, values, slot_ids, None, scale, metric, exclude_ids, num_classes)


def _search(q, keys, slot_ids, k, metric="ip", exclude_ids=None) -> torch.Tensor:
    """CUDA slots for CPU inputs, back on the CPU."""
    slots = _cuda_search(*_on(q, keys, slot_ids), k, metric, *_on(exclude_ids))
    assert slots.device.type == "cuda" and slots.dtype == torch.int64
    return slots.cpu()


def _attend(q, keys, values, slot_ids, k, scale, metric="ip", exclude_ids=None, num_classes=None):
    q, keys, values, slot_ids, exclude_ids = _on(q, keys, values, slot_ids, exclude_ids)
    return _cuda_topk(q, keys, values, slot_ids, k, scale, metric, exclude_ids, num_classes)


def test_missing_says_why_without_a_gpu():
    reason = cuda.missing()
    ext = kmem._ext.compiled()
    if torch.cuda.is_available() and getattr(ext, "with_cuda", False):
        assert reason is None
        return
    assert isinstance(reason, str) and ("CUDA" in reason or "kmem._C" in reason), reason
    with pytest.raises(kmem.BackendUnavailable, match="cuda: "):
        ops.search(torch.randn(2, 4), torch.randn(5, 4), torch.arange(5), 2, backend="cuda")


# ------------------------------------------------------------------ search
@needs_gpu
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize(("n", "k"), [(1, 1), (37, 1), (37, 5), (37, 37), (37, 60), (1031, 33), (3001, 600)])
@pytest.mark.parametrize("batch", [1, 8, 11])
@pytest.mark.parametrize("exclude", [False, True])
def test_search_matches_brute_force_with_ties(metric, n, k, batch, exclude):
    # Integer data: exact scores and many ties, so the tie rule (lower slot first) is
    # checked exactly. 11 queries span two query blocks; 1031 and 3001 rows span
    # several tiles (a ragged last one); k = 600 keeps whole tiles.
    keys, slot_ids = buffers(n, 5, dead_every=4, data=integer_data)
    q = integer_data(batch, 5)
    ex = exclusions(slot_ids, batch, 4) if exclude and n > 1 else None
    assert torch.equal(
        _search(q, keys, slot_ids, k, metric, ex), brute_topk(q, keys, slot_ids, k, metric, ex)
    )


@needs_gpu
@pytest.mark.parametrize("k", [4096, 4097, 5000])
def test_search_large_k(k):
    # k = 4096 sorts in shared memory, larger k in global scratch; 5000 > live rows.
    keys, slot_ids = buffers(4999, 3, dead_every=7, data=integer_data)
    q = integer_data(3, 3)
    ex = exclusions(slot_ids, 3, 5)
    assert torch.equal(_search(q, keys, slot_ids, k, "ip", ex), brute_topk(q, keys, slot_ids, k, "ip", ex))


@needs_gpu
def test_search_merges_several_chunks():
    # 2049 tiles of 512 rows with k = 600 exceed one chunk's candidate budget per query,
    # so the running top-k is merged across chunks.
    keys, slot_ids = buffers(2049 * 512 - 5, 2, dead_every=9, data=integer_data)
    q = integer_data(2, 2)
    assert torch.equal(_search(q, keys, slot_ids, 600, "l2"), brute_topk(q, keys, slot_ids, 600, "l2"))


@needs_gpu
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("batch", [1, 9])
def test_search_random_floats_is_exact_topk(metric, batch):
    keys, slot_ids = buffers(3001, 16, dead_every=3)
    q = torch.randn(batch, 16)
    slots = _search(q, keys, slot_ids, 20, metric)
    full = brute_scores(q, keys, metric).masked_fill(slot_ids < 0, float("-inf"))
    scores = torch.gather(full, 1, slots)
    assert bool((slot_ids[slots] >= 0).all())
    assert bool((scores[:, :-1] >= scores[:, 1:] - 1e-4).all())
    torch.testing.assert_close(scores, full.topk(20).values, rtol=1e-5, atol=1e-4)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("metric", METRICS)
def test_search_low_precision_keys(dtype, metric):
    # Small integers are exact in float16 and bfloat16: the result is exact too.
    keys, slot_ids = buffers(777, 24, dead_every=5, data=integer_data)
    q = integer_data(10, 24)
    ex = exclusions(slot_ids, 10, 3)
    slots = _search(q, keys.to(dtype), slot_ids, 17, metric, ex)
    assert torch.equal(slots, brute_topk(q, keys, slot_ids, 17, metric, ex))


@needs_gpu
def test_search_all_dead_and_empty():
    keys, slot_ids = torch.randn(10, 4), torch.full((10,), -1)
    assert torch.equal(_search(torch.randn(3, 4), keys, slot_ids, 4), torch.full((3, 4), -1))
    assert torch.equal(_search(torch.randn(3, 4), keys[:0], slot_ids[:0], 2), torch.full((3, 2), -1))
    assert _search(torch.randn(0, 4), keys, slot_ids, 2).shape == (0, 2)


# --------------------------------------------------------------- attention
@needs_gpu
@pytest.mark.parametrize("k", [1, 7, 40, None])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("labels", [False, True])
@pytest.mark.parametrize("batch", [5, 12])
def test_attention_matches_brute_force(metric, k, labels, batch):
    keys, slot_ids = buffers(40, 6, dead_every=5)
    values = torch.randint(0, 4, (40,)) if labels else torch.randn(40, 3)
    q = torch.randn(batch, 6)
    ex = exclusions(slot_ids, batch, 3)
    classes = 4 if labels else None
    out = _attend(q, keys, values, slot_ids, k, 1 / math.sqrt(6), metric, ex, classes)
    assert out.dtype == torch.float32 and out.device.type == "cuda"
    want = brute_attention(q, keys, values, slot_ids, k, 1 / math.sqrt(6), metric, ex, classes)
    torch.testing.assert_close(out.cpu().double(), want, rtol=1e-5, atol=1e-5)
    if labels:
        torch.testing.assert_close(out.sum(1).cpu(), torch.ones(batch))


@needs_gpu
@pytest.mark.parametrize("k", [4096, None])
@pytest.mark.parametrize("metric", METRICS)
def test_attention_many_rows(k, metric):
    # Dense attention over 5000 rows spans several splits; top-k with k = 4096 softmaxes
    # over thousands of slots.
    keys, slot_ids = buffers(5000, 32, dead_every=11)
    values, q = torch.randn(5000, 20), torch.randn(3, 32)
    out = _attend(q, keys, values, slot_ids, k, 0.05, metric)
    want = brute_attention(q, keys, values, slot_ids, k, 0.05, metric)
    torch.testing.assert_close(out.cpu().double(), want, rtol=1e-4, atol=1e-5)


@needs_gpu
@pytest.mark.parametrize("k", [3, None])
def test_attention_no_live_rows_gives_zeros(k):
    keys, slot_ids = torch.randn(9, 4), torch.full((9,), -1)
    out = _attend(torch.randn(2, 4), keys, torch.randn(9, 5), slot_ids, k, 0.5)
    assert torch.equal(out.cpu(), torch.zeros(2, 5))
    slot_ids = torch.arange(9)
    ex = torch.stack([torch.arange(9), torch.full((9,), -1)])
    out = _attend(torch.randn(2, 4), keys, torch.randn(9, 5), slot_ids, k, 0.5, exclude_ids=ex).cpu()
    assert torch.equal(out[0], torch.zeros(5)) and bool(out[1].abs().sum() > 0)


@needs_gpu
def test_dense_lse_and_empty_memory():
    keys, slot_ids = buffers(700, 8, dead_every=3)
    q, values = torch.randn(4, 8), torch.randn(700, 2)
    _, lse = _cuda_topk(*_on(q, keys, values, slot_ids), None, 0.3, "ip", None, None, return_lse=True)
    logits = 0.3 * brute_scores(q, keys, "ip").masked_fill(slot_ids < 0, float("-inf"))
    torch.testing.assert_close(lse.cpu().double(), logits.logsumexp(1), rtol=1e-5, atol=1e-5)
    out, lse = _cuda_topk(
        *_on(q, keys[:0], values[:0], slot_ids[:0]), None, 0.3, "ip", None, None, return_lse=True
    )
    assert torch.equal(out.cpu(), torch.zeros(4, 2)) and bool(torch.isneginf(lse).all())


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [16, None])
def test_low_precision_keys_and_values(dtype, k):
    keys, slot_ids = buffers(3000, 64)
    values, q = torch.randn(3000, 4), torch.randn(20, 64)
    out = _attend(q, keys.to(dtype), values.to(dtype), slot_ids, k, 1 / 8)
    assert out.dtype == torch.float32
    # At most 2x (plus a floor) the error of float64 attention over the rounded rows.
    exact = brute_attention(q, keys, values, slot_ids, k, 1 / 8)
    rounded = brute_attention(q, keys.to(dtype).float(), values.to(dtype).float(), slot_ids, k, 1 / 8)
    assert (out.cpu().double() - exact).abs().max() <= 2 * (rounded - exact).abs().max() + 1e-4


# --------------------------------------------------------------- gradients
def _grads(fn, q, keys, values, labels: bool) -> list[torch.Tensor]:
    """CPU gradients of a fixed weighted sum of ``fn(q, keys, values)`` (values are labels: none)."""
    leaves = [q.clone().requires_grad_(), keys.clone().requires_grad_()]
    if not labels:
        leaves.append(values.clone().requires_grad_())
    out = fn(leaves[0], leaves[1], values if labels else leaves[2])
    weight = torch.linspace(-1, 1, out.numel(), device=out.device).reshape(out.shape)
    (out * weight).sum().backward()
    return [t.grad.cpu() for t in leaves]


@needs_gpu
@pytest.mark.parametrize("k", [1, 4, 40, None])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("labels", [False, True])
def test_gradients_match_reference(k, metric, labels):
    keys, slot_ids = buffers(300, 7, dead_every=6)
    values = torch.randint(0, 3, (300,)) if labels else torch.randn(300, 5)
    q, keys, values, slot_ids = _on(torch.randn(6, 7), keys, values, slot_ids)
    ex = _on(exclusions(slot_ids.cpu(), 6, 2))[0]
    classes = 3 if labels else None

    def kernel(q_, k_, v_):
        if k is None:
            return _cuda_dense(q_, k_, v_, slot_ids, 0.4, metric, ex, classes)
        return _cuda_topk(q_, k_, v_, slot_ids, k, 0.4, metric, ex, classes)

    def twin(q_, k_, v_):
        if k is None:
            return reference.dense_attention(q_, k_, v_, slot_ids, 0.4, metric, ex, classes)
        return reference.topk_attention(q_, k_, v_, slot_ids, k, 0.4, metric, ex, classes)

    got, want = _grads(kernel, q, keys, values, labels), _grads(twin, q, keys, values, labels)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@needs_gpu
def test_gradients_reach_only_retrieved_rows():
    keys, slot_ids = buffers(100, 8)
    keys, slot_ids, q = _on(keys, slot_ids, torch.randn(3, 8))
    keys.requires_grad_()
    values = torch.randn(100, 4, device=DEVICE, requires_grad=True)
    _cuda_topk(q, keys, values, slot_ids, 5, 0.3, "ip", None, None).sum().backward()
    slots = _cuda_search(q, keys, slot_ids, 5, "ip", None)
    retrieved = torch.zeros(100, dtype=torch.bool, device=DEVICE)
    retrieved[slots.flatten()] = True
    assert bool((keys.grad[~retrieved] == 0).all()) and bool((values.grad[~retrieved] == 0).all())
    assert bool((values.grad[retrieved].abs().sum(1) > 0).all())


@needs_gpu
def test_float64_is_refused_by_name_and_runs_elsewhere_under_auto():
    """The CUDA kernels compute in float32: asked for by name they refuse float64 rather
    than return float32 precision; "auto" serves it with a backend that keeps it."""
    keys, slot_ids = buffers(20, 5, dead_every=6)
    keys, slot_ids = _on(keys.double(), slot_ids)
    values = torch.randn(20, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    q = torch.randn(3, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    keys.requires_grad_()
    for k in (4, None):
        with pytest.raises(kmem.BackendUnavailable, match="queries float64 not supported"):
            _cuda_topk(q, keys, values, slot_ids, k, 0.5, "l2", None, None)
        plan = ops.explain("topk_attention", q, keys, values, slot_ids, k=k)
        assert plan.chosen not in (None, "cuda") and "cuda" in plan.refused
        f = lambda *t, k=k: ops.topk_attention(*t, slot_ids, k, scale=0.5, metric="l2")  # noqa: E731
        assert torch.autograd.gradcheck(f, (q, keys, values))


@needs_gpu
def test_calls_run_the_cuda_kernels():
    keys, slot_ids = buffers(50, 8)
    keys, slot_ids, q = _on(keys, slot_ids, torch.randn(2, 8))
    values = torch.randn(50, 3, device=DEVICE, requires_grad=True)
    with ops.trace() as ran:
        _cuda_topk(q, keys, values, slot_ids, 4, 0.3, "ip", None, None).sum().backward()
        _cuda_dense(q, keys, values, slot_ids, 0.3, "ip", None, None).sum().backward()
    kernels = ["search", "attend_forward", "attend_backward", "dense_forward", "dense_backward"]
    assert [e for e in ran if e.startswith("cuda.")] == [f"cuda.{name}" for name in kernels]


# ------------------------------------------------------------- compaction
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8])
@pytest.mark.parametrize(
    ("rows", "row_shape"), [(1, (4,)), (1000, (3,)), (4099, (8,)), (777, ()), (300, (5, 2))]
)
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_compaction_matches_reference(dtype, rows, row_shape, density):
    src = torch.randint(0, 100, (rows, *row_shape)).to(dtype)
    keep = torch.rand(rows) < density
    want = torch.full_like(src, 77)
    n_want = reference.compact_rows(src, keep, want)
    src, keep, out = _on(src, keep, torch.full_like(src, 77))
    assert kmem.ops.compact_rows(src, keep, out, backend="cuda") == n_want
    assert torch.equal(out.cpu(), want)


@needs_gpu
def test_compaction_out_too_small_and_misaligned_rows():
    src = torch.arange(30, dtype=torch.uint8, device=DEVICE).reshape(10, 3)
    keep = torch.ones(10, dtype=torch.bool, device=DEVICE)
    with pytest.raises(RuntimeError, match="are kept"):
        kmem.ops.compact_rows(src, keep, torch.empty(9, 3, dtype=torch.uint8, device=DEVICE), backend="cuda")
    # A view that starts one byte in: rows must move in single bytes, still in order.
    base = torch.arange(31, dtype=torch.uint8, device=DEVICE)
    odd = base[1:].reshape(10, 3)
    keep[::3] = False
    out = torch.zeros(10, 3, dtype=torch.uint8, device=DEVICE)
    n = kmem.ops.compact_rows(odd, keep, out, backend="cuda")
    assert torch.equal(out[:n], odd[keep])


# ------------------------------------------------------------ dispatch
@needs_gpu
def test_auto_picks_the_cuda_kernels_on_the_gpu():
    keys, slot_ids = buffers(64, 8, dead_every=5)
    keys, slot_ids, q, values = _on(keys, slot_ids, torch.randn(3, 8), torch.randn(64, 2))
    with ops.trace() as ran:
        kmem.ops.search(q, keys, slot_ids, 4)
        kmem.ops.topk_attention(q, keys, values, slot_ids, 4)
        kmem.ops.topk_attention(q, keys, values, slot_ids, None)
        kmem.ops.compact_rows(keys, slot_ids >= 0, torch.empty_like(keys))
    kernels = [e for e in ran if "." in e]
    assert kernels == [
        "cuda.search",
        "cuda.search",
        "cuda.attend_forward",
        "cuda.dense_forward",
        "cuda.compact_rows",
    ]


@needs_gpu
def test_auto_dense_float64_goes_past_the_cuda_kernels():
    keys, slot_ids = buffers(40, 6)
    keys, slot_ids, q, values = _on(
        keys.double(), slot_ids, torch.randn(2, 6).double(), torch.randn(40, 3).double()
    )
    with ops.trace() as ran:
        out = kmem.ops.topk_attention(q, keys, values, slot_ids, None)
    assert out.dtype == torch.float64 and not any(e.startswith("cuda") for e in ran)
    want = reference.dense_attention(
        q.cpu(), keys.cpu(), values.cpu(), slot_ids.cpu(), 6**-0.5, "ip", None, None
    )
    torch.testing.assert_close(out.cpu(), want)
    with pytest.raises(kmem.ops.BackendUnavailable, match="float64"):
        kmem.ops.topk_attention(q, keys, values, slot_ids, None, backend="cuda")


@needs_gpu
def test_key_memory_on_the_gpu_matches_the_cpu():
    ids = torch.arange(500)
    keys, values = torch.randn(500, 16), torch.randn(500, 4)
    memories = [kmem.KeyMemory(16, 4, device=device) for device in ("cpu", DEVICE)]
    for memory in memories:
        memory.add(ids, keys.to(memory.device), values.to(memory.device))
        memory.delete(ids[::3])
        memory.compact()
    assert memories[0].fingerprint() == memories[1].fingerprint()
    q = torch.randn(5, 16)
    cpu_out, gpu_out = (m.attend(q.to(m.device), k=8).cpu() for m in memories)
    torch.testing.assert_close(gpu_out, cpu_out, rtol=1e-4, atol=1e-5)
