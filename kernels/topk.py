"""kmem's Triton backend: the :class:`~kmem.ops.fused.KernelSet` of its kernels.

Register it with ``kmem.ops.fused.register("triton", KERNELS)``. On a machine without
a GPU the kernels run on CPU tensors through Triton's interpreter, which needs
``TRITON_INTERPRET=1`` set before this module is imported. :data:`LAUNCHES` counts
kernel launches by kernel name.
"""

from __future__ import annotations

from kmem.ops.fused import KernelSet

from ._common import LAUNCHES
from .attend import attend_backward, attend_forward
from .dense import dense_backward, dense_forward
from .search import search

__all__ = ["KERNELS", "LAUNCHES"]

KERNELS = KernelSet(
    search=search,
    attend_forward=attend_forward,
    attend_backward=attend_backward,
    dense_forward=dense_forward,
    dense_backward=dense_backward,
)
