"""ShardedKeyMemory: search and attend time, and bytes exchanged per query, vs shards.

The pytest process is rank 0 of a gloo group on this machine; P - 1 helper processes
are the other ranks. The memory holds ``--small-rows`` rows in all (``--dim`` keys,
16-d values), split by id hash; every rank asks B = 64 queries per call. Each
benchmark first tells the helpers which call to make and how many times, so both
sides make exactly the calls pytest-benchmark times (one when benchmarks are
disabled, as in CI). ``extra_info`` holds the bytes this rank sent per query and the
shard sizes.

On this 2-core machine all ranks share two cores, so the times show the exchange's
overhead, not a speed-up; BENCHMARKS.md gives the model for GPU nodes.
"""

from __future__ import annotations

import datetime
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kmem import ops
from kmem.distributed import ShardedKeyMemory

BATCH = 64
K = 32
VALUE_DIM = 16
ROUNDS = 5
CALLS = {"search": (0, K), "attend": (1, K), "dense attend": (1, None)}  # name -> (op, k)


def _group(rank: int, world: int, port: int) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=600),
    )


def _memory(rank: int, world: int, rows: int, dim: int) -> tuple[ShardedKeyMemory, torch.Tensor]:
    """Rank r adds rows r, r + P, ... (each then goes to its owner); its queries."""
    gen = torch.Generator().manual_seed(rank)
    mem = ShardedKeyMemory(dim, VALUE_DIM, capacity=2 * rows // world + 1024)
    step = 1 << 16
    for start in range(0, rows, step * world):
        ids = torch.arange(start + rank, min(rows, start + step * world), world)
        mem.add(
            ids, torch.randn(len(ids), dim, generator=gen), torch.randn(len(ids), VALUE_DIM, generator=gen)
        )
    return mem, torch.randn(BATCH, dim, generator=gen)


def _call(mem: ShardedKeyMemory, queries: torch.Tensor, op: int, k: int | None) -> None:
    if op == 0:
        mem.search(queries, k)
    else:
        mem.attend(queries, k=k)


def _helper(rank: int, world: int, port: int, rows: int, dim: int) -> None:
    torch.set_num_threads(1)
    _group(rank, world, port)
    mem, queries = _memory(rank, world, rows, dim)
    plan = torch.zeros(3, dtype=torch.int64)
    while True:
        dist.broadcast(plan, 0)
        op, k, calls = plan.tolist()
        if op < 0:
            break
        for _ in range(calls):
            _call(mem, queries, op, None if k < 0 else k)
    _leave()


def _leave() -> None:
    """Tear the group down only once every rank is done with it: a rank that closes its
    gloo connections while a peer still reads from them kills that peer (std::terminate)."""
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module", params=[1, 2, 4], ids=lambda p: f"P={p}")
def sharded(request, sizes):
    world = request.param
    rows, dim = sizes["small"], sizes["dim"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    helpers = [ctx.Process(target=_helper, args=(r, world, port, rows, dim)) for r in range(1, world)]
    for p in helpers:
        p.start()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    _group(0, world, port)
    try:
        yield world, *_memory(0, world, rows, dim)
        dist.broadcast(torch.tensor([-1, 0, 0]), 0)
        _leave()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(threads)
        for p in helpers:
            p.join(timeout=60)
    assert [p.exitcode for p in helpers] == [0] * len(helpers)


@pytest.mark.parametrize("name", list(CALLS))
def test_sharded_read(benchmark, sharded, name):
    world, mem, queries = sharded
    op, k = CALLS[name]
    calls = 1 if benchmark.disabled else ROUNDS
    dist.broadcast(torch.tensor([op, -1 if k is None else k, calls]), 0)
    sent = mem.bytes_sent
    benchmark.group = f"sharded {name}, B = {BATCH}, N = {len(mem)}"
    benchmark.pedantic(_call, args=(mem, queries, op, k), rounds=calls, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(
        shards=world,
        rows=len(mem),
        shard_rows=len(mem.shard),
        bytes_sent_per_query=(mem.bytes_sent - sent) / (calls * BATCH),
    )


def test_shard_local_topk(benchmark, sharded):
    """The compute inside a sharded search: rank 0's fused top-k over its shard for the
    P * B queries of all ranks, with no exchange (the helpers wait)."""
    world, mem, queries = sharded
    keys, _, slot_ids = mem.shard.buffers()
    every = queries.repeat(world, 1)
    benchmark.group = f"sharded search, B = {BATCH}, N = {len(mem)}"
    benchmark.extra_info.update(shards=world, shard_rows=len(mem.shard))
    benchmark.pedantic(ops.search, args=(every, keys, slot_ids, K), rounds=ROUNDS, iterations=1)
