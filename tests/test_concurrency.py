"""Readers (search, attend, save) on several threads while one thread adds, deletes
and compacts: every read must equal the brute-force answer on the memory as it was
at one version between the read's start and its end -- never a half-scrubbed row,
never an id whose delete had returned before the read began."""

from __future__ import annotations

import random
import threading
import time

import torch

import kmem

KEY_DIM, K, MUTATIONS, READS_PER_THREAD, READERS = 8, 5, 2000, 1000, 3


def _rows(ids):
    """Small-integer keys (exact scores in float32, many ties) and values ``[id, -id]``."""
    ids = torch.as_tensor(ids, dtype=torch.int64)
    keys = ((ids[:, None] * 7 + torch.arange(KEY_DIM) * 3) % 11 - 5).float()
    return keys, torch.stack([ids.float(), -ids.float()], 1)


def _brute(queries, live, k):
    """Top-``k`` ids and scores over ``live`` ids; ties go to the row added earlier,
    which is the smaller id (ids are never reused)."""
    ids = torch.tensor(sorted(live), dtype=torch.int64)
    scores = queries.double() @ _rows(ids)[0].double().T
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    got_ids = torch.full((len(queries), k), -1)
    got_ids[:, : order.shape[1]] = ids[order]
    got_scores = torch.full((len(queries), k), float("-inf"), dtype=torch.float64)
    got_scores[:, : order.shape[1]] = scores.gather(1, order)
    return got_ids, got_scores


def _matches(record, states) -> bool:
    kind, v0, v1, queries, result = record
    for v in range(v0, v1 + 1):
        want_ids, want_scores = _brute(queries, states[v], K)
        if kind == "search":
            scores, ids = result
            if torch.equal(ids, want_ids) and torch.equal(scores.double(), want_scores):
                return True
        else:
            values = _rows(want_ids.clamp(min=0).flatten())[1].reshape(*want_ids.shape, 2).double()
            weights = torch.softmax(want_scores * KEY_DIM**-0.5, 1).nan_to_num(0.0)
            if torch.allclose(result.double(), torch.einsum("bk,bkv->bv", weights, values), atol=1e-4):
                return True
    return False


def test_reads_see_each_mutation_wholly_or_not_at_all(tmp_path):
    ledger = kmem.Ledger(tmp_path / "ledger.db", durable=False)
    mem = kmem.KeyMemory(KEY_DIM, 2, compact_threshold=0.25, capacity=64, ledger=ledger)
    live = set(range(200))
    mem.add(torch.arange(200), *_rows(range(200)))
    states = {mem.version: frozenset(live)}  # version -> live ids, recorded by the writer
    records, errors, deletes, done = [], [], 0, 0
    finished = threading.Event()

    def writer():
        nonlocal deletes, done
        rng, next_id = random.Random(1), 200
        for _ in range(MUTATIONS):
            before, op = mem.version, rng.random()
            if op < 0.45 or len(live) < 20:
                new = list(range(next_id, next_id + rng.randint(1, 3)))
                mem.add(torch.tensor(new), *_rows(new))
                live.update(new)
                next_id += len(new)
            elif op < 0.95:
                gone = rng.sample(sorted(live), rng.randint(1, 3))
                mem.delete(gone, request_id=f"r{deletes}")
                live.difference_update(gone)
                deletes += 1
            else:
                mem.compact()
            for v in range(before + 1, mem.version + 1):  # a delete may also compact: two versions
                states[v] = frozenset(live)
            done += 1

    def reader(seed):
        rng = random.Random(seed)
        gen = torch.Generator().manual_seed(seed)
        for i in range(READS_PER_THREAD):
            # Paced to the writer, so the reads spread over its whole run however fast
            # either side is (the interleaving is what this test is about).
            while done < i * MUTATIONS // READS_PER_THREAD and not finished.is_set():
                time.sleep(0)
            queries = torch.randint(-3, 4, (2, KEY_DIM), generator=gen).float()
            v0 = mem.version
            if i % 100 == 99 and seed == 0:
                path = tmp_path / f"snap{i}"
                mem.save(path)
                records.append(("save", v0, mem.version, None, path))
                continue
            kind = rng.choice(["search", "attend"])
            result = mem.search(queries, K) if kind == "search" else mem.attend(queries, k=K)
            records.append((kind, v0, mem.version, queries, result))

    def guarded(fn, *args):
        try:
            fn(*args)
        except BaseException as err:  # surfaced below: a thread's exception is otherwise lost
            errors.append(err)
        finally:
            if fn is writer:
                finished.set()  # readers never wait on a writer that died

    threads = [threading.Thread(target=guarded, args=(writer,))]
    threads += [threading.Thread(target=guarded, args=(reader, s)) for s in range(READERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors

    overlapping = 0
    for record in records:
        kind, v0, v1, _, result = record
        overlapping += v1 > v0
        if kind == "save":
            loaded = kmem.KeyMemory.load(result)
            assert v0 <= loaded.version <= v1 and set(loaded.ids().tolist()) == states[loaded.version]
        else:
            assert _matches(record, states), f"{kind} between versions {v0} and {v1} saw a torn memory"
    assert len(records) == READERS * READS_PER_THREAD
    assert overlapping > 50, overlapping  # the threads really did interleave
    result = ledger.verify()
    assert result.ok and result.receipts == deletes
    ledger.close()
