"""SlotIndex against a dict: the id -> slot map KeyMemory and ExemplarTokens delete through."""

import pytest
import torch

from kmem.slot_index import SlotIndex


class Rows:
    """A tombstoned buffer as its owners keep it: slot_ids plus the index, and a dict twin."""

    def __init__(self, capacity: int) -> None:
        self.slot_ids = torch.full((capacity,), -1, dtype=torch.int64)
        self.used = 0
        self.index = SlotIndex(self.slot_ids)
        self.twin: dict[int, int] = {}

    def add(self, ids: list[int]) -> None:
        t = torch.tensor(ids, dtype=torch.int64)
        slots = torch.arange(self.used, self.used + len(ids))
        self.slot_ids[slots] = t
        self.index.insert(t, slots, self.slot_ids)
        self.twin.update(zip(ids, slots.tolist(), strict=True))
        self.used += len(ids)

    def delete(self, ids: list[int]) -> None:
        slots = self.index.take(torch.tensor(ids, dtype=torch.int64), self.slot_ids, "held", distinct=True)
        assert slots.tolist() == [self.twin.pop(i) for i in ids]
        self.slot_ids[slots] = -1

    def compact(self) -> None:
        live = self.slot_ids[: self.used][self.slot_ids[: self.used] >= 0]
        self.slot_ids.fill_(-1)
        self.slot_ids[: len(live)] = live
        self.used = len(live)
        self.index.rebuild(self.slot_ids)
        self.twin = {i: s for s, i in enumerate(live.tolist())}

    def check(self, universe: int, spread=lambda i: i) -> None:
        queries = spread(torch.arange(-2, universe))
        want = [self.twin.get(i, -1) for i in queries.tolist()]
        assert self.index.find(queries, self.slot_ids).tolist() == want
        # any shape, as ExemplarTokens.rows asks
        assert (
            self.index.find(queries[: 2 * (len(queries) // 2)].reshape(2, -1), self.slot_ids)
            .reshape(-1)
            .tolist()
            == want[: 2 * (len(queries) // 2)]
        )


SPREADS = {
    "dense": lambda i: i,  # sample ids 0..N: the direct table
    "sparse": lambda i: i * 7_919_000_003 + 10**12,  # hashes, say: the sorted arrays
}


@pytest.mark.parametrize("spread", SPREADS.values(), ids=SPREADS.keys())
def test_index_follows_adds_deletes_returns_and_compaction_like_a_dict(spread):
    gen = torch.Generator().manual_seed(0)
    rows = Rows(4096)
    universe = 300
    for round_ in range(12):
        absent = [i for i in spread(torch.randperm(universe, generator=gen)).tolist() if i not in rows.twin]
        rows.add(absent[: int(torch.randint(1, 40, (), generator=gen))])  # deleted ids come back too
        live = list(rows.twin)
        picks = torch.randperm(len(live), generator=gen)[: len(live) // 3].tolist()
        rows.delete([live[p] for p in picks])
        rows.check(universe, spread)
        if round_ % 4 == 3:
            rows.compact()
            rows.check(universe, spread)
    assert rows.index.dense is (spread is SPREADS["dense"])


def test_index_moves_between_table_and_sorted_arrays_as_the_ids_spread():
    rows = Rows(64)
    rows.add(list(range(10)))
    assert rows.index.dense
    rows.add([10**15, 12])  # one far id: a table that long would not pay
    assert not rows.index.dense
    rows.check(20)
    assert rows.index.find(torch.tensor([10**15]), rows.slot_ids).tolist() == [10]
    rows.delete([10**15])
    rows.compact()
    assert rows.index.dense
    rows.check(20)
    rows.add([1000])  # within 2 x capacity + 1,024 of the table: it grows
    assert rows.index.dense
    rows.check(1001)


def test_take_refuses_unknown_and_repeated_ids_and_changes_nothing():
    rows = Rows(8)
    rows.add([10, 20, 30])
    ids = torch.tensor
    with pytest.raises(ValueError, match=r"repeats \[20\]; nothing was changed"):
        rows.index.take(ids([10, 20, 20]), rows.slot_ids, "held", distinct=True)
    with pytest.raises(KeyError, match=r"2 id\(s\) not held, e.g. \[40, -1\]; nothing was deleted"):
        rows.index.take(ids([10, 40, -1]), rows.slot_ids, "held", distinct=True, verb="deleted")
    with pytest.raises(ValueError, match=r"repeats \[40\]"):  # a repeat is named before an unknown id
        rows.index.take(ids([40, 40]), rows.slot_ids, "held", distinct=True)
    assert rows.index.take(ids([20, 20]), rows.slot_ids, "held", distinct=False).tolist() == [1, 1]
    rows.check(40)
    rows.delete([30, 10])
    rows.check(40)
    with pytest.raises(KeyError, match=r"\[30\]"):
        rows.index.take(ids([30]), rows.slot_ids, "held", distinct=True)


@pytest.mark.parametrize(
    "id_, held",
    [(20, True), (torch.tensor(20), True), (21, False), (-1, False), (2**70, False),
     (20.0, False), ("20", False), (True, False), (torch.tensor(20.0), False)],
)  # fmt: skip
def test_holds_takes_only_integers(id_, held):
    rows = Rows(4)
    rows.add([20, 1])
    assert rows.index.holds(id_, rows.slot_ids) is held


def test_an_empty_index_finds_nothing():
    rows = Rows(4)
    assert rows.index.find(torch.tensor([0, 5, -1]), rows.slot_ids).tolist() == [-1, -1, -1]
    assert not rows.index.holds(0, rows.slot_ids)
