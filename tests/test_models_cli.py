"""kmem train and kmem forget, end to end on digits."""

from __future__ import annotations

import pytest
import torch

from kmem.cli import main
from kmem.ledger import Ledger
from kmem.models import load_checkpoint, save_checkpoint
from kmem.unlearn.demo import DATASET_CONFIGS


@pytest.fixture(autouse=True, scope="module")
def _private_cache(tmp_path_factory):
    """One private feature cache for the module: digits are encoded once, not per test."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KMEM_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def _train(tmp_path, capsys, *args):
    path = tmp_path / "model.kmodel"
    code = main(
        ["train", "--data", "digits", "--resolution", "16", "--epochs", "1", "--out", str(path), *args]
    )
    return code, path, capsys.readouterr()


def test_train_then_forget(tmp_path, capsys):
    code, path, out = _train(tmp_path, capsys, "--model", "spm", "--mode", "spm-c", "--set", "supports=256")
    assert code == 0, out.err
    assert "trained spm on digits/train (1437 samples, seed 0)" in out.out
    assert "test accuracy:" in out.out and f"checkpoint -> {path}" in out.out
    model = load_checkpoint(path)
    assert model.config["mode"] == "spm-c" and model.config["supports"] == 256
    assert len(model.memories()[0]) == 1437

    ledger = tmp_path / "ledger.db"
    args = [
        "forget",
        str(path),
        "--ids",
        "3,14,15",
        "--in-place",
        "--ledger",
        str(ledger),
        "--request-id",
        "t-1",
    ]
    assert main([*args, "--data", "digits", "--resolution", "16"]) == 0
    out = capsys.readouterr().out
    assert "forgot 3 samples" in out and "1434 rows left" in out and "test accuracy after" in out
    after = load_checkpoint(path)  # replaced in place
    assert not any(i in after.memories()[0] for i in (3, 14, 15))
    with Ledger(ledger, create=False) as led:
        (receipt,) = led.receipts(request_id="t-1")
        assert receipt.ids == (3, 14, 15)

    out2 = tmp_path / "less.kmodel"
    assert main(["forget", str(path), "--fraction", "0.1", "--out", str(out2)]) == 0
    assert len(load_checkpoint(out2).memories()[0]) == 1434 - round(0.1 * 1434)
    assert main(["forget", str(path), "--ids", "3", "--in-place"]) == 2  # already forgotten
    assert "not in the memory" in capsys.readouterr().err


def test_train_settings_and_the_baseline(tmp_path, capsys):
    code, path, out = _train(tmp_path, capsys, "--model", "baseline", "--set", "head=mlp", "--seed", "2")
    assert code == 0, out.err
    model = load_checkpoint(path)
    assert model.config["head"] == "mlp"
    assert main(["forget", str(path), "--ids", "1", "--in-place"]) == 2
    assert "cannot forget by id" in capsys.readouterr().err
    assert _train(tmp_path, capsys, "--model", "baseline", "--set", "depth=3")[0] == 2
    assert _train(tmp_path, capsys, "--model", "munkey", "--mode", "spm-c")[0] == 2
    with pytest.raises(SystemExit):
        main(["train", "--model", "baseline", "--set", "novalue"])


def test_a_missing_dataset_is_one_line_and_status_2(tmp_path, capsys):
    code = main(["train", "--model", "spm", "--data", "fashion-mnist", "--data-dir", str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("kmem: ") and "apt-get install dataset-fashion-mnist" in err
    assert "Traceback" not in err and err.count("\n") == 1
    assert main(["forget", str(tmp_path / "none.kmodel"), "--ids", "1", "--in-place"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_munkey_from_the_command_line(tmp_path, capsys):
    code, path, out = _train(tmp_path, capsys, "--model", "munkey", "--set", "layers=1")
    assert code == 0, out.err
    model = load_checkpoint(path)
    ids, _, values = model.memories()[0].state()
    assert torch.equal(values, model.tokens.get(ids))


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory, _private_cache):
    """An SPM checkpoint trained (briefly) on digits, shared by the tests that only read it."""
    path = tmp_path_factory.mktemp("model") / "spm.kmodel"
    args = ["--model", "spm", "--mode", "spm-c", "--set", "supports=256", "--out", str(path)]
    assert main(["train", "--data", "digits", "--resolution", "16", "--epochs", "1", *args]) == 0
    return path


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--fraction", "-0.5", "--in-place"], "--fraction must be in (0, 1], got -0.5"),
        (["--fraction", "1.5", "--in-place"], "--fraction must be in (0, 1], got 1.5"),
        (["--fraction", "0", "--in-place"], "--fraction must be in (0, 1], got 0.0"),
        (["--fraction", "nan", "--in-place"], "--fraction must be in (0, 1], got nan"),
        (
            ["--fraction", "0.0001", "--in-place"],
            "nothing to forget: --fraction 0.0001 of 1437 rows is 0 rows",
        ),
        (["--ids", "", "--in-place"], "nothing to forget: --ids names no sample id"),
        (["--ids", " , ", "--in-place"], "nothing to forget: --ids names no sample id"),
        (["--ids", "1,a", "--in-place"], "--ids: 'a' is not an integer sample id"),
        (["--ids", "3"], "say where the result goes: --out PATH, or --in-place"),
        (["--ids", "3", "--data", "fashion-mnist", "--in-place"], "was trained on digits"),
    ],
)
def test_forget_refuses_and_writes_nothing(digits_checkpoint, tmp_path, capsys, args, words):
    before = digits_checkpoint.read_bytes()
    assert main(["forget", str(digits_checkpoint), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kmem: error: ") and words in err and "Traceback" not in err, err
    assert digits_checkpoint.read_bytes() == before


@pytest.mark.parametrize(
    ("content", "words"),
    [(None, "cannot read it"), ("", "names no sample id"), ("1 2\nx 3\n", "'x' is not an integer sample id")],
)
def test_forget_refuses_a_bad_ids_file(digits_checkpoint, tmp_path, capsys, content, words):
    ids_file = tmp_path / "ids.txt"
    if content is not None:
        ids_file.write_text(content)
    out = tmp_path / "out.kmodel"
    assert main(["forget", str(digits_checkpoint), "--ids-file", str(ids_file), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kmem: error: ") and f"--ids-file {ids_file}" in err and words in err, err
    assert not out.exists()


def test_forget_keeps_the_dataset_the_checkpoint_records(digits_checkpoint, tmp_path):
    model = load_checkpoint(digits_checkpoint)
    assert model.dataset == "digits"
    out = tmp_path / "less.kmodel"
    args = ["--ids", "3", "--data", "digits", "--resolution", "16", "--out", str(out)]
    assert main(["forget", str(digits_checkpoint), *args]) == 0
    assert load_checkpoint(out).dataset == "digits"  # kept through forget


def test_forget_says_when_an_old_checkpoint_does_not_know_its_dataset(digits_checkpoint, tmp_path, capsys):
    old = tmp_path / "old.kmodel"
    model = load_checkpoint(digits_checkpoint)
    model.dataset = None  # as written before checkpoints kept it
    save_checkpoint(model, old)
    args = ["--ids", "3", "--data", "digits", "--resolution", "16", "--in-place"]
    assert main(["forget", str(old), *args]) == 0
    assert "does not say which dataset it was trained on" in capsys.readouterr().err


def _train_default_epochs(tmp_path, capsys, *args):
    path = tmp_path / "model.kmodel"
    assert main(["train", "--data", "digits", "--resolution", "16", "--out", str(path), *args]) == 0
    return load_checkpoint(path), capsys.readouterr().out


def test_train_uses_the_demo_settings_for_the_dataset_and_says_so(tmp_path, capsys):
    """Without --epochs, SPM on digits trains the demo's 20 epochs, not the family's 2
    (12 optimiser steps there: 56% test accuracy). Two batches an epoch keep it quick."""
    model, out = _train_default_epochs(tmp_path, capsys, "--model", "spm", "--set", "batch_size=1024")
    assert model.config["epochs"] == DATASET_CONFIGS["digits"]["spm"]["epochs"] == 20
    assert "epochs=20: what kmem demo trains spm with on digits (the family's default: epochs=2)" in out
    assert "hint: only 40 optimiser steps (20 epoch(s) x 2 batches)" in out and "try --epochs 50" in out
    model, out = _train_default_epochs(tmp_path, capsys, "--model", "spm", "--epochs", "1")
    assert model.config["epochs"] == 1 and "what kmem demo trains" not in out
    assert "hint: only 6 optimiser steps (1 epoch(s) x 6 batches)" in out


def test_train_gives_no_hint_with_enough_steps(tmp_path, capsys):
    model, out = _train_default_epochs(tmp_path, capsys, "--model", "baseline", "--set", "batch_size=8")
    assert model.config["epochs"] == 5 and "hint:" not in out and "what kmem demo trains" not in out


def test_train_in_exact_mode_then_forget_outside_the_core_only(tmp_path, capsys):
    code, path, out = _train(
        tmp_path, capsys, "--model", "spm", "--set", "supports=256", "--core-fraction", "0.2"
    )
    assert code == 0, out.err
    assert "exact mode: dense weights fitted on a core of 287 samples" in out.out
    model = load_checkpoint(path)
    core = model.core_ids.tolist()
    assert len(core) == 287 and len(model.memories()[0]) == 1437
    assert main(["forget", str(path), "--ids", str(core[0]), "--in-place"]) == 2
    assert "of the core" in capsys.readouterr().err
    assert main(["forget", str(path), "--fraction", "0.5", "--in-place"]) == 0
    after = load_checkpoint(path)
    assert len(after.memories()[0]) == 1437 - 575 and all(i in after.memories()[0] for i in core)
    ids_file = tmp_path / "core.txt"
    ids_file.write_text(" ".join(map(str, core[:50])))
    code, path, out = _train(tmp_path, capsys, "--model", "munkey", "--core-ids", str(ids_file))
    assert code == 0, out.err
    assert load_checkpoint(path).core_ids.tolist() == core[:50]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--core-fraction", "1.0"], "--core-fraction must be in (0, 1), got 1.0"),
        (["--core-fraction", "nan"], "--core-fraction must be in (0, 1)"),
        (["--core-ids", "/nonexistent/ids"], "--core-ids /nonexistent/ids: cannot read it"),
        (["--model", "baseline", "--core-fraction", "0.5"], "exact mode needs a memory family"),
    ],
)
def test_train_refuses_a_bad_core_and_writes_nothing(tmp_path, capsys, args, words):
    model = [] if "--model" in args else ["--model", "spm"]
    code, path, out = _train(tmp_path, capsys, *model, *args)
    assert code == 2 and words in out.err and not path.exists()
