"""Digits as model Samples for the model tests: features computed once per test process
(32 px: small and fast; the models do not depend on the resolution), into a private
cache, never the user's."""

from __future__ import annotations

import functools
import tempfile

import kmem
from kmem.models import Samples

RES = 32


@functools.cache
def digits(inputs: str = "features") -> tuple[Samples, Samples]:
    """``(train, test)`` Samples of the bundled digits: 1,437 and 360 samples."""
    data = kmem.load_dataset("digits")
    with tempfile.TemporaryDirectory() as cache:
        out = []
        for split in (data.train, data.test):
            x = kmem.encode(split, RES, cache_dir=cache) if inputs == "features" else split.images
            out.append(Samples(x, split.labels, split.ids))
    return out[0], out[1]
