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


def test_an_exact_family_runs_one_piece_per_request_and_trains_its_original_once(tmp_path, monkeypatch):
    """Exact-mode pieces are one request each (MUNKEY-exact's would run for hours); the
    original model is trained once, kept as a checkpoint, and read by the other pieces --
    giving the results one piece of all requests gives."""
    from kmem.unlearn import evaluate as evaluation

    trained = []
    train = evaluation.Setup.train

    def counting(self, family, data, seed=None, core=None):
        if len(data) == 300:  # the original, on all 300 training samples
            trained.append(family)
        return train(self, family, data, seed=seed, core=core)

    monkeypatch.setattr(evaluation.Setup, "train", counting)
    args = dict(
        quick=True, families=("spm",), requests=["10%", "class:1"], core_fraction=0.3, limit=300, epochs=1,
        progress=False,
    )  # fmt: skip
    split = demo.run(out=tmp_path / "a", **args)
    pieces = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "a" / "parts").glob("eval-*-exact-*.json"))
    assert pieces == ["eval-seed0-spm-exact-10-", "eval-seed0-spm-exact-class-1"]
    assert len(list((tmp_path / "a" / "originals").glob("spm-exact-*.kmem"))) == 1
    assert trained.count("spm-exact") == 1 and trained.count("spm") == 1
    # The same requests evaluated together, the original trained in the same call.
    from kmem.datasets.splits import load_dataset
    from kmem.models.samples import samples
    from kmem.unlearn.requests import parse_request

    data = load_dataset("digits")
    train_set, test_set = samples(data.train)[:300], samples(data.test)
    asked = [parse_request(spec, train_set.ids, train_set.labels, 0) for spec in args["requests"]]
    setup = evaluation.Setup(
        num_classes=10,
        epochs=1,
        methods=(),
        max_retain=demo.QUICK.max_retain,
        core_fraction=0.3,
        progress=False,
    )
    together = evaluation.evaluate("digits", train_set, test_set, asked, setup, ["spm-exact"])
    for mine, theirs in zip([r for r in split.results], together, strict=True):
        rows = {(m.family, m.method): m.scores for m in mine.rows if m.family == "spm-exact"}
        for m in theirs.rows:
            want, got = m.scores.as_dict(), rows[(m.family, m.method)].as_dict()
            assert {k: v for k, v in got.items() if k != "seconds"} == {
                k: v for k, v in want.items() if k != "seconds"
            }
