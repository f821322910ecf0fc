"""The one registry of kmem's backends, and dispatch.

A :class:`Backend` declares, per op, the exact input combinations its own kernels run
(:class:`Serves`: device, query/key/value dtypes, label values, gradients, a ``k``
range); why it is absent at all (extension not built, no GPU) is found once, at import.
:func:`select` returns the first backend, in priority order, that serves a call
(``backend="auto"``) or exactly the one asked for, and raises
:class:`BackendUnavailable` with every reason when it cannot: a backend asked for by
name never hands the call to another one. The reference twin serves everything and
comes last, so under ``"auto"`` it is the only fallback -- chosen here, in the open,
and shown by :func:`plan`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .inputs import Signature

FLOATS = frozenset({torch.float32, torch.float64, torch.bfloat16, torch.float16})
NARROW = FLOATS - {torch.float64}  # what float32 kernels read (float64 would lose precision)
OPS = ("search", "topk_attention", "dense_attention", "compact_rows", "zero_rows")


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run this call; the message says why."""


def _names(dtypes: frozenset[torch.dtype]) -> list[str]:
    return sorted(str(d).removeprefix("torch.") for d in dtypes)


@dataclass(frozen=True)
class Serves:
    """One combination of inputs a backend's kernels run themselves.

    ``keys``: the key (or row) dtypes, None for any; ``values``: the dtypes of vector
    values, or ``"keys"`` for the keys' dtype only;
    ``labels``: int64 label values too; ``grads``: the backward too; ``k``: the range
    of ``k`` (top-k ops); ``slower``: why ``backend="auto"`` passes this combination by
    although the kernels run it -- they were measured slower than a backend after them
    (asked for by name, they still run).
    """

    devices: frozenset[str]
    queries: frozenset[torch.dtype] = FLOATS
    keys: frozenset[torch.dtype] | None = FLOATS
    values: frozenset[torch.dtype] | str = FLOATS
    labels: bool = True
    grads: bool = True
    k: tuple[int, int] = (1, 2**31 - 1)
    slower: str | None = None

    def refusals(self, sig: Signature, auto: bool = False) -> list[str]:
        """Why this combination does not cover ``sig`` (for ``backend="auto"`` when
        ``auto``); empty when it does."""
        out = [f"auto passes it by: {self.slower}"] if auto and self.slower else []
        if sig.device not in self.devices:
            out.append(f"device {sig.device} not supported (supports {sorted(self.devices)})")
        if sig.queries is not None and sig.queries not in self.queries:
            out.append(f"queries {_dtype(sig.queries)} not supported (supports {_names(self.queries)})")
        if self.keys is not None and sig.keys not in self.keys:
            out.append(f"dtype {_dtype(sig.keys)} not supported (supports {_names(self.keys)})")
        if sig.labels and not self.labels:
            out.append("label values not supported")
        if sig.values is not None:
            allowed = frozenset({sig.keys}) if self.values == "keys" else self.values
            if sig.values not in allowed:
                want = "the keys' dtype" if self.values == "keys" else str(_names(allowed))
                out.append(f"values {_dtype(sig.values)} not supported (supports {want})")
        if sig.grads and not self.grads:
            out.append("gradients not supported")
        if sig.k is not None and not self.k[0] <= sig.k <= self.k[1]:
            out.append(f"k={sig.k} not supported (supports {self.k[0]}..{self.k[1]})")
        return out


def _dtype(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


@dataclass
class Backend:
    """One implementation of some of the ops.

    ``serves``: per op, the combinations it runs; ``run``: per op, the function that
    runs a record (see :mod:`kmem.ops.inputs`); ``absent``: why the backend cannot run
    in this process (None: it can), found once, at registration; ``kernels``: the
    kernels the custom ops call (:mod:`kmem.ops.custom`), loaded on first use;
    ``tolerance``: ``(rtol, atol)`` its float32 results keep against an exact (float64)
    computation of the same op -- what the kernel tests hold it to.
    """

    name: str
    serves: dict[str, tuple[Serves, ...]]
    run: dict[str, Callable]
    absent: str | None = None
    load_kernels: Callable[[], Any] | None = None
    tolerance: tuple[float, float] = (1e-5, 1e-6)
    _kernels: Any = field(default=None, init=False, repr=False)

    # Cached by hand: functools.cached_property takes a lock that torch.compile cannot trace.
    @property
    def kernels(self) -> Any:
        if self._kernels is None:
            if self.load_kernels is None:
                raise BackendUnavailable(f"{self.name} brings no compiled kernels")
            self._kernels = self.load_kernels()
        return self._kernels

    def refusals(self, op: str, sig: Signature, auto: bool = False) -> list[str]:
        """Why this backend cannot run ``op`` on ``sig`` (or, with ``auto``, why
        ``backend="auto"`` does not pick it); empty when it can."""
        if op not in self.serves:
            return [f"does not implement {op}"]
        if self.absent:
            return [self.absent]
        per = [c.refusals(sig, auto) for c in self.serves[op]]
        return [] if any(not r for r in per) else min(per, key=len)


@dataclass
class Registry:
    """Backends by name, best first."""

    backends: dict[str, Backend] = field(default_factory=dict)
    # (op, backend asked for, signature) -> the backend that serves it: a call's choice
    # depends on nothing else, and availability does not change within a process.
    _chosen: dict[tuple, Backend] = field(default_factory=dict, repr=False)

    def register(self, backend: Backend, before: str | None = None) -> None:
        """Add ``backend`` last, or just before backend ``before``."""
        self.backends[backend.name] = backend
        if before is not None:
            names = list(self.backends)
            names.insert(names.index(before), names.pop())
            self.backends = {n: self.backends[n] for n in names}
        self._chosen.clear()

    def names(self, op: str | None = None) -> list[str]:
        """The backends (implementing ``op``), best first."""
        return [n for n, b in self.backends.items() if op is None or op in b.serves]

    def select(self, op: str, inputs: Any, backend: str = "auto") -> Backend:
        """The backend that runs ``op`` on ``inputs`` (a record of :mod:`kmem.ops.inputs`)."""
        sig = inputs.signature()
        chosen = self._chosen.get((op, backend, sig))
        if chosen is None:
            chosen = self._chosen[op, backend, sig] = self._select(op, sig, backend)
        if _TRACES:
            _record(f"{op}:{chosen.name}")
        return chosen

    def _select(self, op: str, sig: Signature, backend: str) -> Backend:
        if backend == "auto":
            candidates = [b for b in self.backends.values() if op in b.serves]
        elif backend in self.backends and op in self.backends[backend].serves:
            candidates = [self.backends[backend]]
        else:
            raise ValueError(f"{op}: unknown backend {backend!r}; choose from {['auto', *self.names(op)]}")
        why = {}
        for b in candidates:
            reasons = b.refusals(op, sig, auto=backend == "auto")
            if not reasons:
                return b
            why[b.name] = reasons
        detail = "; ".join(f"{name}: {', '.join(r)}" for name, r in why.items())
        raise BackendUnavailable(f"{op}: no backend can run on {sig.device}/{_dtype(sig.keys)} ({detail})")

    def plan(self, op: str, inputs: Any) -> Plan:
        """Which backend ``"auto"`` picks for ``op`` on ``inputs``, and why each better one cannot."""
        sig = inputs.signature()
        refused = {}
        for name in self.names(op):
            reasons = self.backends[name].refusals(op, sig, auto=True)
            if not reasons:
                return Plan(op, sig, name, refused)
            refused[name] = reasons
        return Plan(op, sig, None, refused)


@dataclass(frozen=True)
class Plan:
    """What dispatch does with one call: ``chosen`` (None: no backend can) and the
    reasons of each backend ahead of it."""

    op: str
    signature: Signature
    chosen: str | None
    refused: dict[str, list[str]]

    def __str__(self) -> str:
        lines = [f"{self.op} on {self.signature.device}, keys {_dtype(self.signature.keys)}:"]
        lines += [f"  {name}: no -- {'; '.join(r)}" for name, r in self.refused.items()]
        lines.append(f"  {self.chosen}: runs it" if self.chosen else "  no backend can run it")
        return "\n".join(lines)


REGISTRY = Registry()
_TRACES: list[list[str]] = []


def _record(event: str) -> None:
    for trace in _TRACES:
        trace.append(event)


def record_kernel(backend: str, kernel: str) -> None:
    """Note that ``backend``'s ``kernel`` ran (read by :func:`trace`)."""
    if _TRACES:
        _record(f"{backend}.{kernel}")


@contextlib.contextmanager
def trace() -> Iterator[list[str]]:
    """Record what serves the calls made inside the block: ``"op:backend"`` for each
    dispatch and ``"backend.kernel"`` for each compiled kernel run. Nothing is counted
    outside such a block."""
    events: list[str] = []
    _TRACES.append(events)
    try:
        yield events
    finally:
        _TRACES.remove(events)
