"""What a ``kmem`` command costs before it does anything: a fresh interpreter running
``kmem ledger verify --help``. It imports no torch (``tests/test_cli_startup.py``
checks that), so this is Python's own start-up plus argparse, well under a second.
"""

from __future__ import annotations

import subprocess
import sys


def test_cli_help_startup(benchmark):
    command = [sys.executable, "-m", "kmem.cli", "ledger", "verify", "--help"]
    benchmark.group = "kmem command start-up"
    benchmark.pedantic(
        lambda: subprocess.run(command, check=True, capture_output=True), rounds=5, iterations=1
    )
