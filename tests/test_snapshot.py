"""save/load: round trip, no deleted bytes on disk, clear errors on bad files."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import filled_memory
from safetensors.torch import save_file

import kmem


@pytest.mark.parametrize("num_classes", [None, 6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_round_trip(tmp_path, num_classes, dtype, metric):
    mem, *_ = filled_memory(70, num_classes=num_classes, dtype=dtype, metric=metric, compact_threshold=None)
    mem.delete([3, 9, 40])
    mem.save(tmp_path / "m.kmem")
    back = kmem.KeyMemory.load(tmp_path / "m.kmem")
    assert (back.key_dim, back.value_dim, back.num_classes, back.metric, back.dtype) == (
        8,
        mem.value_dim,
        num_classes,
        metric,
        dtype,
    )
    for x, y in zip(mem.state(), back.state(), strict=True):
        assert torch.equal(x, y)
    q = torch.randn(3, 8)
    assert torch.equal(mem.search(q, 5)[1], back.search(q, 5)[1])
    assert [f.name for f in tmp_path.iterdir()] == ["m.kmem"]  # no temp file left behind


def test_empty_round_trip(tmp_path):
    kmem.KeyMemory(4, 2).save(tmp_path / "e")
    assert len(kmem.KeyMemory.load(tmp_path / "e")) == 0


def test_deleted_rows_never_reach_the_file(tmp_path):
    mem = kmem.KeyMemory(16, 4, compact_threshold=None)
    pattern = 12345.6789
    mem.add(torch.arange(10), torch.randn(10, 16), torch.randn(10, 4))
    mem.add(torch.arange(10, 12), torch.full((2, 16), pattern), torch.full((2, 4), pattern))
    needle = torch.tensor([pattern]).numpy().tobytes()
    mem.save(tmp_path / "before")
    assert needle in (tmp_path / "before").read_bytes()
    mem.delete([10, 11])
    mem.save(tmp_path / "after")
    assert needle not in (tmp_path / "after").read_bytes()
    for buf in mem.buffers():
        assert needle not in buf.numpy().tobytes()


def test_overwrite_replaces_the_file(tmp_path):
    mem, *_ = filled_memory(10)
    mem.save(tmp_path / "m")
    mem.delete([0, 1])
    mem.save(tmp_path / "m")
    assert len(kmem.KeyMemory.load(tmp_path / "m")) == 8


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        kmem.KeyMemory.load(tmp_path / "missing")
    (tmp_path / "junk").write_bytes(b"\x00" * 50)
    with pytest.raises(ValueError, match="not a readable kmem snapshot"):
        kmem.KeyMemory.load(tmp_path / "junk")
    save_file({"ids": torch.arange(2)}, str(tmp_path / "other"), metadata={"format": "something"})
    with pytest.raises(ValueError, match="not a kmem snapshot"):
        kmem.KeyMemory.load(tmp_path / "other")
    mem, *_ = filled_memory(10)
    mem.save(tmp_path / "good")
    data = (tmp_path / "good").read_bytes()
    (tmp_path / "truncated").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError):
        kmem.KeyMemory.load(tmp_path / "truncated")
    meta = {"format": "kmem.KeyMemory", "format_version": "99", "config": json.dumps({})}
    save_file({"ids": torch.arange(2)}, str(tmp_path / "future"), metadata=meta)
    with pytest.raises(ValueError, match="format version"):
        kmem.KeyMemory.load(tmp_path / "future")
