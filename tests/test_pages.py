"""Large key buffers ask for 2 MB pages (kmem._pages), and only their whole pages."""

from __future__ import annotations

import torch

import kmem
from kmem import _pages


def test_a_large_buffer_advises_its_whole_huge_pages(monkeypatch):
    calls = []
    monkeypatch.setattr(
        _pages, "_madvise_fn", lambda start, length, advice: calls.append((start, length, advice))
    )
    t = _pages.empty_on_huge_pages(3_000_001, 4, dtype=torch.float32, device=torch.device("cpu"))
    assert t.shape == (3_000_001, 4) and t.dtype == torch.float32
    ((start, length, advice),) = calls
    huge = 2 << 20
    assert advice == 14 and start % huge == 0 and length % huge == 0 and length > 0
    assert t.data_ptr() <= start and start + length <= t.data_ptr() + t.numel() * 4
    assert start - t.data_ptr() < huge and t.data_ptr() + t.numel() * 4 - (start + length) < huge


def test_small_buffers_and_refusals_leave_the_buffer_as_torch_makes_it(monkeypatch):
    calls = []
    monkeypatch.setattr(_pages, "_madvise_fn", lambda *a: calls.append(a) or -1)  # -1: refused
    small = _pages.empty_on_huge_pages(10, 4, dtype=torch.float32, device=torch.device("cpu"))
    assert small.shape == (10, 4) and calls == []
    big = _pages.empty_on_huge_pages(4_000_000, 2, dtype=torch.bfloat16, device=torch.device("cpu"))
    assert len(calls) == 1 and bool((big.zero_() == 0).all())


def test_the_memory_buffers_are_zeroed_whatever_the_pages():
    mem = kmem.KeyMemory(64, 8, capacity=40_000)  # 10 MB of keys: advised
    assert not mem._keys.any() and not mem._values.any() and bool((mem._slot_ids == -1).all())
