"""Every backend of kmem's ops, and exactly what each one serves, in priority order.

On the CPU the C++ kernels come first; on a GPU the hand-written CUDA kernels come
before Triton's (tuned per architecture; Triton's are portable and the only compiled
path under its interpreter); the PyTorch reference twin comes last and serves every
call, so it is what ``backend="auto"`` falls back to -- and only it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from .. import custom, reference
from ..registry import FLOATS, NARROW, REGISTRY, Backend, Serves, record_kernel
from . import cpp, cuda, triton

CPU, CUDA, ANY = frozenset({"cpu"}), frozenset({"cuda"}), frozenset({"cpu", "cuda"})
# Measured crossovers (BENCHMARKS.md, GPU kernels): until a kernel beats the reference
# twin on a shape, "auto" must not pick it there.
_DENSE_GPU = (
    "dense attention, B = 64, N = 1.28M, d = 256 on an H100: {}x the reference twin's time (BENCHMARKS.md)"
    "; the kernel changed since and waits for a GPU to be measured again"
)
ALL_DTYPES = None  # row copies move bytes: any dtype


def _compiled_runs(name: str) -> dict[str, Callable]:
    """How a compiled backend runs each op: through the custom ops, with its own kernels."""
    return {
        "search": lambda s: custom.call("search", s, name),
        "topk_attention": lambda a: custom.call("topk_attention", a, name)[0],
        "dense_attention": lambda d: custom.call("dense_attention", d, name),
        "compact_rows": _direct(name, "compact_rows"),
        "zero_rows": _direct(name, "zero_rows"),
    }


def _direct(name: str, kernel: str) -> Callable:
    """A kernel that needs no autograd, called as it is."""

    def run(inputs):
        record_kernel(name, kernel)
        return getattr(REGISTRY.backends[name].kernels, kernel)(inputs)

    return run


def _register(
    name: str, serves: dict[str, tuple[Serves, ...]], missing, kernels, tolerance: tuple[float, float]
) -> None:
    runs = {op: run for op, run in _compiled_runs(name).items() if op in serves}
    REGISTRY.register(Backend(name, serves, runs, missing(), kernels, tolerance))


def _rows(devices: frozenset[str]) -> tuple[Serves, ...]:
    return (Serves(devices, keys=ALL_DTYPES),)


_register(
    "cpp",
    {
        # Ranking is by float32 score in every backend: float64 keys are scored as float32.
        "search": (Serves(CPU),),
        "topk_attention": (Serves(CPU, queries=NARROW, keys=NARROW, values=NARROW),),
        "dense_attention": (Serves(CPU),),
        "compact_rows": _rows(CPU),
        "zero_rows": _rows(CPU),
    },
    cpp.missing,
    lambda: cpp.KERNELS,
    tolerance=(1e-5, 1e-6),
)
_register(
    "cuda",
    {
        "search": (Serves(CUDA),),
        "topk_attention": (Serves(CUDA, queries=NARROW, keys=NARROW, values=NARROW),),
        "dense_attention": (
            Serves(CUDA, queries=NARROW, keys=NARROW, values=NARROW, slower=_DENSE_GPU.format(7.9)),
        ),
        "compact_rows": _rows(CUDA),
    },
    cuda.missing,
    lambda: cuda.KERNELS,
    tolerance=(1e-5, 1e-5),  # parallel sums in another order than the CPU's
)
_register(
    "triton",
    {
        "search": (Serves(triton.devices(), k=(1, triton.MAX_K)),),
        "topk_attention": (Serves(triton.devices(), k=(1, triton.MAX_K)),),
        "dense_attention": (Serves(triton.devices(), slower=_DENSE_GPU.format(350)),),
        "compact_rows": _rows(triton.devices()),
    },
    triton.missing,
    triton.kernels,
    tolerance=(1e-4, 1e-5),  # tl.dot tiles, and exp/log in the interpreter's numpy
)

_EVERYTHING = (Serves(ANY, queries=FLOATS, keys=FLOATS, values=FLOATS),)
REGISTRY.register(
    Backend(
        "reference",
        {
            "search": _EVERYTHING,
            "topk_attention": _EVERYTHING,
            "dense_attention": _EVERYTHING,
            "compact_rows": _rows(ANY),
            "zero_rows": _rows(ANY),
        },
        {
            "search": reference.search,
            "topk_attention": reference.topk_attention,
            "dense_attention": reference.dense_attention,
            "compact_rows": reference.compact_rows,
            "zero_rows": reference.zero_rows,
        },
    )
)


def register_twin(
    name: str, of: str, devices: frozenset[str], kernels: Callable[[], object], why: str
) -> None:
    """Register backend ``name``: ``of``'s declarations and tolerance, served by other
    ``kernels`` (loaded on first use) on ``devices``; it runs only when asked for by
    name (``why`` says so to ``"auto"``), and the reference twin stays last. The tests
    run the CUDA kernels on the CPU this way, compiled against a simulator
    (tests/_cuda_sim.py)."""
    like = REGISTRY.backends[of]
    serves = {
        op: tuple(dataclasses.replace(c, devices=devices, slower=why) for c in combos)
        for op, combos in like.serves.items()
    }
    runs = {op: run for op, run in _compiled_runs(name).items() if op in serves}
    REGISTRY.register(Backend(name, serves, runs, None, kernels, like.tolerance), before="reference")
