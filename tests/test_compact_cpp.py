"""The compiled row kernels of kmem._C -- compaction and the scrub of deleted rows --
against their reference twins."""

from __future__ import annotations

import pytest
import torch

import kmem
from kmem import ops


@pytest.fixture(scope="module")
def ext():
    module = kmem._ext.compiled()
    assert module is not None, (
        f"the compiled extension must be built for these tests: {kmem._ext.missing_reason()}"
    )
    return module


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.bool]
)
@pytest.mark.parametrize(
    ("rows", "row_shape"), [(0, (3,)), (1, (1,)), (13, ()), (1001, (7,)), (20011, (2, 5))]
)
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_matches_reference(ext, dtype, rows, row_shape, density):
    src = (torch.randn(rows, *row_shape) * 100).to(dtype)
    keep = torch.rand(rows) < density
    out_cpp = torch.full((rows + 3, *row_shape), 7).to(dtype)
    out_ref = out_cpp.clone()
    with ops.trace() as ran:
        n_cpp = ops.compact_rows(src, keep, out_cpp, backend="cpp")
    assert ran == ["compact_rows:cpp", "cpp.compact_rows"]
    n_ref = ops.compact_rows(src, keep, out_ref, backend="reference")
    assert n_cpp == n_ref == int(keep.sum())
    assert torch.equal(out_cpp, out_ref)


def test_runs_of_kept_rows_cross_thread_blocks(ext):
    # Long runs make single memcpy calls span block boundaries of the parallel scan.
    rows = 50_000
    keep = torch.zeros(rows, dtype=torch.bool)
    keep[100:30_000] = True
    keep[-7:] = True
    src = torch.arange(rows * 3, dtype=torch.int64).reshape(rows, 3)
    out = torch.zeros_like(src)
    assert ops.compact_rows(src, keep, out, backend="cpp") == int(keep.sum())
    assert torch.equal(out[: int(keep.sum())], src[keep])


def test_auto_picks_the_compiled_kernel_on_cpu(ext):
    src, keep = torch.randn(10, 2), torch.ones(10, dtype=torch.bool)
    with ops.trace() as ran:
        ops.compact_rows(src, keep, torch.empty(10, 2))
    assert ran == ["compact_rows:cpp", "cpp.compact_rows"]
    assert ops.REGISTRY.names("compact_rows")[0] == "cpp"


def test_out_too_small_is_an_error(ext):
    with pytest.raises(RuntimeError, match="kept"):
        ops.compact_rows(
            torch.randn(10, 2), torch.ones(10, dtype=torch.bool), torch.empty(4, 2), backend="cpp"
        )


@pytest.mark.parametrize(
    ("keep", "out", "error"),
    [
        (torch.ones(10, dtype=torch.int64), torch.empty(10, 2), TypeError),
        (torch.ones(9, dtype=torch.bool), torch.empty(10, 2), ValueError),
        (torch.ones(10, dtype=torch.bool), torch.empty(10, 3), ValueError),
        (torch.ones(10, dtype=torch.bool), torch.empty(10, 2, dtype=torch.float64), ValueError),
        (torch.ones(10, dtype=torch.bool), torch.empty(2, 10).T, ValueError),  # not contiguous
        (
            torch.ones(10, dtype=torch.bool),
            [torch.empty(10, 2), torch.empty(10, 2)],
            ValueError,
        ),  # 1 src, 2 outs
        (torch.ones(10, dtype=torch.bool), [], TypeError),
        (torch.ones(10, dtype=torch.bool), [torch.empty(10, 2).numpy()], TypeError),
    ],
)
def test_bad_arguments(keep, out, error):
    with pytest.raises(error):
        ops.compact_rows(torch.randn(10, 2), keep, out)


def test_reference_backend_on_request_does_not_touch_the_extension(ext):
    out = torch.empty(5, 1)
    with ops.trace() as ran:
        reference_n = ops.compact_rows(
            torch.randn(5, 1), torch.ones(5, dtype=torch.bool), out, backend="reference"
        )
    assert reference_n == 5 and ran == ["compact_rows:reference"]
    assert ops.REGISTRY.names("compact_rows")[-1] == "reference"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.int64, torch.bool])
@pytest.mark.parametrize(("rows", "row_shape"), [(1, ()), (13, (3,)), (20011, (2, 5))])
@pytest.mark.parametrize("picked", [0.0, 0.4, 1.0])
def test_zero_rows_matches_reference(ext, dtype, rows, row_shape, picked):
    dst_cpp = (torch.randn(rows, *row_shape) * 100 + 1).to(dtype)
    dst_ref = dst_cpp.clone()
    which = torch.randperm(rows)[: int(picked * rows)]
    with ops.trace() as ran:
        ops.zero_rows(dst_cpp, which, backend="cpp")
    assert ran == ["zero_rows:cpp", "cpp.zero_rows"]
    ops.zero_rows(dst_ref, which, backend="reference")
    assert torch.equal(dst_cpp, dst_ref)
    untouched = torch.ones(rows, dtype=torch.bool).index_fill_(0, which, False)
    assert not bool(dst_cpp[which].bool().any()) and torch.equal(dst_cpp[untouched], dst_ref[untouched])


def test_zero_rows_is_an_in_place_edit_autograd_sees(ext):
    keys = torch.randn(6, 4)
    q = torch.randn(2, 4, requires_grad=True)
    out = (q @ keys.T).square().sum()  # saves keys for backward
    ops.zero_rows(keys, torch.tensor([1]), backend="cpp")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


@pytest.mark.parametrize(
    ("dst", "rows", "error"),
    [
        (torch.zeros(5, 2), torch.tensor([1.0]), TypeError),
        (torch.zeros(5, 2), torch.tensor([[1]]), ValueError),
        (torch.zeros(5, 2), torch.tensor([5]), IndexError),
        (torch.zeros(5, 2), torch.tensor([-1]), IndexError),
        (torch.zeros(2, 5).T, torch.tensor([0]), ValueError),  # not contiguous
        (torch.zeros(()), torch.tensor([0]), ValueError),
    ],
)
def test_zero_rows_bad_arguments(dst, rows, error):
    before = dst.clone()
    with pytest.raises(error):
        ops.zero_rows(dst, rows)
    assert torch.equal(dst, before)


def test_a_deletion_scrubs_through_the_compiled_kernel(ext):
    mem = kmem.KeyMemory(4, 3)
    mem.add(torch.arange(10), torch.randn(10, 4), torch.randn(10, 3))
    with ops.trace() as ran:
        mem.delete([2, 7])
    assert ran.count("cpp.zero_rows") == 2  # keys, values
