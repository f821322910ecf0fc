"""kmem's CUDA kernels on the CPU, for the tests: ``csrc/cuda`` compiled with g++ against
the simulator in ``csrc/cuda/sim`` (each CUDA thread a fiber, barriers and warp
exchanges checked; see ``runtime.h``) as the module ``kmem_cuda_sim``, and registered as
backend ``"cuda-sim"`` on CPU tensors with the CUDA backend's declarations. The kernel
contract (``test_kernels.py``) then runs on the very CUDA sources without a GPU.

The module is built on first use, into ``build/cuda-sim`` (one translation unit, about
a minute on two cores; ninja rebuilds it when a source changes).
"""

from __future__ import annotations

import functools
from pathlib import Path

from kmem.ops.backends import register_twin
from kmem.ops.backends.extension import CudaExtension

NAME = "cuda-sim"
ROOT = Path(__file__).resolve().parents[1]
SIM = ROOT / "csrc" / "cuda" / "sim"


@functools.cache
def module():
    """The simulator's extension module, built (or found up to date) once per process."""
    from torch.utils import cpp_extension

    build = ROOT / "build" / "cuda-sim"
    build.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name="kmem_cuda_sim",
        sources=[str(SIM / "module.cpp")],
        extra_include_paths=[str(SIM), str(ROOT / "csrc")],
        extra_cflags=["-O2", "-DKMEM_CUDA_SIM", "-U_FORTIFY_SOURCE"],
        build_directory=str(build),
    )


def register() -> None:
    """Register ``"cuda-sim"`` (its kernels load, and build, on first use)."""
    why = "the CUDA kernels on a CPU simulator: for tests, asked for by name"
    register_twin(NAME, "cuda", frozenset({"cpu"}), lambda: CudaExtension(module), why)
