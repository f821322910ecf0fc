"""The CUDA simulator that runs kmem's CUDA kernels on the CPU (``csrc/cuda/sim``,
built by ``_cuda_sim.py``): its warp exchanges keep CUDA's definitions, and the faults
a GPU would not report -- a shuffle some lanes never reach, a warp split between two
barriers or between two shuffles, shared memory past the launch limit -- fail the
launch with a message. The kernels themselves are tested through the kernel contract,
as backend "cuda-sim"."""

from __future__ import annotations

import _cuda_sim
import pytest
import torch


@pytest.fixture(scope="module")
def sim():
    return _cuda_sim.module()


def test_warp_exchanges_keep_cuda_semantics(sim):
    threads = 72  # two whole warps and a partial third
    out = torch.zeros(threads, 6, dtype=torch.int32)
    assert sim.selftest("shuffles", threads, 0, out) == ""
    t = torch.arange(threads, dtype=torch.int32)
    lane, base = t % 32, t - t % 32
    # The third warp's missing lanes have no value to give: only whole warps are checked
    # where a source lane may be missing.
    assert torch.equal(out[:64, 0], t[:64] ^ 5)
    assert torch.equal(out[:, 1], torch.where(lane >= 3, t - 3, t))  # no source below lane 0: own value
    assert torch.equal(out[:64, 2], torch.where(lane + 7 < 32, t + 7, t)[:64])
    assert torch.equal(out[:64, 3], (base + 9)[:64])
    assert bool((out[:64, 4] == 0xAAAAAAAA - 2**32).all())  # the odd lanes' bits, as int32
    assert bool((out[:, 5] == t.sum()).all())  # every thread's add landed before the barrier


def test_a_shuffle_that_lanes_have_left_fails_the_launch(sim):
    error = sim.selftest("diverged", 64, 0, torch.zeros(64, dtype=torch.int32))
    assert "21 lanes wait at a warp exchange while 11 have exited" in error


def test_a_warp_split_between_barriers_fails_the_launch(sim):
    error = sim.selftest("split", 32, 0, torch.zeros(32, dtype=torch.int32))
    assert "16 lanes wait at a warp exchange" in error and "__syncthreads" in error


def test_lanes_at_two_different_shuffles_fail_the_launch(sim):
    error = sim.selftest("two places", 32, 0, torch.zeros(32, dtype=torch.int32))
    assert "different places" in error


def test_launch_limits_are_checked(sim):
    out = torch.zeros(1024, dtype=torch.float32)
    assert "without an opt-in" in sim.selftest("smem", 32, 64 * 1024, out)
    assert "a block of 2048 threads" in sim.selftest("smem", 2048, 0, torch.zeros(2048))
    # Shared memory starts as 0xFF bytes: read before written, it is NaN.
    assert sim.selftest("smem", 32, 16, out) == "" and bool(out[:32].isnan().all())


def test_mma_follows_the_ptx_fragment_layout(sim):
    """One m16n8k8 TF32 MMA, each lane loading and storing its fragments by the PTX ISA's
    layout, gives A B; the operands lose the mantissa bits TF32 drops (2^-20 here)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-8, 9, (16, 8), generator=g).float()
    b = torch.randint(-8, 9, (8, 8), generator=g).float()
    out = torch.cat([torch.zeros(128), (a * (1 + 2.0**-20)).flatten(), b.flatten()])
    assert sim.selftest("mma", 32, 0, out) == ""
    assert torch.equal(out[:128].view(16, 8), a @ b)  # small integers: exact in any order
