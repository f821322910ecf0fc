"""The torchrun command of docs/distributed.md: the example runs on 2 gloo ranks and checks itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_torchrun_example():
    """It prints whether the sharded memory equals one KeyMemory without the forgotten rows."""
    root = Path(__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    out = subprocess.run(
        [*command, str(root / "examples" / "sharded_memory.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "equals one KeyMemory without the forgotten rows: True" in out.stdout
