"""What belongs to the CUDA backend alone: its chunked merge, its one-pass top-k
attention, its float32-only declaration, its compaction of odd rows, auto's choice of it
on a GPU. The contract every backend keeps (results, ties, gradients, dtypes) is in
``test_kernels.py``.

These tests need a CUDA GPU and a CUDA build of kmem._C; without one they skip and say
why, except those that also run on the CUDA simulator (tests/_cuda_sim.py). One test
always runs: on a machine without them, the backend says why it is unavailable instead
of failing obscurely.
"""

from __future__ import annotations

import _cuda_sim
import pytest
import torch
from _buffers import buffers, exclusions
from conftest import brute_topk, integer_data

import kmem
from kmem import ops
from kmem.ops import reference
from kmem.ops.backends import cuda
from kmem.ops.inputs import AttendInputs, DenseInputs

DEVICE = "cuda"
METRICS = ["ip", "l2"]

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason=f"needs a CUDA GPU: {cuda.missing()}")


def _on(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.to(DEVICE) for t in tensors]


def _search(q, keys, slot_ids, k, metric="ip") -> torch.Tensor:
    """CUDA slots for CPU inputs, back on the CPU."""
    return ops.search(*_on(q, keys, slot_ids), k, metric=metric, backend="cuda")[1].cpu()


# The CUDA kernels on the GPU, and on the CPU simulator (tests/_cuda_sim.py).
ON_GPU_AND_SIMULATED = pytest.mark.parametrize(
    ("backend", "device"), [pytest.param("cuda", DEVICE, marks=needs_gpu), (_cuda_sim.NAME, "cpu")]
)


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
@ON_GPU_AND_SIMULATED
@pytest.mark.parametrize("k", [600, 32])
def test_search_merges_several_chunks(backend, device, k):
    """2049 tiles of 512 rows exceed one chunk's candidate budget per query at k = 600, so
    the running top-k is merged across chunks; at k = 32 the threshold is shared across
    them (one chunk then: 2^20 candidates)."""
    keys, slot_ids = buffers(2049 * 512 - 5, 2, dead_every=9, data=integer_data)
    q = integer_data(2, 2)
    on = [t.to(device) for t in (q, keys, slot_ids)]
    slots = ops.search(*on, k, metric="l2", backend=backend)[1].cpu()
    assert torch.equal(slots, brute_topk(q, keys, slot_ids, k, "l2"))


@ON_GPU_AND_SIMULATED
@pytest.mark.parametrize(("n", "k", "labels"), [(3001, 40, False), (3001, 600, True), (7, 9, False)])
def test_one_pass_topk_attention_is_search_then_attend(backend, device, n, k, labels):
    """Top-k attention in one pass (the search's last kernel attends) gives the bits of
    the search followed by the attend kernel: several tiles, k past a tile's 512 rows,
    k above the rows, dead rows, exclusions, labels."""
    kernels = ops.REGISTRY.backends[backend].kernels
    keys, slot_ids = buffers(n, 6, dead_every=4)
    q = torch.randn(5, 6)
    values = torch.randint(0, 5, (n,)) if labels else torch.randn(n, 3)
    on = [t.to(device) for t in (q, keys, values, slot_ids, exclusions(slot_ids, 5, 4))]
    a = AttendInputs(*on, 0.7, "l2", 5 if labels else 0, k=k)
    out, slots, weights = kernels.topk_forward(a)
    _, want_slots = kernels.search(a.search())
    want_out, want_weights = kernels.attend_forward(a, want_slots)
    assert (
        torch.equal(slots, want_slots) and torch.equal(weights, want_weights) and torch.equal(out, want_out)
    )
    want = reference.topk_attention(AttendInputs(*(t.cpu() for t in on), 0.7, "l2", 5 if labels else 0, k=k))
    torch.testing.assert_close(out.cpu(), want, rtol=1e-5, atol=1e-5)


@ON_GPU_AND_SIMULATED
@pytest.mark.parametrize("metric", METRICS)
def test_tensor_core_paths_agree_with_the_fma_paths(backend, device, metric, monkeypatch):
    """Above 16 queries the search screens on tensor cores and dense attention multiplies
    on them (3xTF32); KMEM_CUDA_TENSOR_CORES=0 keeps both on float32 FMA. The search must
    return the same bits either way, dense attention and its gradients the same values to
    float32's accuracy. Random floats, dead rows, exclusions, ragged tiles."""
    keys, slot_ids = buffers(3001, 40, dead_every=7)
    q, values, w = torch.randn(24, 40), torch.randn(3001, 5), torch.randn(24, 5)
    on = [t.to(device) for t in (q, keys, values, slot_ids, exclusions(slot_ids, 24, 5))]

    def run() -> list[torch.Tensor]:
        scores, slots = ops.search(on[0], on[1], on[3], 10, metric=metric, exclude_ids=on[4], backend=backend)
        leaves = [t.clone().requires_grad_() for t in on[:3]]
        out, lse = ops.topk_attention(
            *leaves,
            on[3],
            None,
            scale=0.3,
            metric=metric,
            exclude_ids=on[4],
            backend=backend,
            return_lse=True,
        )
        ((out * w.to(device)).sum() + lse.sum()).backward()
        return [scores, slots, out, lse, *(leaf.grad for leaf in leaves)]

    tensor_cores = run()
    monkeypatch.setenv("KMEM_CUDA_TENSOR_CORES", "0")
    fma = run()
    assert torch.equal(tensor_cores[0], fma[0]) and torch.equal(tensor_cores[1], fma[1])
    for got, want in zip(tensor_cores[2:], fma[2:], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- dtypes
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
            ops.topk_attention(q, keys, values, slot_ids, k, scale=0.5, metric="l2", backend="cuda")
        plan = ops.explain("topk_attention", q, keys, values, slot_ids, k=k)
        assert plan.chosen not in (None, "cuda") and "cuda" in plan.refused
        f = lambda *t, k=k: ops.topk_attention(*t, slot_ids, k, scale=0.5, metric="l2")  # noqa: E731
        assert torch.autograd.gradcheck(f, (q, keys, values))


# ------------------------------------------------------------- compaction
@ON_GPU_AND_SIMULATED
def test_compaction_out_too_small_and_misaligned_rows(backend, device):
    src = torch.arange(30, dtype=torch.uint8, device=device).reshape(10, 3)
    keep = torch.ones(10, dtype=torch.bool, device=device)
    with pytest.raises(RuntimeError, match="are kept"):
        kmem.ops.compact_rows(src, keep, torch.empty(9, 3, dtype=torch.uint8, device=device), backend=backend)
    # A view that starts one byte in: rows must move in single bytes, still in order.
    base = torch.arange(31, dtype=torch.uint8, device=device)
    odd = base[1:].reshape(10, 3)
    keep[::3] = False
    out = torch.zeros(10, 3, dtype=torch.uint8, device=device)
    n = kmem.ops.compact_rows(odd, keep, out, backend=backend)
    assert torch.equal(out[:n], odd[keep])


# ------------------------------------------------------------ dispatch
@needs_gpu
def test_auto_picks_the_cuda_kernels_on_the_gpu_where_they_are_faster():
    keys, slot_ids = buffers(64, 8, dead_every=5)
    keys, slot_ids, q, values = _on(keys, slot_ids, torch.randn(3, 8), torch.randn(64, 2))
    with ops.trace() as ran:
        kmem.ops.search(q, keys, slot_ids, 4)
        kmem.ops.topk_attention(q, keys, values, slot_ids, 4)
        kmem.ops.topk_attention(q, keys, values, slot_ids, None)
        kmem.ops.compact_rows(keys, slot_ids >= 0, torch.empty_like(keys))
    kernels = [e for e in ran if "." in e]
    assert kernels == ["cuda.search", "cuda.topk_forward", "cuda.compact_rows"]
    # Dense attention: the CUDA and Triton kernels were measured slower than the reference
    # twin, so auto passes them by (asked for by name, they run).
    assert "dense_attention:reference" in ran
    plan = kmem.ops.explain("topk_attention", q, keys, values, slot_ids, None)
    assert plan.chosen == "reference" and "auto passes it by" in "; ".join(plan.refused["cuda"])


@needs_gpu
def test_auto_dense_float64_goes_past_the_cuda_kernels():
    keys, slot_ids = buffers(40, 6)
    keys, slot_ids, q, values = _on(
        keys.double(), slot_ids, torch.randn(2, 6).double(), torch.randn(40, 3).double()
    )
    with ops.trace() as ran:
        out = kmem.ops.topk_attention(q, keys, values, slot_ids, None)
    assert out.dtype == torch.float64 and not any(e.startswith("cuda") for e in ran)
    want, _ = reference.dense_attention(
        DenseInputs(q.cpu(), keys.cpu(), values.cpu(), slot_ids.cpu(), None, 6**-0.5, "ip", 0)
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


@needs_gpu
@pytest.mark.parametrize("k", [8, None])
def test_reads_never_synchronise_the_host(k):
    """The call path from KeyMemory down to the CUDA kernels never waits for the GPU:
    torch raises on any synchronising call under sync debug mode "error" (issue 16)."""
    memory = kmem.KeyMemory(16, 4, device=DEVICE)
    rows = torch.randn(300, 16, device=DEVICE), torch.randn(300, 4, device=DEVICE)
    memory.add(torch.arange(300), *rows)  # an add may synchronise: it is not a read
    q = torch.randn(5, 16, device=DEVICE, requires_grad=True)
    exclude = torch.randint(0, 300, (5, 3), device=DEVICE)
    memory.search(q.detach(), 8)  # warm: dispatch caches its choice, kernels load
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        memory.search(q.detach(), 8, exclude_ids=exclude)
        memory.attend(q, k=k, exclude_ids=exclude).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert q.grad is not None
