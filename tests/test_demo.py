"""The README's main job runs and proves exact forgetting."""

from __future__ import annotations

import pytest

from kmem import cli, demo


def test_demo_forgets_exactly():
    result = demo.run(forget_fraction=0.2, seed=1)
    assert result.forgotten == int(0.2 * result.train_rows)
    assert result.same_fingerprint and result.same_predictions and result.forgotten_retrieved == 0
    assert result.accuracy_before > 0.9 and result.accuracy_after > 0.9
    assert "identical" in result.summary()


def test_cli_demo(capsys):
    assert cli.main(["demo", "--forget-fraction", "0.05"]) == 0
    assert "accuracy after forgetting" in capsys.readouterr().out


def test_cli_rejects_bad_fraction():
    with pytest.raises(ValueError, match="forget_fraction"):
        cli.main(["demo", "--forget-fraction", "1.5"])
