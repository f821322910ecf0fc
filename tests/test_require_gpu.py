"""KMEM_REQUIRE_GPU=1 (scripts/gpu-check) fails GPU tests that skip; other skips stay skips."""

from __future__ import annotations

pytest_plugins = ["pytester"]

TESTS = """
import pytest

@pytest.mark.skipif(True, reason="needs a CUDA GPU: none")
def test_marked(): pass

def test_skips_inside(): pytest.skip("triton backend unavailable: not installed")

def test_other_skip(): pytest.skip("needs scipy")

def test_runs(): pass
"""


def _run(pytester, monkeypatch, required: str | None):
    pytester.makeconftest("from _require_gpu import pytest_runtest_makereport  # noqa: F401")
    pytester.makepyfile(TESTS)
    if required is None:
        monkeypatch.delenv("KMEM_REQUIRE_GPU", raising=False)
    else:
        monkeypatch.setenv("KMEM_REQUIRE_GPU", required)
    return pytester.runpytest("-p", "no:cacheprovider")


def test_gpu_skips_fail_when_required(pytester, monkeypatch):
    result = _run(pytester, monkeypatch, "1")
    result.assert_outcomes(passed=1, skipped=1, failed=1, errors=1)  # skipif skips at setup: an error
    result.stdout.fnmatch_lines(["*KMEM_REQUIRE_GPU=1, but this GPU test skipped*"])
    assert result.ret != 0


def test_gpu_skips_are_skips_otherwise(pytester, monkeypatch):
    for required in (None, "0"):
        _run(pytester, monkeypatch, required).assert_outcomes(passed=1, skipped=3)
