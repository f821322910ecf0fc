"""The Triton backend: the kernels of :mod:`kmem.kernels`, imported on first use.

Importing them imports Triton, which a CPU-only install may lack, so this module only
looks for it; the kernels are registered with :mod:`kmem.ops.fused` the first time a
call is routed here. Triton serves CUDA tensors, and CPU tensors too when its
interpreter is on (``TRITON_INTERPRET=1``, set before kmem is imported) -- that is how
the tests run it without a GPU.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

from . import fused


def devices() -> frozenset[str]:
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return frozenset({"cuda", "cpu"} if interpreted else {"cuda"})


_MISSING = None if importlib.util.find_spec("triton") else "triton is not installed (pip install triton)"


def missing() -> str | None:
    """Why the Triton backend cannot run, or None."""
    return _MISSING


def lazily(make: Callable[[str], Callable]) -> Callable:
    """``make("triton")`` -- one of fused's op factories -- registering the kernels first."""
    run = make("triton")

    def call(*args):
        if "triton" not in fused.KERNELS:
            from ..kernels import topk

            fused.register("triton", topk.KERNELS)
        return run(*args)

    return call


def compact_rows(src, keep, out) -> int:
    from ..kernels import compact

    return compact.compact_rows(src, keep, out)
