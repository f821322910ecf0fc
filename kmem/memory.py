"""KeyMemory: a key/value buffer whose rows can be deleted in O(1) and for good."""

from __future__ import annotations

import hashlib
import json
import math
import threading
import uuid
from pathlib import Path

import torch

from . import _checks, compiled_reads, ops, snapshot
from .ledger import Ledger
from .rows import DTYPES, SNAPSHOT_KEYS, IdsLike, cast, id_tensor
from .slot_index import SlotIndex, repeats


class MemoryEditedError(RuntimeError):
    """A backward ran after the memory its forward read was changed."""


class KeyMemory:
    """Rows of ``(id, key, value)``, searchable by key, deletable by id.

    Storage is one preallocated buffer per field: ``keys [capacity, key_dim]``,
    ``values [capacity, value_dim]`` (vector values) or int64 ``[capacity]`` (class
    labels), and ``slot_ids [capacity]`` int64 holding each slot's id, ``-1`` for a free
    or deleted slot -- the tombstone mask every op skips. Rows fill slots in insertion
    order; an ``id -> slot`` index (:class:`~kmem.slot_index.SlotIndex`, tensors looked
    up in one vectorised pass) finds them, and ``delete`` marks the slots dead and zeroes their key and value bytes
    at once. :meth:`compact` later moves the live rows
    to the front, keeping their order, so the memory is then identical to one that only
    ever received the surviving rows.

    Threads: every method may be called from any thread. Mutations (``add``,
    ``delete``, ``compact``) and reads (``search``, ``attend``, ``state``,
    ``fingerprint``, ``save``) hold one re-entrant lock, so each read sees the memory
    wholly before or wholly after each mutation: never a half-scrubbed row, never an id
    whose ``delete`` has returned. Reads also wait for each other (each kernel already
    uses every core). On CUDA the lock orders the kernel launches, which one stream (the
    default) then runs in that order. Views returned by :meth:`buffers` are outside the
    lock: a later delete scrubs them in place. So is the backward of an ``attend``
    result, which reads the buffers after the call: finish it before changing the
    memory -- otherwise it raises :class:`MemoryEditedError`, on every backend.

    Copies: ``copy.deepcopy``, ``pickle`` (and so ``torch.optim.swa_utils.AveragedModel``
    of a model holding one) copy every slot, tombstones included; the copy is a memory
    of its own, which forgets only what is deleted from it. :meth:`state_dict` /
    :meth:`load_state_dict` carry the same state as tensors. A memory with a ledger
    refuses to be copied: the copy's deletions would have no record.

    ``torch.compile``: under compilation :meth:`search` and :meth:`attend` are single
    custom ops (:mod:`kmem.compiled_reads`), so ``fullgraph=True`` compiles and the
    compiled graph reads the memory live.

    Ledger: with a :class:`~kmem.ledger.Ledger` attached, every :meth:`delete` commits
    a receipt together with the deletion -- both or neither.

    Args:
        key_dim: length of each key.
        value_dim: length of each value vector (vector memory). Give this or ``num_classes``.
        num_classes: number of classes (label memory: values are int64 labels).
        metric: ``"ip"`` (score ``q . k``, default) or ``"l2"`` (score ``-||q - k||^2``).
        dtype: floating dtype of keys and vector values (float32 by default).
        device: where the buffers live.
        capacity: initial number of slots; grows geometrically on demand.
        compact_threshold: compact automatically once this fraction of used slots is
            dead (``None`` = only when :meth:`compact` is called).
        backend: kernel backend for search and attend (see :mod:`kmem.ops`).
        ledger: where :meth:`delete` records receipts (``None``: no record); also
            settable later as the ``ledger`` attribute.
    """

    def __init__(
        self,
        key_dim: int,
        value_dim: int | None = None,
        *,
        num_classes: int | None = None,
        metric: str = "ip",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        capacity: int = 1024,
        compact_threshold: float | None = 0.25,
        backend: str = "auto",
        ledger: Ledger | None = None,
    ) -> None:
        if (value_dim is None) == (num_classes is None):
            raise ValueError("give exactly one of value_dim (vector values) or num_classes (label values)")
        for name, v in (("key_dim", key_dim), ("value_dim", value_dim), ("num_classes", num_classes)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        if compact_threshold is not None and not (
            isinstance(compact_threshold, int | float)
            and not isinstance(compact_threshold, bool)
            and 0.0 < compact_threshold <= 1.0
        ):
            raise ValueError(
                f"compact_threshold must be a number in (0, 1] or None, got {compact_threshold!r}"
            )
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a positive int, got {capacity!r}")
        if ledger is not None and not isinstance(ledger, Ledger):
            raise TypeError(f"ledger must be a kmem.Ledger or None, got {type(ledger).__name__}")
        self.key_dim = key_dim
        self.value_dim = value_dim
        self.num_classes = num_classes
        self.metric = _checks.metric(metric)
        self.dtype = dtype
        # Resolved through an allocation so "cuda" becomes "cuda:0" (the current device):
        # tensors report an indexed device, and the device checks compare equal.
        self.device = torch.empty(0, device=device).device
        self._on_cpu = self.device.type == "cpu"
        self.compact_threshold = compact_threshold
        self.backend = backend
        self.ledger = ledger
        self.version = 0  # bumped by every mutation
        # Bumped by every change of the buffers (version may be set back by a load): a
        # pending backward compares it with the count its forward saw.
        self.edits = 0
        self._lock = threading.RLock()  # re-entrant: delete compacts, load adds
        self._handle = compiled_reads.register(self)
        self._used = 0  # slots [0, _used) have held a row since the last compaction
        self._rows = 0  # live rows
        self._set_buffers(self._allocate(capacity))
        self._index = SlotIndex(self._slot_ids)

    # ------------------------------------------------------------------ state
    @property
    def is_labels(self) -> bool:
        """True for a label memory (int64 class values)."""
        return self.num_classes is not None

    @property
    def out_dim(self) -> int:
        """Width of :meth:`attend`'s result: ``value_dim`` or ``num_classes``."""
        return self.num_classes if self.is_labels else self.value_dim

    @property
    def capacity(self) -> int:
        return self._slot_ids.shape[0]

    @property
    def num_dead(self) -> int:
        """Deleted rows whose slots :meth:`compact` has not reclaimed yet."""
        with self._lock:
            return self._used - self._rows

    def __len__(self) -> int:
        return self._rows

    def __contains__(self, id_: object) -> bool:
        with self._lock:
            return self._index.holds(id_, self._slot_ids)

    def has(self, ids: IdsLike) -> torch.Tensor:
        """``id in memory`` for many ids at once: bool ``[n]``, on the memory's device."""
        ids = id_tensor("ids", ids).to(self.device)
        with self._lock:
            return self._index.find(ids, self._slot_ids) >= 0

    def __getstate__(self) -> dict:
        if self.ledger is not None:
            raise TypeError(
                "a KeyMemory with a ledger cannot be copied or pickled: the copy's deletions would "
                "have no receipts. Detach it first (mem.ledger = None) and attach a ledger to the copy."
            )
        with self._lock:
            state = dict(self.__dict__)
        del state["_lock"], state["_handle"]  # a copy is a memory of its own to compiled graphs
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()
        self._handle = compiled_reads.register(self)

    def __repr__(self) -> str:
        kind = f"num_classes={self.num_classes}" if self.is_labels else f"value_dim={self.value_dim}"
        return (
            f"KeyMemory(key_dim={self.key_dim}, {kind}, metric={self.metric!r}, dtype={self.dtype}, "
            f"device={self.device}, rows={len(self)}, dead={self.num_dead}, capacity={self.capacity})"
        )

    def buffers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views ``(keys, values, slot_ids)`` of the used slots, dead ones included
        (zeroed, ``slot_ids == -1``). These are what the ops read; do not write to them.
        They are consistent when returned; a later ``delete`` scrubs them in place."""
        with self._lock:
            # Cached per used count: slicing three tensors is a good part of a tiny read.
            if self._views[0] != self._used:
                n = self._used
                self._views = (n, (self._keys[:n], self._values[:n], self._slot_ids[:n]))
            return self._views[1]

    def state(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Copies ``(ids [n], keys [n, key_dim], values)`` of the live rows, in slot order."""
        with self._lock:
            keys, values, slot_ids = self.buffers()
            live = slot_ids >= 0
            return slot_ids[live].clone(), keys[live].clone(), values[live].clone()

    def fingerprint(self) -> str:
        """SHA-256 of the settings and the live rows (ids, key and value bytes, in order).

        Equal fingerprints mean equal memories: after deleting rows, a memory and one
        that never received them fingerprint the same, compacted or not.
        """
        layout = {k: v for k, v in self._config().items() if k != "compact_threshold"}  # policy, not content
        digest = hashlib.sha256(json.dumps(layout, sort_keys=True).encode())
        for t in self.state():
            digest.update(str((t.dtype, tuple(t.shape))).encode())
            digest.update(t.cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def ids(self) -> torch.Tensor:
        """Live ids in slot order: int64 ``[len(self)]``."""
        return self.state()[0]

    # -------------------------------------------------------------- mutation
    def add(self, ids: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append rows.

        Args:
            ids: int64 ``[n]``, non-negative, new (not live in the memory) and distinct.
            keys: floating ``[n, key_dim]`` on the memory's device, finite; cast to ``dtype``.
            values: floating ``[n, value_dim]`` (vector memory) or int64 ``[n]`` labels in
                ``[0, num_classes)`` (label memory), on the memory's device.

        Raises ``TypeError``/``ValueError`` naming the argument; nothing is added then.
        """
        n = len(self._check_new_ids(ids))
        self._check_keys("keys", keys, n)
        self._check_values(values, n)
        keys = cast("keys", keys, self.dtype)
        values = values.detach() if self.is_labels else cast("values", values, self.dtype)
        ids = ids.to(self.device)
        with self._lock:
            live = ids[self._index.find(ids, self._slot_ids) >= 0].tolist()
            if live:
                raise ValueError(f"{len(live)} id(s) already in the memory, e.g. {live[:5]}")
            if not n:
                return
            self._reserve(self._used + n)
            rows = slice(self._used, self._used + n)
            self._keys[rows] = keys
            self._values[rows] = values
            self._slot_ids[rows] = ids
            slots = torch.arange(self._used, self._used + n, device=self.device)
            self._index.insert(ids, slots, self._slot_ids)
            self._used += n
            self._rows += n
            self.version += 1
            self.edits += 1

    def delete(self, ids: IdsLike, *, request_id: str | None = None, reason: str | None = None) -> int:
        """Delete rows by id; returns how many. A few vectorised passes over the n ids: O(n)
        for sample-like ids (dense, non-negative), O(n log N) for any others.

        The slots are marked dead and their key and value bytes overwritten with zeros
        before this returns. Unknown or repeated ids raise (``KeyError`` /
        ``ValueError``) and then no row is deleted.

        With a :attr:`ledger` attached, a receipt naming ``request_id`` (default: a new
        UUID) and the free-text ``reason`` is committed with the deletion: if the
        receipt cannot be written, the rows are restored and the error propagates.
        Without a ledger, ``request_id`` and ``reason`` raise ``ValueError``: nothing
        would record them.
        """
        ids = id_tensor("ids", ids).to(self.device)
        with self._lock:
            ledger = self.ledger
            if ledger is None and (request_id is not None or reason is not None):
                raise ValueError(
                    "request_id and reason are kept by a ledger and this memory has none: "
                    "attach one with KeyMemory(..., ledger=kmem.Ledger(path)) or mem.ledger = ..."
                )
            if not len(ids):
                return 0
            slots = self._index.take(ids, self._slot_ids, "in the memory", distinct=True, verb="deleted")
            if ledger is None:
                self._scrub(slots)
            else:
                self._scrub_recorded(ledger, ids, slots, request_id or uuid.uuid4().hex, reason)
            if self.compact_threshold is not None and self.num_dead > self.compact_threshold * self._used:
                self.compact()
        return len(ids)

    def _scrub(self, slots: torch.Tensor) -> None:
        """Tombstone the rows at ``slots`` (int64, live, distinct) -- which takes their ids
        out of the index -- and zero their key and value bytes."""
        ops.zero_rows(self._keys, slots)
        ops.zero_rows(self._values, slots)
        self._slot_ids.index_fill_(0, slots, -1)
        self._rows -= len(slots)
        self.version += 1
        self.edits += 1

    def _scrub_recorded(
        self, ledger: Ledger, ids: torch.Tensor, slots: torch.Tensor, request_id: str, reason: str | None
    ) -> None:
        """:meth:`_scrub` inside the ledger transaction of its receipt; any failure
        (of the scrub, the receipt or the commit) restores the rows and their ids."""
        # The rows' only copy outside the buffers, to undo with; zeroed below either way.
        saved = (self._keys.index_select(0, slots), self._values.index_select(0, slots))
        version, rows = self.version, self._rows
        try:
            with ledger.record(
                request_id=request_id,
                reason=reason,
                ids=ids.tolist(),
                version_before=version,
                version_after=version + 1,
                rows_before=rows,
                rows_after=rows - len(ids),
            ):
                self._scrub(slots)
        except BaseException:
            self._keys.index_copy_(0, slots, saved[0])
            self._values.index_copy_(0, slots, saved[1])
            self._slot_ids.index_copy_(0, slots, ids)  # which puts the ids back in the index
            self.version, self._rows = version, rows
            raise
        finally:
            for t in saved:
                t.zero_()

    def compact(self) -> int:
        """Move live rows to the front in order, reclaiming dead slots; returns how many.

        Afterwards ids, keys and values equal, bit for bit, those of a memory that only
        ever received the surviving rows in the same order. O(used slots).
        """
        with self._lock:
            reclaimed = self.num_dead
            if not reclaimed:
                return 0
            keep = self._slot_ids[: self._used] >= 0
            new = self._allocate(self.capacity)
            # A byte copy (every backend gives the same bits), one scan of keep for all three.
            old = (self._keys, self._values, self._slot_ids)
            ops.compact_rows(tuple(src[: self._used] for src in old), keep, new)
            self._set_buffers(new)
            self._used = self._rows
            self._index.rebuild(self._slot_ids)
            self.version += 1
            self.edits += 1
            return reclaimed

    # ----------------------------------------------------------------- reads
    def search(
        self, queries: torch.Tensor, k: int, exclude_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` live rows per query.

        Args:
            queries: floating ``[B, key_dim]`` on the memory's device.
            k: rows per query, ``>= 1``.
            exclude_ids: int64 ``[B, E]`` ids a query must not retrieve (``-1`` = none).

        Returns:
            ``(scores [B, k] float32, ids [B, k] int64)`` best first (ties: the row added earlier);
            ``-inf`` and ``-1`` where fewer than ``k`` rows qualify.
        """
        if torch.compiler.is_compiling():
            return compiled_reads.memory_search(queries, exclude_ids, self._handle, k)
        self._check_queries(queries)
        k, exclude_ids = _checks.k(k), self._check_exclusions(exclude_ids, queries)
        with self._lock:
            keys, _, slot_ids = self.buffers()
            scores, slots = ops.run_search(
                ops.SearchInputs(queries, keys, slot_ids, exclude_ids, k, self.metric), self.backend
            )
            ids = self._ids_of(slots)
        return scores, ids

    def _ids_of(self, slots: torch.Tensor) -> torch.Tensor:
        """The ids in ``slots`` (any shape), -1 for slot -1: ``take`` reads index -1 as
        the entry past the last slot, which is always -1 -- one op instead of three on a
        small read's path."""
        return self._slot_id_lookup.take(slots)

    def get(self, ids: IdsLike) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies ``(keys [n, key_dim], values)`` of the live rows ``ids``, in that order.

        ``KeyError`` for an id not in the memory.
        """
        ids = id_tensor("ids", ids).to(self.device)
        with self._lock:
            slots = self._index.take(ids, self._slot_ids, "in the memory", distinct=False, verb="read")
            return self._keys.index_select(0, slots), self._values.index_select(0, slots)

    def attend(
        self,
        queries: torch.Tensor,
        k: int | None = 32,
        scale: float | None = None,
        exclude_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Softmax attention of each query over its top-``k`` live rows.

        ``softmax(scale * score)`` over the retrieved rows weights their values:
        ``[B, value_dim]`` for a vector memory, class probabilities ``[B, num_classes]``
        for a label memory. ``k=None`` attends over every live row; ``scale`` defaults to
        ``1/sqrt(key_dim)``. A query with no live row gets zeros. Differentiable in
        ``queries``; its backward raises :class:`MemoryEditedError` if the memory changed
        (add, delete, compact, load) after this call.
        """
        if torch.compiler.is_compiling():
            return compiled_reads.memory_attend(queries, exclude_ids, self._handle, k, scale)[0]
        out, edits = self.read(queries, k, scale, exclude_ids)
        return _EditGuard.apply(out, self, edits) if out.requires_grad else out

    def read(
        self,
        queries: torch.Tensor,
        k: int | None = 32,
        scale: float | None = None,
        exclude_ids: torch.Tensor | None = None,
        backend: str | None = None,
    ) -> tuple[torch.Tensor, int]:
        """:meth:`attend`'s result without the check on its backward, and the :attr:`edits`
        count of the memory it read (taken under the same lock); ``backend`` overrides
        the memory's."""
        self._check_queries(queries)
        k = None if k is None else _checks.k(k)
        exclude_ids = self._check_exclusions(exclude_ids, queries)
        with self._lock:
            keys, values, slot_ids = self.buffers()
            inputs = ops.attention_inputs(
                queries,
                keys,
                values,
                slot_ids,
                k,
                scale,
                self.metric,
                exclude_ids,
                self.num_classes,
                checked=False,
            )
            out = ops.run(inputs, backend or self.backend)
            return (out[0] if k is None else out), self.edits

    def check_unedited(self, edits: int, now: int | None = None) -> None:
        """Raise :class:`MemoryEditedError` unless the memory's :attr:`edits` (or ``now``)
        is still ``edits``, the count a read saw."""
        raise_if_edited("KeyMemory", "add/delete/compact/load", edits, self.edits if now is None else now)

    # ----------------------------------------------------------- persistence
    def save(self, path: str | Path) -> None:
        """Write the live rows, settings and version to ``path`` (safetensors), atomically.

        The file holds only live rows: no byte of a deleted row is written. If the
        process dies while saving, the file at ``path`` is the previous snapshot.
        """
        with self._lock:  # a consistent copy; the slow write runs without the lock
            ids, keys, values = self.state()
            config = {**self._config(), "version": self.version}
        snapshot.write(path, {"ids": ids, "keys": keys, "values": values}, config)

    def state_dict(self) -> dict:
        """The whole memory as tensors and plain values, for a module's ``state_dict``.

        ``{"config": settings, "version": int, "slot_ids": int64 [n], "keys": [n, key_dim],
        "values": [n, ...]}``: copies of the ``n`` used slots in order, dead ones
        included (``-1`` and zero bytes), so tombstones travel too. Loadable by
        ``torch.load(..., weights_only=True)``.
        """
        with self._lock:
            keys, values, slot_ids = (t.clone() for t in self.buffers())
            return {
                "config": self._config(),
                "version": self.version,
                "slot_ids": slot_ids,
                "keys": keys,
                "values": values,
            }

    def load_state_dict(self, state: dict) -> None:
        """Replace every row with those of :meth:`state_dict`'s ``state``, tombstones and
        version included. Settings must match this memory's (the compaction policy may
        differ); ``ValueError`` otherwise, and nothing changes.

        Loading an older state brings back rows deleted since: with a ledger attached,
        their receipts stay, but the rows are live again.
        """
        if not isinstance(state, dict) or set(state) != {"config", "version", "slot_ids", "keys", "values"}:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"state must be a KeyMemory.state_dict(), got {got}")
        mine = {k: v for k, v in self._config().items() if k != "compact_threshold"}
        theirs = {k: v for k, v in dict(state["config"]).items() if k != "compact_threshold"}
        if mine != theirs:
            raise ValueError(f"state has settings {theirs}, this memory {mine}")
        version, slot_ids = state["version"], state["slot_ids"]
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ValueError(f"state's version must be an int >= 0, got {version!r}")
        _checks.int64("slot_ids", slot_ids)
        _checks.shape("slot_ids", slot_ids, (None,))
        n = slot_ids.shape[0]
        if n and int(slot_ids.min()) < -1:
            raise ValueError("slot_ids must be >= -1 (-1 marks a dead slot)")
        live = slot_ids >= 0
        self._check_keys("keys", state["keys"].to(self.device), n)
        self._check_values(state["values"].to(self.device), n)
        keys, values = state["keys"].to(self.device, self.dtype), state["values"].to(self.device)
        if values.dtype != self._values.dtype:
            values = cast("values", values, self._values.dtype)
        id_list = slot_ids[live].tolist()
        if len(set(id_list)) != len(id_list):
            raise ValueError(f"slot_ids repeats {repeats(id_list)[:5]}")
        with self._lock:
            new = self._allocate(max(n, 1))
            for dst, src in zip(new, (keys, values, slot_ids.to(self.device)), strict=True):
                dst[:n] = src
            dead = torch.nonzero(~live).reshape(-1).to(self.device)
            for t in new[:2]:  # a dead slot never holds bytes, whatever was loaded
                ops.zero_rows(t, dead)
            self._set_buffers(new)
            self._index.rebuild(self._slot_ids)
            self._used, self._rows = n, len(id_list)
            self.version = version
            self.edits += 1

    @classmethod
    def load(
        cls, path: str | Path, device: torch.device | str | None = None, *, ledger: Ledger | None = None
    ) -> KeyMemory:
        """Read a memory written by :meth:`save`; ``device`` overrides where it lives.

        ``ValueError`` for a truncated, corrupted or inconsistent file, naming it.
        """
        tensors, config = snapshot.read(path, expected=("ids", "keys", "values"))
        if set(config) != SNAPSHOT_KEYS:
            raise ValueError(f"{path} has settings {sorted(config)}, expected {sorted(SNAPSHOT_KEYS)}")
        version = config.pop("version")
        dtype = DTYPES.get(str(config.pop("dtype")))
        ids, keys, values = tensors["ids"], tensors["keys"], tensors["values"]
        try:
            if dtype is None:
                raise ValueError(f"dtype must be one of {sorted(DTYPES)}")
            if isinstance(version, bool) or not isinstance(version, int) or version < 0:
                raise ValueError(f"version must be an int >= 0, got {version!r}")
            mem = cls(**config, dtype=dtype, device=device or "cpu", capacity=max(1, len(ids)), ledger=ledger)
            if keys.dtype != dtype or values.dtype != mem._values.dtype:
                raise ValueError(f"keys/values are {keys.dtype}/{values.dtype}, the settings say {dtype}")
            dev = mem.device
            mem.add(ids.to(dev), keys.to(dev), values.to(dev))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path} is not a valid kmem snapshot: {err}") from err
        mem.version = version
        return mem

    def _config(self) -> dict:
        return {
            "key_dim": self.key_dim,
            "value_dim": self.value_dim,
            "num_classes": self.num_classes,
            "metric": self.metric,
            "dtype": str(self.dtype).removeprefix("torch."),
            "compact_threshold": self.compact_threshold,
        }

    # -------------------------------------------------------------- internals
    def _allocate(self, capacity: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Zeroed ``keys [capacity, key_dim]`` and ``values``, and ``slot_ids [capacity + 1]``
        all -1 (:meth:`_set_buffers` keeps the extra entry out of sight)."""
        keys = torch.zeros(capacity, self.key_dim, dtype=self.dtype, device=self.device)
        if self.is_labels:
            values = torch.zeros(capacity, dtype=torch.int64, device=self.device)
        else:
            values = torch.zeros(capacity, self.value_dim, dtype=self.dtype, device=self.device)
        # One slot past the end that is always -1: see _ids_of.
        slot_ids = torch.full((capacity + 1,), -1, dtype=torch.int64, device=self.device)
        return keys, values, slot_ids

    def _reserve(self, slots: int) -> None:
        """Grow the buffers geometrically so at least ``slots`` slots exist."""
        if slots <= self.capacity:
            return
        capacity = max(slots, math.ceil(self.capacity * 1.5))
        new = self._allocate(capacity)
        for src, dst in zip((self._keys, self._values, self._slot_ids), new, strict=True):
            dst[: self._used] = src[: self._used]
        self._set_buffers(new)

    def _set_buffers(self, buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        """Install new ``(keys, values, slot_ids)`` buffers of :meth:`_allocate` and drop
        the views of the old."""
        self._keys, self._values, self._slot_id_lookup = buffers
        self._slot_ids = self._slot_id_lookup[:-1]
        self._views: tuple[int, tuple[torch.Tensor, ...]] = (-1, ())

    def _check_new_ids(self, ids: object) -> list[int]:
        """Ids in the form ``add`` takes, as a list; whether they are new is checked under the lock."""
        _checks.int64("ids", ids)
        _checks.shape("ids", ids, (None,))
        _checks.concrete("ids", ids)
        id_list = ids.tolist()
        if any(i < 0 for i in id_list):
            raise ValueError("ids must be >= 0 (-1 marks an empty slot)")
        if len(set(id_list)) != len(id_list):
            raise ValueError(f"ids repeats {repeats(id_list)[:5]}")
        return id_list

    def _check_keys(self, name: str, keys: object, n: int) -> None:
        _checks.floating(name, keys)
        _checks.shape(name, keys, (n, self.key_dim))
        _checks.device(name, keys, self.device)
        _checks.finite(name, keys)

    def _check_queries(self, queries: object) -> None:
        """The one check of a read's queries (the ops are handed valid records)."""
        _checks.floating("queries", queries)
        # Every read passes here: the common case is tested inline (the general checks
        # cost ~1 us more per call, ~8% of a small read), the general ones name the error.
        if queries.dim() != 2 or queries.shape[1] != self.key_dim:
            _checks.shape("queries", queries, (None, self.key_dim))
        if not (queries.is_cpu and self._on_cpu):
            _checks.device("queries", queries, self.device)
        _checks.finite("queries", queries)

    def _check_exclusions(self, exclude_ids: object, queries: torch.Tensor) -> torch.Tensor | None:
        return _checks.exclude_ids(exclude_ids, queries.shape[0], queries.device)

    def _check_values(self, values: object, n: int) -> None:
        if self.is_labels:
            _checks.int64("values", values)
            _checks.shape("values", values, (n,))
            _checks.device("values", values, self.device)
            if n and (int(values.min()) < 0 or int(values.max()) >= self.num_classes):
                raise ValueError(f"values (labels) must be in [0, {self.num_classes})")
        else:
            _checks.floating("values", values)
            _checks.shape("values", values, (n, self.value_dim))
            _checks.device("values", values, self.device)
            _checks.finite("values", values)


def raise_if_edited(kind: str, calls: str, edits: int, now: int) -> None:
    """:class:`MemoryEditedError` unless a ``kind`` memory's edit count ``now`` is still
    ``edits``, the count its read saw (``calls``: the calls that count as edits)."""
    if now != edits:
        raise MemoryEditedError(
            f"this {kind} changed ({now - edits} {calls} call(s)) after the attend whose backward is "
            "running: its gradient would read rows that are gone, moved or overwritten. Run backward() "
            "before changing the memory, or recompute the forward."
        )


class _EditGuard(torch.autograd.Function):
    """Identity on an attend's result whose backward first checks that the memory's rows
    were not edited since: it runs before the read's own backward, so every backend
    fails the same way instead of one with an in-place error and another silently."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, memory: KeyMemory, edits: int) -> torch.Tensor:
        ctx.memory, ctx.edits = memory, edits
        return out.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.memory.check_unedited(ctx.edits)
        return grad, None, None
