"""The library core works without the evaluation extras (``pip install kmem`` without
``[eval]``), and the commands that need them say how to install them."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from kmem.cli import EVAL_EXTRAS

# Run in a fresh interpreter where the modules of the `eval` extra are absent, as on an
# install without it (a None entry makes `import` fail and `find_spec` find nothing).
_BLOCK = f"import sys\nsys.modules.update(dict.fromkeys({EVAL_EXTRAS!r}))\n"


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _BLOCK + textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )


def test_the_core_runs_without_the_evaluation_extras():
    done = _run(
        """
        import torch, kmem
        mem = kmem.KeyMemory(8, 3)
        mem.add(torch.arange(10), torch.randn(10, 8), torch.randn(10, 3))
        layer = kmem.KeyMemoryAttention(8, mem, k=4)
        layer(torch.randn(2, 8)).sum().backward()
        mem.delete([3])
        print(kmem.ops.explain("search", torch.randn(2, 8), *mem.buffers()[::2], 4).chosen)
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["cpp"]


def test_a_command_that_needs_the_extras_says_how_to_install_them():
    done = _run("import sys, kmem.cli; sys.exit(kmem.cli.main(['demo', '--quick']))")
    assert done.returncode == 2, done.stderr
    assert "pip install 'kmem[eval]'" in done.stderr
