"""SlotIndex: which slot of a tombstoned buffer holds each live id -- a direct table, or
sorted tensors for ids too spread for one."""

from __future__ import annotations

import operator
from collections import Counter

import torch


class SlotIndex:
    """``id -> slot`` for a buffer whose int64 ``slot_ids[s]`` is the id in slot ``s``
    (``-1``: free or deleted) -- :class:`~kmem.KeyMemory`'s and
    :class:`~kmem.models.ExemplarTokens`' rows.

    Ids that are dense non-negative integers (sample ids ``0 .. N``, the usual case) are
    kept in a direct table, ``table[id] = slot``, so looking up n ids is one gather; any
    other id set (hashes, say) in two aligned int64 tensors, ids sorted, looked
    up with one ``searchsorted``. Either replaces n probes of a dict of boxed ints -- a
    cache miss each on a freshly loaded model, which made the lookups most of a forget
    request's time. An entry counts only while its slot still holds its id, so deleting
    a row is its owner's tombstone alone; the stale entry goes at the next
    :meth:`insert` or :meth:`rebuild`. Every method takes the owner's current
    ``slot_ids`` (the owner reallocates it as it grows) and follows it to its device (a
    module's ``.to()`` moves the owner's buffers only).
    """

    def __init__(self, slot_ids: torch.Tensor) -> None:
        self.rebuild(slot_ids)

    @property
    def dense(self) -> bool:
        """Whether the ids are kept in the direct table (else in the sorted arrays)."""
        return self._table is not None

    def rebuild(self, slot_ids: torch.Tensor) -> None:
        """Index the live slots of ``slot_ids`` (after a compaction or a load)."""
        slots = torch.nonzero(slot_ids >= 0).reshape(-1)
        ids = slot_ids[slots]
        self._table = None
        self._ids = self._slots = ids[:0]
        if _dense(ids, len(ids)):
            self._table = torch.full(
                (int(ids.max()) + 1 if len(ids) else 0,), -1, dtype=torch.int64, device=ids.device
            )
            self._table[ids] = slots
        else:
            self._ids, order = ids.sort()
            self._slots = slots[order]

    def insert(self, ids: torch.Tensor, slots: torch.Tensor, slot_ids: torch.Tensor) -> None:
        """Index new rows: ``ids`` (int64 ``[n]``, distinct, not live) now held at
        ``slots`` -- ``slot_ids[slots] == ids`` already. O(n) while the ids stay dense,
        else O(N log N): adds come in bulk."""
        self._follow(slot_ids)
        table = self._table
        if table is None or not len(ids) or not _dense(ids, len(slot_ids), floor=len(table)):
            self.rebuild(slot_ids)  # also drops deleted ids, which may return here
            return
        top = int(ids.max()) + 1
        if top > len(table):
            self._table = table = torch.cat((table, table.new_full((top - len(table),), -1)))
        table[ids] = slots

    def find(self, ids: torch.Tensor, slot_ids: torch.Tensor) -> torch.Tensor:
        """Slot of each of ``ids`` (int64, any shape, on the index's device); ``-1`` for an
        id not live (negative ids included)."""
        self._follow(slot_ids)
        ids = ids.contiguous()
        table = self._table
        if not len(self._ids if table is None else table):
            return torch.full_like(ids, -1)
        if table is not None:
            slots = table[ids.clamp(0, len(table) - 1)]
            known = (ids >= 0) & (ids < len(table)) & (slots >= 0)
        else:
            at = torch.searchsorted(self._ids, ids).clamp_(max=len(self._ids) - 1)
            slots = self._slots[at]
            known = self._ids[at] == ids
        return torch.where(known & (slot_ids[slots.clamp(min=0)] == ids), slots, -1)

    def holds(self, id_: object, slot_ids: torch.Tensor) -> bool:
        """Whether ``id_`` is a live id. Only integers are ids: ``int()`` would make 2.9,
        ``'2'`` and ``tensor(2.5)`` mean 2."""
        if isinstance(id_, bool):
            return False
        try:
            id_ = operator.index(id_)
        except TypeError:
            return False
        if not -(2**63) <= id_ < 2**63:
            return False
        query = torch.tensor([id_], dtype=torch.int64, device=slot_ids.device)
        return bool(self.find(query, slot_ids)[0] >= 0)

    def take(
        self, ids: torch.Tensor, slot_ids: torch.Tensor, where: str, *, distinct: bool, verb: str = "changed"
    ) -> torch.Tensor:
        """Slots of ``ids`` (int64 ``[n]``), every one of which must be live --
        ``KeyError`` naming them otherwise, saying they are not ``where`` and nothing
        was ``verb`` -- and, with ``distinct``, none repeated (``ValueError``)."""
        slots = self.find(ids, slot_ids)
        missing = slots < 0
        if bool(missing.any()):
            twice = repeats(ids.tolist()) if distinct else []  # a repeat is named first, found or not
            if twice:
                raise ValueError(f"ids repeats {twice[:5]}; nothing was {verb}")
            unknown = ids[missing].tolist()
            raise KeyError(f"{len(unknown)} id(s) not {where}, e.g. {unknown[:5]}; nothing was {verb}")
        if distinct and len(slots) > 1:
            # Found ids repeat exactly where their slots do: a count per slot, O(n + N)
            # passes, is cheaper than sorting the n slots.
            counts = torch.zeros(len(slot_ids), dtype=torch.int32, device=slots.device)
            if bool(counts.index_add_(0, slots, torch.ones_like(slots, dtype=torch.int32)).gt(1).any()):
                raise ValueError(f"ids repeats {repeats(ids.tolist())[:5]}; nothing was {verb}")
        return slots

    def _follow(self, slot_ids: torch.Tensor) -> None:
        if self._ids.device != slot_ids.device:
            self._ids, self._slots = self._ids.to(slot_ids.device), self._slots.to(slot_ids.device)
            if self._table is not None:
                self._table = self._table.to(slot_ids.device)


def _dense(ids: torch.Tensor, rows: int, floor: int = 0) -> bool:
    """Whether a direct table over ``ids`` (int64, ``>= 0``: ``-1`` marks a free slot)
    costs no more than the sorted arrays of ``rows`` entries would (16 bytes each), with
    1,024 entries of slack -- a table already ``floor`` long stays."""
    return not len(ids) or int(ids.max()) < max(2 * rows + 1024, floor)


def repeats(values: list[int]) -> list[int]:
    """The values occurring more than once, sorted."""
    return sorted(v for v, count in Counter(values).items() if count > 1)
