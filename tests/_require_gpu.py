"""A pytest hook for tests/conftest.py.

``KMEM_REQUIRE_GPU=1`` (set by ``scripts/gpu-check``) turns every test skipped for want
of a GPU, CUDA or Triton into a failure: on a machine lent for the GPU checks, a GPU
test that quietly skipped (a build without its CUDA kernels, a driver torch cannot
see) would read as a pass.
"""

from __future__ import annotations

import os
import re

import pytest

REQUIRE_GPU = "KMEM_REQUIRE_GPU"
_GPU_REASON = re.compile(r"cuda|gpu|triton", re.IGNORECASE)


def gpu_skip_fails(skip_reason: str) -> bool:
    """Whether a skip with ``skip_reason`` fails the test in this process."""
    return os.environ.get(REQUIRE_GPU) == "1" and bool(_GPU_REASON.search(skip_reason))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and isinstance(report.longrepr, tuple):  # (file, line, "Skipped: reason")
        reason = str(report.longrepr[2])
        if gpu_skip_fails(reason):
            report.outcome = "failed"
            report.longrepr = f"{REQUIRE_GPU}=1, but this GPU test skipped: {reason}"
