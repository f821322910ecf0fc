"""Access to the compiled extension ``kmem._C``, which may be missing.

A pure-Python checkout (no build) still works through the reference ops; dispatch asks
:func:`compiled` and reports :func:`missing_reason` when a compiled backend was asked
for explicitly. The extension is loaded once, at import, so these are plain reads
(torch.compile traces through dispatch).
"""

from __future__ import annotations

import importlib
from types import ModuleType


def _load() -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module("kmem._C"), None
    except ImportError as err:
        return None, f"kmem._C is not built or failed to load ({err}); reinstall with the README's command"


_module, _error = _load()


def compiled() -> ModuleType | None:
    """The loaded ``kmem._C`` module, or None when it is not available."""
    return _module


def missing_reason() -> str | None:
    """Why ``kmem._C`` is unavailable, or None when it loaded."""
    return _error
