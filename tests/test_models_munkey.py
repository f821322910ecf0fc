"""MUNKEY-style models and their learnable exemplar tokens."""

from __future__ import annotations

import math

import pytest
import torch
from _digits import digits, forget_and_compare

from kmem.models import ExemplarTokens, Munkey, train

SMALL = {"layers": 1, "ff": 128}


@pytest.fixture(scope="module", params=["ensemble", "single"])
def model(request):
    return train(
        "munkey", digits()[0], num_classes=10, epochs=2, progress=False, aggregation=request.param, **SMALL
    )[0]


# -------------------------------------------------------------- the token table
def test_only_retrieved_rows_get_gradient_and_move():
    table = ExemplarTokens(4, lr=0.1)
    table.add(torch.tensor([10, 20, 30, 40]), torch.randn(4, 4))
    before = table.weight.detach().clone()
    out = table(torch.tensor([[30, -1], [10, 30]]))
    assert out.shape == (2, 2, 4) and torch.equal(out[0, 1], torch.zeros(4))  # -1: no row
    out.sum().backward()
    assert table.weight.grad.is_sparse
    assert sorted(table.weight.grad.coalesce().indices()[0].tolist()) == [0, 2]
    table.step()
    moved = (table.weight.detach() != before).any(1)
    assert moved.tolist() == [True, False, True, False]
    assert table.steps.tolist() == [1, 0, 1, 0] and table.weight.grad is None
    # Adam's first step moves every coordinate by lr (gradients here are all positive).
    torch.testing.assert_close(before[0] - table.weight.detach()[0], torch.full((4,), 0.1))


def _train_steps(table: ExemplarTokens, grads: dict[int, torch.Tensor]) -> None:
    ids = torch.tensor(list(grads))
    (table(ids) * torch.stack(list(grads.values()))).sum().backward()
    table.step()


def test_optimiser_state_follows_rows_across_growth_deletion_and_compaction():
    """A table that grows, loses rows and compacts mid-training ends, for every surviving
    id, with the same token and optimiser state as a table that only ever held the
    survivors and saw the same gradients."""
    torch.manual_seed(0)
    init = torch.randn(8, 3)
    g = {i: torch.randn(3) for i in range(8)}
    a = ExemplarTokens(3, compact_threshold=0.25)
    a.add(torch.arange(5), init[:5])
    _train_steps(a, {i: g[i] for i in (0, 1, 3, 4)})
    a.add(torch.arange(5, 8), init[5:])  # growth
    _train_steps(a, {i: g[i] for i in (0, 3, 5, 7)})
    a.delete([1, 6])  # 2 of 8 dead: below the threshold, no compaction yet
    assert a.ids.tolist() == [0, -1, 2, 3, 4, 5, -1, 7]
    assert torch.equal(a.weight.detach()[1], torch.zeros(3)) and a.steps[1] == 0  # scrubbed with its state
    a.delete([2])  # 3 of 8 dead: compacts
    assert a.ids.tolist() == [0, 3, 4, 5, 7] and len(a) == 5
    _train_steps(a, {i: g[i] for i in (0, 4, 7)})

    b = ExemplarTokens(3)
    keep = [0, 3, 4, 5, 7]
    b.add(torch.tensor(keep), init[keep])
    _train_steps(b, {i: g[i] for i in (0, 3, 4)})
    _train_steps(b, {i: g[i] for i in (0, 3, 5, 7)})
    _train_steps(b, {i: g[i] for i in (0, 4, 7)})
    for name in ("weight", "exp_avg", "exp_avg_sq", "steps", "ids"):
        assert torch.equal(getattr(a, name).detach(), getattr(b, name).detach()), name
    assert torch.equal(a.get([7, 0]), b.get([7, 0]))


def test_released_state_leaves_deletion_to_the_rows_and_restarts_at_zero():
    torch.manual_seed(0)
    a = ExemplarTokens(3)
    a.add(torch.arange(4), torch.randn(4, 3))
    _train_steps(a, {i: torch.randn(3) for i in range(4)})
    with_state = a.fingerprint()
    a.release_state()
    assert a.exp_avg is None and a.fingerprint() != with_state  # the state is gone, not hidden
    a.delete([1])
    assert a.ids.tolist() == [0, -1, 2, 3] and torch.equal(a.weight.detach()[1], torch.zeros(3))
    a.add(torch.tensor([9]), torch.ones(1, 3))  # grows without state
    assert a.exp_avg is None and len(a) == 4
    _train_steps(a, {0: torch.ones(3)})  # restarts at zero, like a loaded checkpoint
    assert a.steps.tolist() == [1, 0, 0, 0, 0] and a.exp_avg.shape == (5, 3)


def test_trained_model_keeps_no_optimiser_state(model):
    assert model.tokens.exp_avg is None and model.tokens.steps is None


def test_token_table_refuses_bad_ids():
    t = ExemplarTokens(2)
    t.add(torch.tensor([1, 2]), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="new, distinct"):
        t.add(torch.tensor([2]), torch.zeros(1, 2))
    with pytest.raises(KeyError):
        t.delete([1, 5])
    with pytest.raises(ValueError, match="repeat"):
        t.delete([1, 1])
    assert len(t) == 2  # nothing deleted
    with pytest.raises(KeyError, match="no exemplar token"):
        t(torch.tensor([9]))


# -------------------------------------------------------------------- the model
def test_forget_equals_a_memory_that_never_held_the_rows(model):
    m, forget = forget_and_compare(model)
    # Gone from the memory, unreachable by its own key, and its token is gone too.
    mem = m.memories()[0]
    assert not any(int(i) in mem or int(i) in m.tokens for i in forget)
    assert not torch.isin(m.retrieve(digits()[0].inputs[forget]), forget).any()


def test_memory_values_are_the_trained_tokens(model):
    train_set, _ = digits()
    ids, keys, values = model.memories()[0].state()
    assert torch.equal(ids, train_set.ids)
    assert torch.equal(values, model.tokens.get(ids))
    assert torch.equal(keys, Munkey.keys(train_set.inputs))


def test_leave_batch_out_in_training_is_the_search_that_excludes_the_batch():
    """The precomputed neighbour lists, minus the batch, give exactly what a search
    excluding the batch gives -- including batches that use up a list's margin."""
    train_set, _ = digits()
    m = Munkey(10, (1280,), **SMALL)
    m.begin_training(train_set, torch.Generator().manual_seed(0))
    for batch in (train_set[torch.randperm(len(train_set))[:256]], train_set[:1437:3]):
        got = m.retrieve(batch.inputs, batch.ids)
        exclude = batch.ids.expand(len(batch), -1).contiguous()
        want = m.memory.search(Munkey.keys(batch.inputs), 4, exclude_ids=exclude)[1]
        assert torch.equal(got, want)
        assert not torch.isin(got, batch.ids).any()
    # A batch holding a sample's whole neighbour list: the fallback search answers.
    first = m._neighbours[1][0]
    batch = train_set[torch.cat([torch.tensor([0]), first])]
    exclude = batch.ids.expand(len(batch), -1).contiguous()
    want = m.memory.search(Munkey.keys(batch.inputs), 4, exclude_ids=exclude)[1]
    assert torch.equal(m.retrieve(batch.inputs, batch.ids), want)


def test_pathway_dropout_replaces_every_retrieved_token_by_the_null_token():
    train_set, _ = digits()
    m = Munkey(10, (1280,), pathway_dropout=1.0, dropout=0.0, **SMALL)
    m.begin_training(train_set, torch.Generator().manual_seed(0))
    batch = train_set[:16]
    m.train()
    dropped = m(batch.inputs, batch.ids)
    m.tokens.weight.data.normal_()  # other tokens: no effect when every one is dropped
    torch.testing.assert_close(m(batch.inputs, batch.ids), dropped)
    m.eval()  # no pathway dropout at test time: the tokens matter
    assert not torch.allclose(m(batch.inputs, batch.ids), dropped)


def test_ensemble_is_the_mean_of_single_token_passes():
    train_set, test = digits()
    m = Munkey(10, (1280,), aggregation="ensemble", **SMALL).eval()
    m.begin_training(train_set[:300], torch.Generator().manual_seed(0))
    m.eval()
    x = test.inputs[:8]
    found = m.retrieve(x)
    with torch.no_grad():
        probs = []
        for j in range(4):
            tok = m.tokens(found[:, j : j + 1]) + m.rank_pos[j]
            img = m.image(x).reshape(8, -1, 128) + m.image_pos
            seq = torch.cat([m.cls.expand(8, 1, 128), img, tok], dim=1)
            probs.append(torch.softmax(m._classify(seq), -1))
        want = torch.stack(probs).mean(0).log()
        torch.testing.assert_close(m(x), want, atol=1e-5, rtol=1e-5)
    assert math.isclose(float(m(x).detach().exp().sum(1).mean()), 1.0, rel_tol=1e-5)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="aggregation must be one of"):
        Munkey(10, (1280,), aggregation="vote")
    with pytest.raises(ValueError, match="frozen features"):
        Munkey(10, (1, 8, 8))


def test_retrieve_self_trains_on_each_samples_own_top_k():
    train_set, _ = digits()
    m = Munkey(10, (1280,), retrieve_self=True, **SMALL)
    m.begin_training(train_set, torch.Generator().manual_seed(0))
    batch = train_set[torch.randperm(len(train_set))[:64]]
    want = m.memory.search(Munkey.keys(batch.inputs), 4)[1]
    assert torch.equal(m._lists(batch.ids)[:, :4], want)
    assert (want[:, 0] == batch.ids).float().mean() > 0.9  # its own row first (ties aside)
    # Leave-batch-out through forward(ids) still holds with lists that include self.
    exclude = batch.ids.expand(len(batch), -1).contiguous()
    got = m.retrieve(batch.inputs, batch.ids)
    assert torch.equal(got, m.memory.search(Munkey.keys(batch.inputs), 4, exclude_ids=exclude)[1])
    m.eval()  # no pathway dropout: every sample reads its retrieved rows
    m.loss(batch, torch.Generator()).backward()
    touched = m.tokens.weight.grad.coalesce().indices()[0]
    # Only each sample's own row gets gradient: the neighbours' rows it read are constants,
    # so no retained row is ever fitted to a sample that may later be forgotten.
    own = batch.ids[(want == batch.ids[:, None]).any(1)]
    assert sorted(touched.tolist()) == sorted(m.tokens.rows(own).tolist())
    assert len(own) > 0.9 * len(batch)


def test_token_table_fingerprint_proves_the_rows_kept_and_gone():
    table = ExemplarTokens(4)
    table.add(torch.arange(10), torch.randn(10, 4))
    table.exp_avg += torch.randn(10, 4)  # optimiser state is part of the evidence
    table.steps += torch.arange(10)
    kept = torch.tensor([0, 2, 3, 5, 6, 7, 8, 9])
    want = table.fingerprint(only=kept)
    assert want != table.fingerprint()
    table.delete([1, 4])
    table.compact()
    assert table.fingerprint() == want
    table.exp_avg[0, 0] += 1.0  # a retained row's state changed: caught
    assert table.fingerprint() != want
