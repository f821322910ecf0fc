"""ShardedKeyMemory on 2 and 4 gloo processes against one KeyMemory holding the same rows.

Starting processes is the cost, so each world size runs every check in one spawned
run: each rank builds the single-process KeyMemory itself (the same rows, added in the
order the sharded adds define) and compares every result it gets with that memory's.
Keys and queries hold small integers: scores are exact, and rows with equal keys on
different ranks make ties whose winner only the global insertion order decides.
"""

from __future__ import annotations

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import kmem
from kmem.distributed import ShardedKeyMemory, ShardError, owner_of

TIMEOUT = datetime.timedelta(seconds=20)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, world: int, *args) -> None:
    mp.spawn(fn, args=(world, _free_port(), *args), nprocs=world, join=True)


def _init(rank: int, world: int, port: int, timeout: datetime.timedelta = TIMEOUT) -> None:
    torch.set_num_threads(1)  # the ranks share the machine's cores
    os.environ.setdefault("TRITON_INTERPRET", "1")
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timeout
    )


def _rows(gen: torch.Generator, n: int, key_dim: int, first_id: int):
    """``n`` rows with distinct, scattered ids and integer keys in [-2, 2] (many ties)."""
    ids = first_id + 7 * torch.randperm(5 * n, generator=gen)[:n]
    keys = torch.randint(-2, 3, (n, key_dim), generator=gen).float()
    return ids, keys


def _empty(key_dim: int, value_fn):
    """No rows: what a rank adds when it has nothing to add."""
    return torch.empty(0, dtype=torch.int64), torch.empty(0, key_dim), value_fn(None, 0)


class Pair:
    """A sharded memory and the single KeyMemory it must equal, driven by the same calls."""

    def __init__(self, rank: int, world: int, **kw) -> None:
        self.rank, self.world = rank, world
        self.sharded = ShardedKeyMemory(**kw, capacity=4)  # small: the shards grow
        self.single = kmem.KeyMemory(**kw, capacity=4)

    def add(self, per_rank: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        """Rank r adds ``per_rank[r]``; the single memory adds them all in rank order."""
        self.sharded.add(*per_rank[self.rank])
        for rows in per_rank:
            self.single.add(*rows)

    def delete(self, per_rank: list[list[int]]) -> None:
        assert self.sharded.delete(per_rank[self.rank]) == len(per_rank[self.rank])
        self.single.delete([i for ids in per_rank for i in ids])

    def check(self, queries: list[torch.Tensor], exclude: list[torch.Tensor | None]) -> None:
        """Every read of this rank's queries equals the single memory's."""
        q, ex = queries[self.rank], exclude[self.rank]
        assert len(self.sharded) == len(self.single)
        assert self.sharded.fingerprint() == self.single.fingerprint()
        for k in (1, 3, 8, len(self.single) + 2):
            for e in (None, ex):
                scores, ids = self.sharded.search(q, k, exclude_ids=e)
                want_scores, want_ids = self.single.search(q, k, exclude_ids=e)
                assert torch.equal(ids, want_ids), (k, e, ids, want_ids)
                assert torch.equal(scores, want_scores)
        for k in (1, 4, None):
            for e in (None, ex):
                qg = q.clone().requires_grad_(True)
                qs = q.clone().requires_grad_(True)
                out = self.sharded.attend(qg, k=k, scale=0.7, exclude_ids=e)
                want = self.single.attend(qs, k=k, scale=0.7, exclude_ids=e)
                torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
                weight = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
                (out * weight).sum().backward()
                (want * weight).sum().backward()
                torch.testing.assert_close(qg.grad, qs.grad, rtol=1e-4, atol=1e-5)


def _data(world: int, key_dim: int, value_fn, seed: int):
    """Rows of two add calls (rank 1 adds nothing in the second) and the queries."""
    gen = torch.Generator().manual_seed(seed)
    calls = []
    for call, sizes in enumerate(([9, 5, 12, 7], [6, 0, 4, 3])):
        per_rank = []
        for r in range(world):
            ids, keys = _rows(gen, sizes[r], key_dim, first_id=1_000_000 * (1 + call) + 10_000 * r)
            per_rank.append((ids, keys, value_fn(gen, sizes[r])))
        calls.append(per_rank)
    # Different batch sizes per rank, rank 1 asks nothing.
    queries = [
        torch.randint(-2, 3, (0 if r == 1 else 2 + r, key_dim), generator=gen).float() for r in range(world)
    ]
    return calls, queries


def _exclude(calls, queries, world):
    """Each query excludes an id of the first call (one a top result with ties) and -1s."""
    out = []
    for r in range(world):
        ids = calls[0][(r + 1) % world][0]
        b = queries[r].shape[0]
        ex = torch.full((b, r + 1), -1, dtype=torch.int64)
        ex[:, 0] = ids[:b] if b <= len(ids) else ids[0]
        out.append(ex)
    return out


def _check_memory(rank, world, tmp, **kw):
    key_dim = 4
    if "num_classes" in kw:

        def value_fn(g, n):
            return torch.randint(0, kw["num_classes"], (n,), generator=g)
    else:

        def value_fn(g, n):
            return torch.randn(n, kw["value_dim"], generator=g)

    pair = Pair(rank, world, key_dim=key_dim, **kw)
    gen = torch.Generator().manual_seed(5)
    calls, queries = _data(world, key_dim, value_fn, seed=len(kw["metric"]))
    exclude = _exclude(calls, queries, world)
    for per_rank in calls:
        pair.add(per_rank)
    pair.check(queries, exclude)
    # Each shard holds the rows its rank owns, in insertion order.
    ids = pair.sharded.shard.ids()
    assert bool((owner_of(ids, world) == rank).all())

    # Deletes from every rank, of rows that live anywhere; some shards then compact themselves.
    first, second = calls
    dels = [first[(r + 1) % world][0][: 3 + r].tolist() for r in range(world)]
    dels[0] = dels[0] + second[world - 1][0][:2].tolist()
    pair.delete(dels)
    pair.check(queries, exclude)
    pair.sharded.compact()
    pair.single.compact()
    pair.check(queries, exclude)
    # Re-adding a deleted id is an add like any other: it goes last in the order.
    rows = [(first[1][0][:1], torch.full((1, key_dim), 2.0), value_fn(gen, 1))]
    rows += [_empty(key_dim, value_fn)] * (world - 1)
    pair.add(rows)
    pair.check(queries, exclude)

    # Snapshots per shard: the loaded memory is the same memory.
    path = os.path.join(tmp, f"{kw['metric']}-{{rank}}-of-{{world_size}}.kmem")
    pair.sharded.save(path)
    dist.barrier()
    pair.sharded = ShardedKeyMemory.load(path)
    pair.check(queries, exclude)
    # A damaged shard file fails the load on every rank.
    if rank == 1:
        with open(path.format(rank=1, world_size=world), "r+b") as f:
            f.truncate(100)
    with pytest.raises(ValueError, match="not a valid shard snapshot" if rank == 1 else "failed on rank 1"):
        ShardedKeyMemory.load(path)

    # state_dict per rank, tombstones included: loaded into a new sharded memory, the same memory.
    pair.delete([[int(pair.single.ids()[r])] for r in range(world)])
    state = pair.sharded.state_dict()
    pair.sharded = ShardedKeyMemory(key_dim, **kw)
    pair.sharded.load_state_dict(state)
    assert pair.sharded.shard.num_dead == state["shard"]["slot_ids"].lt(0).sum()
    pair.check(queries, exclude)
    # Another rank's part fails on every rank, and nothing changes.
    wrong = {**state, "rank": (rank + 1) % world} if rank == 0 else state
    with pytest.raises(ValueError, match="state of rank 1" if rank == 0 else "failed on rank 0"):
        pair.sharded.load_state_dict(wrong)
    pair.check(queries, exclude)
    return pair


def _check_errors(pair: Pair, rank: int, world: int) -> None:
    """Bad arguments on one rank raise on every rank and change nothing anywhere."""
    mem = pair.sharded
    before = mem.fingerprint()
    live = pair.single.ids()
    unknown = [[] for _ in range(world)]
    unknown[1] = [int(live[0]), 123]  # one real id, one unknown: nothing is deleted
    with pytest.raises(KeyError, match="not in the memory"):
        mem.delete(unknown[rank])
    # The same id asked by two ranks.
    with pytest.raises(ValueError, match="repeat across ranks"):
        mem.delete([int(live[1])] if rank < 2 else [])
    # An id already live, and an id added by two ranks at once.
    key = torch.zeros(1, mem.key_dim)
    value = torch.zeros(1, mem.out_dim) if not mem.is_labels else torch.zeros(1, dtype=torch.int64)
    with pytest.raises(ValueError, match="already in the memory"):
        if rank == 0:
            mem.add(live[2:3], key, value)
        else:
            mem.add(torch.empty(0, dtype=torch.int64), key[:0], value[:0])
    with pytest.raises(ValueError, match="repeat across ranks"):
        mem.add(torch.tensor([99_999_999]), key, value)
    # A malformed argument on rank 1 only.
    bad = torch.zeros(1, mem.key_dim + (rank == 1))
    with pytest.raises(ValueError, match="rank 1" if rank != 1 else "keys"):
        mem.add(torch.tensor([88_888_888 + rank]), bad, value)
    with pytest.raises(ValueError, match="rank 1" if rank != 1 else "finite|NaN"):
        mem.search(torch.full((1, mem.key_dim), float("nan") if rank == 1 else 0.0), 2)
    with pytest.raises(ValueError, match="different reads"):
        mem.search(torch.zeros(1, mem.key_dim), 2 + rank)
    with pytest.raises(ValueError, match="different reads"):
        mem.attend(torch.zeros(1, mem.key_dim, requires_grad=rank == 0), k=2)
    with pytest.raises(ValueError, match="different reads"):
        mem.attend(torch.zeros(1, mem.key_dim), k=2, scale=1.0 + rank)
    with pytest.raises(ValueError, match="different reads"):
        mem.search(torch.zeros(1, mem.key_dim, dtype=torch.float64 if rank else torch.float32), 2)
    with pytest.raises(
        TypeError if rank == 1 else ValueError, match="k must be an int" if rank == 1 else "rank 1"
    ):
        mem.attend(torch.zeros(1, mem.key_dim), k="2" if rank == 1 else 2)
    with pytest.raises(ValueError, match="\\{rank\\}"):
        mem.save("one-file-for-all.kmem")
    assert mem.fingerprint() == before


def _check_layer(pair: Pair, world: int) -> None:
    """KeyMemoryAttention reads a sharded memory as it reads a single one."""
    torch.manual_seed(1)
    sharded = kmem.KeyMemoryAttention(6, pair.sharded, num_heads=2, k=3)
    single = kmem.KeyMemoryAttention(6, pair.single, num_heads=2, k=3)
    # The projections only: each layer's extra state is its own memory.
    projections = {k: v for k, v in sharded.state_dict().items() if k != "_extra_state"}
    single.load_state_dict(projections, strict=False)
    x = torch.randn(2, 1 + pair.rank, 6)
    out, want = sharded(x), single(x)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    out.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(sharded.q_proj.weight.grad, single.q_proj.weight.grad, rtol=1e-4, atol=1e-5)
    # Forgetting through the layer: each rank asks for one id, wherever it lives.
    live = pair.single.ids()
    assert sharded.forget([int(live[pair.rank])]) == 1
    single.forget(live[:world])
    assert pair.sharded.fingerprint() == pair.single.fingerprint()


def _check_compiled_layer(pair: Pair) -> None:
    """torch.compile(fullgraph=True) of a layer over a sharded memory: one graph around
    the collective read; forward and gradients equal the eager single memory's, top-k
    and dense, and a forget shows without recompiling."""
    torch.manual_seed(2)
    for k in (3, None):
        sharded = kmem.KeyMemoryAttention(6, pair.sharded, num_heads=2, k=k)
        single = kmem.KeyMemoryAttention(6, pair.single, num_heads=2, k=k)
        single.load_state_dict(
            {n: v for n, v in sharded.state_dict().items() if n != "_extra_state"}, strict=False
        )
        compiled = torch.compile(sharded, fullgraph=True)  # a graph break would raise
        x = torch.randn(2, 1 + pair.rank, 6)
        out, want = compiled(x), single(x)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
        out.sum().backward()
        want.sum().backward()
        for got, exp in (
            (sharded.q_proj.weight.grad, single.q_proj.weight.grad),
            (sharded.out_proj.bias.grad, single.out_proj.bias.grad),
        ):
            torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-5)
    live = pair.single.ids()
    assert pair.sharded.delete([int(live[pair.rank])]) == 1
    pair.single.delete(live[: pair.world])
    torch.testing.assert_close(compiled(x), single(x), rtol=1e-5, atol=1e-6)


def _check_ties(rank: int, world: int) -> None:
    """Equal keys everywhere: the global top-k is the first rows added, whichever rank
    owns or added them -- not each shard's first."""
    mem = ShardedKeyMemory(2, 1)
    for call in range(3):
        ids = torch.tensor([100 * call + 10 * rank + j for j in range(2)])
        mem.add(ids, torch.ones(2, 2), torch.full((2, 1), float(rank)))
    order = [100 * call + 10 * r + j for call in range(3) for r in range(world) for j in range(2)]
    sent = mem.bytes_sent
    scores, ids = mem.search(torch.ones(1, 2), k=5)
    # To each peer: one query (2 fp32), then 5 candidates of (fp32 score, int64 id, int64 number).
    assert mem.bytes_sent - sent == (world - 1) * (2 * 4 + 5 * (4 + 8 + 8))
    assert ids[0].tolist() == order[:5]
    assert scores[0].tolist() == [2.0] * 5
    mem.delete([order[0]] if rank == world - 1 else [])
    assert mem.search(torch.ones(1, 2), k=5)[1][0].tolist() == order[1:6]


def _check_ledger(rank: int, world: int, tmp: str) -> None:
    """Each owner records the deletions of its rows, one receipt per asking rank, with
    that rank's request_id and reason; a ledger on one rank means one on every rank."""
    ledger = kmem.Ledger(os.path.join(tmp, f"ledger-{rank}.sqlite"))
    mem = ShardedKeyMemory(2, 1, ledger=ledger)
    mine = torch.arange(10) + 100 * rank
    mem.add(mine, torch.randn(10, 2), torch.randn(10, 1))
    theirs = (mine + 100) % (100 * world)  # the next rank's rows
    assert mem.delete(theirs[:3], request_id=f"req-{rank}", reason=f"asked by {rank}") == 3
    receipts = [(r.request_id, r.reason, r.ids) for r in ledger.receipts()]
    everyone = [x for got in mem._comm.gather_objects(receipts, "test") for x in got]
    for r in range(world):
        asked = {
            (f"req-{r}", f"asked by {r}", i)
            for i in ((torch.arange(3) + 100 * r + 100) % (100 * world)).tolist()
        }
        assert {(req, why, i) for req, why, ids in everyone if req == f"req-{r}" for i in ids} == asked
    assert all(owner_of(torch.tensor(ids), world).eq(rank).all() for _, _, ids in receipts)
    with pytest.raises(ValueError, match="different settings"):
        ShardedKeyMemory(2, 1, ledger=ledger if rank == 0 else None)
    ledger.close()


def _check_dtypes(rank: int, world: int) -> None:
    """Half-precision and float64 memories travel through the exchanges intact."""
    for dtype in (torch.bfloat16, torch.float64):
        gen = torch.Generator().manual_seed(0)
        pair = Pair(rank, world, key_dim=4, value_dim=2, dtype=dtype)
        pair.add(
            [
                (torch.arange(6) + 10 * r, torch.randn(6, 4, generator=gen), torch.randn(6, 2, generator=gen))
                for r in range(world)
            ]
        )
        q = torch.randn(
            2,
            4,
            generator=torch.Generator().manual_seed(rank),
            dtype=torch.float64 if dtype == torch.float64 else torch.float32,
        )
        assert torch.equal(pair.sharded.search(q, 3)[1], pair.single.search(q, 3)[1])
        for k in (3, None):
            torch.testing.assert_close(pair.sharded.attend(q, k=k), pair.single.attend(q, k=k))


def _check_empty_shards(rank: int, world: int) -> None:
    """One row in all: the other shards are empty, yet every read and its backward run."""
    pair = Pair(rank, world, key_dim=3, value_dim=2)
    rows = [_empty(3, lambda g, n: torch.randn(n, 2, generator=g))] * world
    rows[world - 1] = (torch.tensor([5]), torch.ones(1, 3), torch.ones(1, 2))
    pair.add(rows)
    q = torch.full((2, 3), float(rank))
    assert pair.sharded.search(q, 2)[1].tolist() == [[5, -1], [5, -1]]
    for k in (2, None):
        qg, qs = q.clone().requires_grad_(True), q.clone().requires_grad_(True)
        out, want = pair.sharded.attend(qg, k=k), pair.single.attend(qs, k=k)
        torch.testing.assert_close(out, want)
        out.sum().backward()
        want.sum().backward()
        torch.testing.assert_close(qg.grad, qs.grad)


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    _init(rank, world, port)
    _check_ties(rank, world)
    _check_ledger(rank, world, tmp)
    _check_dtypes(rank, world)
    _check_empty_shards(rank, world)
    pair = _check_memory(rank, world, tmp, value_dim=3, metric="ip")
    _check_errors(pair, rank, world)
    _check_layer(pair, world)
    if world == 2:  # compiling costs each rank ~20 s: once is enough
        _check_compiled_layer(pair)
    labels = _check_memory(rank, world, tmp, num_classes=4, metric="l2", compact_threshold=None)
    _check_errors(labels, rank, world)
    if world == 2:
        _check_dead_rank(rank, world)
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_memory_equals_one_memory(world, tmp_path):
    """Every operation against one KeyMemory; with 2 ranks, then a rank that dies."""
    _spawn(_worker, world, str(tmp_path))


def _check_dead_rank(rank: int, world: int) -> None:
    """Rank 1 stops answering, then exits: rank 0's calls raise ShardError, not hang,
    and leave its shard as it was. Runs last: the group is then broken."""
    group = dist.new_group(timeout=datetime.timedelta(seconds=1))
    mem = ShardedKeyMemory(2, 1, group=group)
    mem.add(torch.tensor([rank]), torch.ones(1, 2), torch.ones(1, 1))
    if rank == 1:
        time.sleep(2)  # alive but silent past the timeout, then gone
        os._exit(0)
    before = mem.shard.fingerprint()
    with pytest.raises(ShardError, match="search failed on rank 0"):
        mem.search(torch.ones(1, 2), 1)
    time.sleep(1.5)
    with pytest.raises(ShardError, match="add failed on rank 0"):
        mem.add(torch.tensor([7]), torch.ones(1, 2), torch.ones(1, 1))
    assert mem.shard.fingerprint() == before and len(mem) == 2
    os._exit(0)  # skip tearing down broken process groups, which may abort


def test_owner_of_is_stable_and_even():
    """Saved shards rely on the hash never changing: pinned values, and an even spread."""
    assert owner_of(torch.tensor([0, 1, 2, 2**62]), 3).tolist() == [0, 2, 2, 0]
    assert owner_of(torch.tensor([0, 1, 2, 3, 4, 5, 6, 7]), 4).tolist() == [3, 0, 3, 2, 1, 1, 0, 3]
    counts = torch.bincount(owner_of(torch.arange(40_000), 4), minlength=4)
    assert bool((counts - 10_000).abs().max() < 300)  # ~3 standard deviations


def test_needs_a_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        ShardedKeyMemory(4, 2)
