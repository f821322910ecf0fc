"""The Triton backend: the kernels of :mod:`kmem.kernels` on records, imported on first use.

Importing them imports Triton, which a CPU-only install may lack, so this module only
looks for it (once, at import); :func:`kernels` imports them the first time a call is
routed here. Triton serves CUDA tensors, and CPU tensors too when its interpreter is on
(``TRITON_INTERPRET=1``, set before kmem is imported) -- that is how the tests run it
without a GPU.
"""

from __future__ import annotations

import importlib.util
import os
from types import SimpleNamespace

_MISSING = None if importlib.util.find_spec("triton") else "triton is not installed (pip install triton)"


def devices() -> frozenset[str]:
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return frozenset({"cuda", "cpu"} if interpreted else {"cuda"})


def missing() -> str | None:
    """Why the Triton backend cannot run, or None."""
    return _MISSING


def kernels() -> SimpleNamespace:
    """The Triton kernels in the form :mod:`kmem.ops.custom` calls."""
    from ..kernels import attend, compact, dense, search

    return SimpleNamespace(
        search=lambda s: search.search(s.queries, s.keys, s.slot_ids, s.k, s.metric, s.exclude_ids),
        attend_forward=lambda a, slots: attend.attend_forward(
            a.queries, a.keys, a.values, slots, a.scale, a.metric, a.num_classes
        ),
        attend_backward=lambda a, slots, weights, grad_out, *needs: attend.attend_backward(
            grad_out, a.queries, a.keys, a.values, slots, weights, a.scale, a.metric, a.num_classes, *needs
        ),
        dense_forward=lambda d: dense.dense_forward(
            d.queries, d.keys, d.values, d.slot_ids, d.exclude_ids, d.scale, d.metric, d.num_classes
        ),
        dense_backward=lambda d, out, lse, grad_out, *needs: dense.dense_backward(
            grad_out,
            d.queries,
            d.keys,
            d.values,
            d.slot_ids,
            d.exclude_ids,
            out,
            lse,
            d.scale,
            d.metric,
            d.num_classes,
            *needs,
        ),
        compact_rows=lambda c: compact.compact_rows(c.src, c.keep, c.out),
    )
