"""The README's main job: `kmem demo` / `kmem eval` run the whole evaluation and write the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kmem import cli, demo
from kmem.unlearn.results import ORACLE, ORACLE_SEED


def test_demo_writes_the_report(tmp_path):
    result = demo.run(
        "digits",
        quick=True,
        out=tmp_path,
        epochs=1,
        limit=300,
        methods=("GA",),
        progress=False,
        command="kmem demo",
    )
    assert result.exact
    (r,) = result.results
    assert r.request == "random-10%" and r.forgotten == 30
    text = result.report.read_text()
    assert "Reproduce with: `kmem demo`" in text and "| MUNKEY-style | kmem forget |" in text
    assert "| baseline (parametric) | GA |" in text and "**yes**" in text
    assert {p.name for p in tmp_path.glob("*.png")} == {
        "digits-random-10-time.png",
        "digits-random-10-accuracy.png",
    }
    assert "memory after forget == memory of the retained ids alone: yes" in result.summary


def test_cli_eval(tmp_path, capsys):
    out = tmp_path / "report"
    argv = [
        "eval",
        "--model",
        "spm",
        "--request",
        "class:3",
        "--epochs",
        "1",
        "--out",
        str(out),
        "--no-progress",
        "--floor",
    ]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "digits, class-3" in printed and "SPM-style: Avg. Gap" in printed and f"report: {out}" in printed
    assert "two oracles' seeds apart" in printed
    assert (out / "report.md").exists() and (out / "results.json").exists()
    # --floor: the oracle's recipe with the next seed, scored against the oracle, untimed.
    (result,) = json.loads((out / "results.json").read_text())
    rows = {row["method"]: row["scores"] for row in result["rows"]}
    floor = rows[ORACLE_SEED]
    assert floor["seconds"] is None and floor["avg_gap"] > 0 and rows[ORACLE]["avg_gap"] == 0
    assert f"| SPM-style | {ORACLE_SEED} |" in (out / "report.md").read_text()


def test_cli_rejects_bad_request(tmp_path):
    with pytest.raises(ValueError, match="must look like"):
        cli.main(["eval", "--model", "spm", "--request", "half", "--out", str(tmp_path)])


@pytest.mark.parametrize(
    ("argv", "floor"),
    [(["demo"], True), (["demo", "--no-floor"], False), (["eval", "--model", "spm"], False)],
)
def test_demo_computes_the_floor_by_default(monkeypatch, argv, floor):
    """The demo's verdicts are judged against the floor: it is on unless --no-floor; eval's stays opt-in."""
    asked = {}

    def run(*args, **kwargs):
        asked.update(kwargs)
        return demo.DemoResult([], Path("report.md"), "")

    monkeypatch.setattr(demo, "run", run)
    assert cli.main(argv) == 0
    assert asked["floor"] is floor
