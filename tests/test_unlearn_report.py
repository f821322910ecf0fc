"""The report writer: Markdown table, plots, JSON, terminal summary."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from kmem.unlearn.metrics import Scores
from kmem.unlearn.report import explanations, speedup, summary, table, verdicts, write_report
from kmem.unlearn.results import KMEM, ORACLE, ORACLE_SEED, ORIGINAL, Exactness, MethodResult, RequestResult


def s(ua, mia, seconds=None, gap=None):
    return Scores(
        ua=ua,
        ra=99.0,
        ta=90.0,
        mia=mia,
        mia_auc=51.0,
        seconds=seconds,
        avg_gap=gap,
        hard_gap=gap,
        soft_gap=gap,
    )


def _result() -> RequestResult:
    return RequestResult(
        dataset="digits",
        request="random-10%",
        forgotten=144,
        retained=1293,
        test=360,
        rows=[
            MethodResult("munkey", ORIGINAL, s(0.0, 2.0, gap=3.0)),
            MethodResult("munkey", ORACLE, s(9.0, 12.0, gap=0.0)),
            MethodResult("munkey", KMEM, s(8.5, 11.0, seconds=0.002, gap=0.4)),
            MethodResult("baseline", ORACLE, s(9.0, 12.0, gap=0.0)),
            MethodResult("baseline", "FT", s(3.0, 5.0, seconds=1.5, gap=3.25)),
            MethodResult("baseline", "GA", s(30.0, 40.0, seconds=0.5, gap=12.0)),
        ],
        retrain_seconds={"munkey": 40.0, "baseline": 6.0},
        exactness=[Exactness("munkey", 144, True, 0, True, "ab" * 32, 0.001, "the classifier head")],
        notes=["a tiny run"],
    )


def test_table_and_speedup():
    r = _result()
    assert speedup(r.rows[2], r) == 40.0 / 0.002
    assert speedup(r.rows[1], r) is None and speedup(r.rows[0], r) is None
    lines = table(r).splitlines()
    assert len(lines) == 2 + len(r.rows)
    assert "| MUNKEY-style | kmem forget | 8.50 | 99.00 | 90.00 | 11.00 | 51.00 | 0.40 |" in lines[4]
    assert lines[4].endswith("| 2 ms | 20,000x |")
    assert "| 40 s | - |" in lines[3]  # the oracle's time is its retraining


def test_write_report(tmp_path):
    r = _result()
    path = write_report([r], tmp_path / "out", command="kmem demo --quick", setup=["seed 0"])
    text = path.read_text()
    assert "Reproduce with: `kmem demo --quick`" in text and "- seed 0" in text
    assert "(fingerprint `abababababababab…`): **yes**" in text
    assert "Avg. Gap 0.40 (best post-hoc: FT 3.25); MIA-Eff. 11.00 vs the oracle's 12.00" in text
    assert "20,000x faster than retraining" in text and "_a tiny run_" in text
    assert "What forgetting guarantees here, and what it does not" in text
    for png in ("digits-random-10-time.png", "digits-random-10-accuracy.png"):
        assert (tmp_path / "out" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in text
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert (
        saved["rows"][2]["scores"]["avg_gap"] == 0.4
        and saved["requests"][0]["exactness"][0]["fingerprints_equal"]
    )


def test_summary_says_whether_exact():
    r = _result()
    text = summary([r])
    assert "digits, random-10% (144 forgotten, 1,293 kept):" in text
    assert "munkey: memory after forget == memory of the retained ids alone: yes" in text
    r.exactness[0] = Exactness("munkey", 144, False, 0, True, "00" * 32, 0.0, "the head")
    assert "retained ids alone: NO" in summary([r])


def _with_floor(gap: float, ua: float = 9.0) -> RequestResult:
    """The result with munkey's floor: another seed's oracle, ``gap`` from the oracle."""
    r = _result()
    r.rows.insert(2, MethodResult("munkey", ORACLE_SEED, s(ua, 12.0, gap=gap)))
    return r


def test_verdict_forgot_opens_the_report(tmp_path):
    text = write_report([_with_floor(0.2)], tmp_path, command="kmem demo", setup=["seed 0"]).read_text()
    line = (
        "- MUNKEY-style on random-10%: forgot -- Avg. Gap 0.40 to its oracle, within the floor's 0.20 + 0.3; "
        "beats the best post-hoc baseline (FT, 3.25); 20,000x faster than retraining"
    )
    assert line in text
    # Right after the title and the reproduce line, before the set-up and the tables.
    assert text.index("Reproduce with") < text.index("## Verdict") < text.index(line) < text.index("- seed 0")
    assert "Avg. Gap + 0.3" in text and "evidence about the memory, not a verdict on forgetting" in text
    assert summary([_with_floor(0.2)]).splitlines()[1] == "  " + line[2:]


def test_verdict_did_not_forget():
    r = _with_floor(0.05)
    r.rows[-2] = MethodResult("baseline", "FT", s(3.0, 5.0, seconds=1.5, gap=0.3))
    first = summary([r]).splitlines()[1]
    assert first.startswith(
        "  MUNKEY-style on random-10%: did not forget -- Avg. Gap 0.40 to its oracle, above"
    )
    assert "does not beat the best post-hoc baseline (FT, 0.30)" in first


def test_verdict_without_floor_cannot_judge(tmp_path):
    text = write_report([_result()], tmp_path).read_text()
    assert "MUNKEY-style on random-10%: cannot judge -- no floor was computed (rerun with --floor)" in text
    assert "forgot --" not in text and "did not forget" not in text


def test_far_metric_explained_under_its_table(tmp_path):
    r = _with_floor(0.2)
    kmem = r.row("munkey", KMEM)
    r.rows[r.rows.index(kmem)] = replace(kmem, scores=replace(kmem.scores, ua=2.0))
    (line,) = explanations(r)
    assert line == (
        "MUNKEY-style on random-10%: UA 2.00 against the oracle's 9.00 -- the forgotten samples are still "
        "classified right more often than by a model that never saw them: they are still recognised. "
        "Deleting the rows leaves the trained weights as they were: the classifier head."
    )
    text = write_report([r], tmp_path).read_text()
    assert (
        text.index("| MUNKEY-style | kmem forget |")
        < text.index(line)
        < text.index("Exactness of the memory")
    )
    # 7 points off, but two oracles are 3 apart on UA: within 3x the floor's, not far.
    r.rows[2] = MethodResult("munkey", ORACLE_SEED, s(6.0, 12.0, gap=0.2))
    assert explanations(r) == []


@pytest.mark.parametrize("identical", [True, False])
def test_exact_mode_is_judged_bit_for_bit_not_by_a_floor(identical):
    """An exact family has no floor (no distance between oracles judges bit-identity):
    its verdict is whether it equals its real retraining."""
    r = _result()
    r.rows = [MethodResult("munkey-exact", m.method, m.scores) for m in r.rows if m.family == "munkey"]
    r.retrain_seconds["munkey-exact"] = 40.0
    e = Exactness("munkey-exact", 144, True, 0, True, "ab" * 32, 0.001, "the head", retrained_equal=identical)
    r.exactness = [e]
    line = verdicts([r])[0]
    want = "forgot exactly -- bit-identical" if identical else "did NOT forget exactly"
    assert want in line and "floor" not in line and "faster than retraining" in line
