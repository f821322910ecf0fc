"""KeyMemoryAttention: shapes, heads, exclusion, forgetting, gradients, torch.compile."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import brute_attention, filled_memory

import kmem
from kmem import ops


def _independent(layer, x, exclude_ids=None):
    """What the layer must compute, from its weights and the memory's live rows alone:
    per position and head ``h``, the query ``x W_h^T + b_h`` attends (float64 brute
    force over every score) with scale 1/sqrt(key_dim); the heads' results, head by
    head, go through the output projection."""
    mem, heads = layer.memory, layer.num_heads
    ids, keys, values = mem.state()
    w, b = layer.q_proj.weight.double(), layer.q_proj.bias.double()
    flat = x.reshape(-1, x.shape[-1]).double()
    ex = None if exclude_ids is None else exclude_ids.reshape(flat.shape[0], -1)
    per_head = []
    for h in range(heads):
        rows = slice(h * mem.key_dim, (h + 1) * mem.key_dim)
        q = flat @ w[rows].T + b[rows]
        per_head.append(
            brute_attention(
                q, keys, values, ids, layer.k, 1 / math.sqrt(mem.key_dim), mem.metric, ex, mem.num_classes
            )
        )
    out = torch.cat(per_head, dim=1) @ layer.out_proj.weight.double().T + layer.out_proj.bias.double()
    return out.reshape(*x.shape[:-1], -1).float()


@pytest.mark.parametrize("heads", [1, 3])
@pytest.mark.parametrize("num_classes", [None, 4])
@pytest.mark.parametrize("lead", [(5,), (2, 3), (2, 1, 4)])
def test_shapes_and_math(heads, num_classes, lead):
    mem, *_ = filled_memory(60, num_classes=num_classes)
    layer = kmem.KeyMemoryAttention(16, mem, num_heads=heads, k=6)
    x = torch.randn(*lead, 16)
    out = layer(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, _independent(layer, x), rtol=1e-4, atol=1e-5)


def test_exclude_ids_per_position():
    mem, _ids, *_ = filled_memory(40)
    layer = kmem.KeyMemoryAttention(16, mem, num_heads=2, k=3)
    x = torch.randn(2, 3, 16)
    ex = torch.randint(0, 40, (2, 3, 5))
    torch.testing.assert_close(layer(x, exclude_ids=ex), _independent(layer, x, ex), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(layer(x, exclude_ids=ex), layer(x))
    with pytest.raises(ValueError, match="exclude_ids"):
        layer(x, exclude_ids=torch.zeros(3, 5, dtype=torch.long))


def test_forget_changes_output_exactly_as_never_added():
    mem, ids, keys, values = filled_memory(80, compact_threshold=None)
    layer = kmem.KeyMemoryAttention(16, mem, k=8)
    x = torch.randn(7, 16)
    before = layer(x)
    assert layer.forget(torch.arange(0, 80, 2)) == 40
    never = kmem.KeyMemory(8, 3)
    never.add(ids[1::2], keys[1::2], values[1::2])
    twin = kmem.KeyMemoryAttention(16, never, k=8)
    twin.q_proj.load_state_dict(layer.q_proj.state_dict())
    twin.out_proj.load_state_dict(layer.out_proj.state_dict())
    assert torch.equal(layer(x), twin(x))
    assert not torch.allclose(layer(x), before)


@pytest.mark.parametrize("k", [4, None])
def test_gradients_reach_projections_and_input_through_the_compiled_kernels(k):
    mem, *_ = filled_memory(30)
    layer = kmem.KeyMemoryAttention(16, mem, num_heads=2, k=k)
    x = torch.randn(3, 16, requires_grad=True)
    with ops.trace() as ran:
        layer(x).sum().backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in layer.parameters())
    assert bool(x.grad.abs().sum() > 0)
    # Forward and backward ran the C++ kernels, not the reference twin.
    kernels = ["search", "attend_forward", "attend_backward"] if k else ["dense_forward", "dense_backward"]
    assert [e for e in ran if "." in e] == [f"cpp.{name}" for name in kernels]
    assert not any(e.endswith(":reference") for e in ran)


def test_state_dict_holds_projections_and_memory():
    mem, *_ = filled_memory(10)
    layer = kmem.KeyMemoryAttention(16, mem)
    state = layer.state_dict()
    assert set(state) == {"q_proj.weight", "q_proj.bias", "out_proj.weight", "out_proj.bias", "_extra_state"}
    assert torch.equal(state["_extra_state"]["memory"]["slot_ids"], mem.ids())
    assert "rows=10" in repr(layer)


def test_bad_construction_and_input():
    mem, *_ = filled_memory(10)
    with pytest.raises(TypeError, match="memory"):
        kmem.KeyMemoryAttention(16, object())
    with pytest.raises(ValueError, match="num_heads"):
        kmem.KeyMemoryAttention(16, mem, num_heads=0)
    with pytest.raises(ValueError, match="embed_dim"):
        kmem.KeyMemoryAttention(16, mem)(torch.randn(2, 15))


def test_torch_compile_matches_eager():
    mem, *_ = filled_memory(50)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), kmem.KeyMemoryAttention(16, mem, num_heads=2, k=5))
    compiled = torch.compile(model)
    x = torch.randn(4, 16)
    torch.testing.assert_close(compiled(x), model(x))
    # The compiled model reads the memory live: forgetting shows up without recompiling.
    model[1].forget([int(i) for i in mem.search(model[1].q_proj(model[0](x)).reshape(-1, 8)[:1], 1)[1][0]])
    torch.testing.assert_close(compiled(x), model(x))


class _Negated:
    """A user's own memory: a KeyMemory whose reads see negated queries. Satisfies
    kmem.MemoryLike without inheriting from anything kmem defines."""

    def __init__(self, inner: kmem.KeyMemory) -> None:
        self.inner = inner
        self.key_dim, self.out_dim, self.dtype, self.device = (
            inner.key_dim,
            inner.out_dim,
            inner.dtype,
            inner.device,
        )

    def search(self, queries, k, exclude_ids=None):
        return self.inner.search(-queries, k, exclude_ids)

    def attend(self, queries, k=32, scale=None, exclude_ids=None):
        return self.inner.attend(-queries, k, scale, exclude_ids)

    def read(self, queries, k=32, scale=None, exclude_ids=None, backend=None):
        return self.inner.read(-queries, k, scale, exclude_ids, backend)

    def check_unedited(self, edits, now=None):
        self.inner.check_unedited(edits, now)

    def delete(self, ids, *, request_id=None, reason=None):
        return self.inner.delete(ids, request_id=request_id, reason=reason)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


def test_any_memory_like_is_read():
    mem, *_ = filled_memory(30)
    assert isinstance(mem, kmem.MemoryLike) and isinstance(_Negated(mem), kmem.MemoryLike)
    layer = kmem.KeyMemoryAttention(16, _Negated(mem), k=4)
    x = torch.randn(3, 16)
    # Independently: the same projections over the inner memory, with negated queries.
    want = layer.out_proj(mem.attend(-layer.q_proj(x), k=4))
    torch.testing.assert_close(layer(x), want)
    assert layer.forget([0]) == 1 and 0 not in mem
