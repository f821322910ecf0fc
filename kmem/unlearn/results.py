"""What an unlearning evaluation produced: per request, one row per (model family, method)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .metrics import Scores

ORIGINAL = "original"  # the trained model, before any forgetting
ORACLE = "retrain (oracle)"  # the same recipe trained from scratch without the forget set
KMEM = "kmem forget"  # memory models: delete the rows, no weight update
# The oracle's recipe with another seed: how far apart two equally valid oracles are.
ORACLE_SEED = "retrain, another seed (floor)"
REFERENCES = (ORIGINAL, ORACLE, ORACLE_SEED)  # rows that are not forgetting methods


@dataclass(frozen=True)
class MethodResult:
    """One method's metrics; ``family`` names the model it was applied to (its oracle's too)."""

    family: str
    method: str
    scores: Scores


@dataclass(frozen=True)
class Exactness:
    """Evidence that a memory model's forgetting is exact.

    Attributes:
        family: the model family.
        forgotten_rows: rows ``forget`` deleted.
        fingerprints_equal: after ``forget`` and ``compact``, every memory's fingerprint
            (SHA-256 of its settings and live ids, keys, values) equals that of the memory
            the same model builds from the retained samples alone (``memory_for``); for a
            stream request, after every one of its requests too.
        forgotten_ids_left: forgotten ids still in any memory (must be 0).
        predictions_equal: the model's predictions on the forget and test sets equal, bit
            for bit, those of the same weights reading the memory of the retained samples.
        fingerprint: the first memory's fingerprint after forgetting.
        compact_seconds: the compaction after the timed ``forget``.
        weights_that_saw: the trained weights that were fitted with the forgotten samples
            and are not changed by ``forget``.
        tables_equal: see the field's comment; True for a model without such tables.
    """

    family: str
    forgotten_rows: int
    fingerprints_equal: bool
    forgotten_ids_left: int
    predictions_equal: bool
    fingerprint: str
    compact_seconds: float
    weights_that_saw: str
    # Per-sample tables (MUNKEY's tokens with their optimiser state): after forget and
    # compaction, each fingerprints as it did before, restricted to the retained ids.
    tables_equal: bool = True
    tables: int = 0  # how many such tables the model has
    # Exact mode: after forget and compaction, every checkpoint tensor and every
    # prediction equal, bit for bit, those of the model really retrained without the
    # samples (same core, same seed). None: not exact mode, not checked.
    retrained_equal: bool | None = None

    @property
    def ok(self) -> bool:
        return (
            self.fingerprints_equal
            and self.tables_equal
            and self.predictions_equal
            and self.forgotten_ids_left == 0
            and self.retrained_equal is not False
        )


@dataclass
class RequestResult:
    """Every method's result on one forget request of one dataset."""

    dataset: str
    request: str
    forgotten: int
    retained: int
    test: int
    rows: list[MethodResult] = field(default_factory=list)
    retrain_seconds: dict[str, float] = field(default_factory=dict)  # by family
    # A stream request: each memory family's forget time per request, in order.
    step_seconds: dict[str, list[float]] = field(default_factory=dict)
    seed: int | None = 0  # the evaluation seed (None: an aggregate over ``seeds``)
    seeds: list[int] = field(default_factory=list)
    # An aggregate's intervals: "family/method" -> metric -> Interval (kmem.unlearn.stats).
    spread: dict[str, dict[str, Any]] = field(default_factory=dict)
    exactness: list[Exactness] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def row(self, family: str, method: str) -> MethodResult:
        for r in self.rows:
            if (r.family, r.method) == (family, method):
                return r
        raise KeyError(f"no result for {family}/{method} on {self.request}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RequestResult:
        """The inverse of :meth:`to_json` for one seed's result (an aggregate's ``spread``
        stays plain dicts)."""
        fields = dict(data)
        fields["rows"] = [MethodResult(r["family"], r["method"], Scores(**r["scores"])) for r in data["rows"]]
        fields["exactness"] = [Exactness(**e) for e in data["exactness"]]
        return cls(**fields)

    def merged(self, other: RequestResult) -> RequestResult:
        """This request's result with ``other``'s families (the same request and seed, run
        apart) appended: rows, times, exactness, and the notes not already here."""
        if (other.dataset, other.request, other.seed) != (self.dataset, self.request, self.seed):
            raise ValueError(
                f"cannot merge {other.dataset}/{other.request}/seed {other.seed} into "
                f"{self.dataset}/{self.request}/seed {self.seed}"
            )
        return replace(
            self,
            rows=[*self.rows, *other.rows],
            retrain_seconds={**self.retrain_seconds, **other.retrain_seconds},
            step_seconds={**self.step_seconds, **other.step_seconds},
            exactness=[*self.exactness, *other.exactness],
            notes=[*self.notes, *(n for n in other.notes if n not in self.notes)],
        )
