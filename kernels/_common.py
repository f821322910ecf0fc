"""Helpers shared by kmem's Triton kernels: launching, block sizes and masking."""

from __future__ import annotations

from collections import Counter

import torch
import triton
import triton.language as tl

# Kernel name -> launches so far; tests read it to prove the Triton path ran.
LAUNCHES: Counter[str] = Counter()

# tl.dot needs every dimension of a block to be at least 16 on the GPU.
MIN_DOT = 16


def launch(kernel: triton.JITFunction, grid: tuple[int, ...], *args, **meta) -> None:
    """Run ``kernel`` over ``grid`` and count the launch."""
    LAUNCHES[kernel.__name__] += 1
    kernel[grid](*args, **meta)


def pow2(n: int, floor: int = 1) -> int:
    """The smallest power of two >= ``max(n, floor)``."""
    return triton.next_power_of_2(max(n, floor))


def tl_dtype(dtype: torch.dtype) -> tl.dtype:
    """The Triton twin of a working dtype (float32 or float64)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def load_rows(ptr, rows, row_ok, width, cols, col_ok):
    """Columns ``cols`` of rows ``rows`` of a row-major ``[*, width]`` matrix:
    ``[len(rows), len(cols)]``, 0 where a row or column is masked off."""
    offsets = rows.to(tl.int64)[:, None] * width + cols[None, :]
    return tl.load(ptr + offsets, mask=row_ok[:, None] & col_ok[None, :], other=0.0)


@triton.jit
def store_rows(ptr, rows, row_ok, width, cols, col_ok, x):
    """Write ``x [len(rows), len(cols)]`` where :func:`load_rows` reads."""
    offsets = rows.to(tl.int64)[:, None] * width + cols[None, :]
    tl.store(ptr + offsets, x, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def span(start, n, BLOCK: tl.constexpr):
    """Indices ``start .. start + BLOCK`` and which of them are below ``n``."""
    idx = start + tl.arange(0, BLOCK)
    return idx, idx < n


@triton.jit
def excluded(ex_ptr, rows, row_ok, ids, E, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    """bool ``[BLOCK_B, BLOCK_N]``: row id ``ids[j]`` is listed in ``exclude[rows[i], :E]``."""
    hit = tl.zeros([BLOCK_B, BLOCK_N], tl.int1)
    for e in range(E):
        ex = tl.load(ex_ptr + rows.to(tl.int64) * E + e, mask=row_ok, other=-1)
        hit = hit | (ids[None, :] == ex[:, None])
    return hit


@triton.jit
def live_mask(ids_ptr, ex_ptr, rows, row_ok, cols, N, E, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    """bool ``[BLOCK_B, BLOCK_N]``: row ``cols[j]`` exists, is live and is not excluded for query ``rows[i]``.

    Dead rows have id -1, so the -1 padding of ``exclude`` can only match rows already dropped.
    """
    ids = tl.load(ids_ptr + cols, mask=cols < N, other=-1)
    keep = (ids >= 0)[None, :] & row_ok[:, None]
    return keep & ~excluded(ex_ptr, rows, row_ok, ids, E, BLOCK_B, BLOCK_N)
