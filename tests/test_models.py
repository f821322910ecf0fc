"""The model API every family shares: Samples, the training loop, predictions, checkpoints."""

from __future__ import annotations

import pytest
import torch
from _digits import RES, digits

import kmem
from kmem.models import (
    MODELS,
    Samples,
    accuracy,
    load_checkpoint,
    predict_proba,
    samples,
    save_checkpoint,
    train,
)

# Every family and mode, small enough to train in a second or two on digits.
FAMILIES = [
    ("baseline", {}),
    ("spm", {"mode": "spm-r", "k": 32, "supports": 512, "batch_size": 64}),
    ("spm", {"mode": "spm-c", "supports": 512, "batch_size": 64}),
    ("munkey", {"aggregation": "ensemble", "layers": 1}),
    ("munkey", {"aggregation": "single", "layers": 1}),
]
IDS = [f"{name}-{cfg.get('mode', cfg.get('aggregation', ''))}" for name, cfg in FAMILIES]


@pytest.fixture(scope="module", params=FAMILIES, ids=IDS)
def trained(request):
    name, cfg = request.param
    train_set, _ = digits()
    return train(name, train_set, num_classes=10, epochs=3, progress=False, **cfg)


# ----------------------------------------------------------------- Samples
def test_samples_index_and_without_keep_ids():
    s = Samples(
        torch.arange(12.0).reshape(6, 2), torch.tensor([0, 1, 0, 1, 0, 1]), torch.tensor([9, 3, 7, 1, 5, 8])
    )
    assert len(s) == 6
    assert s[1:3].ids.tolist() == [3, 7]
    assert s[torch.tensor([4, 0])].ids.tolist() == [5, 9]
    assert s[s.labels == 1].ids.tolist() == [3, 1, 8]
    assert s[2].ids.tolist() == [7] and s[2].inputs.shape == (1, 2)
    kept = s.without(torch.tensor([7, 8, 100]))  # unknown ids are ignored
    assert kept.ids.tolist() == [9, 3, 1, 5]
    assert torch.equal(kept.inputs, s.inputs[[0, 1, 3, 4]])
    assert s.without([]).ids.tolist() == s.ids.tolist()


def test_samples_refuse_bad_fields():
    with pytest.raises(ValueError, match="inputs must be float32"):
        Samples(torch.zeros(3, 2, dtype=torch.float64), torch.zeros(3, dtype=torch.int64), torch.arange(3))
    with pytest.raises(ValueError, match="labels must be int64 \\[3\\]"):
        Samples(torch.zeros(3, 2), torch.zeros(3, dtype=torch.int32), torch.arange(3))
    with pytest.raises(ValueError, match="ids must be int64 \\[3\\]"):
        Samples(torch.zeros(3, 2), torch.zeros(3, dtype=torch.int64), torch.arange(4))


def test_samples_of_a_split_are_its_cached_features_or_images(tmp_path, monkeypatch):
    monkeypatch.setenv("KMEM_CACHE", str(tmp_path))
    split = kmem.load_dataset("digits").train[:20]
    s = samples(split, resolution=RES)
    assert torch.equal(s.inputs, kmem.encode(split, RES)) and s.inputs.shape == (20, 1280)
    assert torch.equal(s.ids, split.ids) and torch.equal(s.labels, split.labels)
    assert torch.equal(samples(split, "images").inputs, split.images)
    with pytest.raises(ValueError, match="inputs must be one of"):
        samples(split, "pixels")


# -------------------------------------------------------------- training
def test_every_family_trains_loss_falls_and_it_classifies(trained):
    model, report = trained
    assert report.losses[-1] < 0.7 * report.losses[0], report.losses
    assert report.seconds > 0 and report.config == model.config and report.config["epochs"] == 3
    _, test = digits()
    assert accuracy(model, test) > 0.7
    assert not model.training


def test_predict_proba_is_a_distribution_and_leaves_the_mode(trained):
    model, _ = trained
    _, test = digits()
    model.train()
    p = predict_proba(model, test.inputs[:50], batch_size=16)
    assert model.training
    model.eval()
    assert p.shape == (50, 10) and p.dtype == torch.float32 and not p.requires_grad
    torch.testing.assert_close(p.sum(1), torch.ones(50))
    # Batching does not change a prediction.
    torch.testing.assert_close(p, predict_proba(model, test.inputs[:50], batch_size=1024))


@pytest.mark.parametrize("name", ["baseline", "spm", "munkey"])
def test_training_is_seeded_and_leaves_the_global_rng(name):
    train_set = digits()[0][:300]
    state = torch.get_rng_state()
    kw = {"layers": 1} if name == "munkey" else {}
    a, _ = train(name, train_set, num_classes=10, epochs=1, seed=3, progress=False, **kw)
    assert torch.equal(torch.get_rng_state(), state)
    b, _ = train(name, train_set, num_classes=10, epochs=1, seed=3, progress=False, **kw)
    c, _ = train(name, train_set, num_classes=10, epochs=1, seed=4, progress=False, **kw)
    for (ka, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), ka
    assert any(
        not torch.equal(va, vc)
        for va, vc in zip(a.state_dict().values(), c.state_dict().values(), strict=True)
    )
    assert [m.fingerprint() for m in a.memories()] == [m.fingerprint() for m in b.memories()]


def test_training_refuses_bad_arguments():
    train_set = digits()[0][:50]
    with pytest.raises(ValueError, match="model must be one of"):
        train("resnet", train_set, num_classes=10)
    with pytest.raises(TypeError, match="has no setting"):
        train("baseline", train_set, num_classes=10, depth=3)
    with pytest.raises(ValueError, match="labels must be in"):
        train("baseline", train_set, num_classes=5)
    with pytest.raises(ValueError, match="no samples"):
        train("baseline", train_set[:0], num_classes=10)
    assert MODELS == ("munkey", "spm", "baseline")


# ------------------------------------------------------------ checkpoints
def test_checkpoints_round_trip_exactly(trained, tmp_path):
    model, _ = trained
    _, test = digits()
    path = tmp_path / "model.kmodel"
    save_checkpoint(model, path)
    back = load_checkpoint(path)
    assert type(back) is type(model) and back.config == model.config and not back.training
    for (k, v), w in zip(model.state_dict().items(), back.state_dict().values(), strict=True):
        assert torch.equal(v, w), k
    assert [m.fingerprint() for m in back.memories()] == [m.fingerprint() for m in model.memories()]
    assert [m.version for m in back.memories()] == [m.version for m in model.memories()]
    assert torch.equal(predict_proba(back, test.inputs), predict_proba(model, test.inputs))


@pytest.mark.parametrize(("name", "cfg"), [("spm", {"supports": 256}), ("munkey", {"layers": 1})])
def test_checkpoint_of_a_model_that_forgot_holds_no_forgotten_row(tmp_path, name, cfg):
    train_set, test = digits()
    train_set = train_set[:400]
    model, _ = train(name, train_set, num_classes=10, epochs=1, progress=False, **cfg)
    gone = train_set.ids[:10]
    model.forget(gone)
    save_checkpoint(model, tmp_path / "m.kmodel")
    back = load_checkpoint(tmp_path / "m.kmodel")
    assert len(back.memories()[0]) == len(train_set) - 10
    assert not any(int(i) in back.memories()[0] for i in gone)
    if name == "munkey":  # the token table keeps zeroed rows for the gone ids, no id
        assert not any(int(i) in back.tokens for i in gone) and len(back.tokens) == len(train_set) - 10
        assert torch.equal(back.tokens.weight[back.tokens.ids < 0], torch.zeros(10, 128))
    assert torch.equal(predict_proba(back, test.inputs), predict_proba(model, test.inputs))


def test_the_models_are_part_of_kmem():
    assert kmem.models.train is train and kmem.models.MODELS == MODELS


def test_bad_checkpoints_are_refused(tmp_path):
    model, _ = train("baseline", digits()[0][:50], num_classes=10, epochs=1, progress=False)
    path = tmp_path / "m.kmodel"
    save_checkpoint(model, path)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nothing")
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # a flipped bit in the last tensor
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        load_checkpoint(path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"not a (readable )?kmem snapshot"):
        load_checkpoint(path)
    mem = kmem.KeyMemory(4, 2)
    mem.save(tmp_path / "mem.kmem")  # a memory snapshot is not a model
    with pytest.raises(ValueError, match=r"not a (readable )?kmem snapshot"):
        load_checkpoint(tmp_path / "mem.kmem")


# ------------------------------------------------------------- baseline
def test_the_baseline_has_no_memory_and_cannot_forget_by_deletion():
    model, _ = train("baseline", digits()[0][:50], num_classes=10, epochs=1, progress=False, head="mlp")
    assert model.memories() == [] and model.memory_for(digits()[0]) == []
    with pytest.raises(TypeError, match="cannot forget by deleting rows"):
        model.forget([1, 2])


def test_key_memory_get_returns_rows_by_id_in_the_order_asked():
    """KeyMemory.get, added for the models (SPM-C's O(d) deletion reads the row it removes)."""
    mem = kmem.KeyMemory(3, num_classes=4)
    keys = torch.arange(12.0).reshape(4, 3)
    mem.add(torch.tensor([7, 5, 9, 2]), keys, torch.tensor([0, 1, 2, 3]))
    got_keys, got_labels = mem.get([9, 7])
    assert torch.equal(got_keys, keys[[2, 0]]) and got_labels.tolist() == [2, 0]
    mem.delete([9])
    with pytest.raises(KeyError, match="not in the memory"):
        mem.get([7, 9])
