"""Exact mode: dense weights fitted on a core that is never forgotten, every other sample
only in memory -- so forgetting equals, bit for bit, a model really retrained without
the samples (not the same weights with a rebuilt memory)."""

from __future__ import annotations

import copy

import pytest
import torch
from _digits import digits
from safetensors.torch import load_file

from kmem.models import Samples, choose_core, load_checkpoint, predict_proba, save_checkpoint, train
from kmem.unlearn import demo
from kmem.unlearn.results import KMEM

FAMILIES = [
    ("spm", {"mode": "spm-r", "k": 32, "supports": 256, "batch_size": 64}),
    ("spm", {"mode": "spm-c", "supports": 256, "batch_size": 64}),
    ("munkey", {"layers": 1, "admit_steps": 3}),
]
IDS = ["spm-r", "spm-c", "munkey"]
CORE = 300  # the first 300 digits: the never-forgotten slice


def _train(name: str, cfg: dict, samples: Samples):
    train_set, _ = digits()
    model, _ = train(name, samples, num_classes=10, core=train_set[:CORE], epochs=2, progress=False, **cfg)
    return model


@pytest.fixture(scope="module", params=FAMILIES, ids=IDS)
def family(request):
    name, cfg = request.param
    train_set, _ = digits()
    return name, cfg, _train(name, cfg, train_set)


def _requests() -> dict[str, list[torch.Tensor]]:
    """Forget requests among the forgettable digits: random, a class, a stream of three."""
    train_set, _ = digits()
    rest = train_set[CORE:]
    gen = torch.Generator().manual_seed(7)
    shuffled = rest.ids[torch.randperm(len(rest), generator=gen)]
    return {
        "random": [shuffled[:120]],
        "class": [rest.ids[rest.labels == 3]],
        "stream": [shuffled[i * 40 : (i + 1) * 40] for i in range(3)],
    }


def _checkpoint(model, path) -> dict[str, torch.Tensor]:
    for mem in model.memories():
        mem.compact()
    for table in model.row_tables():
        table.compact()
    save_checkpoint(model, path)
    return load_file(str(path))


@pytest.mark.parametrize("kind", ["random", "class", "stream"])
def test_forgetting_is_bit_identical_to_retraining_without_the_samples(family, kind, tmp_path):
    name, cfg, full = family
    train_set, test = digits()
    model, gone = copy.deepcopy(full), torch.empty(0, dtype=torch.int64)
    before = predict_proba(model, test.inputs)
    for step, ids in enumerate(_requests()[kind]):
        assert model.forget(ids) == len(ids)
        gone = torch.cat([gone, ids])
        retrained = _train(name, cfg, train_set.without(gone))
        for inputs in (test.inputs, train_set.inputs):
            assert torch.equal(predict_proba(model, inputs), predict_proba(retrained, inputs)), step
    assert not torch.equal(predict_proba(model, test.inputs), before)  # forgetting did something
    mine, theirs = _checkpoint(model, tmp_path / "a"), _checkpoint(retrained, tmp_path / "b")
    assert mine.keys() == theirs.keys() and "core.ids" in mine
    for key in mine:
        assert torch.equal(mine[key], theirs[key]), key
    assert torch.equal(load_checkpoint(tmp_path / "a").core_ids, train_set.ids[:CORE].sort().values)


def test_dense_weights_never_see_a_forgettable_sample(family):
    """The weights depend on the core alone: changing every other sample's label changes
    no weight (rows aside)."""
    name, cfg, full = family
    train_set, _ = digits()
    relabelled = Samples(train_set.inputs, (train_set.labels + 1) % 10, train_set.ids)
    relabelled = Samples(
        torch.cat([train_set.inputs[:CORE], relabelled.inputs[CORE:]]),
        torch.cat([train_set.labels[:CORE], relabelled.labels[CORE:]]),
        train_set.ids,
    )
    other = _train(name, cfg, relabelled)
    rows = {f"tokens.{n}" for n in ("weight", "ids")}
    for (key, mine), theirs in zip(full.state_dict().items(), other.state_dict().values(), strict=True):
        if key not in rows:
            assert torch.equal(mine, theirs), key


def test_a_core_id_cannot_be_forgotten_and_nothing_changes(family):
    _, _, full = family
    train_set, test = digits()
    model = copy.deepcopy(full)
    before, rows = predict_proba(model, test.inputs), len(model.memories()[0])
    with pytest.raises(ValueError, match=r"1 id\(s\) of the core, e.g. \[0\]: .*; nothing was deleted"):
        model.forget(torch.cat([train_set.ids[CORE : CORE + 5], train_set.ids[:1]]))
    assert len(model.memories()[0]) == rows and torch.equal(predict_proba(model, test.inputs), before)


def test_core_samples_also_listed_in_train_count_once():
    train_set, _ = digits()
    name, cfg = FAMILIES[0]
    model, _ = train(
        name, train_set[:400], num_classes=10, core=train_set[:CORE], epochs=1, progress=False, **cfg
    )
    assert len(model.memories()[0]) == 400


@pytest.mark.parametrize(
    ("make_core", "error", "match"),
    [
        (lambda t: t[:0], ValueError, "core holds no samples"),
        (
            lambda t: Samples(t.inputs[:5], (t.labels[:5] + 1) % 10, t.ids[:5]),
            ValueError,
            "different samples",
        ),
        (lambda t: Samples(t.inputs[:5] + 1, t.labels[:5], t.ids[:5]), ValueError, "different samples"),
        (lambda t: Samples(t.inputs[:5, :7], t.labels[:5], t.ids[:5] + 10**6), ValueError, "core inputs"),
        (lambda t: t.inputs[:5], TypeError, "core must be kmem.models.Samples"),
    ],
)
def test_bad_core_is_refused(make_core, error, match):
    train_set, _ = digits()
    with pytest.raises(error, match=match):
        train("spm", train_set, num_classes=10, core=make_core(train_set), epochs=1, progress=False)


def test_a_model_without_memory_has_no_exact_mode():
    train_set, _ = digits()
    with pytest.raises(TypeError, match="core: exact mode needs a memory family"):
        train("baseline", train_set, num_classes=10, core=train_set[:CORE], epochs=1, progress=False)


def test_choose_core_is_one_fixed_draw_or_the_ids_given():
    train_set, _ = digits()
    core = choose_core(train_set, fraction=0.1)
    assert len(core) == round(0.1 * len(train_set)) and torch.equal(core.ids, core.ids.sort().values)
    assert torch.equal(choose_core(train_set, fraction=0.1).ids, core.ids)  # the same core every time
    assert choose_core(train_set, ids=[5, 3]).ids.tolist() == [3, 5]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fraction": 0.0}, r"core fraction must be in \(0, 1\)"),
        ({"fraction": 1.0}, r"core fraction must be in \(0, 1\)"),
        ({"fraction": float("nan")}, r"core fraction must be in \(0, 1\)"),
        ({"fraction": 1e-9}, "holds no sample"),
        ({"ids": []}, "holds no samples"),
        ({"ids": [3, 10**9]}, r"1 not in the training set, e.g. \[1000000000\]"),
        ({}, "exactly one"),
        ({"fraction": 0.1, "ids": [3]}, "exactly one"),
    ],
)
def test_choose_core_refuses_bad_arguments(kwargs, match):
    train_set, _ = digits()
    with pytest.raises(ValueError, match=match):
        choose_core(train_set, **kwargs)


def test_eval_reports_exact_mode_beside_the_default_and_checks_it_against_retraining(tmp_path):
    result = demo.run(
        quick=True, out=tmp_path, families=("spm", "munkey"), requests=["10%", "stream:2x2%"], limit=400,
        epochs=1, core_fraction=0.25, progress=False,
    )  # fmt: skip
    for r in result.results:
        exact = {e.family: e for e in r.exactness}
        assert set(exact) == {"spm", "munkey", "spm-exact", "munkey-exact"}
        assert exact["spm"].retrained_equal is None
        assert exact["spm-exact"].retrained_equal and exact["munkey-exact"].retrained_equal
        for family in ("spm-exact", "munkey-exact"):
            assert r.row(family, KMEM).scores.avg_gap == 0.0
    text = (tmp_path / "report.md").read_text()
    assert "SPM-style, exact mode" in text and "bit-identical to the model really retrained" in text
    assert "fitted on the core of 100 samples alone" in text


@pytest.mark.parametrize("fraction", [0.0, 1.5, float("nan")])
def test_eval_refuses_a_bad_core_fraction_and_writes_nothing(tmp_path, fraction):
    with pytest.raises(ValueError, match=r"--core-fraction must be in \(0, 1\)"):
        demo.run(quick=True, out=tmp_path / "out", families=("spm",), core_fraction=fraction, progress=False)
    assert not (tmp_path / "out").exists()
