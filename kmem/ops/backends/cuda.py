"""The CUDA backend: ``kmem._C``'s kernels built from ``csrc/cuda`` by a CUDA build.

Importing this module never touches the GPU or the extension, so it works on CPU-only
builds too. The kernels compute in float32 (queries and gradients float32; keys and
vector values float32, float16 or bfloat16): :mod:`kmem.ops.backends` declares exactly
that, so a float64 call is never served here with float32 precision.
"""

from __future__ import annotations

import torch

from ... import _ext
from .extension import CudaExtension


def missing() -> str | None:
    """Why the CUDA backend cannot run in this process, or None when it can."""
    ext = _ext.compiled()
    if ext is None:
        return _ext.missing_reason()
    if not getattr(ext, "with_cuda", False):
        return (
            "kmem._C was built without its CUDA kernels (torch without CUDA, no CUDA toolkit, "
            "or KMEM_CUDA=0); rebuild with a CUDA torch and KMEM_CUDA=1"
        )
    if not torch.cuda.is_available():
        return "no CUDA device is available (torch.cuda.is_available() is False)"
    return None


KERNELS = CudaExtension()
