"""Shared helpers: a brute-force oracle for search/attention and memory builders."""

from __future__ import annotations

import os

import torch

# Triton kernels run on CPU tensors through the interpreter where no GPU is present;
# the variable must be set before any Triton kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import _cuda_sim
import pytest
from _require_gpu import pytest_runtest_makereport  # noqa: F401  (KMEM_REQUIRE_GPU=1)

import kmem
from kmem.ops import reference

_cuda_sim.register()  # the CUDA kernels on the CPU: every backend test covers them too


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def small_chunks(monkeypatch):
    """Force the reference ops to stream in chunks of 7 rows, so merging across chunks
    (and a ragged last chunk) is exercised on small memories."""
    monkeypatch.setattr(reference, "chunk_rows", lambda batch: 7)


def brute_scores(queries, keys, metric):
    """Exact float64 scores ``[B, N]``."""
    q, k = queries.double(), keys.double()
    if metric == "ip":
        return q @ k.T
    return -torch.cdist(q, k).pow(2)


def brute_topk(queries, keys, slot_ids, k, metric="ip", exclude_ids=None):
    """Slots ``[B, k]`` by materialising every score; ties go to the lower slot."""
    s = brute_scores(queries, keys, metric)
    dead = (slot_ids < 0).expand_as(s).clone()
    if exclude_ids is not None:
        dead |= (slot_ids[None, :, None] == exclude_ids[:, None, :]).any(-1) & (slot_ids >= 0)
    s = s.masked_fill(dead, float("-inf"))
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    slots = torch.full((s.shape[0], k), -1, dtype=torch.int64)
    width = min(k, s.shape[1])
    slots[:, :width] = order[:, :width]
    valid = torch.zeros_like(slots, dtype=torch.bool)
    valid[:, :width] = ~torch.gather(dead, 1, order[:, :width])
    return torch.where(valid, slots, -1)


def brute_attention(
    queries, keys, values, slot_ids, k, scale, metric="ip", exclude_ids=None, num_classes=None
):
    """float64 attention over ``brute_topk`` (every live row when ``k`` is None)."""
    n = keys.shape[0]
    slots = brute_topk(queries, keys, slot_ids, n if k is None else k, metric, exclude_ids)
    s = brute_scores(queries, keys, metric)
    valid = slots >= 0
    logits = scale * torch.gather(s, 1, slots.clamp(min=0)).masked_fill(~valid, float("-inf"))
    w = torch.softmax(logits, 1).nan_to_num(0.0) * valid
    if num_classes is None:
        rows = values.double()[slots.clamp(min=0)] if n else torch.zeros(*slots.shape, values.shape[1])
        return torch.einsum("bk,bkv->bv", w, rows.double())
    out = torch.zeros(w.shape[0], num_classes, dtype=torch.float64)
    return out.scatter_add(1, values[slots.clamp(min=0)] if n else torch.zeros_like(slots), w)


def integer_data(n, d, lo=-2, hi=3):
    """Small integer-valued floats: scores are exact in any float dtype, with many ties."""
    return torch.randint(lo, hi, (n, d)).float()


def filled_memory(n=50, key_dim=8, value_dim=3, num_classes=None, **kw):
    """A memory with ids 0..n-1 (shuffled order of insertion is not needed here)."""
    mem = kmem.KeyMemory(key_dim, None if num_classes else value_dim, num_classes=num_classes, **kw)
    ids = torch.arange(n)
    keys = torch.randn(n, key_dim)
    values = torch.randint(0, num_classes, (n,)) if num_classes else torch.randn(n, value_dim)
    mem.add(ids, keys, values)
    return mem, ids, keys, values
