"""A KeyMemory and a KeyMemoryAttention behave like any torch module's state: copies,
pickles, state_dict, AveragedModel, torch.compile(fullgraph=True), and a backward that
says so when the rows it read were deleted -- the same way on every backend."""

from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import pytest
import torch
from conftest import filled_memory
from torch.optim.swa_utils import AveragedModel

import kmem
from kmem.models.exemplars import ExemplarTokens

CPU_BACKENDS = ["reference", "cpp", "triton"]  # triton runs under its interpreter here


def _layer(n=40, k=5, **kw):
    mem, *_ = filled_memory(n, compact_threshold=None, **kw)
    mem.delete([3, 7, 11])  # tombstones must travel too
    return kmem.KeyMemoryAttention(16, mem, num_heads=2, k=k)


@pytest.mark.parametrize("table", ["memory", "tokens"])
def test_membership_takes_integers_only(table):
    if table == "memory":
        mem, *_ = filled_memory(5)
    else:
        mem = ExemplarTokens(4)
        mem.add(torch.arange(5), torch.randn(5, 4))
    assert 2 in mem and np.int64(2) in mem and torch.tensor(2) in mem
    for not_an_id in (2.9, 2.0, "2", torch.tensor(2.5), True, None, [2]):
        assert not_an_id not in mem, not_an_id


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_carry_the_memory_and_are_independent(how):
    layer = _layer()
    twin = copy.deepcopy(layer) if how == "deepcopy" else pickle.loads(pickle.dumps(layer))
    assert twin.memory is not layer.memory
    assert twin.memory.fingerprint() == layer.memory.fingerprint()
    assert twin.memory.num_dead == layer.memory.num_dead == 3
    x = torch.randn(4, 16)
    assert torch.equal(twin(x), layer(x))
    twin.forget([0, 1])  # the copy forgets for itself only
    assert 0 in layer.memory and 0 not in twin.memory
    twin(x).sum().backward()  # the copy has a lock and a handle of its own


def test_a_memory_with_a_ledger_refuses_to_be_copied(tmp_path):
    mem, *_ = filled_memory(5, ledger=kmem.Ledger(tmp_path / "l.db"))
    with pytest.raises(TypeError, match="ledger"):
        copy.deepcopy(mem)
    mem.ledger = None
    assert copy.deepcopy(mem).fingerprint() == mem.fingerprint()


def test_averaged_model_of_a_model_holding_the_layer():
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), _layer())
    averaged = AveragedModel(model)
    averaged.update_parameters(model)
    x = torch.randn(3, 16)
    torch.testing.assert_close(averaged(x), model(x))


def test_state_dict_carries_rows_and_tombstones_through_torch_save():
    layer = _layer(num_classes=None)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    other = kmem.KeyMemoryAttention(16, kmem.KeyMemory(8, 3), num_heads=2, k=5)
    other.load_state_dict(state)
    assert other.memory.fingerprint() == layer.memory.fingerprint()
    assert other.memory.num_dead == 3 and other.memory.version == layer.memory.version
    assert 3 not in other.memory and len(other.memory) == 37
    x = torch.randn(4, 16)
    assert torch.equal(other(x), layer(x))
    # Later deletions work on the loaded memory: its id map was rebuilt.
    assert other.forget([0]) == 1 and other.memory.compact() == 4


def test_label_memory_state_dict_round_trip():
    mem, *_ = filled_memory(20, num_classes=4, metric="l2")
    mem.delete([5])
    twin = kmem.KeyMemory(8, num_classes=4, metric="l2")
    twin.load_state_dict(mem.state_dict())
    assert twin.fingerprint() == mem.fingerprint() and twin.num_dead == mem.num_dead


def test_load_state_dict_refuses_what_does_not_fit_and_changes_nothing():
    layer = _layer()
    state = layer.memory.state_dict()
    other = kmem.KeyMemory(8, 4)  # another value_dim
    with pytest.raises(ValueError, match="settings"):
        other.load_state_dict(state)
    target, *_ = filled_memory(6)
    before = target.fingerprint()
    bad = [
        ({**state, "slot_ids": state["slot_ids"].clone().fill_(2)}, "repeats"),
        ({**state, "slot_ids": state["slot_ids"] - 5}, ">= -1"),
        ({**state, "keys": state["keys"][:-1]}, "keys"),
        ({**state, "version": -1}, "version"),
        ({"keys": state["keys"]}, "state_dict"),
    ]
    for broken, match in bad:
        with pytest.raises(ValueError, match=match):
            target.load_state_dict(broken)
        assert target.fingerprint() == before
    # A dead slot never carries bytes, whatever the state held there.
    dirty = {**state, "keys": state["keys"].clone()}
    dirty["keys"][3] = 7.0
    target.load_state_dict(dirty)
    assert not target.buffers()[0][3].any()


@pytest.mark.parametrize("k", [4, None])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backward_after_delete_raises_the_same_on_every_backend(backend, k):
    mem, *_ = filled_memory(30, compact_threshold=None, backend=backend)
    q = torch.randn(3, 8, requires_grad=True)
    out = mem.attend(q, k=k)
    mem.delete([int(mem.search(q.detach(), 1)[1][0, 0])])
    with pytest.raises(kmem.MemoryEditedError, match="backward"):
        out.sum().backward()
    # A compaction moves rows: the same.
    out = mem.attend(q, k=k)
    mem.compact()
    with pytest.raises(kmem.MemoryEditedError):
        out.sum().backward()
    # Adding rows writes into the buffers the forward read: the same.
    out = mem.attend(q, k=k)
    mem.add(torch.tensor([100]), torch.randn(1, 8), torch.randn(1, 3))
    with pytest.raises(kmem.MemoryEditedError):
        out.sum().backward()
    # Reads change nothing: backward runs.
    out = mem.attend(q, k=k)
    mem.search(q.detach(), 2)
    out.sum().backward()
    assert q.grad is not None


@pytest.mark.parametrize("k", [5, None])
@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_compile_fullgraph_layer_matches_eager_forward_and_backward(backend, k):
    torch._dynamo.reset()
    layer = _layer(k=k, backend=backend)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(2, 3, 16, requires_grad=True)
    out = compiled(x)
    torch.testing.assert_close(out, layer(x))
    out.sum().backward()
    got = x.grad.clone(), layer.q_proj.weight.grad.clone()
    x.grad = None
    layer.zero_grad()
    layer(x).sum().backward()
    torch.testing.assert_close(got[0], x.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got[1], layer.q_proj.weight.grad, rtol=1e-4, atol=1e-6)
    # The graph reads the memory live, and its backward checks for deletions too.
    out = compiled(x)
    layer.forget([0, 1, 2])
    with pytest.raises(kmem.MemoryEditedError):
        out.sum().backward()
    torch.testing.assert_close(compiled(x), layer(x))


def test_compile_fullgraph_of_the_memory_reads():
    torch._dynamo.reset()
    mem, *_ = filled_memory(30, num_classes=3)
    q = torch.randn(4, 8)
    attend = torch.compile(mem.attend, fullgraph=True)
    search = torch.compile(mem.search, fullgraph=True)
    torch.testing.assert_close(attend(q, k=6), mem.attend(q, k=6))
    for got, want in zip(search(q, 3), mem.search(q, 3), strict=True):
        assert torch.equal(got, want)
    mem.delete([int(i) for i in mem.search(q, 1)[1][:, 0]])
    assert torch.equal(search(q, 3)[1], mem.search(q, 3)[1])
