"""The process test_crash.py kills: it saves a memory again and again, changing it
between saves, so a SIGKILL lands in the middle of a save most of the time.

Every snapshot it writes holds the rows ``last - WINDOW + 1 .. last`` in order, whose
keys and values follow from their ids (:func:`rows`), at version
:func:`version_at` ``(last)``: a reader can tell a consistent snapshot from any other.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import torch

import kmem
from kmem import snapshot

WINDOW, KEY_DIM, VALUE_DIM = 256, 32, 8


def rows(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys ``[n, KEY_DIM]`` and values ``[n, VALUE_DIM]`` of ``ids``, exact in float32."""
    keys = ids[:, None].float() + torch.arange(KEY_DIM, dtype=torch.float32)
    return keys, ids[:, None].float().expand(-1, VALUE_DIM).contiguous()


def version_at(last: int) -> int:
    """One add of the first WINDOW rows, then an add and a delete per step."""
    return 1 + 2 * (last - (WINDOW - 1))


def run(path: str, ready, aim: bool = False) -> None:
    """Continue from the snapshot at ``path`` (or start one); send the next id on
    ``ready`` once a first save is done, then save forever.

    ``aim``: the next save stops halfway through writing its temporary file, says
    ``"mid-save"`` on ``ready`` and waits to be killed there -- a kill that lands inside
    a save by construction, however slow the machine.
    """
    if Path(path).exists():
        mem = kmem.KeyMemory.load(path)
        mem.compact_threshold = None
    else:
        mem = kmem.KeyMemory(KEY_DIM, VALUE_DIM, compact_threshold=None)
        ids = torch.arange(WINDOW)
        mem.add(ids, *rows(ids))
    step = int(mem.ids()[-1]) + 1
    mem.save(path)
    ready.send(step)
    if aim:
        _stop_halfway(ready)
    while True:
        new = torch.tensor([step])
        mem.add(new, *rows(new))
        mem.delete([step - WINDOW])
        mem.save(path)
        step += 1


def _stop_halfway(ready) -> None:
    """Make the next snapshot write half its bytes, flush them, then block."""

    def write_half(f, tensors, metadata):
        whole = io.BytesIO()
        write_whole(whole, tensors, metadata)
        f.write(whole.getvalue()[: whole.tell() // 2])
        f.flush()
        ready.send("mid-save")
        time.sleep(3600)

    write_whole = snapshot._write_safetensors
    snapshot._write_safetensors = write_half
