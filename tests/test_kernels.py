"""The kernel contract, checked on every backend in the registry: the C++ kernels, the
CUDA kernels, Triton's and the reference twin, each asked for by name, against a
brute-force oracle that materialises every score (float64) and against the reference.

Each backend runs on the device it declares: Triton on the GPU when there is one, else
on CPU tensors through its interpreter (slow: :meth:`Kernel.rows` caps the memories it
gets); CUDA on a GPU, and the same CUDA sources on CPU tensors through the simulator
of ``_cuda_sim.py`` (backend "cuda-sim"). A backend that cannot run here skips and says why (under
``KMEM_REQUIRE_GPU=1`` a GPU backend's skip fails). Each backend's float32 tolerance is
its own, declared in the registry (:attr:`kmem.ops.registry.Backend.tolerance`).
Behaviour that belongs to one backend (its tiling, its launches, its refusals) is
tested beside it: ``test_dispatch.py``, ``test_triton.py``, ``test_cuda.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import _cuda_sim
import pytest
import torch
from _buffers import buffers, exclusions
from conftest import brute_attention, brute_scores, brute_topk, integer_data

from kmem import BackendUnavailable, ops
from kmem.ops.inputs import Signature

METRICS = ["ip", "l2"]
F32, F64 = torch.float32, torch.float64
LOW = [torch.float16, torch.bfloat16]
INTERPRETED_ROWS = 320  # Triton's interpreter runs each program in numpy: keep memories small
SIMULATED_SCORES = 8_000_000  # rows x queries the CUDA simulator scores within seconds
GRAD_TOLERANCE = (1e-4, 1e-5)  # gradients sum more terms than outputs: at least this


def _device(name: str) -> str:
    """Where ``name`` is tested: its GPU when it declares one and there is one (the
    reference twin stays on the CPU), else the CPU if it declares it."""
    declared = set().union(*(s.devices for s in ops.REGISTRY.backends[name].serves["search"]))
    if torch.cuda.is_available() and "cuda" in declared and name != "reference":
        return "cuda"
    return "cpu" if "cpu" in declared else "cuda"


@dataclass(frozen=True)
class Kernel:
    """A backend under test: its name, device and declared tolerance."""

    name: str
    device: str

    @property
    def interpreted(self) -> bool:
        return self.name == "triton" and self.device == "cpu"

    @property
    def simulated(self) -> bool:
        """The CUDA kernels on the CPU simulator (tests/_cuda_sim.py): each CUDA thread a fiber."""
        return self.name == _cuda_sim.NAME

    @property
    def tol(self) -> dict[str, float]:
        rtol, atol = ops.REGISTRY.backends[self.name].tolerance
        return {"rtol": rtol, "atol": atol}

    @property
    def grad_tol(self) -> dict[str, float]:
        rtol, atol = ops.REGISTRY.backends[self.name].tolerance
        return {"rtol": max(rtol, GRAD_TOLERANCE[0]), "atol": max(atol, GRAD_TOLERANCE[1])}

    @property
    def max_k(self) -> int:
        """The largest k the backend declares for search (past it: BackendUnavailable)."""
        return max(c.k[1] for c in ops.REGISTRY.backends[self.name].serves["search"])

    def refuses_k(self, k: int | None, call) -> bool:
        """Whether ``k`` is past the backend's declared range, after checking that
        ``call()`` then raises BackendUnavailable saying so."""
        if k is None or k <= self.max_k:
            return False
        with pytest.raises(BackendUnavailable, match=f"k={k} not supported"):
            call()
        return True

    def rows(self, n: int) -> int:
        """``n`` memory rows, capped under Triton's interpreter."""
        return min(n, INTERPRETED_ROWS) if self.interpreted else n

    def fits(self, n: int, batch: int = 1) -> None:
        """Skip a case too large for Triton's interpreter (it runs only without a GPU) or
        for the CUDA simulator (the same case runs on the GPU as backend "cuda")."""
        if self.interpreted and (n > INTERPRETED_ROWS or batch > 9):
            pytest.skip(f"{n} rows x {batch} queries: too slow for Triton's interpreter (no GPU here)")
        if self.simulated and n * batch > SIMULATED_SCORES:
            pytest.skip(
                f"{n} rows x {batch} queries: too slow for the CUDA simulator (runs on a GPU as cuda)"
            )

    def on(self, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
        return [None if t is None else t.to(self.device) for t in tensors]

    def search(self, q, keys, slot_ids, k, metric="ip", exclude_ids=None):
        """``(scores, slots)`` on the CPU, computed on the backend's device."""
        q, keys, slot_ids, exclude_ids = self.on(q, keys, slot_ids, exclude_ids)
        scores, slots = ops.search(
            q, keys, slot_ids, k, metric=metric, exclude_ids=exclude_ids, backend=self.name
        )
        assert slots.device.type == self.device and slots.dtype == torch.int64
        return scores.cpu(), slots.cpu()

    def attend(
        self, q, keys, values, slot_ids, k, scale=None, metric="ip", exclude_ids=None, num_classes=None, **kw
    ):
        """Top-k (``k`` int) or dense (``k=None``) attention on the backend's device;
        tensors that require grad stay the caller's leaves."""
        slot_ids, exclude_ids = self.on(slot_ids, exclude_ids)
        return ops.topk_attention(
            q, keys, values, slot_ids, k, scale=scale, metric=metric, exclude_ids=exclude_ids,
            num_classes=num_classes, backend=self.name, **kw,
        )  # fmt: skip


def declaring(op: str, dtype: torch.dtype = F32, *, k: int | None = 8, grads: bool = False) -> list[str]:
    """Backends whose declared combinations cover ``op`` with ``dtype`` queries, keys and
    values on their test device -- whether or not they can run in this process."""
    sig = Signature(
        "", dtype, dtype, dtype, False, None if op == "search" or k is None else k, grads
    )  # fmt: skip
    names = []
    for name in ops.REGISTRY.names(op):
        backend = ops.REGISTRY.backends[name]
        per = [c.refusals(sig._replace(device=_device(name))) for c in backend.serves[op]]
        if any(not r for r in per):
            names.append(name)
    return names


ALL = ops.REGISTRY.names("search")
ATTENDING = sorted(
    set(declaring("topk_attention")) & set(declaring("dense_attention", k=None)), key=ALL.index
)


@pytest.fixture
def kernel(request, small_chunks) -> Kernel:
    """The backend named by the test's parameter, on its device; skips, saying why, where
    it cannot run. ``small_chunks`` makes the reference stream in 7-row chunks."""
    name = request.param
    found = Kernel(name, _device(name))
    why = ops.REGISTRY.backends[name].absent
    if why is None and found.device == "cuda" and not torch.cuda.is_available():
        why = "no CUDA device is available"
    if why:
        pytest.skip(f"{name} backend unavailable: {why}")
    return found


def backends(names: list[str]):
    """Parametrise a test's ``kernel`` over ``names``."""
    return pytest.mark.parametrize("kernel", names, indirect=True)


# ------------------------------------------------------------------------ search
@backends(ALL)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize(
    ("n", "k"), [(1, 1), (37, 1), (37, 5), (37, 37), (37, 60), (200, 33), (300, 256), (3001, 40), (3001, 600)]
)
@pytest.mark.parametrize("batch", [1, 6, 70])
@pytest.mark.parametrize("exclude", [False, True])
def test_search_matches_brute_force_with_ties(kernel, metric, n, k, batch, exclude):
    # Integer data: exact scores and many ties, so the tie rule (lower slot first) is
    # checked exactly. Batch 1 and 6 take the C++ streaming path, 70 its BLAS tiles;
    # 3001 rows span several threads, tiles and CUDA chunks; k = 60 > live rows pads.
    kernel.fits(n, batch)
    keys, slot_ids = buffers(n, 5, dead_every=4, data=integer_data, scrub=False)
    q = integer_data(batch, 5)
    ex = exclusions(slot_ids, batch, 4) if exclude and n > 1 else None
    scores, slots = kernel.search(q, keys, slot_ids, k, metric, ex)
    expected = brute_topk(q, keys, slot_ids, k, metric, ex)
    assert torch.equal(slots, expected)
    want = torch.gather(brute_scores(q, keys, metric), 1, expected.clamp(min=0)).float()
    torch.testing.assert_close(scores.float(), want.masked_fill(expected < 0, float("-inf")))


@backends(ALL)
@pytest.mark.parametrize("dtype", [F32, *LOW])
@pytest.mark.parametrize("query_dtype", [F32, F64])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize(
    ("n", "batch", "dim"),
    [(31, 9, 20), (33, 9, 72), (3001, 3, 20), (3001, 17, 72), (3001, 70, 20), (3001, 33, 64)],
)
def test_search_low_precision_keys_exact_on_integers(kernel, dtype, query_dtype, metric, n, batch, dim):
    """Small integers are exact in every dtype, so every path (the C++ streaming scan on
    any key dtype, its AMX tiles for bf16 keys at d a multiple of 32, its bf16 tile
    kernel above batch 64 at even d, BLAS tiles; d past a whole number of SIMD steps)
    must give the exact answer."""
    kernel.fits(n, batch)
    keys, slot_ids = buffers(n, dim, dead_every=5, data=integer_data)
    q = integer_data(batch, dim).to(query_dtype)
    _, slots = kernel.search(q, keys.to(dtype), slot_ids, 25, metric)
    assert torch.equal(slots, brute_topk(q, keys, slot_ids, 25, metric))


@backends(ALL)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("batch", [1, 9, 41])  # 41: the C++ scan's prefetch spread over groups of queries
def test_search_random_floats_is_exact_topk(kernel, metric, batch):
    n = kernel.rows(3001)
    keys, slot_ids = buffers(n, 16, dead_every=3)
    q = torch.randn(batch, 16)
    scores, slots = kernel.search(q, keys, slot_ids, 20, metric)
    full = brute_scores(q, keys, metric).masked_fill(slot_ids < 0, float("-inf"))
    # Every returned row is live, its score is right, and no live row beats the last one.
    assert bool((slot_ids[slots] >= 0).all()) and scores.dtype == torch.float32
    if metric == "ip":  # the very scores of the ranking: in order, exactly
        assert bool((scores[:, :-1] >= scores[:, 1:]).all())
    torch.testing.assert_close(scores.double(), torch.gather(full, 1, slots), rtol=1e-5, atol=1e-4)
    assert bool((scores[:, :-1] >= scores[:, 1:] - 1e-4).all())
    torch.testing.assert_close(full.topk(20).values.float(), scores, rtol=1e-5, atol=1e-4)


@backends(ALL)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("batch", [1, 16, 37, 64, 100])
def test_search_bf16_keys_rank_by_float32_queries(kernel, metric, batch):
    """bf16 keys at d a multiple of 32 (the C++ backend's AMX tiles where the CPU has
    them, and above 64 queries its bf16 dot-product tiles): scores within float32
    summation error of the exact scores of the float32 queries -- a bf16 rounding of the
    queries would be ~1e-3 off -- with dead rows, exclusions and a last block of fewer
    than 16 rows."""
    kernel.fits(3001, batch)
    n = kernel.rows(3001)
    keys, slot_ids = buffers(n, 64, dead_every=3)
    keys = keys.bfloat16()
    q = torch.randn(batch, 64)
    full = brute_scores(q, keys.float(), metric).masked_fill(slot_ids < 0, float("-inf"))
    exclude = slot_ids[full.topk(3).indices]  # each query's three best rows' ids ...
    exclude[:, 1] = -1  # ... but one: -1 pads a row of exclusions
    scores, slots = kernel.search(q, keys, slot_ids, 20, metric, exclude_ids=exclude)
    full = full.masked_fill((slot_ids[None, :, None] == exclude[:, None, :]).any(-1), float("-inf"))
    assert bool((slot_ids[slots] >= 0).all())
    torch.testing.assert_close(scores.double(), torch.gather(full, 1, slots), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(full.topk(20).values.float(), scores, rtol=1e-5, atol=1e-4)


@backends(ALL)
@pytest.mark.parametrize("batch", [3, 100])
def test_search_bf16_keys_ranked_where_bf16_queries_tie(kernel, batch):
    """Row A (slot 0) and row B (slot 250) differ by one bf16 step in one column. In
    float32 B wins (64.070 vs 64.0625); with the queries' 1 + 2^-10 rounded to bf16
    (1.0), B scores 64.008 -- below the threshold A's exact score set. Every backend
    must return B first (the C++ tiles above 64 queries screen with bf16 queries: B's
    row must fall within the bound and be rescored)."""
    kernel.fits(300, batch)
    keys = -torch.ones(300, 64)
    keys[0] = 1.0
    keys[250] = 1.0
    keys[250, 0] = 1.0 + 2.0**-7
    q = torch.full((batch, 64), 1.0 + 2.0**-10)
    _, slots = kernel.search(q, keys.bfloat16(), torch.arange(300), 1)
    assert slots.flatten().tolist() == [250] * batch


@backends(ALL)
def test_search_all_dead_and_empty(kernel):
    keys, slot_ids = torch.randn(10, 4), torch.full((10,), -1)
    scores, slots = kernel.search(torch.randn(3, 4), keys, slot_ids, 4)
    assert torch.equal(slots, torch.full((3, 4), -1)) and bool(torch.isneginf(scores).all())
    scores, slots = kernel.search(torch.randn(3, 4), keys[:0], slot_ids[:0], 2)
    assert slots.shape == (3, 2) and bool((slots == -1).all())
    assert kernel.search(torch.randn(0, 4), keys, slot_ids, 2)[1].shape == (0, 2)


@backends(ALL)
@pytest.mark.parametrize(
    ("n", "k", "batch"),
    [(4200, 4096, 2), (4999, 4096, 70), (4999, 4097, 3), (4999, 5000, 3), (20011, 300, 5)],
)
def test_search_large_k(kernel, n, k, batch):
    """SPM-sized retrieval, exact on integer data: k = 4096 (CUDA sorts it in shared
    memory), larger k (global scratch), k above the live rows (-1 padding), and k = 300
    over 20k rows (the C++ candidate buffers fill and are cut back many times, among
    many tied scores)."""
    if kernel.interpreted and (n, batch) != (4200, 2):
        pytest.skip(f"{n} rows x {batch} queries: too slow for Triton's interpreter (no GPU here)")
    keys, slot_ids = buffers(n, 6, dead_every=9, data=integer_data)
    q = integer_data(batch, 6)
    ex = exclusions(slot_ids, batch, 5)
    if kernel.refuses_k(k, lambda: kernel.search(q, keys, slot_ids, k, "l2", ex)):
        return  # Triton: its candidates would not fit in shared memory
    _, slots = kernel.search(q, keys, slot_ids, k, "l2", ex)
    assert torch.equal(slots, brute_topk(q, keys, slot_ids, k, "l2", ex))


@backends(ALL)
@pytest.mark.parametrize("metric", METRICS)
def test_search_wide_keys_and_many_queries(kernel, metric):
    """d = 256 and 24 queries: CUDA's query-block loop (over 20 queries) and Triton's
    second query block, the key dimension streamed in several chunks."""
    n = kernel.rows(600)
    keys, slot_ids = buffers(n, 256, dead_every=5, data=integer_data)
    q = integer_data(24, 256)
    ex = exclusions(slot_ids, 24, 4)
    _, slots = kernel.search(q, keys, slot_ids, 17, metric, ex)
    assert torch.equal(slots, brute_topk(q, keys, slot_ids, 17, metric, ex))


@backends(ALL)
@pytest.mark.parametrize("metric", METRICS)
def test_search_random_float_ties_across_tiles(kernel, metric):
    """Three identical random-float rows far apart (other tiles, other threads) score the
    same bits: they come first, in slot order."""
    n = kernel.rows(1500)
    keys, slot_ids = buffers(n, 16)
    q = torch.randn(4, 16)
    tied = [n // 10, n // 2, n - 3]
    keys[tied] = q[0] * (3 if metric == "ip" else 1)  # query 0's best rows by far
    _, slots = kernel.search(q, keys, slot_ids, 6, metric)
    assert slots[0, :3].tolist() == tied
    assert torch.equal(slots, brute_topk(q, keys, slot_ids, 6, metric))


@backends(ALL)
def test_search_ranks_what_tf32_cannot_tell_apart(kernel):
    """Rows A (first tile) and B (second) differ only below TF32's 10 mantissa bits: cut
    to TF32 they tie, in float32 B wins. 20 queries take the GPU backends' tensor-core
    screens; each must send B's tile on to the float32 scorer after A set the threshold."""
    d, n, batch = 16, 2048, 20
    kernel.fits(n, batch)
    keys = -torch.ones(n, d)
    keys[0], keys[700] = 1.0, 1.0 + 2.0**-20
    q = torch.full((batch, d), 1.0 + 2.0**-15)
    tf32 = (q.view(torch.int32) & -8192).view(torch.float32)
    cut = (keys[[0, 700]].view(torch.int32) & -8192).view(torch.float32)
    assert bool((cut @ tf32[0]).diff() == 0)  # the premise: TF32 scores tie
    _, slots = kernel.search(q, keys, torch.arange(n), 1, "ip")
    assert slots.flatten().tolist() == [700] * batch


@backends(ALL)
@pytest.mark.parametrize("metric", METRICS)
def test_search_never_returns_dead_rows_that_would_win(kernel, metric):
    """Dead rows whose (unscrubbed) keys would beat every live row are skipped."""
    n = kernel.rows(700)
    keys, slot_ids = buffers(n, 8, dead_every=3, scrub=False)
    q = torch.randn(5, 8)
    keys[slot_ids < 0] = q[0] * 50
    _, slots = kernel.search(q, keys, slot_ids, 10, metric)
    assert bool((slot_ids[slots] >= 0).all())
    assert torch.equal(slots, brute_topk(q, keys, slot_ids, 10, metric))


@backends(ALL)
def test_large_exclusion_lists(kernel):
    """200 excluded ids per query (sorted, searched, or masked per tile by the backends)."""
    n = kernel.rows(600)
    keys, slot_ids = buffers(n, 6, dead_every=4, data=integer_data)
    q = integer_data(5, 6)
    ex = exclusions(slot_ids, 5, 200)
    _, slots = kernel.search(q, keys, slot_ids, 30, "l2", ex)
    assert torch.equal(slots, brute_topk(q, keys, slot_ids, 30, "l2", ex))
    if kernel.name in ATTENDING:
        values = torch.randn(n, 3)
        for k in (30, None):
            out = kernel.attend(*kernel.on(q, keys, values), slot_ids, k, 0.5, "l2", ex).cpu()
            torch.testing.assert_close(
                out.double(), brute_attention(q, keys, values, slot_ids, k, 0.5, "l2", ex), **kernel.tol
            )


@backends(ALL)
def test_non_contiguous_inputs(kernel):
    """Strided views (every other column, a transposed value matrix) give what their
    contiguous copies give."""
    n = kernel.rows(300)
    wide, slot_ids = buffers(n, 12, dead_every=5, data=integer_data)
    keys = wide[:, ::2]  # [n, 6], row stride 12
    q = integer_data(7, 12)[:, 1::2]
    assert not keys.is_contiguous() and not q.is_contiguous()
    _, slots = kernel.search(q, keys, slot_ids, 9, "ip")
    assert torch.equal(slots, brute_topk(q, keys, slot_ids, 9, "ip"))
    if kernel.name in ATTENDING:
        values = torch.randn(3, n).T  # [n, 3], column-major
        for k in (9, None):
            out = kernel.attend(*kernel.on(q, keys, values), slot_ids, k, 0.1).cpu()
            want = kernel.attend(
                *kernel.on(q.contiguous(), keys.contiguous(), values.contiguous()), slot_ids, k, 0.1
            )
            torch.testing.assert_close(out, want.cpu())


# --------------------------------------------------------- top-k and dense attention
def _values(n: int, labels: bool, width: int = 3) -> torch.Tensor:
    return torch.randint(0, 4, (n,)) if labels else torch.randn(n, width)


def _grads(fn, q, keys, values, labels: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``fn``'s output and the CPU gradients of a fixed weighting of it w.r.t. queries,
    keys and (vector) values."""
    leaves = [q.clone().requires_grad_(), keys.clone().requires_grad_()]
    if not labels:
        leaves.append(values.clone().requires_grad_())
    out = fn(leaves[0], leaves[1], values if labels else leaves[2])
    weight = torch.linspace(-1.0, 2.0, out.numel(), dtype=out.dtype, device=out.device).view_as(out)
    (out * weight).sum().backward()
    return out.detach().cpu(), [t.grad.cpu() for t in leaves]


@backends(ATTENDING)
@pytest.mark.parametrize("k", [1, 7, 40, None])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("labels", [False, True])
@pytest.mark.parametrize("batch", [5, 12])
def test_attention_matches_brute_force(kernel, k, metric, labels, batch):
    keys, slot_ids = buffers(40, 6, dead_every=5)
    values, q = _values(40, labels), torch.randn(batch, 6)
    ex = exclusions(slot_ids, batch, 3)
    classes = 4 if labels else None
    out = kernel.attend(*kernel.on(q, keys, values), slot_ids, k, None, metric, ex, classes)
    assert out.dtype == F32 and out.device.type == kernel.device
    want = brute_attention(q, keys, values, slot_ids, k, 1 / math.sqrt(6), metric, ex, classes)
    torch.testing.assert_close(out.cpu().double(), want, **kernel.tol)
    if labels:
        torch.testing.assert_close(out.sum(1).cpu(), torch.ones(batch))


@backends(ATTENDING)
@pytest.mark.parametrize("k", [4096, None])
@pytest.mark.parametrize("metric", METRICS)
def test_attention_over_many_rows(kernel, k, metric):
    """Dense attention over 5,000 rows spans several splits and chunks; top-k with
    k = 4096 softmaxes thousands of rows (float32 sums of 4096 terms)."""
    n = kernel.rows(5000)
    keys, slot_ids = buffers(n, 32, dead_every=11)
    values, q = torch.randn(n, 20), torch.randn(3, 32)

    def attend():
        return kernel.attend(*kernel.on(q, keys, values), slot_ids, k, 0.05, metric)

    if kernel.refuses_k(k, attend):
        return
    out = attend()
    want = brute_attention(q, keys, values, slot_ids, k, 0.05, metric)
    torch.testing.assert_close(out.cpu().double(), want, rtol=1e-4, atol=1e-5)


@backends(ATTENDING)
@pytest.mark.parametrize("k", [3, None])
@pytest.mark.parametrize("labels", [False, True])
def test_attention_no_live_rows_gives_zeros(kernel, k, labels):
    keys, values, q = torch.randn(9, 4), _values(9, labels, width=5), torch.randn(2, 4)
    classes = 4 if labels else None
    dead = torch.full((9,), -1)
    out, grads = _grads(
        lambda *t: kernel.attend(*t, dead, k, 1.0, "l2", None, classes), *kernel.on(q, keys, values), labels
    )
    assert bool((out == 0).all()) and all(bool((g == 0).all()) for g in grads)
    # A query whose every live row is excluded gets zeros as well.
    ex = torch.stack([torch.arange(9), torch.full((9,), -1)])
    out = kernel.attend(
        *kernel.on(q, keys, values), torch.arange(9), k, exclude_ids=ex, num_classes=classes
    ).cpu()
    assert bool((out[0] == 0).all()) and bool(out[1].abs().sum() > 0)


@backends(ATTENDING)
@pytest.mark.parametrize("k", [10, None])
def test_scale_is_applied(kernel, k):
    keys, slot_ids = buffers(30, 4)
    values, q = torch.randn(30, 2), torch.randn(3, 4)
    out = kernel.attend(*kernel.on(q, keys, values), slot_ids, k, 0.3)
    torch.testing.assert_close(
        out.cpu().double(), brute_attention(q, keys, values, slot_ids, k, 0.3), **kernel.tol
    )


@backends(ATTENDING)
@pytest.mark.parametrize("labels", [False, True])
def test_dense_attention_returns_its_log_sum_exp(kernel, labels):
    keys, slot_ids = buffers(60, 5, dead_every=4)
    values, q = _values(60, labels), torch.randn(4, 5)
    ex = exclusions(slot_ids, 4, 3)
    classes = 4 if labels else None
    on = kernel.on(q, keys, values)
    out, lse = kernel.attend(*on, slot_ids, None, 0.7, "ip", ex, classes, return_lse=True)
    z = 0.7 * brute_scores(q, keys, "ip")
    dead = (slot_ids < 0)[None, :] | (slot_ids[None, None, :] == ex[:, :, None]).any(1)
    torch.testing.assert_close(
        lse.cpu().double(), z.masked_fill(dead, float("-inf")).logsumexp(1), **kernel.tol
    )
    torch.testing.assert_close(out, kernel.attend(*on, slot_ids, None, 0.7, "ip", ex, classes))
    # No row at all: out 0, lse -inf.
    out, lse = kernel.attend(
        *kernel.on(q, keys[:0], values[:0]), slot_ids[:0], None, 0.7, num_classes=classes, return_lse=True
    )
    assert bool((out == 0).all()) and bool(torch.isneginf(lse).all())


@backends(ATTENDING)
@pytest.mark.parametrize(("metric", "labels"), [("ip", False), ("l2", False), ("l2", True)])
def test_dense_attention_online_softmax_over_rising_scores(kernel, metric, labels):
    """Scores that rise along the rows, so every streaming kernel meets a new maximum
    tile after tile and must rescale what it summed: 272 queries (17 CUDA query tiles,
    the last ragged) over 23,040 rows make each of the CUDA forward's splits three tiles
    long. Rows past the first dead, some excluded."""
    n, batch = 23_040, 272
    kernel.fits(n, batch)
    keys, slot_ids = buffers(n, 4, dead_every=5)
    keys[:, 0] = torch.linspace(-3, 3, n) * (1 if metric == "ip" else -1)
    q = torch.randn(batch, 4).abs() + torch.tensor([1.0, 0, 0, 0])
    values = _values(n, labels)
    ex = exclusions(slot_ids, batch, 3)
    classes = 4 if labels else None
    out, lse = kernel.attend(
        *kernel.on(q, keys, values), slot_ids, None, 0.5, metric, ex, classes, return_lse=True
    )
    want_out, want_lse = Kernel("reference", "cpu").attend(
        q.double(), keys.double(), values if labels else values.double(), slot_ids, None, 0.5, metric, ex,
        classes, return_lse=True,
    )  # fmt: skip
    torch.testing.assert_close(out.cpu().double(), want_out, **kernel.grad_tol)
    torch.testing.assert_close(lse.cpu().double(), want_lse, **kernel.grad_tol)


@backends(declaring("topk_attention", torch.float16))
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("low_values", [False, True])
def test_low_precision_keys_and_values(kernel, dtype, dense, low_values):
    """Error against float64 attention over the exact rows at most 2x (plus a floor) the
    error of the same computation over the rows (and queries) rounded to ``dtype`` -- the
    flash-attention rule: a low-precision kernel is judged against its own dtype's
    rounding. Top-k takes k above the live rows, so that rounding cannot change which
    rows are chosen (the choice is checked exactly on integer data above) and this
    measures the numeric error alone."""
    n = min(kernel.rows(3000), kernel.max_k - 40)
    keys, slot_ids = buffers(n, 64)
    values, q = torch.randn(n, 4), torch.randn(20, 64)
    k = None if dense else n + 40
    low_k = keys.to(dtype)
    low_v = values.to(dtype) if low_values else values
    out = kernel.attend(*kernel.on(q, low_k, low_v), slot_ids, k, 1 / 8)
    assert out.dtype == F32
    exact = brute_attention(q, keys, values, slot_ids, k, 1 / 8)
    rounded = brute_attention(q.to(dtype).float(), low_k.float(), low_v.float(), slot_ids, k, 1 / 8)
    floor = 10 * kernel.tol["atol"]
    assert (out.cpu().double() - exact).abs().max() <= 2 * (rounded - exact).abs().max() + floor


# ------------------------------------------------------------------- gradients
@backends([b for b in declaring("topk_attention", grads=True) if b != "reference"])
@pytest.mark.parametrize("k", [1, 6, 40, None])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("labels", [False, True])
@pytest.mark.parametrize("dtype", [F32, *LOW])
def test_gradients_match_autograd_through_reference(kernel, k, metric, labels, dtype):
    """The backend's own backward against autograd through the reference twin, on the
    same device. Low-precision keys: each result within twice the same-dtype reference's
    distance from float64 truth (on the same rounded inputs), plus a small floor."""
    n = kernel.rows(300)
    keys, slot_ids = buffers(n, 12, dead_every=7)
    values = _values(n, labels, width=4)
    q = torch.randn(9, 12)
    ex = exclusions(slot_ids, 9, 3)
    classes = 4 if labels else None
    q, keys, values = kernel.on(q, keys.to(dtype), values)

    def run(name):
        def f(q_, k_, v_):
            return Kernel(name, kernel.device).attend(q_, k_, v_, slot_ids, k, 0.4, metric, ex, classes)

        return f

    out, got = _grads(run(kernel.name), q, keys, values, labels)
    want_out, want = _grads(run("reference"), q, keys, values, labels)
    if dtype == F32:
        torch.testing.assert_close(out, want_out, **kernel.grad_tol)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g.float(), w.float(), **kernel.grad_tol)
        return
    wide = [t.double() if t.is_floating_point() else t for t in (q, keys, values)]
    true_out, truth = _grads(run("reference"), *wide, labels)
    names = ("out", "dq", "dkeys", "dvalues")[: 1 + len(got)]  # labels: no dvalues
    for name, g, w, t in zip(names, [out, *got], [want_out, *want], [true_out, *truth], strict=True):
        error, allowed = (g.double() - t).abs().max(), 2 * (w.double() - t).abs().max() + 1e-5 * t.abs().max()
        assert error <= allowed, (
            f"{name}: {error:.3g} from float64, the {dtype} reference {allowed:.3g} (x2 + floor)"
        )


@backends([b for b in ATTENDING if b != "reference"])
@pytest.mark.parametrize(("k", "batch"), [(4096, 3), (None, 1024)])
def test_gradients_over_many_rows(kernel, k, batch):
    """Backward at k = 4096, and dense backward over 5,000 rows with 1,024 queries: the
    C++ dense attention then streams several tiles and CUDA's backward several row chunks."""
    kernel.fits(5000, batch)
    keys, slot_ids = buffers(5000, 6, dead_every=7)
    values, q = torch.randn(5000, 3), torch.randn(batch, 6)
    ex = exclusions(slot_ids, batch, 3)

    def run(name):
        return lambda q_, k_, v_: Kernel(name, kernel.device).attend(q_, k_, v_, slot_ids, k, 0.3, "ip", ex)

    on = kernel.on(q, keys, values)
    if kernel.refuses_k(k, lambda: run(kernel.name)(*on)):
        return
    out, got = _grads(run(kernel.name), *on, False)
    want_out, want = _grads(run("reference"), *on, False)
    torch.testing.assert_close(out, want_out, **kernel.grad_tol)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **kernel.grad_tol)


@backends(ATTENDING)
def test_gradients_reach_only_retrieved_rows(kernel):
    keys, slot_ids, q = kernel.on(*buffers(100, 8), torch.randn(3, 8))
    keys.requires_grad_()
    values = torch.randn(100, 4, device=kernel.device, requires_grad=True)
    kernel.attend(q, keys, values, slot_ids, 5, 0.3).sum().backward()
    _, slots = kernel.search(q, keys.detach(), slot_ids, 5)
    retrieved = torch.zeros(100, dtype=torch.bool)
    retrieved[slots.flatten()] = True
    dk, dv = keys.grad.cpu(), values.grad.cpu()
    assert bool((dk[~retrieved] == 0).all()) and bool((dv[~retrieved] == 0).all())
    assert bool((dv[retrieved].abs().sum(1) > 0).all())


@backends(ATTENDING)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("labels", [False, True])
@pytest.mark.parametrize("k", [5, 70])
def test_sparse_gradients_hold_the_dense_ones(kernel, metric, labels, k):
    """``sparse_grad=True``: the keys' and values' gradients are uncoalesced sparse COO
    tensors with one entry per retrieval (``B k``), and they sum to the dense gradients;
    dq is unchanged. Queries near each other share rows (duplicates to sum); k = 70 is
    past the 53 live rows, so some slots are -1."""
    keys, slot_ids = buffers(64, 6, dead_every=6)
    values = _values(64, labels, width=3)
    q = torch.randn(1, 6) + 0.2 * torch.randn(7, 6)
    ex = exclusions(slot_ids, 7, 2)
    classes = 4 if labels else None

    def grads(sparse: bool) -> list[torch.Tensor | None]:
        leaves = [t.clone().requires_grad_(t.is_floating_point()) for t in kernel.on(q, keys, values)]
        out = kernel.attend(*leaves, slot_ids, k, 0.6, metric, ex, classes, sparse_grad=sparse)
        (out * torch.linspace(-1, 2, out.numel(), device=out.device).view_as(out)).sum().backward()
        return [leaf.grad for leaf in leaves]

    if kernel.refuses_k(k, lambda: grads(True)):
        return
    dense, sparse = grads(False), grads(True)
    torch.testing.assert_close(sparse[0], dense[0], rtol=0, atol=0)
    assert not sparse[0].is_sparse
    for got, want in zip(sparse[1:], dense[1:], strict=True):
        if want is None:  # labels have no gradient
            assert got is None
            continue
        assert got.is_sparse and got._nnz() == 7 * k
        torch.testing.assert_close(got.to_dense().cpu(), want.cpu(), **kernel.grad_tol)


@pytest.mark.parametrize(
    ("kernel", "k"),
    [
        (b, k)
        for k in (4, None)
        for b in declaring("dense_attention" if k is None else "topk_attention", F64, k=k, grads=True)
    ],
    indirect=["kernel"],
)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("labels", [False, True])
def test_gradcheck_float64(kernel, k, metric, labels):
    """Finite differences against the backend's own backward, where it declares float64
    (the others refuse it by name: test_dispatch.py, test_cuda.py)."""
    keys, slot_ids = buffers(12, 4, dead_every=5)  # small: each input element is perturbed twice
    q = torch.randn(2, 4, dtype=F64)
    values = _values(12, labels, width=2).double() if not labels else _values(12, labels)
    ex = exclusions(slot_ids, 2, 2)
    leaves = [t.requires_grad_() for t in kernel.on(q, keys.double(), *([] if labels else [values]))]
    label_values = kernel.on(values)[0]

    def f(q_, k_, *v):
        return kernel.attend(
            q_, k_, v[0] if v else label_values, slot_ids, k, 0.8, metric, ex, 4 if labels else None
        )

    assert torch.autograd.gradcheck(f, tuple(leaves))


@backends(declaring("dense_attention", F64, k=None, grads=True))
@pytest.mark.parametrize("labels", [False, True])
def test_dense_log_sum_exp_is_differentiable(kernel, labels):
    """``return_lse``'s log-sum-exp carries its gradient (what a merge of partial results
    differentiates through), through the backend's own backward."""
    keys, slot_ids = buffers(20, 5, dead_every=6)
    ex = exclusions(slot_ids, 3, 2)
    label_values = kernel.on(torch.randint(0, 3, (20,)))[0]
    leaves = [t.requires_grad_() for t in kernel.on(torch.randn(3, 5, dtype=F64), keys.double())]
    if not labels:
        leaves.append(torch.randn(20, 2, dtype=F64, device=kernel.device, requires_grad=True))

    def f(q, k_, *v):
        return kernel.attend(
            q, k_, v[0] if v else label_values, slot_ids, None, 0.8, "ip", ex, 3 if labels else None,
            return_lse=True,
        )  # fmt: skip

    assert torch.autograd.gradcheck(f, tuple(leaves))


@backends([b for b in ATTENDING if b != "reference"])
@pytest.mark.parametrize("metric", METRICS)
def test_dense_log_sum_exp_gradient_matches_reference(kernel, metric):
    """float32 gradients through both dense outputs, lse and out, by the backend's own
    backward against autograd through the reference twin: l2's dq has a term that sums
    to zero unless lse receives gradient. 700 rows and 20 queries span several CUDA
    row and query tiles."""
    n, batch = 700, 20
    kernel.fits(n, batch)
    keys, slot_ids = buffers(n, 6, dead_every=6)
    values, q = torch.randn(n, 3), torch.randn(batch, 6)
    ex = exclusions(slot_ids, batch, 2)
    w_out, w_lse = torch.randn(batch, 3), torch.randn(batch)

    def grads(name: str) -> list[torch.Tensor]:
        leaves = [t.clone().requires_grad_() for t in kernel.on(q, keys, values)]
        out, lse = Kernel(name, kernel.device).attend(
            *leaves, slot_ids, None, 0.8, metric, ex, return_lse=True
        )
        ((out.cpu() * w_out).sum() + (lse.cpu() * w_lse).sum()).backward()
        return [leaf.grad.cpu() for leaf in leaves]

    for got, want in zip(grads(kernel.name), grads("reference"), strict=True):
        torch.testing.assert_close(got, want, **kernel.grad_tol)


@backends(ATTENDING)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("k", [5, None])
@pytest.mark.parametrize("batch", [9, 20])  # 20: the CUDA kernels' tensor-core paths
def test_gradients_are_the_same_bits_every_run(kernel, metric, k, batch):
    """Two backward passes give bit-identical gradients: no sum depends on the order
    blocks or threads run in (the CUDA simulator runs blocks in a new order each launch,
    so an atomic sum shows there). Queries near each other share retrieved rows."""
    n = kernel.rows(700)
    kernel.fits(n, batch)
    keys, slot_ids = buffers(n, 6, dead_every=6)
    q = torch.randn(1, 6) + 0.1 * torch.randn(batch, 6)
    values, w = torch.randn(n, 3), torch.randn(batch, 3)

    def grads() -> list[torch.Tensor]:
        leaves = [t.clone().requires_grad_() for t in kernel.on(q, keys, values)]
        (kernel.attend(*leaves, slot_ids, k, 0.8, metric).cpu() * w).sum().backward()
        return [leaf.grad.cpu() for leaf in leaves]

    for first, second in zip(grads(), grads(), strict=True):
        assert torch.equal(first, second)


@backends([b for b in ATTENDING if b != "reference"])
def test_calls_run_the_backends_own_kernels(kernel):
    q, keys, slot_ids = kernel.on(torch.randn(2, 8), *buffers(50, 8))
    values = torch.randn(50, 3, device=kernel.device, requires_grad=True)
    with ops.trace() as ran:
        kernel.attend(q, keys, values, slot_ids, 4, 0.3).sum().backward()
        kernel.attend(q, keys, values, slot_ids, None, 0.3).sum().backward()
    fused = hasattr(ops.REGISTRY.backends[kernel.name].kernels, "topk_forward")
    forward = ["topk_forward"] if fused else ["search", "attend_forward"]
    names = [*forward, "attend_backward", "dense_forward", "dense_backward"]
    assert [e for e in ran if e.startswith(f"{kernel.name}.")] == [f"{kernel.name}.{n}" for n in names]
    assert not [e for e in ran if ":" in e and not e.endswith(f":{kernel.name}")]


# ------------------------------------------------------------------- compaction
@backends(declaring("compact_rows"))
@pytest.mark.parametrize("dtype", [F32, torch.bfloat16, torch.float16, torch.int64, torch.uint8, torch.bool])
@pytest.mark.parametrize(
    ("rows", "row_shape"),
    [(0, (3,)), (1, (4,)), (200, (3,)), (777, ()), (300, (5, 2)), (4099, (8,)), (300, (100,))],
)
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_compaction_matches_reference(kernel, dtype, rows, row_shape, density):
    """Rows of every shape and dtype; 100-wide rows take several steps of a Triton copy."""
    rows = kernel.rows(rows)
    src = torch.randint(0, 100, (rows, *row_shape)).to(dtype)
    keep = torch.rand(rows) < density
    want = torch.full_like(src, 77)
    n_want = int(keep.sum())
    want[:n_want] = src[keep]
    src, keep, out = kernel.on(src, keep, torch.full_like(src, 77))
    with ops.trace() as ran:
        assert ops.compact_rows(src, keep, out, backend=kernel.name) == n_want
    assert torch.equal(out.cpu(), want)
    assert kernel.name == "reference" or ran == [f"compact_rows:{kernel.name}", f"{kernel.name}.compact_rows"]


@backends(declaring("compact_rows"))
@pytest.mark.parametrize("rows", [0, 1, 300, 4099])
@pytest.mark.parametrize("more", [False, True])
def test_compaction_of_several_buffers_at_once(kernel, rows, more):
    """A memory's keys, values and ids -- three dtypes and row shapes -- in one call; and
    five buffers (more than one CUDA launch moves), two of them empty rows or 16-byte."""
    rows = kernel.rows(rows)
    keep = torch.rand(rows) < 0.7
    srcs = [torch.randn(rows, 5, dtype=torch.bfloat16), torch.randn(rows, 3, 2), torch.randperm(rows)]
    if more:
        srcs += [torch.randn(rows, 0), torch.randn(rows, 4)]
    outs = [torch.full((rows + 2, *s.shape[1:]), 9).to(s.dtype) for s in srcs]
    wants = [o.clone() for o in outs]
    n = int(keep.sum())
    for s, w in zip(srcs, wants, strict=True):
        w[:n] = s[keep]
    srcs, outs = kernel.on(*srcs), kernel.on(*outs)
    with ops.trace() as ran:
        assert ops.compact_rows(srcs, kernel.on(keep)[0], outs, backend=kernel.name) == n
    for o, w in zip(outs, wants, strict=True):
        assert torch.equal(o.cpu(), w)
    assert kernel.name == "reference" or ran == [f"compact_rows:{kernel.name}", f"{kernel.name}.compact_rows"]


@backends(declaring("compact_rows"))
def test_compaction_checks_every_output_before_writing_any(kernel):
    keep = torch.ones(6, dtype=torch.bool)
    srcs = kernel.on(torch.randn(6, 2), torch.arange(6))
    outs = kernel.on(torch.zeros(6, 2), torch.zeros(5, dtype=torch.int64))  # the second is one row short
    with pytest.raises((RuntimeError, ValueError), match="are kept"):
        ops.compact_rows(srcs, kernel.on(keep)[0], outs, backend=kernel.name)
    assert not bool(outs[0].any())
