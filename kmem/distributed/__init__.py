"""A KeyMemory sharded over the ranks of a ``torch.distributed`` process group.

* :class:`ShardedKeyMemory` -- ``KeyMemory``'s interface; rows live on the rank
  :func:`owner_of` their id; search and attention return the exact global result.
* :class:`ShardError` -- a collective failed (a rank died or timed out).

Works with ``gloo`` (CPU tensors) and ``nccl`` (CUDA tensors, one GPU per rank; set
``TORCH_NCCL_BLOCKING_WAIT=1`` so that a timed-out collective raises in the caller
rather than NCCL's watchdog ending the process).
"""

from .comm import ShardError
from .memory import ShardedKeyMemory
from .routing import owner_of

__all__ = ["ShardError", "ShardedKeyMemory", "owner_of"]
