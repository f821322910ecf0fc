"""The main job of the README: `kmem demo` / `kmem eval` run the whole evaluation and write the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kmem import cli
from kmem.unlearn import demo
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
        "--seeds",
        "1",
        "--core-fraction",
        "0.3",
    ]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "digits, class-3" in printed and "SPM-style: Avg. Gap" in printed and f"report: {out}" in printed
    assert "two oracles' seeds apart" in printed
    assert (out / "report.md").exists() and (out / "results.json").exists()
    # --floor: the oracle's recipe with another seed, scored against the oracle, untimed.
    saved = json.loads((out / "results.json").read_text())
    rows = {row["method"]: row["scores"] for row in saved["rows"] if row["family"] == "spm"}
    floor = rows[ORACLE_SEED]
    assert floor["seconds"] is None and floor["avg_gap"] > 0 and rows[ORACLE]["avg_gap"] == 0
    assert f"| SPM-style | {ORACLE_SEED} |" in (out / "report.md").read_text()
    # Exact mode has no floor: it is judged bit for bit against its real retraining.
    exact = {row["method"] for row in saved["rows"] if row["family"] == "spm-exact"}
    assert ORACLE in exact and ORACLE_SEED not in exact
    assert "SPM-style, exact mode on class-3: forgot exactly -- bit-identical" in printed


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--request", "half"], "must look like"),
        (["--request", "150%"], "request '150%'"),
        (["--request", "class:12"], "request 'class:12': no sample has label 12"),
        (["--seeds", "0"], "seeds must be an int >= 1, got 0"),
        (["--seed", "-1"], "seed must be an int in"),
    ],
)
def test_cli_rejects_bad_arguments_and_writes_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "report"
    assert cli.main(["eval", "--model", "spm", "--no-progress", "--out", str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_cli_rejects_an_unknown_method(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["eval", "--model", "spm", "--methods", "NegGrad"])
    assert exit_.value.code == 2 and "invalid choice: 'NegGrad'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "floor", "seeds"),
    [
        (["demo"], True, 1),
        (["demo", "--no-floor"], False, 1),
        (["eval", "--model", "spm"], False, 3),
        (["eval", "--model", "spm", "--quick"], False, 1),
        (["eval", "--model", "spm", "--seeds", "5"], False, 5),
    ],
)
def test_demo_computes_the_floor_by_default(monkeypatch, argv, floor, seeds):
    """The demo's verdicts are judged against the floor: it is on unless --no-floor; eval's stays opt-in.
    eval runs 3 seeds unless --quick or --seeds says otherwise; the demo one."""
    asked = {}

    def run(*args, **kwargs):
        asked.update(kwargs)
        return demo.DemoResult([], Path("report.md"), "")

    monkeypatch.setattr(demo, "run", run)
    assert cli.main(argv) == 0
    assert asked["floor"] is floor and asked["seeds"] == seeds
    assert asked["core_fraction"] == (0.1 if argv[0] == "demo" else None)  # exact mode: on in the demo
    assert cli.main([*argv, "--core-fraction", "0.3"]) == 0 and asked["core_fraction"] == 0.3
