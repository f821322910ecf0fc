"""Triton stable compaction: the kept rows of buffers, in order, to the front of others.

Two launches over blocks of rows: one counts each block's kept rows, then (after an
exclusive cumsum of those few counts on the host side of the graph) one gives every
kept row its destination -- block offset plus the exclusive prefix sum of the keep
flags within the block -- and copies it. Rows are moved as integer words of the widest
size that divides the row, so one kernel serves keys, values and ids of any dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ._common import launch, pow2

_BLOCK_ROWS = 128
_BLOCK_WORDS = 16  # 64-bit words per row and step: at 64, ptxas spilled 352 B per thread (sm_90, 1 KB rows)


@triton.jit
def _count_kernel(keep_ptr, counts_ptr, N, BLOCK_ROWS: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    keep = tl.load(keep_ptr + rows, mask=rows < N, other=0).to(tl.int32)
    tl.store(counts_ptr + tl.program_id(0), tl.sum(keep, axis=0))


@triton.jit
def _scatter_kernel(
    src_ptr, keep_ptr, offsets_ptr, out_ptr, N, W, BLOCK_ROWS: tl.constexpr, BLOCK_WORDS: tl.constexpr
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    keep = tl.load(keep_ptr + rows, mask=rows < N, other=0).to(tl.int32)
    dst = tl.load(offsets_ptr + tl.program_id(0)) + tl.cumsum(keep, axis=0) - keep
    for w0 in range(0, W, BLOCK_WORDS):
        words = w0 + tl.arange(0, BLOCK_WORDS)
        mask = (keep > 0)[:, None] & (words < W)[None, :]
        row = tl.load(src_ptr + rows.to(tl.int64)[:, None] * W + words[None, :], mask=mask)
        tl.store(out_ptr + dst.to(tl.int64)[:, None] * W + words[None, :], row, mask=mask)


def _as_words(t: torch.Tensor) -> torch.Tensor:
    """``t [N, ...]`` as ``[N, W]`` integer words of the widest size dividing a row."""
    rows = t.shape[0]
    flat = t.reshape(rows, -1)
    row_bytes = flat.shape[1] * t.element_size()
    for word in (torch.int64, torch.int32, torch.int16, torch.uint8):
        if row_bytes % word.itemsize == 0:
            return flat.view(torch.uint8).view(word) if t.dtype != word else flat
    raise AssertionError("unreachable: uint8 divides every row")


def compact_rows(srcs: Sequence[torch.Tensor], keep: torch.Tensor, outs: Sequence[torch.Tensor]) -> int:
    """Copy the rows of each ``srcs[i] [N, ...]`` where ``keep [N]`` (bool) holds, in order,
    to ``outs[i][:n]`` (same dtype and row shape); returns ``n``. The keep flags are
    counted once for every buffer, and ``n`` read to the host once."""
    n = keep.shape[0]
    if n == 0:
        return 0
    blocks = triton.cdiv(n, _BLOCK_ROWS)
    keep8 = keep.to(torch.int8)
    counts = torch.empty(blocks, dtype=torch.int32, device=keep.device)
    launch(_count_kernel, (blocks,), keep8, counts, n, BLOCK_ROWS=_BLOCK_ROWS)
    totals = counts.to(torch.int64).cumsum(0)
    kept = int(totals[-1])
    for out in outs:
        if out.shape[0] < kept:
            raise ValueError(f"out holds {out.shape[0]} rows but {kept} are kept")
    offsets = totals - counts
    for src, out in zip(srcs, outs, strict=True):
        if src.numel() == 0:  # rows of zero bytes: nothing to move
            continue
        src_words, out_words = _as_words(src), _as_words(out)  # contiguous: CompactInputs made them so
        width = src_words.shape[1]
        launch(
            _scatter_kernel,
            (blocks,),
            src_words,
            keep8,
            offsets,
            out_words,
            n,
            width,
            BLOCK_ROWS=_BLOCK_ROWS,
            BLOCK_WORDS=min(_BLOCK_WORDS, pow2(width)),
        )
    return kept
