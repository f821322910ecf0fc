"""Which rank owns a row: a stable hash of its id."""

from __future__ import annotations

import torch

# splitmix64's multipliers as signed int64 (torch multiplies int64 modulo 2**64).
_MUL1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MUL2 = 0x94D049BB133111EB - (1 << 64)
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)


def _shift(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def owner_of(ids: torch.Tensor, world_size: int) -> torch.Tensor:
    """The rank in ``[0, world_size)`` that owns each id: int64 ``[n]`` -> int64 ``[n]``.

    splitmix64's finaliser, so consecutive ids spread evenly; the same on every
    machine, process and run (unlike Python's ``hash``), and on CPU and GPU alike.
    """
    x = ids.to(torch.int64) + _GOLDEN
    x = (x ^ _shift(x, 30)) * _MUL1
    x = (x ^ _shift(x, 27)) * _MUL2
    x = x ^ _shift(x, 31)
    return _shift(x, 1).remainder(world_size)  # non-negative before the modulo
