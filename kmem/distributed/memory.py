"""ShardedKeyMemory: one KeyMemory split across the ranks of a torch.distributed group.

How gradients cross the ranks. A rank's attention result depends on its queries
through scores computed on other ranks. Two ways to differentiate that: ship each
candidate's key back with it and recompute its score locally (the backward stays
local, but every query then moves ``P * k * d`` key elements), or recompute the
candidates' scores on their owners under autograd and make each exchange an autograd
function whose backward is the reverse exchange (``comm._AllToAll``). kmem does the
second: a candidate travels as a 4-byte score instead of a ``d``-element key (84 vs
1,104 bytes per candidate with its ids and value at d = 256, V = 16, fp32), and dense
attention -- where every row is a candidate -- has no other option. The price is that backward is a collective, as in DDP. The top-k *selection*
is made without gradient (as in ``KeyMemory``); only the winners' scores carry it.
"""

from __future__ import annotations

import math
import threading
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

from .. import _checks, compiled_reads, ops, rows, snapshot
from ..ledger import Ledger
from ..memory import KeyMemory, raise_if_edited
from ..ops import reference
from ..rows import IdsLike
from ..slot_index import repeats
from . import merge
from .comm import Comm
from .routing import owner_of

FORMAT = "kmem.ShardedKeyMemory"
_SNAPSHOT_KEYS = {*rows.SNAPSHOT_KEYS, "next_seq", "rank", "world_size"}
_STATE_KEYS = {"rank", "world_size", "shard", "seq", "next_seq", "rows", "version"}
_ERRORS = {"KeyError": KeyError, "TypeError": TypeError, "ValueError": ValueError}
_READS = ("search", "attend")
_QUERY_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class ShardedKeyMemory:
    """A :class:`~kmem.KeyMemory` whose rows are spread over the ranks of a process group.

    Each rank holds one shard, a ``KeyMemory`` (:attr:`shard`). A row lives on the rank
    :func:`owner_of` its id picks (a stable hash), so any rank finds a row's owner
    without asking. Every method except :meth:`compact` and :meth:`save` is a
    *collective*: all ranks of the group call it, in the same order, each with its own
    arguments (its own rows to add, ids to delete, queries to answer; possibly none).

    * ``add`` sends each row to its owner (``all_to_all``); ``delete`` sends each id to
      its owner, which alone touches the row (O(1) per id, as in ``KeyMemory``).
    * ``search`` / ``attend`` answer every rank's queries against every shard: the
      queries are exchanged, each shard runs the fused local top-k, the candidates
      (scores, ids, insertion numbers, values) go back to the asking rank, which merges
      them into the exact global top-k and applies the softmax. Dense attention
      (``k=None``) merges the shards' partial results by their log-sum-exps.
    * Results equal those of one ``KeyMemory`` that received every rank's rows, rank by
      rank, call by call: each row carries a global insertion number, and ties go to
      the row added first, as in ``KeyMemory``.

    Gradients: ``attend`` is differentiable in ``queries``. Its backward runs the
    reverse exchanges, so when one rank differentiates a result, every rank must (as
    with ``DistributedDataParallel``); ranks must agree on whether queries need grad.

    Failures: arguments are checked on every rank and the ranks agree before anything
    changes, so a bad argument on one rank raises on all and changes nothing. A
    collective that fails (a rank died, or hung past the process group's ``timeout``)
    raises :class:`~kmem.distributed.ShardError`; a mutation changes its shard only
    after its last collective, so every shard is left wholly before or after it.

    Args:
        key_dim, value_dim, num_classes, metric, dtype, device, capacity, backend: as in
            :class:`~kmem.KeyMemory`, the same on every rank (checked); ``capacity`` is
            per shard. ``device`` is this rank's (``cuda:<local rank>`` with NCCL).
        compact_threshold: each shard compacts itself once this fraction of its slots is dead.
        ledger: this rank's :class:`~kmem.Ledger` (one file per rank: receipts of the
            rows it owns), or None; every rank has one or none does.
        group: the process group (default: the default group).
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
        group: dist.ProcessGroup | None = None,
    ) -> None:
        err, shard = None, None
        try:
            shard = KeyMemory(
                key_dim,
                value_dim,
                num_classes=num_classes,
                metric=metric,
                dtype=dtype,
                device=device,
                capacity=capacity,
                compact_threshold=compact_threshold,
                backend=backend,
                ledger=ledger,
            )
        except (TypeError, ValueError) as e:
            err = e
        self._setup(Comm(group), shard, err)

    def _setup(self, comm: Comm, shard: KeyMemory | None, err: Exception | None, info: object = None) -> list:
        """Adopt ``shard`` once every rank has built one with the same settings (``err``:
        this rank could not); returns every rank's ``info``."""
        self._comm = comm
        mine = (
            None
            if shard is None
            else {**shard._config(), "backend": shard.backend, "ledger": shard.ledger is not None}
        )
        got = self._agree("ShardedKeyMemory()", err, (mine, info))
        if any(config != got[0][0] for config, _ in got):
            raise ValueError(f"ranks built ShardedKeyMemory with different settings: {[c for c, _ in got]}")
        self.shard = shard
        # The shard never compacts on its own: _seq must follow its slots.
        self.compact_threshold, shard.compact_threshold = shard.compact_threshold, None
        self._seq = torch.empty(shard.capacity, dtype=torch.int64, device=shard.device)  # per slot
        self._next_seq = 0  # global insertion number of the next row added
        self._rows = 0  # live rows on all ranks
        self.version = 0  # bumped by every collective mutation, the same on every rank
        self._lock = threading.RLock()
        self._handle = compiled_reads.register(self)
        return [i for _, i in got]

    # ------------------------------------------------------------------ state
    key_dim = property(lambda self: self.shard.key_dim)
    value_dim = property(lambda self: self.shard.value_dim)
    num_classes = property(lambda self: self.shard.num_classes)
    metric = property(lambda self: self.shard.metric)
    dtype = property(lambda self: self.shard.dtype)
    device = property(lambda self: self.shard.device)
    backend = property(lambda self: self.shard.backend)
    is_labels = property(lambda self: self.shard.is_labels)
    out_dim = property(lambda self: self.shard.out_dim)
    edits = property(lambda self: self.version, doc="Collective mutations so far (reads compare it).")
    rank = property(lambda self: self._comm.rank, doc="This rank in the group.")
    world_size = property(lambda self: self._comm.world_size, doc="Ranks (shards) in the group.")

    @property
    def ledger(self) -> Ledger | None:
        return self.shard.ledger

    @ledger.setter
    def ledger(self, value: Ledger | None) -> None:
        self.shard.ledger = value

    @property
    def bytes_sent(self) -> int:
        """Tensor bytes this rank has sent to other ranks in forward exchanges so far."""
        return self._comm.bytes_sent

    def __len__(self) -> int:
        """Live rows on all ranks (known to every rank without communication)."""
        return self._rows

    def __repr__(self) -> str:
        kind = f"num_classes={self.num_classes}" if self.is_labels else f"value_dim={self.value_dim}"
        return (
            f"ShardedKeyMemory(key_dim={self.key_dim}, {kind}, metric={self.metric!r}, dtype={self.dtype}, "
            f"rank={self.rank}/{self.world_size}, rows={len(self)}, shard_rows={len(self.shard)})"
        )

    def state(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Collective. Copies ``(ids, keys, values)`` of all live rows in insertion order,
        on every rank: the state of the equivalent ``KeyMemory``. Gathers the whole
        memory to every rank: for checks on small memories."""
        with self._lock:
            ids, keys, values = (t.cpu() for t in self.shard.state())
            seq = self._live_seq().cpu()
            parts = self._comm.gather_objects((seq, ids, keys, values), "state")
        seq, ids, keys, values = (torch.cat(p) for p in zip(*parts, strict=True))
        order = seq.argsort()
        return ids[order], keys[order], values[order]

    def fingerprint(self) -> str:
        """Collective. :meth:`KeyMemory.fingerprint` of the equivalent single memory
        (gathers the whole memory, like :meth:`state`)."""
        ids, keys, values = self.state()
        config = {k: v for k, v in self.shard._config().items() if k != "dtype"}
        single = KeyMemory(**config, dtype=self.dtype, capacity=max(1, len(ids)))
        single.add(ids, keys, values)
        return single.fingerprint()

    # -------------------------------------------------------------- mutation
    def add(self, ids: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Collective. Append this rank's rows (arguments as in :meth:`KeyMemory.add`;
        ``n = 0`` rows is fine). Each row goes to the rank that owns its id.

        In the equivalent ``KeyMemory``, a call adds rank 0's rows, then rank 1's, ...
        Ids must be new across all ranks; any bad argument on any rank raises on every
        rank and nothing is added anywhere.
        """
        comm, shard = self._comm, self.shard
        with self._lock:
            err, counts = None, [0] * comm.world_size
            try:
                id_list = shard._check_new_ids(ids)
                n = len(id_list)
                shard._check_keys("keys", keys, n)
                shard._check_values(values, n)
                ids = ids.to(self.device)
                keys = rows.cast("keys", keys, self.dtype)
                values = values.detach() if self.is_labels else rows.cast("values", values, self.dtype)
                owner = owner_of(ids, comm.world_size)
                counts = torch.bincount(owner, minlength=comm.world_size).tolist()
            except (TypeError, ValueError) as e:
                err = e
            sizes = self._agree("add", err, counts)  # sizes[source][owner]
            sent = [sum(row) for row in sizes]
            if not sum(sent):
                return
            seq = self._next_seq + sum(sent[: comm.rank]) + torch.arange(n, device=self.device)
            order = owner.argsort(stable=True)  # by owner, in input order within each
            ints = torch.stack([ids, seq, *([values] if self.is_labels else [])], 1)[order]
            floats = keys if self.is_labels else torch.cat([keys, values], 1)
            recv = [row[comm.rank] for row in sizes]
            ints = comm.all_to_all(ints, "add", counts, recv)  # by source rank: in seq order
            floats = comm.all_to_all(floats[order], "add", counts, recv)
            got = ints[:, 0].tolist()
            err = None
            if len(set(got)) != len(got):
                err = ValueError(f"ids repeat across ranks: {repeats(got)[:5]}; nothing was added")
            elif live := ints[:, 0][shard.has(ints[:, 0])].tolist():
                err = ValueError(
                    f"{len(live)} id(s) already in the memory, e.g. {live[:5]}; nothing was added"
                )
            self._agree("add", err, None)
            # No collective from here on: the shard changes wholly or not at all.
            new_keys = floats[:, : self.key_dim]
            new_values = ints[:, 2] if self.is_labels else floats[:, self.key_dim :]
            self._append(ints[:, 0], new_keys, new_values, ints[:, 1])
            self._next_seq += sum(sent)
            self._rows += sum(sent)
            self.version += 1

    def delete(self, ids: IdsLike, *, request_id: str | None = None, reason: str | None = None) -> int:
        """Collective. Delete this rank's ``ids`` (possibly none) wherever they live;
        returns how many (``len(ids)``). Only each id's owner touches its row, O(1).

        Unknown or repeated ids (also across ranks) raise on every rank and nothing is
        deleted anywhere. With ledgers, each owner commits one receipt per asking rank,
        with that rank's ``request_id`` (default: a new UUID) and ``reason``; a receipt
        that cannot be written restores that owner's rows and raises on that rank only.
        """
        comm, shard = self._comm, self.shard
        with self._lock:
            err, counts, id_list = None, [0] * comm.world_size, []
            try:
                id_list = rows.id_list("ids", ids)
                if shard.ledger is None and (request_id is not None or reason is not None):
                    raise ValueError(
                        "request_id and reason are kept by a ledger and this memory has none: give every "
                        "rank's ShardedKeyMemory one with ShardedKeyMemory(..., ledger=kmem.Ledger(path))"
                    )
                if len(set(id_list)) != len(id_list):
                    raise ValueError(f"ids repeats {repeats(id_list)[:5]}")
                wanted = torch.tensor(id_list, dtype=torch.int64, device=self.device)
                owner = owner_of(wanted, comm.world_size)
                counts = torch.bincount(owner, minlength=comm.world_size).tolist()
            except (TypeError, ValueError) as e:
                err = e
            asked = self._agree("delete", err, (counts, request_id, reason, uuid.uuid4().hex))
            recv = [a[0][comm.rank] for a in asked]
            total = sum(sum(a[0]) for a in asked)
            if not total:
                return 0
            got_t = comm.all_to_all(wanted[owner.argsort(stable=True)], "delete", counts, recv)
            got = got_t.tolist()
            err = None
            unknown = got_t[~shard.has(got_t)].tolist()
            if len(set(got)) != len(got):
                err = ValueError(f"ids repeat across ranks: {repeats(got)[:5]}; nothing was deleted")
            elif unknown:
                err = KeyError(
                    f"{len(unknown)} id(s) not in the memory, e.g. {unknown[:5]}; nothing was deleted"
                )
            self._agree("delete", err, None)
            # No collective from here on.
            self._rows -= total
            self.version += 1
            start = 0
            for source, n in enumerate(recv):
                sent, start = got[start : start + n], start + n
                if not sent:
                    continue
                if shard.ledger is None:
                    shard.delete(sent)
                else:
                    _, rid, why, fallback = asked[source]
                    shard.delete(sent, request_id=rid or fallback, reason=why)
            threshold = self.compact_threshold
            if threshold is not None and shard.num_dead > threshold * len(shard.buffers()[2]):
                self.compact()
        return len(id_list)

    def compact(self) -> int:
        """Compact this rank's shard (not a collective: no communication); returns the
        slots reclaimed. Insertion order, and so every result, is unchanged."""
        with self._lock:
            slot_ids = self.shard.buffers()[2]
            live = self._seq[: len(slot_ids)][slot_ids >= 0]
            self._seq[: len(live)] = live
            return self.shard.compact()

    # ----------------------------------------------------------------- reads
    def search(
        self, queries: torch.Tensor, k: int, exclude_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Collective. This rank's queries' top-``k`` rows over all shards: as
        :meth:`KeyMemory.search` (``(scores [B, k], ids [B, k])``, ties to the row added
        first), ``B`` may differ between ranks. Every rank passes the same ``k``. Under
        ``torch.compile`` one opaque node (:mod:`kmem.compiled_reads`), still a collective."""
        if torch.compiler.is_compiling():
            return compiled_reads.memory_search(queries, exclude_ids, self._handle, k)
        with self._lock, torch.no_grad():
            q, exclude, batch, _ = self._exchange_queries("search", queries, k, exclude_ids)
            scores, ints, _ = self._candidates(q, exclude, k, with_values=False)
            scores, ints = self._return(scores, batch, k), self._return(ints, batch, k)
            order = merge.topk_order(scores, ints[..., 1], k)
            return scores.gather(1, order).float(), ints[..., 0].gather(1, order)

    def attend(
        self,
        queries: torch.Tensor,
        k: int | None = 32,
        scale: float | None = None,
        exclude_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Collective. :meth:`KeyMemory.attend` of this rank's queries over all shards:
        ``[B, out_dim]``, differentiable in ``queries`` (every rank then runs backward).
        Every rank passes the same ``k`` and ``scale``. Under ``torch.compile``
        (``fullgraph=True`` included) one opaque node, as for a ``KeyMemory``
        (:mod:`kmem.compiled_reads`); its backward recomputes the read, a collective too."""
        if torch.compiler.is_compiling():
            return compiled_reads.memory_attend(queries, exclude_ids, self._handle, k, scale)[0]
        return self.read(queries, k, scale, exclude_ids)[0]

    def read(
        self,
        queries: torch.Tensor,
        k: int | None = 32,
        scale: float | None = None,
        exclude_ids: torch.Tensor | None = None,
        backend: str | None = None,
    ) -> tuple[torch.Tensor, int]:
        """Collective. :meth:`attend`'s result and the :attr:`edits` count it saw;
        ``backend`` overrides the shards' for this read."""
        backend = backend or self.backend
        with self._lock:
            q, exclude, batch, scale = self._exchange_queries("attend", queries, k, exclude_ids, scale)
            if k is None:
                return self._dense(q, exclude, batch, scale, backend), self.edits
            scores, ints, values = self._candidates(q, exclude, k, with_values=True, backend=backend)
            scores, ints = self._return(scores, batch, k, q.requires_grad), self._return(ints, batch, k)
            order = merge.topk_order(scores, ints[..., 1], k)
            chosen = ints[..., 0].gather(1, order) >= 0
            weights = reference.masked_softmax(scale * scores.gather(1, order), chosen)
            if self.is_labels:
                labels = ints[..., 2].gather(1, order)
                return weights.new_zeros(batch, self.num_classes).scatter_add(1, labels, weights), self.edits
            values = self._return(values, batch, k)
            picked = values.gather(1, order[..., None].expand(-1, -1, values.shape[-1]))
            return torch.einsum("bk,bkv->bv", weights, picked.to(weights.dtype)), self.edits

    def check_unedited(self, edits: int, now: int | None = None) -> None:
        """Raise :class:`~kmem.MemoryEditedError` unless :attr:`edits` (or ``now``) is
        still ``edits``, the count a read saw."""
        raise_if_edited(
            "ShardedKeyMemory", "collective add/delete/load", edits, self.edits if now is None else now
        )

    # ----------------------------------------------------------- persistence
    def save(self, path: str | Path) -> Path:
        """Write this rank's shard (not a collective) to ``path`` formatted with ``rank``
        and ``world_size``, e.g. ``"mem-{rank}-of-{world_size}.kmem"``; returns the file.
        A checksummed safetensors snapshot written atomically, live rows only."""
        if "{rank}" not in str(path):
            raise ValueError(
                f"path must contain '{{rank}}' so ranks write different files, got {str(path)!r}"
            )
        target = Path(str(path).format(rank=self.rank, world_size=self.world_size))
        with self._lock:
            ids, keys, values = self.shard.state()
            tensors = {"ids": ids, "keys": keys, "values": values, "seq": self._live_seq().clone()}
            config = {
                **self.shard._config(),
                "compact_threshold": self.compact_threshold,
                "version": self.version,
                "next_seq": self._next_seq,
                "rank": self.rank,
                "world_size": self.world_size,
            }
        snapshot.write(target, tensors, config, fmt=FORMAT)
        return target

    def state_dict(self) -> dict:
        """This rank's part of the memory (not a collective), for a module's ``state_dict``:
        the shard's :meth:`KeyMemory.state_dict`, its rows' insertion numbers and the
        group-wide counters, with ``rank`` and ``world_size``."""
        with self._lock:
            shard = self.shard.state_dict()
            return {
                "rank": self.rank,
                "world_size": self.world_size,
                "shard": shard,
                "seq": self._seq[: len(shard["slot_ids"])].clone(),
                "next_seq": self._next_seq,
                "rows": self._rows,
                "version": self.version,
            }

    def load_state_dict(self, state: dict) -> None:
        """Collective. Every rank replaces its shard with its part of :meth:`state_dict`
        (taken on the same rank of a group of the same size, at the same version on
        every rank); ``ValueError`` on every rank if any rank's part does not fit, and
        then no rank changes."""
        err = None
        try:
            if not isinstance(state, dict) or set(state) != _STATE_KEYS:
                raise ValueError(f"state must be a ShardedKeyMemory.state_dict(), got {sorted(state)}")
            where = (state["rank"], state["world_size"])
            if where != (self.rank, self.world_size):
                raise ValueError(
                    f"state of rank {where[0]} of {where[1]}, not {self.rank} of {self.world_size}"
                )
            slot_ids, seq = state["shard"]["slot_ids"], state["seq"]
            if bool((owner_of(slot_ids[slot_ids >= 0], self.world_size) != self.rank).any()):
                raise ValueError(f"holds ids that rank {self.rank} does not own")
            if seq.shape != slot_ids.shape or seq.dtype != torch.int64:
                raise ValueError("seq must be int64 with one insertion number per slot")
            config = {k: v for k, v in self.shard._config().items() if k != "dtype"}
            check = KeyMemory(**config, dtype=self.dtype, device=self.device)
            check.load_state_dict(state["shard"])  # every check, on a scratch memory
        except (KeyError, TypeError, ValueError) as e:
            err = e
        versions = self._agree("load_state_dict", err, state["version"] if err is None else None)
        if len(set(versions)) != 1:
            raise ValueError(f"the ranks' states are at different versions: {versions}")
        with self._lock:
            self.shard.load_state_dict(state["shard"])
            self._seq = state["seq"].to(self.device).clone()
            self._next_seq, self._rows, self.version = state["next_seq"], state["rows"], state["version"]

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: torch.device | str | None = None,
        *,
        ledger: Ledger | None = None,
        group: dist.ProcessGroup | None = None,
    ) -> ShardedKeyMemory:
        """Collective. Read the shards written by :meth:`save` (same ``path`` template,
        same number of ranks): each rank reads its own file. ``ValueError`` on every
        rank if any rank's file is missing, corrupted or from another rank or layout."""
        comm = Comm(group)
        err, shard, seq, info = None, None, None, None
        target = Path(str(path).format(rank=comm.rank, world_size=comm.world_size))
        try:
            tensors, config = snapshot.read(target, ("ids", "keys", "values", "seq"), fmt=FORMAT)
            if set(config) != _SNAPSHOT_KEYS:
                raise ValueError(f"settings {sorted(config)}, expected {sorted(_SNAPSHOT_KEYS)}")
            where = (config.pop("rank"), config.pop("world_size"))
            if where != (comm.rank, comm.world_size):
                raise ValueError(f"shard {where[0]} of {where[1]}, not rank {comm.rank} of {comm.world_size}")
            ids, seq = tensors["ids"], tensors["seq"]
            if bool((owner_of(ids, comm.world_size) != comm.rank).any()):
                raise ValueError(f"holds ids that rank {comm.rank} does not own")
            if seq.shape != ids.shape or bool((seq[1:] <= seq[:-1]).any()):
                raise ValueError("insertion numbers that do not increase")
            info = (config.pop("version"), config.pop("next_seq"), len(ids))
            if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in info):
                raise ValueError(f"version and next_seq must be ints >= 0, got {info[:2]}")
            dtype = rows.DTYPES.get(str(config.pop("dtype")))
            if dtype is None:
                raise ValueError(f"dtype must be one of {sorted(rows.DTYPES)}")
            shard = KeyMemory(
                **config, dtype=dtype, device=device or "cpu", capacity=max(1, len(ids)), ledger=ledger
            )
            shard.add(
                ids.to(shard.device), tensors["keys"].to(shard.device), tensors["values"].to(shard.device)
            )
        except (OSError, TypeError, ValueError) as e:
            err = ValueError(f"{target} is not a valid shard snapshot: {e}")
        mem = cls.__new__(cls)
        states = mem._setup(comm, shard, err, info)
        if len({s[0] for s in states}) != 1:
            raise ValueError(f"the shards were saved at different versions: {[s[0] for s in states]}")
        mem._seq[: len(seq)] = seq.to(mem.device)
        mem.version = states[0][0]
        mem._next_seq = max(s[1] for s in states)
        mem._rows = sum(s[2] for s in states)
        return mem

    # -------------------------------------------------------------- internals
    def _agree(self, what: str, err: Exception | None, info: object) -> list:
        """Every rank's ``info``, once every rank has passed its checks. ``err`` is this
        rank's failed check: then it raises here, and every other rank raises saying so."""
        mine = None if err is None else (type(err).__name__, str(err))
        got = self._comm.gather_objects((mine, info), what)
        if err is not None:
            raise err
        failed = [(rank, e) for rank, (e, _) in enumerate(got) if e is not None]
        if failed:
            rank, (kind, msg) = failed[0]
            raise _ERRORS.get(kind, ValueError)(f"{what} failed on rank {rank}, so on every rank: {msg}")
        return [info for _, info in got]

    def _live_seq(self) -> torch.Tensor:
        slot_ids = self.shard.buffers()[2]
        return self._seq[: len(slot_ids)][slot_ids >= 0]

    def _append(self, ids: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, seq: torch.Tensor) -> None:
        """Add rows this rank owns to its shard, with their insertion numbers."""
        used = len(self.shard.buffers()[2])
        self.shard.add(ids, keys, values)
        if used + len(seq) > len(self._seq):
            grown = self._seq.new_empty(max(used + len(seq), math.ceil(len(self._seq) * 1.5)))
            grown[:used] = self._seq[:used]
            self._seq = grown
        self._seq[used : used + len(seq)] = seq

    def _exchange_queries(
        self,
        op: str,
        queries: torch.Tensor,
        k: int | None,
        exclude_ids: torch.Tensor | None,
        scale: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, int, float]:
        """Check the call's arguments on every rank, then send every rank's queries and
        exclusions to every rank: ``(queries [P * Bmax, d], exclude [P * Bmax, Emax] or
        None, B, scale)``, rank-major, padded with zero queries and ``-1``."""
        comm = self._comm
        err, batch, width, k_code, dtype_code = None, 0, 0, -1, -1
        try:
            scale = 1.0 / math.sqrt(self.key_dim) if scale is None else float(scale)
            self.shard._check_queries(queries)
            _checks.finite("queries", queries)
            dtype_code = _QUERY_DTYPES.index(queries.dtype)  # the exchange needs one dtype
            if k is not None:
                k_code = _checks.k(k)
            exclude_ids = _checks.exclude_ids(exclude_ids, queries.shape[0], self.device)
            batch = queries.shape[0]
            width = 0 if exclude_ids is None else exclude_ids.shape[1]
        except (TypeError, ValueError) as e:
            err = e
        needs_grad = torch.is_grad_enabled() and err is None and queries.requires_grad
        call = [_READS.index(op), k_code, int(needs_grad), hash(scale) & 0xFFFFFFFF, dtype_code]
        meta = comm.gather_ints([int(err is not None), batch, width, *call], op, self.device)
        if err is not None:
            raise err
        if bool(meta[:, 0].any()):
            raise ValueError(
                f"{op} failed on rank {int(meta[:, 0].nonzero()[0])}, so on every rank: invalid arguments there"
            )
        if bool((meta[:, 3:] != meta[0, 3:]).any()):
            raise ValueError(
                f"ranks called different reads [op index, k (-1: dense), needs grad, hash of scale, "
                f"query dtype] per rank: {meta[:, 3:].tolist()}; every rank must call the same read with "
                "the same k and scale, with queries of one dtype that all need grad or none"
            )
        rows, cols = int(meta[:, 1].max()), int(meta[:, 2].max())
        world = comm.world_size
        q = torch.cat([queries, queries.new_zeros(rows - batch, self.key_dim)])
        q = comm.all_to_all((q if needs_grad else q.detach()).expand(world, -1, -1), op)
        exclude = None
        if cols:
            padded = torch.full((rows, cols), -1, dtype=torch.int64, device=self.device)
            if exclude_ids is not None:
                padded[:batch, : exclude_ids.shape[1]] = exclude_ids
            exclude = comm.all_to_all(padded.expand(world, -1, -1), op).reshape(world * rows, cols)
        return q.reshape(world * rows, self.key_dim), exclude, batch, scale

    def _candidates(
        self,
        q: torch.Tensor,
        exclude: torch.Tensor | None,
        k: int,
        with_values: bool,
        backend: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """This shard's top-``k`` for every rank's queries: ``scores [Q, k]`` (differentiable
        in ``q``, ``-inf`` past the end), ``ints [Q, k, 2 or 3]`` (id, insertion number,
        label) and vector values ``[Q, k, V]`` (else None)."""
        keys, values, slot_ids = self.shard.buffers()
        # The queries were checked by _exchange_queries: the record is built unchecked.
        search = ops.SearchInputs(q.detach(), keys, slot_ids, exclude, k, self.metric)
        _, slots = ops.run(search, backend or self.backend)
        with torch.set_grad_enabled(q.requires_grad):  # scores differentiable in q when it needs grad
            scores = reference.gather_scores(q, keys, slots, self.metric)
        missing = slots < 0
        ids = reference.take_rows(slot_ids, slots).masked_fill(missing, -1)
        seq = reference.take_rows(self._seq[: len(slot_ids)], slots).masked_fill(missing, merge.LAST)
        fields = [ids, seq]
        if with_values and self.is_labels:
            fields.append(reference.take_rows(values, slots))
        vectors = reference.take_rows(values, slots) if with_values and not self.is_labels else None
        return scores, torch.stack(fields, -1), vectors

    def _return(self, t: torch.Tensor, batch: int, k: int, grad: bool = False) -> torch.Tensor:
        """Send each rank its queries' rows of ``t [P * Bmax, k, ...]``; returns this rank's
        ``[B, P * k, ...]``: every shard's candidates side by side. ``grad``: the exchange
        is part of a differentiated call."""
        world = self._comm.world_size
        if grad and not t.requires_grad:
            # A shard with no path to the queries (e.g. empty) must still join the
            # backward's reverse exchange, or the other ranks would wait for it.
            t = t.detach().requires_grad_()
        got = self._comm.all_to_all(t.reshape(world, -1, k, *t.shape[2:]), "the exchange of candidates")
        got = got.transpose(0, 1)[:batch]  # [B, P, k, ...]
        return got.reshape(batch, world * k, *t.shape[2:])

    def _dense(
        self, q: torch.Tensor, exclude: torch.Tensor | None, batch: int, scale: float, backend: str
    ) -> torch.Tensor:
        """Dense attention: each shard's normalised result and log-sum-exp, merged."""
        keys, values, slot_ids = self.shard.buffers()
        partial, lse = ops.topk_attention(
            q, keys, values, slot_ids, None, scale=scale, metric=self.metric, exclude_ids=exclude,
            num_classes=self.num_classes, backend=backend, return_lse=True,
        )  # fmt: skip
        payload = torch.cat([partial, lse[:, None].to(partial.dtype)], 1)
        got = self._return(payload[:, None], batch, 1, q.requires_grad)  # [B, P, out_dim + 1]
        return merge.combine_dense(got[..., :-1], got[..., -1])
