"""The C++ CPU backend: ``kmem._C``'s kernels built from ``csrc/cpu``.

Search scores in float32 whatever the keys' dtype (the ranking contract of every
backend), so float64 keys are read as float32 there.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ... import _ext
from ..inputs import SearchInputs
from .extension import Extension


def missing() -> str | None:
    """Why the C++ backend cannot run, or None."""
    return _ext.missing_reason()


class _Cpp(Extension):
    def search(self, s: SearchInputs) -> tuple[torch.Tensor, torch.Tensor]:
        if s.keys.dtype == torch.float64:
            s = replace(s, keys=s.keys.float())
        return super().search(s)


KERNELS = _Cpp("")
