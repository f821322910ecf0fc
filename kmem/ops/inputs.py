"""The ops' inputs as records, checked once, at the public boundary.

A record holds one call's tensors and settings, mirroring the ``*Args`` structs of
``csrc/cuda/topk_attention.cuh``: dispatch reads its :class:`Signature` to pick a
backend, the custom ops (:mod:`kmem.ops.custom`) are generated from its fields, and every
backend's kernels take it whole. :meth:`checked` constructors validate user input and
name the offending argument; code that already holds valid buffers (the memory)
builds records directly. Records are not changed once built (``dataclasses.replace``
makes a new one); they are not frozen because a frozen dataclass's construction costs
~3x, a visible part of a small read.

Shapes: ``queries [B, d]`` floating, ``keys [N, d]`` floating, ``slot_ids [N]`` int64
(``-1`` = an empty or deleted slot), ``values [N, V]`` floating or ``[N]`` int64 labels
with ``num_classes > 0`` (``0``: vector values), ``exclude_ids [B, E]`` int64 or None.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch

from .. import _checks


class Signature(NamedTuple):
    """What dispatch matches a backend's declared combinations against."""

    device: str
    queries: torch.dtype | None  # None: the op has no queries (row copies)
    keys: torch.dtype
    values: torch.dtype | None  # None: no values, or int64 labels
    labels: bool
    k: int | None
    grads: bool


@dataclass(slots=True)
class SearchInputs:
    """Top-``k`` rows per query: a backend's ``search(inputs)`` returns ``(scores
    float32 [B, k], slots int64 [B, k])``, best first, ``-inf`` / ``-1`` past the end."""

    op: ClassVar[str] = "search"
    queries: torch.Tensor
    keys: torch.Tensor
    slot_ids: torch.Tensor
    exclude_ids: torch.Tensor | None
    k: int
    metric: str

    @classmethod
    def checked(cls, queries, keys, slot_ids, k, metric="ip", exclude_ids=None) -> SearchInputs:
        _check_memory(queries, keys, slot_ids)
        return cls(
            queries, keys, slot_ids, _exclusions(exclude_ids, queries), _checks.k(k), _checks.metric(metric)
        )

    needs_grad: ClassVar[bool] = False  # its slots carry no gradient

    @property
    def l2(self) -> bool:
        return self.metric == "l2"

    def signature(self) -> Signature:
        return Signature(
            _device(self.queries), self.queries.dtype, self.keys.dtype, None, False, self.k, False
        )


@dataclass(slots=True)
class _RowsInputs:
    """What top-k and dense attention share: the memory, its values and the softmax scale."""

    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    slot_ids: torch.Tensor
    exclude_ids: torch.Tensor | None
    scale: float
    metric: str
    num_classes: int

    @property
    def l2(self) -> bool:
        return self.metric == "l2"

    @property
    def labels(self) -> bool:
        return self.num_classes > 0

    @property
    def width(self) -> int:
        """Columns of the result: ``V``, or ``num_classes`` for label values."""
        return self.num_classes or self.values.shape[1]

    @property
    def working_dtype(self) -> torch.dtype:
        """float32, or float64 when the queries or keys are float64."""
        wide = torch.float64 in (self.queries.dtype, self.keys.dtype)
        return torch.float64 if wide else torch.float32

    @property
    def needs_grad(self) -> bool:
        """Autograd will ask this call for gradients."""
        return torch.is_grad_enabled() and any(
            t.requires_grad for t in (self.queries, self.keys, self.values)
        )

    def signature(self) -> Signature:
        return Signature(
            _device(self.queries),
            self.queries.dtype,
            self.keys.dtype,
            None if self.labels else self.values.dtype,
            self.labels,
            getattr(self, "k", None),
            self.needs_grad,
        )


@dataclass(slots=True)
class AttendInputs(_RowsInputs):
    """Softmax attention over each query's top-``k`` live rows. ``sparse_grad``: the
    gradients of keys and values are sparse COO tensors holding only the ``B * k``
    retrieved rows (as ``nn.Embedding(sparse=True)``'s), not dense ``[N, ...]`` ones."""

    op: ClassVar[str] = "topk_attention"
    k: int
    sparse_grad: bool = False

    def search(self) -> SearchInputs:
        """The scan half: the same query, memory, exclusions and ``k``."""
        return SearchInputs(self.queries, self.keys, self.slot_ids, self.exclude_ids, self.k, self.metric)


@dataclass(slots=True)
class DenseInputs(_RowsInputs):
    """Softmax attention over every live, non-excluded row."""

    op: ClassVar[str] = "dense_attention"
    sparse_grad: ClassVar[bool] = False  # every live row gets gradient


Grads = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]  # (dq, dkeys, dvalues)


@dataclass(slots=True)
class AttendGrads:
    """What top-k attention's backward reads (the ``AttendBackwardArgs`` of the CUDA
    kernels): the forward's record, its chosen ``slots [B, k]`` and softmax ``weights
    [B, k]``, the gradient reaching its output ``grad_out [B, W]``, and which row
    gradients are needed. ``attend_backward(g) ->`` :data:`Grads`; only the retrieved
    rows get gradient, and a gradient not needed (or dvalues of labels) is None."""

    inputs: AttendInputs
    slots: torch.Tensor
    weights: torch.Tensor
    grad_out: torch.Tensor
    needs_keys: bool = True
    needs_values: bool = True

    @property
    def per_retrieval(self) -> bool:
        """Row gradients come back per retrieval, ``dkeys [B * k, d]`` and ``dvalues
        [B * k, V]`` in ``slots``' order (zero where a slot is ``-1``), not summed into
        ``[N, ...]``: what a sparse gradient holds (``inputs.sparse_grad``)."""
        return self.inputs.sparse_grad


@dataclass(slots=True)
class DenseGrads:
    """What dense attention's backward reads: the forward's record, its ``out [B, W]``
    and ``lse [B]``, the gradients reaching them (``grad_out``, ``grad_lse``), and which
    row gradients are needed. ``dense_backward(g) ->`` :data:`Grads`."""

    inputs: DenseInputs
    out: torch.Tensor
    lse: torch.Tensor
    grad_out: torch.Tensor
    grad_lse: torch.Tensor
    needs_keys: bool = True
    needs_values: bool = True


def attention_inputs(
    queries,
    keys,
    values,
    slot_ids,
    k=32,
    scale=None,
    metric="ip",
    exclude_ids=None,
    num_classes=None,
    sparse_grad=False,
    *,
    checked: bool = True,
) -> AttendInputs | DenseInputs:
    """The record of a top-k (``k`` an int) or dense (``k=None``) attention call, the
    arguments as :func:`kmem.ops.topk_attention` takes them; ``checked=False`` for a
    caller that has checked them already. ``scale`` defaults to ``1/sqrt(d)``."""
    if sparse_grad and k is None:
        raise ValueError(
            "sparse_grad is for top-k attention: dense attention (k=None) gives every live row gradient"
        )
    if checked:
        _check_memory(queries, keys, slot_ids)
        _checks.metric(metric)
        if num_classes is None:
            _checks.floating("values", values)
            _checks.shape("values", values, (keys.shape[0], None))
        else:
            _checks.int64("values", values)
            _checks.shape("values", values, (keys.shape[0],))
            if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
                raise ValueError(f"num_classes must be an int >= 1 for label values, got {num_classes!r}")
        if values.device != queries.device:
            raise ValueError(f"values is on {values.device} but queries are on {queries.device}")
        exclude_ids = _exclusions(exclude_ids, queries)
        k = None if k is None else _checks.k(k)
    scale = default_scale(queries) if scale is None else float(scale)
    rows = (queries, keys, values, slot_ids, exclude_ids, scale, metric, num_classes or 0)
    return DenseInputs(*rows) if k is None else AttendInputs(*rows, k=k, sparse_grad=bool(sparse_grad))


@dataclass(slots=True)
class CompactInputs:
    """Stable compaction of several buffers at once: the rows where ``keep [N]`` (bool)
    holds, of every ``srcs[i] [N, ...]``, go in order to the front of ``outs[i]`` (same
    dtype and row shape, contiguous). One pass over ``keep`` serves every buffer."""

    op: ClassVar[str] = "compact_rows"
    srcs: tuple[torch.Tensor, ...]
    keep: torch.Tensor
    outs: tuple[torch.Tensor, ...]

    @classmethod
    def checked(cls, src, keep, out) -> CompactInputs:
        """``src`` and ``out``: one tensor each, or equally long sequences of them."""
        srcs, outs = _buffers("src", src), _buffers("out", out)
        if len(srcs) != len(outs):
            raise ValueError(f"src has {len(srcs)} buffers but out has {len(outs)}")
        _checks.tensor("keep", keep)
        if keep.dtype != torch.bool:
            raise TypeError(f"keep must be bool, got {keep.dtype}")
        _checks.shape("keep", keep, (None,))
        for i, (s, o) in enumerate(zip(srcs, outs, strict=True)):
            name = "src" if len(srcs) == 1 else f"src[{i}]"
            if s.dim() < 1 or s.shape[0] != keep.shape[0]:
                raise ValueError(
                    f"{name} must have one row per entry of keep ({keep.shape[0]}), got {list(s.shape)}"
                )
            if o.dtype != s.dtype or o.shape[1:] != s.shape[1:]:
                raise ValueError(f"out must have src's dtype and row shape, got {o.dtype} {list(o.shape)}")
            if not o.is_contiguous():
                raise ValueError("out must be contiguous: the rows are written into it")
            for t in (o, keep):
                if t.device != s.device:
                    raise ValueError(
                        f"every buffer and keep must be on one device: {t.device} and {s.device}"
                    )
        return cls(tuple(s.contiguous() for s in srcs), keep.contiguous(), outs)

    def signature(self) -> Signature:
        return Signature(_device(self.keep), None, self.srcs[0].dtype, None, False, None, False)


def _buffers(name: str, x) -> tuple[torch.Tensor, ...]:
    """A tensor, or a non-empty sequence of tensors, as a tuple."""
    if isinstance(x, torch.Tensor):
        return (x,)
    if not isinstance(x, list | tuple) or not x:
        raise TypeError(
            f"{name} must be a torch.Tensor or a non-empty sequence of them, got {type(x).__name__}"
        )
    return tuple(_checks.tensor(f"{name}[{i}]", t) for i, t in enumerate(x))


@dataclass(slots=True)
class ScrubInputs:
    """The scrub of deleted rows: zero rows ``rows [n]`` (int64) of the contiguous ``dst [N, ...]``."""

    op: ClassVar[str] = "zero_rows"
    dst: torch.Tensor
    rows: torch.Tensor

    @classmethod
    def checked(cls, dst, rows) -> ScrubInputs:
        _checks.tensor("dst", dst)
        _checks.int64("rows", rows)
        _checks.shape("rows", rows, (None,))
        if dst.dim() < 1 or not dst.is_contiguous():
            raise ValueError(f"dst must be a contiguous tensor of rows, got shape {list(dst.shape)}")
        if rows.device != dst.device:
            raise ValueError(f"rows is on {rows.device} but dst is on {dst.device}")
        if len(rows) and not bool(((rows >= 0) & (rows < dst.shape[0])).all()):
            raise IndexError(f"rows must lie in [0, {dst.shape[0]})")
        return cls(dst, rows.contiguous())

    def signature(self) -> Signature:
        return Signature(_device(self.dst), None, self.dst.dtype, None, False, None, False)


def _device(t: torch.Tensor) -> str:
    """``t.device.type``; ``is_cpu`` answers the common case without making a device object."""
    return "cpu" if t.is_cpu else t.device.type


def default_scale(queries: torch.Tensor) -> float:
    """The softmax scale when none is given: ``1/sqrt(d)``."""
    return 1.0 / math.sqrt(queries.shape[1])


def _check_memory(queries, keys, slot_ids) -> None:
    _checks.floating("queries", queries)
    _checks.floating("keys", keys)
    _checks.int64("slot_ids", slot_ids)
    _checks.shape("queries", queries, (None, None))
    _checks.shape("keys", keys, (None, queries.shape[1]))
    _checks.shape("slot_ids", slot_ids, (keys.shape[0],))
    for name, t in (("keys", keys), ("slot_ids", slot_ids)):
        if t.device != queries.device:
            raise ValueError(f"{name} is on {t.device} but queries are on {queries.device}")
    _checks.finite("queries", queries)


def _exclusions(exclude_ids, queries: torch.Tensor) -> torch.Tensor | None:
    return _checks.exclude_ids(exclude_ids, queries.shape[0], queries.device)
