"""Backend selection for kmem's ops.

Every op keeps its backends in priority order. A backend declares the devices and
dtypes it serves and whether it is present at all; :meth:`Op.select` returns the first
backend that can run a call (``backend="auto"``) or exactly the one asked for, and
raises :class:`BackendUnavailable` with every reason when it cannot -- a backend asked
for by name never falls back silently.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run this call; the message says why."""


@dataclass(frozen=True)
class Backend:
    """One implementation of an op.

    ``devices``: device types served (``"cpu"``, ``"cuda"``); ``dtypes``: key/row dtypes
    served, ``None`` for any; ``missing``: returns why the backend is absent (e.g. the
    extension is not built), or None when present.
    """

    name: str
    fn: Callable
    devices: frozenset[str]
    dtypes: frozenset[torch.dtype] | None = None
    missing: Callable[[], str | None] = lambda: None

    def reasons(self, device: torch.device, dtype: torch.dtype) -> list[str]:
        """Why this backend cannot run on ``device`` with ``dtype``; empty when it can."""
        out = []
        absent = self.missing()
        if absent:
            out.append(absent)
        if device.type not in self.devices:
            out.append(f"device {device.type} not supported (supports {sorted(self.devices)})")
        if self.dtypes is not None and dtype not in self.dtypes:
            names = sorted(str(d).removeprefix("torch.") for d in self.dtypes)
            out.append(f"dtype {dtype} not supported (supports {names})")
        return out


@dataclass
class Op:
    """An op name and its backends, best first."""

    name: str
    backends: list[Backend] = field(default_factory=list)

    def register(self, backend: Backend) -> None:
        self.backends.append(backend)

    def names(self) -> list[str]:
        return [b.name for b in self.backends]

    def select(self, backend: str, device: torch.device, dtype: torch.dtype) -> Backend:
        if backend == "auto":
            candidates: Iterable[Backend] = self.backends
        else:
            candidates = [b for b in self.backends if b.name == backend]
            if not candidates:
                raise ValueError(
                    f"{self.name}: unknown backend {backend!r}; choose from {['auto', *self.names()]}"
                )
        why = {}
        for b in candidates:
            reasons = b.reasons(device, dtype)
            if not reasons:
                return b
            why[b.name] = reasons
        detail = "; ".join(f"{name}: {', '.join(r)}" for name, r in why.items())
        raise BackendUnavailable(f"{self.name}: no backend can run on {device.type}/{dtype} ({detail})")
