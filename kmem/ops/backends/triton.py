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

# The largest k the search kernel serves on a GPU: it keeps pow2(k) candidates per query
# in tiles of as many rows, and compiled for sm_90 (scripts/check-triton-compile) it
# needs 139,520 bytes of shared memory at k = 256 but 532,480 at k = 1,024, past the
# 232,448 a block may use on an H100 or H200 (166,912 on an A100).
MAX_K = 256


def devices() -> frozenset[str]:
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return frozenset({"cuda", "cpu"} if interpreted else {"cuda"})


def missing() -> str | None:
    """Why the Triton backend cannot run, or None."""
    return _MISSING


def kernels() -> SimpleNamespace:
    """The Triton kernels in the form :mod:`kmem.ops.custom` calls."""
    from ...kernels import attend, compact, dense, search, topk

    return SimpleNamespace(
        search=search.search,
        topk_forward=topk.topk_forward,
        attend_forward=attend.attend_forward,
        attend_backward=attend.attend_backward,
        dense_forward=dense.dense_forward,
        dense_backward=dense.dense_backward,
        compact_rows=lambda c: compact.compact_rows(c.srcs, c.keep, c.outs),
    )
