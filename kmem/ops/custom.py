"""The compiled backends' kernels as ``torch.library`` custom ops, generated from one table.

``kmem::search``, ``kmem::topk_attention`` and ``kmem::dense_attention`` (with their
backward ops) take a record's fields (:mod:`kmem.ops.inputs`) and the serving backend's
name, so autograd, fake tensors and ``torch.compile`` see one op per operation whatever
kernel serves it; the name is looked up in the one registry
(:data:`kmem.ops.registry.REGISTRY`). Gradients are the kernels' own, never autograd
through them.

Kernel contracts (every backend's ``kernels`` object; results in the working dtype,
float32 or float64):

* ``search(s: SearchInputs) -> (scores [B, k] float32, slots [B, k] int64)``, best
  first by (float32 score desc, slot asc), ``-inf`` / ``-1`` past the qualifying rows;
  each score is the one the row was ranked by (l2: ``2 q . k - ||k||^2``).
* ``attend_forward(a: AttendInputs, slots) -> (out [B, W], weights [B, k])``; a backend
  may also fuse the two, ``topk_forward(a) -> (out, slots, weights)`` -- the same
  result as ``search`` then ``attend_forward`` -- which top-k attention then runs; and
  ``attend_backward(g: AttendGrads) -> (dq, dkeys [N, d] | None, dvalues [N, V] | None)``;
  only the retrieved rows get gradient. Where ``g.per_retrieval`` (the call asked for
  sparse gradients) the row gradients are ``[B * k, d]`` and ``[B * k, V]`` instead, one
  row per retrieval, which autograd receives as a sparse COO gradient.
* ``dense_forward(d: DenseInputs) -> (out, lse [B])`` (``lse``: the log-sum-exp of
  ``scale * score`` over the attended rows, ``-inf`` when none) and
  ``dense_backward(g: DenseGrads) -> (dq, dkeys, dvalues)``, ``g.grad_lse [B]`` being the
  gradient reaching ``lse``.

A gradient not needed may come back as None; the schema carries it as an empty tensor,
and this module turns it back into None for autograd -- the one place that happens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from .inputs import AttendGrads, AttendInputs, DenseGrads, DenseInputs, SearchInputs
from .registry import REGISTRY, record_kernel

_SCHEMA_TYPES = {
    "torch.Tensor": "Tensor",
    "torch.Tensor | None": "Tensor?",
    "int": "int",
    "bool": "bool",
    "float": "float",
    "str": "str",
}


@dataclass(frozen=True)
class _Spec:
    """One custom op: the record it takes, then ``tensors`` (extra tensor arguments) and
    ``flags`` (bool arguments), then the backend name; ``outputs`` tensors come back.
    ``run(kernels, backend, record, *tensors, *flags)`` computes them; ``fake`` gives
    their shapes and dtypes."""

    name: str
    record: type
    outputs: int
    run: Callable
    fake: Callable
    tensors: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()

    @property
    def schema(self) -> str:
        args = [f"{_SCHEMA_TYPES[str(f.type)]} {f.name}" for f in fields(self.record)]
        args += [f"Tensor {t}" for t in self.tensors] + [f"bool {f}" for f in self.flags] + ["str backend"]
        out = "Tensor" if self.outputs == 1 else "(" + ", ".join(["Tensor"] * self.outputs) + ")"
        return f"({', '.join(args)}) -> {out}"

    def split(self, args: tuple) -> tuple[object, tuple, str]:
        """``(record, extra arguments, backend)`` from the op's positional arguments."""
        n = len(fields(self.record))
        return self.record(*args[:n]), args[n:-1], args[-1]


def _define(spec: _Spec):
    def impl(*args):
        record, extra, backend = spec.split(args)
        return spec.run(REGISTRY.backends[backend].kernels, backend, record, *extra)

    def fake(*args):
        record, extra, _ = spec.split(args)
        return spec.fake(record, *extra)

    op = torch.library.custom_op(f"kmem::{spec.name}", mutates_args=(), schema=spec.schema)(impl)
    op.register_fake(fake)
    return op


def _kernel(kernels, backend: str, name: str) -> Callable:
    record_kernel(backend, name)
    return getattr(kernels, name)


# --------------------------------------------------------------- forwards
def _run_search(kernels, backend, s: SearchInputs):
    return _kernel(kernels, backend, "search")(s)


def _run_topk(kernels, backend, a: AttendInputs):
    if hasattr(kernels, "topk_forward"):  # search and attend fused
        return _kernel(kernels, backend, "topk_forward")(a)
    _, slots = _kernel(kernels, backend, "search")(a.search())
    out, weights = _kernel(kernels, backend, "attend_forward")(a, slots)
    return out, slots, weights


def _run_dense(kernels, backend, d: DenseInputs):
    return tuple(_kernel(kernels, backend, "dense_forward")(d))


def _fake_search(s: SearchInputs):
    shape = (s.queries.shape[0], s.k)
    return s.queries.new_empty(shape, dtype=torch.float32), s.queries.new_empty(shape, dtype=torch.int64)


def _fake_topk(a: AttendInputs):
    b, dtype = a.queries.shape[0], a.working_dtype
    return (
        a.queries.new_empty((b, a.width), dtype=dtype),
        a.queries.new_empty((b, a.k), dtype=torch.int64),
        a.queries.new_empty((b, a.k), dtype=dtype),
    )


def _fake_dense(d: DenseInputs):
    b, dtype = d.queries.shape[0], d.working_dtype
    return d.queries.new_empty((b, d.width), dtype=dtype), d.queries.new_empty((b,), dtype=dtype)


# -------------------------------------------------------------- backwards
def _backward_runner(kernel: str, record: type) -> Callable:
    """Run backward ``kernel`` on its record (``AttendGrads`` / ``DenseGrads``) built from
    the op's arguments: the forward's record, what it saved, the gradients, the flags."""

    def run(kernels, backend, rec, *args):
        g = record(rec, *args)
        grads = _kernel(kernels, backend, kernel)(g)
        return _as_schema(rec, grads, g.needs_keys, g.needs_values)

    return run


def _as_schema(rec, grads, needs_keys: bool, needs_values: bool) -> tuple[torch.Tensor, ...]:
    """Kernel gradients in the inputs' dtypes; an empty tensor for one not needed."""
    dq, dk, dv = grads
    return (
        dq.to(rec.queries.dtype),
        dk.to(rec.keys.dtype) if needs_keys and dk is not None else _none(rec),
        dv.to(rec.values.dtype) if needs_values and dv is not None else _none(rec),
    )


def _none(rec) -> torch.Tensor:
    """A fresh empty tensor (outputs of a custom op must not alias each other)."""
    return rec.queries.new_empty(0)


def _fake_grads(rec, *args):
    *_, needs_keys, needs_values = args
    rows = (rec.queries.shape[0] * rec.k,) if rec.sparse_grad else rec.keys.shape[:1]
    return (
        torch.empty_like(rec.queries),
        rec.keys.new_empty((*rows, rec.keys.shape[1])) if needs_keys else _none(rec),
        rec.values.new_empty((*rows, rec.values.shape[1])) if needs_values and not rec.labels else _none(rec),
    )


def _sparse_rows(grad: torch.Tensor, slots: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The per-retrieval row gradients ``grad [B * k, ...]`` as a sparse COO gradient of
    ``like [N, ...]``, uncoalesced (autograd and the optimisers sum duplicate rows). A
    ``-1`` slot's row is zero; it is put on row 0 rather than filtered out, which would
    wait on the device for the count."""
    rows = slots.reshape(1, -1).clamp(min=0)
    return torch.sparse_coo_tensor(rows, grad, like.shape, check_invariants=False)


_GRADS = ("grad_out",)
_NEEDS = ("needs_keys", "needs_values")

SPECS = {
    spec.name: spec
    for spec in (
        _Spec("search", SearchInputs, 2, _run_search, _fake_search),
        _Spec("topk_attention", AttendInputs, 3, _run_topk, _fake_topk),
        _Spec(
            "topk_attention_backward", AttendInputs, 3, _backward_runner("attend_backward", AttendGrads), _fake_grads,
            tensors=("slots", "weights", *_GRADS), flags=_NEEDS,
        ),
        _Spec("dense_attention", DenseInputs, 2, _run_dense, _fake_dense),
        _Spec(
            "dense_attention_backward", DenseInputs, 3, _backward_runner("dense_backward", DenseGrads), _fake_grads,
            tensors=("out", "lse", *_GRADS, "grad_lse"), flags=_NEEDS,
        ),
    )
}  # fmt: skip
OPS = {name: _define(spec) for name, spec in SPECS.items()}


def _autograd(
    forward: str, backward: str, saved: tuple[int, ...], differentiable: tuple[int, ...] = ()
) -> None:
    """Wire ``backward`` as the gradient of ``forward``, saving its outputs ``saved``;
    the gradients of its outputs ``differentiable`` (past the first) are passed on too."""
    spec = SPECS[forward]
    names = [f.name for f in fields(spec.record)]
    tensors = [i for i, f in enumerate(fields(spec.record)) if str(f.type).startswith("torch.Tensor")]
    position = {name: i for i, name in enumerate(names)}

    def setup(ctx, inputs, output):
        # Only tensors may be saved, and None (no exclusions) is kept out: the rest of
        # the record rides on ctx.
        ctx.held = [i for i in tensors if inputs[i] is not None]
        ctx.save_for_backward(*(inputs[i] for i in ctx.held), *(output[i] for i in saved))
        ctx.scalars = [None if i in tensors else a for i, a in enumerate(inputs[: len(names)])]
        ctx.backend = inputs[-1]

    def grad(ctx, grad_out, *more):
        args, kept = list(ctx.scalars), ctx.saved_tensors
        for j, i in enumerate(ctx.held):
            args[i] = kept[j]
        kept = kept[len(ctx.held) :]
        rec = spec.record(*args)
        needs_keys = ctx.needs_input_grad[position["keys"]]
        needs_values = ctx.needs_input_grad[position["values"]] and not rec.labels
        passed = [more[i - 1] for i in differentiable]
        dq, dk, dv = OPS[backward](*args, *kept, grad_out, *passed, needs_keys, needs_values, ctx.backend)
        if rec.sparse_grad:  # top-k only: kept[0] is its slots
            dk = _sparse_rows(dk, kept[0], rec.keys) if needs_keys else None
            dv = _sparse_rows(dv, kept[0], rec.values) if needs_values else None
        out: list[torch.Tensor | None] = [None] * (len(names) + 1)
        out[position["queries"]] = dq
        out[position["keys"]] = dk if needs_keys else None
        out[position["values"]] = dv if needs_values else None
        return tuple(out)

    OPS[forward].register_autograd(grad, setup_context=setup)


_autograd("topk_attention", "topk_attention_backward", saved=(1, 2))
_autograd("dense_attention", "dense_attention_backward", saved=(0, 1), differentiable=(1,))


def call(name: str, record, backend: str):
    """Run custom op ``name`` on ``record`` with ``backend``'s kernels.

    The custom op is there for autograd and torch.compile; an eager call that needs
    neither (a search, an inference read) runs the very same body without the op's
    dispatch, which costs several times a small kernel."""
    if not torch.compiler.is_compiling() and not record.needs_grad:
        return SPECS[name].run(REGISTRY.backends[backend].kernels, backend, record)
    return OPS[name](*(getattr(record, f.name) for f in fields(record)), backend)
