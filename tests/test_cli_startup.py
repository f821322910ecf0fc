"""The command line starts without torch: ``kmem --help`` and ``kmem ledger`` must not
pay seconds of imports for nothing. Whether torch got imported is the deterministic
stand-in for start-up time (``bench/test_bench_cli.py`` times it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import kmem
from kmem.choices import DATASETS, METHODS, MODELS

ROOT = Path(__file__).parents[1]

_VERIFY_WITHOUT_TORCH = """
import sys
from kmem.cli import main

try:
    main(["ledger", "verify", "--help"])
except SystemExit:
    pass
code = main(["ledger", "verify", sys.argv[1]])
torch = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
print("exit", code, "torch modules:", torch)
"""


def test_ledger_verify_does_not_import_torch(tmp_path):
    path = tmp_path / "ledger.db"
    with (
        kmem.Ledger(path) as ledger,
        ledger.record(
            request_id="r1", ids=[1, 2], version_before=0, version_after=1, rows_before=2, rows_after=0
        ),
    ):
        pass
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(
        [sys.executable, "-c", _VERIFY_WITHOUT_TORCH, str(path)], capture_output=True, text=True, env=env
    )
    assert run.returncode == 0, run.stderr
    assert "OK: 1 receipt(s)" in run.stdout
    assert run.stdout.splitlines()[-1] == "exit 0 torch modules: []"


def test_import_kmem_is_lazy_and_complete():
    assert set(kmem.__all__) <= set(dir(kmem))
    for name in kmem.__all__:
        assert getattr(kmem, name) is not None, name
    from kmem import KeyMemory, models

    assert KeyMemory is kmem.memory.KeyMemory and models.MODELS == MODELS


def test_choices_name_what_the_modules_implement():
    from kmem.datasets import splits as data
    from kmem.models import registry
    from kmem.unlearn import posthoc

    assert tuple(data._LOADERS) == DATASETS == kmem.DATASETS
    assert tuple(registry._CLASSES) == MODELS
    assert tuple(posthoc._RUN) == METHODS == posthoc.METHODS
