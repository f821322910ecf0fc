"""Row-wise evaluation whose result for a row does not depend on the other rows.

A matrix product's kernel (blocking, vector width, threads) is chosen by the problem's
shape, so ``Linear(x)[i]`` can differ in the last bits with the rows around row ``i``
and with how many there are. Exact mode needs each memory row to be a function of its
own sample alone -- bit for bit, whatever else was trained -- so rows are evaluated in
chunks of one fixed size, the last one padded with zeros: every row then goes through
the same kernels as every other row in every run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

CHUNK = 256  # rows per evaluation


def chunks(n: int, size: int = CHUNK) -> Iterator[tuple[slice, int]]:
    """``(rows, pad)`` per chunk of ``n`` rows: the slice of the rows, and how many
    padding rows bring it to ``size``."""
    for start in range(0, n, size):
        stop = min(start + size, n)
        yield slice(start, stop), size - (stop - start)


def pad(x: torch.Tensor, rows: int, value: float | int = 0) -> torch.Tensor:
    """``x [n, ...]`` with ``rows`` more rows of ``value``."""
    return torch.cat([x, x.new_full((rows, *x.shape[1:]), value)]) if rows else x


def apply(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, size: int = CHUNK) -> torch.Tensor:
    """``fn`` (row-wise, ``[m, ...] -> [m, ...]``) over the rows of ``x [n, ...]`` in
    zero-padded chunks of ``size``: row ``i`` of the result depends on ``x[i]`` alone."""
    out = [fn(pad(x[rows], extra))[: rows.stop - rows.start] for rows, extra in chunks(len(x), size)]
    return torch.cat(out) if out else fn(x[:0])
