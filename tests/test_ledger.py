"""Deletion ledger: receipts, the hash chain and its verification, the shared commit
point with the deletion (failures injected into SQLite itself), the command line."""

from __future__ import annotations

import json
import sqlite3
import threading

import pytest
import torch
from conftest import filled_memory

import kmem
from kmem import cli
from kmem.ledger import GENESIS


@pytest.fixture
def ledger(tmp_path):
    with kmem.Ledger(tmp_path / "ledger.db") as ledger:
        yield ledger


def _memory_state(mem):
    return (mem.version, len(mem), mem.num_dead, *(t.clone() for t in mem.buffers()))


def _same_state(a, b):
    return a[:3] == b[:3] and all(torch.equal(x, y) for x, y in zip(a[3:], b[3:], strict=True))


def _three_receipts(ledger):
    mem, *_ = filled_memory(30, compact_threshold=None, ledger=ledger)
    mem.delete([1, 2], request_id="r1", reason="user asked")
    mem.delete(torch.tensor([7]), request_id="r2")
    mem.delete(20)
    return mem


def test_every_delete_appends_a_chained_receipt(ledger):
    mem = _three_receipts(ledger)
    r1, r2, r3 = ledger.receipts()
    assert (r1.seq, r1.request_id, r1.reason, r1.ids, r1.count) == (1, "r1", "user asked", (1, 2), 2)
    assert (r1.rows_before, r1.rows_after, r1.version_after - r1.version_before) == (30, 28, 1)
    assert (r2.ids, r2.rows_before, r2.version_before) == ((7,), 28, r1.version_after)
    assert len(r3.request_id) == 32 and r3.reason is None  # a fresh UUID when none is given
    assert r3.version_after == mem.version
    assert (r1.prev_hash, r2.prev_hash, r3.prev_hash) == (GENESIS, r1.hash, r2.hash)
    assert ledger.verify().ok and ledger.verify().head == r3.hash
    assert [r.seq for r in ledger.receipts(request_id="r2")] == [2]
    assert [r.seq for r in ledger.receipts(sample_id=2)] == [1]
    assert [r.seq for r in ledger.receipts(last=2)] == [2, 3]
    assert len(ledger) == 3


def test_no_receipt_without_a_deletion(ledger):
    mem, *_ = filled_memory(10, ledger=ledger)
    assert mem.delete([]) == 0
    with pytest.raises(KeyError):
        mem.delete([3, 99])
    with pytest.raises(ValueError, match="repeats"):
        mem.delete([3, 3])
    assert len(ledger) == 0 and len(mem) == 10


def test_request_id_without_a_ledger_is_refused():
    mem, *_ = filled_memory(10)
    with pytest.raises(ValueError, match="ledger"):
        mem.delete([1], request_id="r1")
    assert 1 in mem
    with pytest.raises(TypeError, match="ledger"):
        kmem.KeyMemory(4, 2, ledger="ledger.db")


def test_layer_forget_and_loaded_memory_record_receipts(ledger, tmp_path):
    mem, *_ = filled_memory(20, compact_threshold=None)
    mem.delete([0])
    mem.save(tmp_path / "m")
    back = kmem.KeyMemory.load(tmp_path / "m", ledger=ledger)
    layer = kmem.KeyMemoryAttention(16, back)
    assert layer.forget([5, 6], request_id="gdpr-17", reason="erasure request") == 2
    (receipt,) = ledger.receipts()
    assert (receipt.request_id, receipt.reason, receipt.ids) == ("gdpr-17", "erasure request", (5, 6))
    assert receipt.version_before == mem.version  # the version counter survived save/load


def _tamper(path, sql, *args):
    with sqlite3.connect(path) as conn:
        conn.execute(sql, args)


@pytest.mark.parametrize(
    ("sql", "words"),
    [
        ("UPDATE receipts SET reason = 'nothing' WHERE seq = 1", "edited"),
        ("UPDATE receipts SET ids = '[1]' WHERE seq = 1", "edited"),
        ("UPDATE receipts SET ids = 'not json' WHERE seq = 2", "edited"),
        ("UPDATE receipts SET time = '2020-01-01T00:00:00+00:00' WHERE seq = 3", "edited"),
        ("DELETE FROM receipts WHERE seq = 2", "missing"),
        ("DELETE FROM receipts WHERE seq = 1", "missing"),
        # Swap receipts 1 and 2 (through a free number): their content moves, their links break.
        ("UPDATE receipts SET seq = CASE seq WHEN 1 THEN 2 ELSE 1 END WHERE seq IN (1, 2)", "reordered"),
    ],
)
def test_verify_detects_edited_removed_and_reordered_receipts(tmp_path, sql, words):
    path = tmp_path / "ledger.db"
    with kmem.Ledger(path) as ledger:
        _three_receipts(ledger)
        assert ledger.verify().ok
    if "CASE" in sql:
        _tamper(path, "UPDATE receipts SET seq = seq + 100 WHERE seq IN (1, 2)")
        sql = sql.replace("seq IN (1, 2)", "seq IN (101, 102)").replace("WHEN 1", "WHEN 101")
    _tamper(path, sql)
    with kmem.Ledger(path) as ledger:
        result = ledger.verify()
    assert not result.ok
    assert any(words in p for p in result.problems), result.problems


@pytest.mark.parametrize(
    "sql",
    [
        "DROP TABLE receipts",
        "DELETE FROM receipts WHERE seq = 3",
        "DELETE FROM receipts WHERE seq >= 2",
        "DELETE FROM receipts",
        "DELETE FROM head",
    ],
)
def test_verify_detects_a_vanished_tail_without_a_kept_head(tmp_path, capsys, sql):
    path = tmp_path / "ledger.db"
    with kmem.Ledger(path) as ledger:
        _three_receipts(ledger)
    _tamper(path, sql)
    with kmem.Ledger(path) as ledger:
        result = ledger.verify()
    assert not result.ok
    assert any(words in p for p in result.problems for words in ("dropped", "removed", "missing")), (
        result.problems
    )
    assert cli.main(["ledger", "verify", str(path)]) == 1
    assert capsys.readouterr().out.startswith("FAILED")


def test_a_damaged_head_record_refuses_new_receipts(ledger):
    mem = _three_receipts(ledger)
    _tamper(ledger.path, "DELETE FROM head")
    with pytest.raises(ValueError, match="head record is missing"):
        mem.delete([3])
    assert 3 in mem and len(ledger) == 3


def test_verify_with_a_kept_head_detects_a_rewritten_head_record(ledger):
    _three_receipts(ledger)
    head = ledger.verify().head
    second = ledger.receipts()[1]
    _tamper(ledger.path, "DELETE FROM receipts WHERE seq = 3")
    _tamper(ledger.path, "UPDATE head SET seq = ?, hash = ?", second.seq, second.hash)
    assert ledger.verify().ok  # a consistent shorter chain...
    assert not ledger.verify(head=head).ok  # ...but not the one whose head was kept


def test_a_schema_1_ledger_verifies_with_a_note_then_keeps_its_head(tmp_path, capsys):
    """A ledger written before the head table: readable, its end unchecked (and said so),
    until its next receipt, from which on a removed tail is caught."""
    path = tmp_path / "old.db"
    with kmem.Ledger(path) as ledger:
        _three_receipts(ledger)
    _tamper(path, "DROP TABLE head")
    _tamper(path, "PRAGMA user_version = 1")
    assert cli.main(["ledger", "verify", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK: 3 receipt(s)") and "note: schema 1" in out and "cannot be detected" in out
    with kmem.Ledger(path) as ledger:
        with ledger.record(
            request_id="r4", ids=[9], version_before=9, version_after=10, rows_before=1, rows_after=0
        ):
            pass
        assert ledger.verify().ok and not ledger.verify().notes and len(ledger) == 4
    _tamper(path, "DELETE FROM receipts WHERE seq = 4")
    with kmem.Ledger(path, create=False) as ledger:
        assert not ledger.verify().ok


def test_failed_receipt_insert_leaves_the_memory_untouched(ledger):
    mem, *_ = filled_memory(20, compact_threshold=0.1, ledger=ledger)
    before = _memory_state(mem)
    _tamper(
        ledger.path,
        "CREATE TRIGGER no_receipts BEFORE INSERT ON receipts BEGIN SELECT RAISE(ABORT, 'disk says no'); END",
    )
    with pytest.raises(sqlite3.IntegrityError, match="disk says no"):
        mem.delete([3, 4])
    assert _same_state(before, _memory_state(mem)) and 3 in mem and len(ledger) == 0
    _tamper(ledger.path, "DROP TRIGGER no_receipts")
    assert mem.delete([3, 4]) == 2 and len(ledger) == 1 and ledger.verify().ok


def test_failed_commit_restores_the_deleted_rows(ledger):
    """COMMIT itself fails (a deferred foreign key, checked only at commit): the rows,
    already scrubbed by then, come back bit for bit and no receipt is visible."""
    mem, *_ = filled_memory(20, compact_threshold=None, ledger=ledger)
    before = _memory_state(mem)
    _tamper(
        ledger.path,
        "CREATE TABLE parent (id INTEGER PRIMARY KEY)",
    )
    _tamper(
        ledger.path, "CREATE TABLE child (pid INTEGER REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED)"
    )
    _tamper(
        ledger.path, "CREATE TRIGGER orphan AFTER INSERT ON receipts BEGIN INSERT INTO child VALUES (42); END"
    )
    ledger._conn.execute("PRAGMA foreign_keys = ON")
    with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
        mem.delete([5, 9], request_id="r")
    assert _same_state(before, _memory_state(mem)) and 5 in mem and 9 in mem
    with sqlite3.connect(ledger.path) as other:  # another reader sees no receipt either
        assert other.execute("SELECT COUNT(*) FROM receipts").fetchone()[0] == 0
    assert mem.search(mem.state()[1][5:6], 1)[1].item() == 5
    _tamper(ledger.path, "DROP TRIGGER orphan")
    assert mem.delete([5, 9]) == 2 and ledger.verify().ok


def test_failed_scrub_rolls_back_the_receipt(ledger, monkeypatch):
    mem, *_ = filled_memory(20, compact_threshold=None, ledger=ledger)
    before = _memory_state(mem)
    scrub = kmem.KeyMemory._scrub

    def scrub_then_fail(self, id_list):
        scrub(self, id_list)
        raise MemoryError("injected after the scrub")

    monkeypatch.setattr(kmem.KeyMemory, "_scrub", scrub_then_fail)
    with pytest.raises(MemoryError):
        mem.delete([2])
    assert _same_state(before, _memory_state(mem)) and len(ledger) == 0


def test_ledger_shared_by_threads_and_connections(tmp_path):
    """Two memories (threads) and a second connection (as another process would hold)
    append to one file: one unbroken chain, numbered 1..n."""
    path = tmp_path / "shared.db"
    first, second = kmem.Ledger(path), kmem.Ledger(path)
    mems = [filled_memory(200, compact_threshold=None, ledger=lg)[0] for lg in (first, first, second)]

    def forget(mem):
        for i in range(60):
            mem.delete([i])

    threads = [threading.Thread(target=forget, args=(m,)) for m in mems]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result = first.verify()
    assert result.ok and result.receipts == 180 == len(second)
    first.close()
    second.close()


def test_not_a_ledger(tmp_path):
    (tmp_path / "junk").write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(ValueError, match="not a kmem ledger"):
        kmem.Ledger(tmp_path / "junk")
    with pytest.raises(FileNotFoundError):
        kmem.Ledger(tmp_path / "missing.db", create=False)
    _tamper(tmp_path / "other.db", "CREATE TABLE t (x)")
    with pytest.raises(ValueError, match="schema"):
        kmem.Ledger(tmp_path / "other.db", create=False)
    with kmem.Ledger(tmp_path / "l.db") as ledger:
        record = ledger.record(
            request_id="", ids=[1], version_before=0, version_after=1, rows_before=1, rows_after=0
        )
        with pytest.raises(ValueError, match="request_id"), record:
            pass


def test_cli_show_export_verify(ledger, capsys, tmp_path):
    _three_receipts(ledger)
    path = ledger.path
    assert cli.main(["ledger", "show", path]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert (
        len(lines) == 3 and "request=r1" in lines[0] and "[1, 2]" in lines[0] and "'user asked'" in lines[0]
    )
    assert cli.main(["ledger", "show", path, "--id", "7"]) == 0
    assert capsys.readouterr().out.startswith("#2 ")
    out = tmp_path / "receipts.jsonl"
    assert cli.main(["ledger", "export", path, "-o", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["ids"] for r in rows] == [[1, 2], [7], [20]]
    assert rows == [r.to_json() for r in ledger.receipts()]
    assert cli.main(["ledger", "verify", path]) == 0
    assert "OK: 3 receipt(s)" in capsys.readouterr().out
    _tamper(path, "UPDATE receipts SET ids = '[2]' WHERE seq = 1")
    assert cli.main(["ledger", "verify", path]) == 1
    assert "receipt 1: hash does not match" in capsys.readouterr().out
    assert cli.main(["ledger", "verify", str(tmp_path / "missing.db")]) == 2
    assert "no ledger" in capsys.readouterr().err
