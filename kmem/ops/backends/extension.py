"""The compiled extension ``kmem._C``'s kernels on records: one adapter for its C++ and
its CUDA kernels, which take the same arguments under two prefixes (``cuda_search`` is
the CUDA twin of ``search``).

What each kernel serves is declared in :mod:`kmem.ops.backends`; nothing here hands a
call to another backend. Tensors are passed as they are, not detached: the kernels
run under a custom op or with no gradient needed (:mod:`kmem.ops.custom`), so nothing
here is recorded by autograd, and a detach is ~0.4 us of a ~20 us small read.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ... import _ext
from ..inputs import (
    AttendGrads,
    AttendInputs,
    CompactInputs,
    DenseGrads,
    DenseInputs,
    Grads,
    ScrubInputs,
    SearchInputs,
)


class Extension:
    """The kernels of ``kmem._C`` whose names start with ``prefix`` (``""``: C++,
    ``"cuda_"``: CUDA), called with a record's fields in the extension's argument order.
    ``module`` loads the extension module (another one: the tests' CUDA simulator)."""

    def __init__(self, prefix: str, module: Callable[[], object] = _ext.compiled) -> None:
        self.prefix = prefix
        self._module = module
        self._fns: dict[str, object] = {}

    def _fn(self, name: str):
        fn = self._fns.get(name)
        if fn is None:  # looked up once: the extension module does not change
            fn = self._fns[name] = getattr(self._module(), self.prefix + name)
        return fn

    def search(self, s: SearchInputs) -> tuple[torch.Tensor, torch.Tensor]:
        return self._fn("search")(s.queries, s.keys, s.slot_ids, s.k, s.l2, s.exclude_ids)

    def attend_forward(self, a: AttendInputs, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._fn("attend_forward")(a.queries, a.keys, a.values, slots, a.scale, a.l2, a.num_classes)

    def attend_backward(self, g: AttendGrads) -> Grads:
        a = g.inputs
        return self._fn("attend_backward")(
            g.grad_out, a.queries, a.keys, a.values, g.slots, g.weights,
            a.scale, a.l2, a.num_classes, g.needs_keys, g.needs_values, g.per_retrieval,
        )  # fmt: skip

    def dense_forward(self, d: DenseInputs) -> tuple[torch.Tensor, torch.Tensor]:
        return self._fn("dense_forward")(
            d.queries, d.keys, d.values, d.slot_ids, d.exclude_ids,
            d.scale, d.l2, d.num_classes,
        )  # fmt: skip

    def dense_backward(self, g: DenseGrads) -> Grads:
        d = g.inputs
        return self._fn("dense_backward")(
            g.grad_out, d.queries, d.keys, d.values, d.slot_ids, d.exclude_ids,
            g.out, g.lse, g.grad_lse, d.scale, d.l2, d.num_classes,
            g.needs_keys, g.needs_values,
        )  # fmt: skip

    def compact_rows(self, c: CompactInputs) -> int:
        """Stable compaction of every ``c.srcs`` buffer's kept rows into ``c.outs``; returns the rows kept."""
        return self._fn("compact_rows")(list(c.srcs), c.keep, list(c.outs))

    def zero_rows(self, z: ScrubInputs) -> None:
        self._fn("zero_rows")(z.dst, z.rows)


class CudaExtension(Extension):
    """The CUDA kernels (prefix ``"cuda_"``), which also run top-k attention in one pass:
    the search, then the attention over the rows found in its last kernel."""

    def __init__(self, module: Callable[[], object] = _ext.compiled) -> None:
        super().__init__("cuda_", module)

    def topk_forward(self, a: AttendInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._fn("topk_forward")(
            a.queries, a.keys, a.values, a.slot_ids, a.exclude_ids,
            a.k, a.scale, a.l2, a.num_classes,
        )  # fmt: skip
