"""Large CPU buffers on 2 MB pages, where Linux offers them.

With transparent huge pages in ``madvise`` mode (a common default), memory is mapped in
4 KB pages unless a range asks for more. A memory's key buffer is read whole by every
scan and at random rows by every gather, so each 4 KB page costs a TLB miss: at
1.28M x 256 float32 keys, 2 MB pages made one read of the keys 1.5x faster and the
gathers of a k = 4096 attention 1.6x faster (BENCHMARKS.md). Elsewhere (another OS, THP
off, a GPU tensor) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch

_HUGE = 2 << 20
_MADV_HUGEPAGE = 14
_MIN_BYTES = 4 * _HUGE  # below this a buffer spans too few huge pages to matter


def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    fn = libc.madvise
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


_madvise_fn = _madvise()


def empty_on_huge_pages(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty(*shape)`` whose whole 2 MB pages are asked to be huge pages before
    anything touches them (the request is advice: refused, the buffer is the same)."""
    t = torch.empty(*shape, dtype=dtype, device=device)
    nbytes = t.numel() * t.element_size()
    if _madvise_fn is None or t.device.type != "cpu" or nbytes < _MIN_BYTES:
        return t
    start = (t.data_ptr() + _HUGE - 1) // _HUGE * _HUGE
    stop = (t.data_ptr() + nbytes) // _HUGE * _HUGE
    _madvise_fn(start, stop - start, _MADV_HUGEPAGE)
    return t
