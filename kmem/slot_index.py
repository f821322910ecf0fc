"""SlotIndex: which slot of a tombstoned buffer holds each live id, as sorted tensors."""

from __future__ import annotations

import operator
from collections import Counter

import torch


class SlotIndex:
    """``id -> slot`` for a buffer whose int64 ``slot_ids[s]`` is the id in slot ``s``
    (``-1``: free or deleted) -- :class:`~kmem.KeyMemory`'s and
    :class:`~kmem.models.ExemplarTokens`' rows.

    Two aligned int64 tensors, ids sorted: looking up n ids is one ``searchsorted``,
    where a dict costs n probes of boxed ints -- a cache miss each on a freshly loaded
    model, which made the id lookups most of a forget request's time. An entry counts
    only while its slot still holds its id, so deleting a row is its owner's tombstone
    alone; the stale entry goes at the next :meth:`insert` or :meth:`rebuild`. Every
    method takes the owner's current ``slot_ids`` (the owner reallocates it as it grows)
    and follows it to its device (a module's ``.to()`` moves the owner's buffers only).
    """

    def __init__(self, slot_ids: torch.Tensor) -> None:
        self.rebuild(slot_ids)

    def rebuild(self, slot_ids: torch.Tensor) -> None:
        """Index the live slots of ``slot_ids`` (after a compaction or a load)."""
        slots = torch.nonzero(slot_ids >= 0).reshape(-1)
        self._set(slot_ids[slots], slots)

    def insert(self, ids: torch.Tensor, slots: torch.Tensor, slot_ids: torch.Tensor) -> None:
        """Index new rows: ``ids`` (int64 ``[n]``, distinct, not live) now held at
        ``slots`` -- ``slot_ids[slots] == ids`` already. O(N log N): adds come in bulk."""
        self._follow(slot_ids)
        fresh = slot_ids[self._slots] == self._ids  # drops deleted ids, which may return here
        self._set(torch.cat((self._ids[fresh], ids)), torch.cat((self._slots[fresh], slots)))

    def find(self, ids: torch.Tensor, slot_ids: torch.Tensor) -> torch.Tensor:
        """Slot of each of ``ids`` (int64, any shape, on the index's device); ``-1`` for an
        id not live (negative ids included)."""
        self._follow(slot_ids)
        if not len(self._ids):
            return torch.full_like(ids, -1)
        ids = ids.contiguous()
        at = torch.searchsorted(self._ids, ids).clamp_(max=len(self._ids) - 1)
        slots = self._slots[at]
        return torch.where((self._ids[at] == ids) & (slot_ids[slots] == ids), slots, -1)

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
            unknown = ids[missing].tolist()
            raise KeyError(f"{len(unknown)} id(s) not {where}, e.g. {unknown[:5]}; nothing was {verb}")
        if distinct and len(slots) > 1:
            ordered = slots.sort().values
            if bool((ordered[1:] == ordered[:-1]).any()):
                raise ValueError(f"ids repeats {repeats(ids.tolist())[:5]}; nothing was {verb}")
        return slots

    def _follow(self, slot_ids: torch.Tensor) -> None:
        if self._ids.device != slot_ids.device:
            self._ids, self._slots = self._ids.to(slot_ids.device), self._slots.to(slot_ids.device)

    def _set(self, ids: torch.Tensor, slots: torch.Tensor) -> None:
        self._ids, order = ids.sort()
        self._slots = slots[order]


def repeats(values: list[int]) -> list[int]:
    """The values occurring more than once, sorted."""
    return sorted(v for v, count in Counter(values).items() if count > 1)
