"""The levers of issue 17, each turned off for one benchmark: the first run on a GPU
times every lever on and off in one run (``bench/test_bench_gpu.py``), which says
whether to keep it. ``tests/test_levers.py`` checks, without a GPU, that "off" takes the
other path on the CUDA kernels (through their simulator) and on Triton's."""

from __future__ import annotations

from typing import Any

from kmem import ops
from kmem.ops.backends.extension import CudaExtension

K = 32
# lever -> the call it should speed up: (batch, k); k None is dense attention.
LEVERS = {"tf32-screen": (64, K), "fused-topk": (1, K), "dense-3xtf32": (64, None)}


class _Without:
    """A backend's kernels with one of them hidden: top-k attention runs its fused
    kernel only where ``hasattr(kernels, "topk_forward")``, and a method defined on the
    kernels' class cannot be deleted from the instance."""

    def __init__(self, kernels: Any, hidden: str) -> None:
        self._kernels, self._hidden = kernels, hidden

    def __getattr__(self, name: str) -> Any:
        if name == self._hidden:
            raise AttributeError(name)
        return getattr(self._kernels, name)


def lever_off(backend: str, lever: str, monkeypatch) -> None:
    """Turn ``lever`` off for ``backend``'s calls until ``monkeypatch`` undoes it."""
    from kmem.kernels import dense, search

    entry = ops.REGISTRY.backends[backend]
    if lever == "fused-topk":  # the search, then the attend kernels
        monkeypatch.setattr(entry, "_kernels", _Without(entry.kernels, "topk_forward"))
    elif isinstance(entry.kernels, CudaExtension):  # the TF32 screen and dense 3xTF32 alike: float32 FMA
        monkeypatch.setenv("KMEM_CUDA_TENSOR_CORES", "0")
    elif lever == "tf32-screen":  # float32 scoring at every batch
        monkeypatch.setattr(search, "TENSOR_CORE_BATCH", 1 << 30)
    else:  # dense products in float32 FMA
        monkeypatch.setattr(dense, "precision", lambda dtype: "ieee")
