"""Deletion ledger: an append-only, hash-chained record of every deletion, in SQLite.

Each receipt says which sample ids a request deleted, when, and how the memory's
version and row count changed -- never what the deleted rows held. Every receipt
carries the SHA-256 of its own fields and of the receipt before it, so editing,
removing or reordering a receipt breaks the chain that :meth:`Ledger.verify` walks.
Dropping the newest receipts would leave a shorter valid chain, so the chain's head
(sequence number and hash of the last receipt) is kept in a table of its own, written
in the same transaction as each receipt, and the last receipt must match it. Whoever
rewrites that record too, or replaces the whole file, is caught only by a head hash
kept elsewhere (``verify(head=...)``).

The database is SQLite in WAL mode with ``synchronous=FULL`` (``durable=False``:
``NORMAL``, which survives a crash of the process but not of the machine). A receipt
is written inside a transaction that commits only if the deletion it records
succeeded (:meth:`Ledger.record`).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

SCHEMA_VERSION = 2  # 2 added the head table; a schema-1 ledger gains it with its next receipt
GENESIS = "0" * 64  # prev_hash of the first receipt

_RECEIPTS_SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS receipts (
    seq INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL,
    reason TEXT,
    time TEXT NOT NULL,
    ids TEXT NOT NULL,
    count INTEGER NOT NULL,
    version_before INTEGER NOT NULL,
    version_after INTEGER NOT NULL,
    rows_before INTEGER NOT NULL,
    rows_after INTEGER NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
)""",
    "CREATE INDEX IF NOT EXISTS receipts_request ON receipts (request_id)",
)
# One row: the last receipt's seq and hash (0 and GENESIS before the first receipt).
_HEAD_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS head (one INTEGER PRIMARY KEY CHECK (one = 1), seq INTEGER NOT NULL, "
    "hash TEXT NOT NULL)",
    f"INSERT OR IGNORE INTO head VALUES (1, 0, '{GENESIS}')",
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)
_FIELDS = (
    "seq",
    "request_id",
    "reason",
    "time",
    "ids",
    "count",
    "version_before",
    "version_after",
    "rows_before",
    "rows_after",
    "prev_hash",
    "hash",
)


@dataclass(frozen=True)
class Receipt:
    """One deletion. ``ids``: the deleted sample ids; ``count == len(ids) ==
    rows_before - rows_after``; ``time``: ISO 8601, UTC; ``hash``: SHA-256 (hex) of
    every other field, ``prev_hash`` included."""

    seq: int
    request_id: str
    reason: str | None
    time: str
    ids: tuple[int, ...]
    count: int
    version_before: int
    version_after: int
    rows_before: int
    rows_after: int
    prev_hash: str
    hash: str

    def to_json(self) -> dict:
        return {**asdict(self), "ids": list(self.ids)}


@dataclass(frozen=True)
class Verification:
    """What :meth:`Ledger.verify` found: ``ok`` when ``problems`` is empty."""

    receipts: int
    head: str  # hash of the last receipt (GENESIS for an empty ledger)
    problems: tuple[str, ...]
    notes: tuple[str, ...] = ()  # what could not be checked

    @property
    def ok(self) -> bool:
        return not self.problems


def receipt_hash(fields: dict) -> str:
    """SHA-256 of a receipt's fields other than ``hash``, in canonical JSON."""
    body = {k: (list(v) if k == "ids" else v) for k, v in fields.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class Ledger:
    """An SQLite deletion ledger at ``path`` (created if missing).

    Safe to share between threads and between processes: appends serialise on the
    database's write lock, and each one links to the receipt that is last at that
    moment. Use as a context manager or call :meth:`close`.

    Args:
        path: the database file (``":memory:"`` for a throwaway one).
        durable: fsync every commit (``synchronous=FULL``); ``False`` trades survival
            of a power loss for speed.
        create: make a new ledger if ``path`` does not exist; ``False``: it must exist
            and be a ledger already (``FileNotFoundError``/``ValueError`` otherwise).
    """

    def __init__(self, path: str | Path, *, durable: bool = True, create: bool = True) -> None:
        if not create and not Path(path).is_file():
            raise FileNotFoundError(f"no ledger at {path}")
        self.path = str(path)
        self._lock = threading.Lock()
        # Autocommit mode: transactions are begun and ended explicitly below.
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        try:
            version = self._version()
            if version not in ((0, 1, SCHEMA_VERSION) if create else (1, SCHEMA_VERSION)):
                raise ValueError(f"{path} has ledger schema {version}, expected {SCHEMA_VERSION}")
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            if version == 0:  # only a new ledger gets tables: a dropped one must stay missing
                with self._transaction():
                    self._run(*_RECEIPTS_SCHEMA, *_HEAD_SCHEMA)
        except sqlite3.DatabaseError as err:
            self._conn.close()
            raise ValueError(f"{path} is not a kmem ledger: {err}") from err
        except BaseException:
            self._conn.close()
            raise

    # ------------------------------------------------------------- writing
    @contextmanager
    def record(
        self,
        *,
        request_id: str,
        ids: list[int],
        version_before: int,
        version_after: int,
        rows_before: int,
        rows_after: int,
        reason: str | None = None,
    ) -> Iterator[Receipt]:
        """Append a receipt, committed when the ``with`` block exits normally.

        The block performs the deletion the receipt describes. If the block raises,
        or the commit fails, the receipt is rolled back and the error propagates: the
        caller must then undo its deletion, so that neither is visible.
        """
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty str, got {request_id!r}")
        if reason is not None and not isinstance(reason, str):
            raise TypeError(f"reason must be a str or None, got {type(reason).__name__}")
        if rows_before - rows_after != len(ids):
            raise ValueError(f"rows_before - rows_after must equal len(ids) = {len(ids)}")
        fields = {
            "request_id": request_id,
            "reason": reason,
            "ids": tuple(ids),
            "count": len(ids),
            "version_before": version_before,
            "version_after": version_after,
            "rows_before": rows_before,
            "rows_after": rows_after,
        }
        with self._lock, self._transaction():
            yield self._append(fields)

    @contextmanager
    def _transaction(self, begin: str = "BEGIN IMMEDIATE") -> Iterator[None]:
        """A transaction; by default it holds the write lock from its start, so the head cannot move."""
        self._conn.execute(begin)
        try:
            yield
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise

    def _run(self, *statements: str) -> None:
        for statement in statements:
            self._conn.execute(statement)

    def _version(self) -> int:
        return self._conn.execute("PRAGMA user_version").fetchone()[0]

    def _append(self, fields: dict) -> Receipt:
        if self._version() < SCHEMA_VERSION:  # a schema-1 ledger: its head is recorded from now on
            self._run(*_HEAD_SCHEMA)
        last = self._conn.execute("SELECT seq, hash FROM receipts ORDER BY seq DESC LIMIT 1").fetchone()
        seq, prev_hash = (last[0] + 1, last[1]) if last else (1, GENESIS)
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")
        full = {**fields, "seq": seq, "time": now, "prev_hash": prev_hash}
        receipt = Receipt(**full, hash=receipt_hash(full))
        row = {**asdict(receipt), "ids": json.dumps(list(receipt.ids))}
        self._conn.execute(
            f"INSERT INTO receipts ({', '.join(_FIELDS)}) VALUES ({', '.join('?' * len(_FIELDS))})",
            [row[f] for f in _FIELDS],
        )
        if self._conn.execute("UPDATE head SET seq = ?, hash = ?", (seq, receipt.hash)).rowcount != 1:
            # Recreating it would bless whatever was removed before: refuse until someone looks.
            raise ValueError(f"{self.path}: the ledger's head record is missing; see `kmem ledger verify`")
        return receipt

    # ------------------------------------------------------------- reading
    def receipts(
        self, *, request_id: str | None = None, sample_id: int | None = None, last: int | None = None
    ) -> list[Receipt]:
        """Receipts in order, optionally only one request's, only those that deleted
        ``sample_id``, or only the ``last`` ones."""
        where, args = [], []
        if request_id is not None:
            where.append("request_id = ?")
            args.append(request_id)
        if sample_id is not None:
            where.append("EXISTS (SELECT 1 FROM json_each(receipts.ids) WHERE value = ?)")
            args.append(int(sample_id))
        sql = f"SELECT {', '.join(_FIELDS)} FROM receipts"
        if where:
            sql += " WHERE " + " AND ".join(where)
        # Newest first so LIMIT keeps the last ones; put back in order below.
        sql += " ORDER BY seq DESC"
        if last is not None:
            sql += " LIMIT ?"
            args.append(int(last))
        with self._lock:
            rows = self._conn.execute(sql, args).fetchall()
        rows.reverse()
        return [_receipt(row) for row in rows]

    def __len__(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM receipts").fetchone()[0]

    def verify(self, head: str | None = None) -> Verification:
        """Walk the chain: every hash must match its receipt, link to the one before, and
        the sequence must run 1, 2, 3, ...; counts must agree with the ids; the last
        receipt must be the one the head record names (catches receipts removed from the
        end). ``head``: a hash kept elsewhere that the last receipt must carry (catches a
        rewritten head record too)."""
        with self._lock, self._transaction("BEGIN DEFERRED"):  # one snapshot: receipts and head agree
            rows, kept, version = self._chain()
        problems: list[str] = [] if rows is not None else ["the receipts table is missing (dropped)"]
        prev, last, count = GENESIS, 0, 0
        for count, row in enumerate(rows or (), start=1):
            fields = dict(zip(_FIELDS, row, strict=True))
            problems += _receipt_problems(fields, count, prev)
            prev, last = fields["hash"], fields["seq"]
        end_problems, notes = _end_problems(version, kept, last, prev)
        problems += end_problems
        if head is not None and head != prev:
            problems.append(f"the last receipt's hash is {prev}, expected {head} (receipts dropped or added)")
        return Verification(receipts=count, head=prev, problems=tuple(problems), notes=tuple(notes))

    def _chain(self) -> tuple[list[tuple] | None, tuple[int, str] | None, int]:
        """The receipts in order and the head record (``None`` where their table is missing), the schema."""
        tables = {
            name for (name,) in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        rows = kept = None
        if "receipts" in tables:
            rows = self._conn.execute(f"SELECT {', '.join(_FIELDS)} FROM receipts ORDER BY seq").fetchall()
        if "head" in tables:
            kept = self._conn.execute("SELECT seq, hash FROM head").fetchone()
        return rows, kept, self._version()

    # ------------------------------------------------------------ lifetime
    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Ledger({self.path!r})"


def _receipt(row: tuple) -> Receipt:
    fields = dict(zip(_FIELDS, row, strict=True))
    return Receipt(**{**fields, "ids": tuple(json.loads(fields["ids"]))})


def _receipt_problems(fields: dict, expected_seq: int, prev: str) -> list[str]:
    """What is wrong with one receipt, the ``expected_seq``-th, whose predecessor's hash is ``prev``."""
    problems = []
    where = f"receipt {fields['seq']}"
    if fields["seq"] != expected_seq:
        problems.append(f"{where}: expected sequence number {expected_seq} (a receipt is missing)")
    if fields["prev_hash"] != prev:
        problems.append(f"{where}: does not link to the receipt before it (removed or reordered)")
    try:
        fields["ids"] = tuple(json.loads(fields["ids"]))
    except (TypeError, ValueError):
        problems.append(f"{where}: ids are not a JSON list")
    if receipt_hash(fields) != fields["hash"]:
        problems.append(f"{where}: hash does not match its content (edited)")
    elif not fields["count"] == len(fields["ids"]) == fields["rows_before"] - fields["rows_after"]:
        problems.append(f"{where}: count, ids and row counts disagree")
    return problems


def _end_problems(
    version: int, kept: tuple[int, str] | None, last: int, prev: str
) -> tuple[list[str], list[str]]:
    """Problems and notes about the chain's end: its last receipt (``last``, hash ``prev``)
    against the head record ``kept`` of a ledger of schema ``version``."""
    if version < SCHEMA_VERSION:
        note = (
            f"schema {version}: written before kmem kept the chain's head, so receipts removed from its "
            "end cannot be detected (its next receipt starts keeping it; --head checks a hash kept elsewhere)"
        )
        return [], [note]
    if kept is None:
        return ["the head record is missing (deleted): receipts removed from the end cannot be ruled out"], []
    seq, hash_ = kept
    if seq > last:
        chain = f"ends at receipt {last}" if last else "is empty"
        return [
            f"the head record names receipt {seq} as the last but the chain {chain} (receipts removed)"
        ], []
    if (seq, hash_) != (last, prev):
        return [
            f"the last receipt, {last}, is not the one the head record names ({seq}, hash {hash_[:16]})"
        ], []
    return [], []
