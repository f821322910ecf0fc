"""The GPU kernels (CUDA C++ and Triton) against the reference twin and the GPU's floors.

Needs a CUDA GPU and a CUDA build of kmem._C (``KMEM_CUDA=1``); without them every
benchmark here skips and says why. Each timed call ends with a device synchronisation,
so pytest-benchmark's figures are wall time of finished work; CUDA events around each
call give the device time too (``extra_info["event_ms"]``, per round), which
``bench/gpu_table.py`` turns into the issue's ratio table. The memory has every tenth row
deleted and each query excludes 16 ids. The floors: one read of the key bytes
(``keys.sum()``, memory bandwidth) and the bare ``queries @ keys.T`` (fp32 FMA, TF32 off;
bf16 for bf16 keys), timed in the same run. BENCHMARKS.md holds the model these are
compared with.
"""

from __future__ import annotations

import pytest
import torch
from conftest import LEARNED_ROW_GRADS, learned_rows_step, make_memory, quarter_dead_buffers
from levers import LEVERS, lever_off

import kmem
from kmem import ops
from kmem.ops.backends import cuda, triton

K = 32
GPU_BACKENDS = ["cuda", "triton", "reference"]
ROUNDS = {"rounds": 10, "warmup_rounds": 2}
EXCLUDED = 16  # ids each query excludes

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason=f"needs a CUDA GPU ({cuda.missing() or 'torch sees none'})"
)


def _skip_unavailable(backend: str) -> None:
    reason = {"cuda": cuda.missing(), "triton": triton.missing()}.get(backend)
    if reason:
        pytest.skip(f"{backend} backend unavailable: {reason}")


def _timed(benchmark, fn):
    """``fn`` as a benchmark target that ends synchronised and logs its CUDA-event time."""
    events: list[float] = []
    benchmark.extra_info["event_ms"] = events

    def run():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize()
        events.append(start.elapsed_time(end))
        return out

    return run


def _exclusions(batch: int, slot_ids: torch.Tensor) -> torch.Tensor:
    """``[batch, EXCLUDED]`` live ids, drawn at random for each query."""
    live = slot_ids[slot_ids >= 0]
    return live[torch.randint(0, live.numel(), (batch, EXCLUDED), device=live.device)]


@pytest.fixture(scope="module")
def gpu_buffers(large_memory):
    """The large memory's (keys, values, slot_ids) on the GPU."""
    return tuple(t.cuda() for t in large_memory.buffers())


def _bench_attend(
    benchmark, group: str, buffers, batch: int, k: int | None, backend: str, q: torch.Tensor | None = None
) -> None:
    """Time ``backend``'s attention of ``batch`` queries (``q``, random by default) over
    ``buffers`` ``(keys, values, slot_ids)`` (``k=None``: dense) in benchmark group ``group``."""
    keys, values, slot_ids = buffers
    q = torch.randn(batch, keys.shape[1], device="cuda") if q is None else q
    ex = _exclusions(batch, slot_ids)
    benchmark.group = group
    run = _timed(
        benchmark, lambda: ops.topk_attention(q, keys, values, slot_ids, k, exclude_ids=ex, backend=backend)
    )
    benchmark.pedantic(run, **ROUNDS)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("batch", [1, 64, 256])
def test_attend(benchmark, gpu_buffers, backend, batch):
    _skip_unavailable(backend)
    _bench_attend(benchmark, f"gpu attend B={batch}", gpu_buffers, batch, K, backend)


@pytest.mark.parametrize("batch", [1, 64, 256])
def test_floor_gemm(benchmark, gpu_buffers, batch):
    keys = gpu_buffers[0]
    q = torch.randn(batch, keys.shape[1], device="cuda")
    benchmark.group = f"gpu attend B={batch}"
    benchmark.pedantic(_timed(benchmark, lambda: q @ keys.T), **ROUNDS)


def test_floor_stream(benchmark, gpu_buffers):
    keys = gpu_buffers[0]
    benchmark.group = "gpu attend B=1"
    benchmark.pedantic(_timed(benchmark, keys.sum), **ROUNDS)


@pytest.mark.parametrize("order", ["ascending", "random"])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_attend_adversarial_order(benchmark, gpu_buffers, backend, order):
    """B = 1 over rows reordered so that the query's scores rise row after row -- every
    row beats the running threshold, which then drops nothing -- against the rows in
    their stored order."""
    _skip_unavailable(backend)
    keys, values, slot_ids = gpu_buffers
    q = torch.randn(1, keys.shape[1], device="cuda")
    if order == "ascending":
        keys = keys[(keys @ q[0]).argsort()].contiguous()
    group = f"gpu attend B=1, {backend}: ascending vs random row order"
    _bench_attend(benchmark, group, (keys, values, slot_ids), 1, K, backend, q)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("k", [1, 32, 256, 4096])
def test_attend_k_sweep(benchmark, gpu_buffers, backend, k):
    _skip_unavailable(backend)
    if backend == "triton" and k > triton.MAX_K:
        pytest.skip(f"the Triton backend serves k <= {triton.MAX_K} (shared memory)")
    _bench_attend(benchmark, "gpu attend B=64, k sweep", gpu_buffers, 64, k, backend)


@pytest.mark.parametrize("backend", ["cuda", "triton", "reference-fp32", "bf16-gemm"])
def test_attend_bf16_keys(benchmark, gpu_buffers, backend):
    keys, values, slot_ids = gpu_buffers
    group = "gpu attend B=64, bf16 keys"
    if backend == "bf16-gemm":
        q, keys16 = torch.randn(64, keys.shape[1], device="cuda").bfloat16(), keys.bfloat16()
        benchmark.group = group
        benchmark.pedantic(_timed(benchmark, lambda: q @ keys16.T), **ROUNDS)
        return
    if backend == "reference-fp32":
        backend = "reference"
    else:
        _skip_unavailable(backend)
        keys, values = keys.bfloat16(), values.bfloat16()
    _bench_attend(benchmark, group, (keys, values, slot_ids), 64, K, backend)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_dense_attend(benchmark, gpu_buffers, backend):
    _skip_unavailable(backend)
    _bench_attend(benchmark, "gpu dense attend B=64", gpu_buffers, 64, None, backend)


@pytest.mark.parametrize("state", ["on", "off"])
@pytest.mark.parametrize("lever", list(LEVERS))
@pytest.mark.parametrize("backend", ["cuda", "triton"])  # the reference twin has no levers
def test_lever(benchmark, gpu_buffers, backend, lever, state, monkeypatch):
    _skip_unavailable(backend)
    if state == "off":
        lever_off(backend, lever, monkeypatch)
    batch, k = LEVERS[lever]
    _bench_attend(benchmark, f"gpu {backend} lever {lever}", gpu_buffers, batch, k, backend)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_training_step(benchmark, sizes, backend):
    _skip_unavailable(backend)
    rows = min(100_000, sizes["rows"])
    cpu_memory = make_memory(rows, sizes["dim"])
    memory = kmem.KeyMemory(sizes["dim"], 16, device="cuda", capacity=rows, backend=backend)
    keys, values, slot_ids = cpu_memory.buffers()
    memory.add(slot_ids.cuda(), keys.cuda(), values.cuda())
    layer = kmem.KeyMemoryAttention(sizes["dim"], memory, k=K).cuda()
    opt = torch.optim.SGD(layer.parameters(), lr=1e-3)
    x = torch.randn(256, sizes["dim"], device="cuda")

    def step():
        opt.zero_grad()
        layer(x).pow(2).mean().backward()
        opt.step()

    benchmark.group = f"gpu training step, N={rows}, B=256"
    benchmark.pedantic(_timed(benchmark, step), **ROUNDS)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("grads", LEARNED_ROW_GRADS)
def test_training_step_of_learned_rows(benchmark, sizes, backend, grads):
    """One SGD step on learned memory rows at B = 256 (see conftest.learned_rows_step)."""
    _skip_unavailable(backend)
    step = learned_rows_step(sizes["rows"], sizes["dim"], grads, backend, "cuda")
    benchmark.group = f"gpu training step of learned rows, N={sizes['rows']}, B=256"
    benchmark.pedantic(_timed(benchmark, step), **ROUNDS)


@pytest.mark.parametrize("backend", [*GPU_BACKENDS, "copy-of-live-bytes"])
def test_compact_quarter_dead(benchmark, sizes, backend):
    """A memory's keys, values and ids compacted in one call, or their live rows copied."""
    buffers, keep, outs, live, live_outs = quarter_dead_buffers(sizes["rows"], sizes["dim"], "cuda")
    benchmark.group = "gpu compaction (25% dead)"
    if backend == "copy-of-live-bytes":

        def copy():
            return [o.copy_(x) for o, x in zip(live_outs, live, strict=True)]

        benchmark.pedantic(_timed(benchmark, copy), **ROUNDS)
        return
    _skip_unavailable(backend)
    benchmark.pedantic(
        _timed(benchmark, lambda: ops.compact_rows(buffers, keep, outs, backend=backend)), **ROUNDS
    )
