"""Resumable, shareable evaluation pieces: computed once, reused by a rerun, a stale key
never reused, a lock held by a live process awaited and a dead one's taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading

import pytest

from kmem.unlearn import demo
from kmem.unlearn.parts import Parts, Unit, digest


def _units(calls: list[str], version: int = 1) -> list[Unit]:
    def make(name, value, needs=()):
        def compute(got):
            calls.append(name)
            return value + sum(got.values())

        return Unit(name, key=lambda got: {"v": version, "got": got}, compute=compute, needs=needs)

    return [make("a", 1), make("b", 10, needs=("a",))]


def test_units_run_once_and_a_rerun_reads_them(tmp_path):
    calls: list[str] = []
    assert Parts(tmp_path, log=None).run(_units(calls)) == {"a": 1, "b": 11}
    assert Parts(tmp_path, log=None).run(_units(calls)) == {"a": 1, "b": 11}
    assert calls == ["a", "b"]
    assert not list(tmp_path.glob("*.lock")) and len(list(tmp_path.glob("*.json"))) == 2


def test_a_changed_key_is_computed_again(tmp_path):
    calls: list[str] = []
    Parts(tmp_path, log=None).run(_units(calls))
    Parts(tmp_path, log=None).run(_units(calls, version=2))
    assert calls == ["a", "b", "a", "b"]
    assert digest({"x": 1, "y": [1, 2]}) == digest({"y": [1, 2], "x": 1}) != digest({"x": 2, "y": [1, 2]})


def test_a_failed_unit_leaves_no_file_and_no_lock(tmp_path):
    def boom(_):
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        Parts(tmp_path, log=None).run([Unit("a", key=lambda _: {}, compute=boom)])
    assert list(tmp_path.iterdir()) == []


def test_bad_units_are_refused(tmp_path):
    a = Unit("a", key=lambda _: {}, compute=lambda _: 1)
    with pytest.raises(ValueError, match="duplicate"):
        Parts(tmp_path, log=None).run([a, a])
    with pytest.raises(ValueError, match="not units"):
        Parts(tmp_path, log=None).run([Unit("b", key=lambda _: {}, compute=lambda _: 1, needs=("z",))])


def test_a_live_lock_is_awaited(tmp_path):
    parts = Parts(tmp_path, poll=0.02, log=None)
    unit = Unit("a", key=lambda _: {}, compute=lambda _: pytest.fail("held by another process"))
    path = parts.path(unit, {})
    tmp_path.mkdir(exist_ok=True)
    lock = path.with_suffix(".lock")
    lock.write_text(f"{socket.gethostname()} {os.getpid()}")  # this process: alive

    def other_process_finishes():
        path.write_text(json.dumps(42))
        lock.unlink()

    timer = threading.Timer(0.2, other_process_finishes)
    timer.start()
    assert parts.run([unit]) == {"a": 42}
    timer.join()


def test_a_dead_process_lock_is_taken_over(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    parts = Parts(tmp_path, log=None)
    unit = Unit("a", key=lambda _: {}, compute=lambda _: 7)
    tmp_path.mkdir(exist_ok=True)
    parts.path(unit, {}).with_suffix(".lock").write_text(f"{socket.gethostname()} {dead.stdout.strip()}")
    assert parts.run([unit]) == {"a": 7}


def test_an_evaluation_rerun_resumes_from_its_parts(tmp_path, monkeypatch):
    args = dict(
        quick=True, out=tmp_path, families=("spm", "baseline"), requests=["10%"], methods=("GA",),
        limit=300, epochs=1, progress=False,
    )  # fmt: skip
    first = demo.run(**args)
    assert {p.name.split("-")[1] for p in (tmp_path / "parts").glob("eval-*.json")} == {"seed0"}

    def refuse(*_, **__):
        raise AssertionError("a finished part was recomputed")

    monkeypatch.setattr(demo, "evaluate", refuse)
    again = demo.run(**args)
    assert [r.to_json() for r in again.results] == [r.to_json() for r in first.results]
    # The families, run apart, merge into one result per request in the families' order.
    (r,) = again.results
    assert [row.family for row in r.rows][:1] == ["spm"] and r.rows[-1].family == "baseline"
    assert [e.family for e in r.exactness] == ["spm"]
