"""The memory demo: a label memory over the bundled digits, then forgetting.

Builds a :class:`KeyMemory` from scikit-learn's digits (always there offline),
classifies the test split by attention over the top-k training rows, forgets a random
fraction of the training samples by id, and checks that the memory -- and every
prediction -- is exactly that of a memory that never received them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from sklearn.datasets import load_digits

from .memory import KeyMemory


@dataclass
class DemoResult:
    """Figures of one demo run."""

    train_rows: int
    test_rows: int
    forgotten: int
    accuracy_before: float
    accuracy_after: float
    predictions_changed: int
    delete_seconds: float
    rebuild_seconds: float
    same_fingerprint: bool
    same_predictions: bool
    forgotten_retrieved: int

    def summary(self) -> str:
        ok = (
            "yes"
            if self.same_fingerprint and self.same_predictions and not self.forgotten_retrieved
            else "NO"
        )
        return "\n".join(
            [
                f"memory: {self.train_rows} digits rows (64-d keys, 10 classes), {self.test_rows} test queries",
                f"accuracy before forgetting: {100 * self.accuracy_before:.2f}%",
                f"forgot {self.forgotten} rows in {1e3 * self.delete_seconds:.3f} ms "
                f"(rebuilding the memory without them: {1e3 * self.rebuild_seconds:.3f} ms)",
                f"accuracy after forgetting:  {100 * self.accuracy_after:.2f}% "
                f"({self.predictions_changed} test predictions changed)",
                f"identical to a memory that never held them (state fingerprint, every prediction): {ok}",
                f"forgotten ids retrieved by any test query afterwards: {self.forgotten_retrieved}",
            ]
        )


def _digits(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(train_ids, train_keys, train_labels, test_keys, test_labels)``; keys unit-norm."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = torch.nn.functional.normalize(x - x.mean(0), dim=1)
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(x))
    train, test = order[:split], order[split:]
    return train, x[train], y[train], x[test], y[test]  # a sample's id is its index in the dataset


def _build(ids: torch.Tensor, keys: torch.Tensor, labels: torch.Tensor, chunk: int = 256) -> KeyMemory:
    mem = KeyMemory(keys.shape[1], num_classes=10)
    for start in range(0, len(ids), chunk):
        mem.add(ids[start : start + chunk], keys[start : start + chunk], labels[start : start + chunk])
    return mem


def run(forget_fraction: float = 0.1, k: int = 10, scale: float = 20.0, seed: int = 0) -> DemoResult:
    """Run the demo; ``scale`` sharpens the softmax over cosine similarities."""
    if not 0.0 < forget_fraction < 1.0:
        raise ValueError(f"forget_fraction must be in (0, 1), got {forget_fraction}")
    torch.manual_seed(seed)
    ids, keys, labels, test_keys, test_labels = _digits(seed)
    mem = _build(ids, keys, labels)
    before = mem.attend(test_keys, k=k, scale=scale)

    gone = ids[torch.randperm(len(ids))[: int(forget_fraction * len(ids))]]
    start = time.perf_counter()
    mem.delete(gone)
    delete_seconds = time.perf_counter() - start
    after = mem.attend(test_keys, k=k, scale=scale)

    keep = ~torch.isin(ids, gone)
    start = time.perf_counter()
    never = _build(ids[keep], keys[keep], labels[keep])
    rebuild_seconds = time.perf_counter() - start
    _, retrieved = mem.search(test_keys, k)
    return DemoResult(
        train_rows=len(ids),
        test_rows=len(test_keys),
        forgotten=len(gone),
        accuracy_before=(before.argmax(1) == test_labels).float().mean().item(),
        accuracy_after=(after.argmax(1) == test_labels).float().mean().item(),
        predictions_changed=int((before.argmax(1) != after.argmax(1)).sum()),
        delete_seconds=delete_seconds,
        rebuild_seconds=rebuild_seconds,
        same_fingerprint=mem.fingerprint() == never.fingerprint(),
        same_predictions=torch.equal(after, never.attend(test_keys, k=k, scale=scale)),
        forgotten_retrieved=int(torch.isin(retrieved, gone).sum()),
    )
