"""SPM-style models: the fusion layer, leave-batch-out, label permutation, forgetting,
exact SPM-C class means."""

from __future__ import annotations

import math

import pytest
import torch
from _digits import digits, forget_and_compare

from kmem.models import SPM, predict_proba, train
from kmem.models.spm import _TINY

SMALL = {"supports": 512, "batch_size": 64}


@pytest.fixture(scope="module", params=["spm-r", "spm-c"])
def model(request):
    return train(
        "spm", digits()[0], num_classes=10, epochs=2, progress=False, mode=request.param, k=32, **SMALL
    )[0]


def test_fusion_is_softmax_of_scaled_scores_times_onehot_labels():
    """SPM-R with k >= rows equals the fusion formula computed by hand in float64."""
    train_set, test = digits()
    train_set = train_set[:200]
    m = SPM(10, (1280,), k=256, key_dim=16).eval()
    m.end_training(train_set)  # fills the memory from the (untrained) weights
    with torch.no_grad():
        e_q, e_s = m.encoder(test.inputs[:20]).double(), m.encoder(train_set.inputs).double()
        scores = (e_q @ m.w_q.weight.double().T) @ (e_s @ m.w_s.weight.double().T).T / math.sqrt(16)
        want = torch.softmax(scores, 1) @ torch.nn.functional.one_hot(train_set.labels, 10).double()
    got = m(test.inputs[:20]).exp()
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)


def test_forget_equals_a_memory_that_never_held_the_rows(model):
    m, forget = forget_and_compare(model)
    # A forgotten sample can no longer be retrieved, even by its own key.
    mem = m.memories()[0]
    assert not any(int(i) in mem for i in forget)
    keys = model.memories()[0].get(forget[:20].tolist())[0]
    assert not torch.isin(mem.search(keys, 5)[1], forget).any()
    fingerprint = mem.fingerprint()
    with pytest.raises(KeyError):
        m.forget(forget[:1])  # already gone: nothing changes
    assert mem.fingerprint() == fingerprint


def test_spm_c_class_means_after_deletion_equal_means_from_scratch():
    train_set, test = digits()
    model = train("spm", train_set, num_classes=10, epochs=1, progress=False, mode="spm-c", **SMALL)[0]
    m = model.with_memories(model.memory_for(train_set))
    forget = train_set.ids[train_set.labels == 3][:40]
    m.forget(forget[:25])
    m.forget(forget[25:])
    scratch = model.with_memories(model.memory_for(train_set.without(forget)))
    assert torch.equal(m.class_means(), scratch.class_means())  # fixed-point sums: exact
    # ... and they are the means: float64 means of the remaining keys, to float32 rounding.
    keep = train_set.without(forget)
    keys = model.support_keys(keep.inputs).double()
    want = torch.stack([keys[keep.labels == c].mean(0) for c in range(10)]).float()
    torch.testing.assert_close(m.class_means(), want, atol=1e-6, rtol=1e-6)
    assert torch.equal(predict_proba(m, test.inputs), predict_proba(scratch, test.inputs))
    # Deleting every row of a class drops its prototype: it gets probability zero.
    m.forget(keep.ids[keep.labels == 3])
    assert predict_proba(m, test.inputs)[:, 3].max() < 1e-6


def test_leave_batch_out_at_prediction(model):
    """Passing the batch's ids equals predicting with a memory that lacks them."""
    train_set, _ = digits()
    batch = train_set[:64]
    without = model.with_memories(model.memory_for(train_set.without(batch.ids)))
    with torch.no_grad():
        got = model(batch.inputs, batch.ids)
        want = without(batch.inputs)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(got, model(batch.inputs).detach(), atol=1e-3)


@pytest.mark.parametrize("mode", ["spm-r", "spm-c"])
def test_leave_batch_out_in_training(mode):
    """With a support set no bigger than the batch, every support is in the batch and
    excluded: no class gets probability, whatever the weights."""
    train_set, _ = digits()
    m = SPM(10, (1280,), mode=mode, supports=32)
    m.begin_training(train_set, torch.Generator())
    batch = train_set[:32]
    loss = m.loss(batch, torch.Generator().manual_seed(0))
    assert float(loss.detach()) == pytest.approx(-math.log(_TINY))
    m.config["supports"] = 64  # now 32 others can vote
    assert float(m.loss(batch, torch.Generator().manual_seed(0)).detach()) < -math.log(_TINY) / 2


def test_support_sets_hold_the_batch_first_and_no_id_twice():
    train_set, _ = digits()
    m = SPM(10, (1280,), supports=300)
    m.begin_training(train_set, torch.Generator())
    batch = train_set[torch.randperm(len(train_set))[:100]]
    s = m._support_set(batch, torch.Generator().manual_seed(1))
    assert len(s) == 300 and torch.equal(s.ids[:100], batch.ids)
    assert len(set(s.ids.tolist())) == 300
    assert torch.equal(s.labels, train_set.labels[s.ids])  # digits train ids are rows


def test_label_permutation_leaves_the_loss_unchanged():
    """Attention over labels is equivariant to relabelling: permuting supports' labels and
    targets alike gives the same loss (the paper's per-batch permutation only stops a
    parametric part from keying on class identity)."""
    train_set, _ = digits()
    m = SPM(10, (1280,), supports=256, permute_labels=True)
    m.begin_training(train_set, torch.Generator())
    batch = train_set[:64]
    permuted = m.loss(batch, torch.Generator().manual_seed(5))
    m.config["permute_labels"] = False
    plain = m.loss(batch, torch.Generator().manual_seed(5))
    torch.testing.assert_close(permuted, plain)


def test_the_cnn_encoder_trains_on_images():
    train_set, test = digits("images")
    m, report = train(
        "spm", train_set[:512], num_classes=10, epochs=2, progress=False, encoder="cnn", k=32, **SMALL
    )
    assert report.losses[-1] < report.losses[0]
    assert m.memories()[0].key_dim == 128 and len(m.memories()[0]) == 512
    assert predict_proba(m, test.inputs).shape == (360, 10)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="mode must be one of"):
        SPM(10, (1280,), mode="spm-x")
    with pytest.raises(ValueError, match="encoder 'cnn' takes images"):
        SPM(10, (1280,), encoder="cnn")
    with pytest.raises(ValueError, match="ids must be int64"):
        SPM(10, (1280,))(torch.zeros(2, 1280), torch.tensor([1, 2, 3]))
