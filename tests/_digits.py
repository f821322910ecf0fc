"""Digits as model Samples for the model tests: features computed once per test process
(32 px: small and fast; the models do not depend on the resolution), into a private
cache, never the user's."""

from __future__ import annotations

import functools
import tempfile

import torch

import kmem
from kmem.models import Samples, predict_proba

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


def forget_and_compare(model, n: int = 150):
    """Forget ``n`` random digits training ids from a copy of ``model`` holding them all and
    check it against the same weights with a memory that never held them: equal test
    predictions, equal fingerprints, and the predictions did change. Returns the copy
    after forgetting and the forgotten ids."""
    train_set, test = digits()
    forget = train_set.ids[torch.randperm(len(train_set))[:n]]
    oracle = model.with_memories(model.memory_for(train_set.without(forget)))
    m = model.with_memories(model.memory_for(train_set))
    before = predict_proba(m, test.inputs)
    assert m.forget(forget) == n
    after = predict_proba(m, test.inputs)
    assert torch.equal(after, predict_proba(oracle, test.inputs))
    assert not torch.equal(after, before)
    assert m.memories()[0].fingerprint() == oracle.memories()[0].fingerprint()
    return m, forget
