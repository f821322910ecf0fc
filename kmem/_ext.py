"""Access to the compiled extension ``kmem._C``, which may be missing.

A pure-Python checkout (no build) still works through the reference ops; dispatch asks
:func:`compiled` and reports :func:`missing_reason` when a compiled backend was asked
for explicitly.
"""

from __future__ import annotations

import importlib
from types import ModuleType

_module: ModuleType | None = None
_error: str | None = None


def _load() -> None:
    global _module, _error
    if _module is not None or _error is not None:
        return
    try:
        _module = importlib.import_module("kmem._C")
    except ImportError as err:
        _error = f"kmem._C is not built or failed to load ({err}); reinstall with the README's command"


def compiled() -> ModuleType | None:
    """The loaded ``kmem._C`` module, or None when it is not available."""
    _load()
    return _module


def missing_reason() -> str | None:
    """Why ``kmem._C`` is unavailable, or None when it loaded."""
    _load()
    return _error
