"""MUNKEY-style classifier (arXiv 2603.15033): a small transformer over image tokens and
the learnable exemplar tokens of the K nearest training samples.

One memory row per training image: key = the image's L2-normalised frozen-encoder
feature, value = its exemplar token (a learnable vector, ``token_dim`` wide). A query
image's normalised feature retrieves the top-``k`` rows by inner product (cosine); their
tokens (from :class:`ExemplarTokens`, so only retrieved rows get gradient) join the
image pathway's tokens -- ``image_tokens`` tokens projected from the frozen feature --
and a class token in a transformer encoder. Aggregation:

* ``"ensemble"`` (the paper's): one pass per retrieved token, the K passes' class
  probabilities averaged; the model outputs the log of that mean.
* ``"single"``: one pass with all K retrieved tokens; the model outputs logits.

Stochastic pathway dropout: in training, each sample's retrieved tokens are all
replaced by a learned null token with probability ``pathway_dropout``, so the image
pathway alone stays predictive (a query with no rows to retrieve also sees the null
token).

Training retrieval, ``retrieve_self`` (the default): a training sample retrieves its
own top-k, its own row among them, and only its own row gets gradient -- the
neighbours' rows it reads are constants. Each row is then fitted by its own sample's
loss alone: what is specific to a sample goes to its row and to no other, so deleting
the row leaves no trace of the sample in the memory, and the row absorbs the loss the
dense weights would otherwise fit by memorising the sample. (With gradient into the
neighbours' rows, a retained row learns the labels of the samples that retrieved it,
forgotten ones included: on Fashion-MNIST that leak alone made forgotten samples 1.2
points easier than unseen ones.) ``retrieve_self=False``: leave-batch-out -- the
batch's own ids are excluded, as at test time a query is never its own neighbour, and
the retrieved rows are trained by the queries that read them.

The defaults (2 epochs, token lr 0.1, pathway dropout 0.2) are chosen for forgetting:
every extra epoch lets the dense weights memorise the training samples further, which
no deletion undoes (see docs/evaluation.md, "Proving forgetting").

The memory's values mirror the token table: the memory is what is searched, deleted,
saved and fingerprinted; tokens are read from the table by the ids the search returns,
and :meth:`Munkey.end_training` copies the trained tokens into the memory.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from ..memory import IdsLike, KeyMemory
from . import rowwise
from .base import TRAINING, Classifier, check_ids
from .exemplars import ExemplarTokens
from .samples import Samples

AGGREGATIONS = ("ensemble", "single")
_SEARCH_BATCH = 1024  # queries per memory search
_MARGIN = 8  # neighbours precomputed beyond k, to stand in for those leave-batch-out removes


class Munkey(Classifier):
    """Settings: ``k`` (rows retrieved), ``token_dim`` (exemplar token and transformer
    width), ``image_tokens``, ``layers``, ``heads``, ``ff`` (transformer), ``dropout``,
    ``pathway_dropout``, ``aggregation`` (``"ensemble"``/``"single"``), ``token_lr``
    (the token table's lazy Adam), ``token_init`` (std of the tokens' normal
    initialisation), ``retrieve_self`` (training retrieval: False, leave-batch-out;
    True, each sample's own top-k, its own row included), ``admit_steps`` (exact mode:
    Adam steps fitting the token of a sample the dense weights never saw, see
    :meth:`admit`), and the training settings. Inputs: frozen features ``[B, F]``.
    """

    name = "munkey"
    defaults: ClassVar[dict[str, Any]] = {
        **TRAINING,
        "epochs": 2,
        "k": 4,
        "token_dim": 128,
        "image_tokens": 4,
        "layers": 1,
        "heads": 4,
        "ff": 256,
        "dropout": 0.1,
        "pathway_dropout": 0.2,
        "aggregation": "ensemble",
        "token_lr": 0.1,
        "token_init": 0.02,
        "retrieve_self": True,
        "admit_steps": 8,
    }

    def __init__(self, num_classes: int, input_shape: tuple[int, ...], **config: Any) -> None:
        super().__init__(num_classes, input_shape, **config)
        c = self.config
        if len(self.input_shape) != 1:
            raise ValueError(f"munkey takes frozen features [n, F], got input shape {list(self.input_shape)}")
        if c["aggregation"] not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {c['aggregation']!r}")
        if int(c["k"]) < 1 or not 0.0 <= float(c["pathway_dropout"]) <= 1.0:
            raise ValueError(
                f"k must be >= 1 and pathway_dropout in [0, 1], got {c['k']}, {c['pathway_dropout']}"
            )
        d, t, features = c["token_dim"], c["image_tokens"], self.input_shape[0]
        self.image = nn.Sequential(nn.LayerNorm(features), nn.Linear(features, t * d))
        self.cls = nn.Parameter(torch.zeros(d))
        self.null = nn.Parameter(torch.randn(d) * c["token_init"])
        self.image_pos = nn.Parameter(torch.randn(t, d) * 0.02)
        self.rank_pos = nn.Parameter(torch.randn(int(c["k"]), d) * 0.02)  # which neighbour a token is
        layer = nn.TransformerEncoderLayer(
            d, c["heads"], c["ff"], c["dropout"], activation="gelu", batch_first=True, norm_first=True
        )
        self.transformer = nn.TransformerEncoder(layer, c["layers"], enable_nested_tensor=False)
        self.head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, num_classes))
        self.tokens = ExemplarTokens(d, lr=c["token_lr"])
        self.use_memories([self._empty_memory()])
        self._neighbours: tuple[torch.Tensor, torch.Tensor] | None = None

    # ------------------------------------------------------------ model
    @property
    def memory(self) -> KeyMemory:
        """One row per training sample: key its normalised feature, value its token."""
        return self._held[0]

    @staticmethod
    def keys(inputs: torch.Tensor) -> torch.Tensor:
        """The memory key of each input (and its query): the L2-normalised feature."""
        return nn.functional.normalize(inputs, dim=-1)

    def retrieve(self, inputs: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Ids ``[B, k]`` of the rows retrieved for ``inputs`` (``-1`` past the live rows),
        none of them in ``ids`` (leave-batch-out) when given."""
        ids = check_ids(ids, inputs.shape[0])
        k = int(self.config["k"])
        if ids is not None and self._neighbours is not None:
            return self._precomputed(inputs, ids, k)
        exclude = None if ids is None else ids.expand(len(ids), -1).contiguous()
        return self.memory.search(self.keys(inputs), k, exclude_ids=exclude)[1]

    def forward(self, inputs: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        return self._predict(inputs, self.retrieve(inputs, ids))

    def loss(self, batch: Samples, generator: torch.Generator) -> torch.Tensor:
        """Cross-entropy with the training retrieval: leave-batch-out, or with
        ``retrieve_self`` each sample's own top-k (its own row among them)."""
        if self.config["retrieve_self"]:
            found = self._lists(batch.ids)[:, : int(self.config["k"])]
            logits = self._predict(batch.inputs, found, own=batch.ids)
        else:
            logits = self._predict(batch.inputs, self.retrieve(batch.inputs, batch.ids))
        return nn.functional.cross_entropy(logits, batch.labels)

    def _predict(
        self, inputs: torch.Tensor, found: torch.Tensor, own: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits or log-probabilities of ``inputs`` given the retrieved ids ``found [B, k]``.

        With ``own`` (int64 ``[B]``, the inputs' ids) only each input's own row gets
        gradient; the other rows retrieved are read as constants.
        """
        if own is None:
            memory = self.tokens(found)  # [B, k, d], zero rows where nothing was found
        else:
            # A row trained by its own sample's loss alone: deleting a sample then leaves
            # no trace of it in any other row (the rows it retrieved were not fitted to it).
            with torch.no_grad():
                memory = self.tokens(found)
            is_own = (found == own[:, None]).unsqueeze(-1)
            memory = torch.where(is_own, self.tokens(own).unsqueeze(1), memory)
        null = (found < 0).unsqueeze(-1)
        if self.training and self.config["pathway_dropout"] > 0:
            drop = torch.rand(found.shape[0], 1, 1) < self.config["pathway_dropout"]
            null = null | drop
        memory = torch.where(null, self.null, memory) + self.rank_pos
        b, d = inputs.shape[0], self.config["token_dim"]
        image = self.image(inputs).reshape(b, -1, d) + self.image_pos
        cls = self.cls.expand(b, 1, d)
        if self.config["aggregation"] == "single":
            return self._classify(torch.cat([cls, image, memory], dim=1))
        k = memory.shape[1]
        seq = torch.cat(
            [cls.repeat_interleave(k, 0), image.repeat_interleave(k, 0), memory.reshape(b * k, 1, d)], dim=1
        )
        logp = self._classify(seq).log_softmax(-1).reshape(b, k, -1)
        return torch.logsumexp(logp, dim=1) - math.log(k)  # log of the K passes' mean probabilities

    def _classify(self, seq: torch.Tensor) -> torch.Tensor:
        return self.head(self.transformer(seq)[:, 0])

    # --------------------------------------------------------- training
    def row_tables(self) -> list[nn.Module]:
        return [self.tokens]

    def rows_fit_own_sample_only(self) -> bool:
        # Leave-batch-out trains a row by the losses of the samples that retrieve it.
        return bool(self.config["retrieve_self"])

    def begin_training(self, train: Samples, generator: torch.Generator) -> None:
        """Fill the memory and the token table, then precompute each sample's neighbours."""
        tokens = (
            torch.randn(len(train), self.config["token_dim"], generator=generator) * self.config["token_init"]
        )
        self.tokens.add(train.ids, tokens)
        mem = self._empty_memory()
        mem.add(train.ids, self.keys(train.inputs), tokens)
        self.use_memories([mem])
        self._neighbours = self._precompute(train)

    def end_training(self, train: Samples) -> None:
        self._neighbours = None
        self.tokens.release_state()  # training is over: deletion then scrubs the tokens alone
        self.use_memories(self.memory_for(train))

    def admit(self, samples: Samples) -> None:
        """Rows for ``samples`` the frozen model never trained on (exact mode), each token
        fitted from its own sample alone.

        A sample retrieves its own row and its top ``k - 1`` rows among those the model
        held before this call (the core's), so what it reads depends on the core and on
        itself, never on the other samples admitted. Its token starts as its nearest
        such row's token and takes ``admit_steps`` lazy-Adam steps (``token_lr``) on its
        own loss, in eval mode, every dense weight frozen. The per-sample losses are
        summed, so the batch a sample is fitted in changes nothing of its token.
        """
        if not len(samples):
            return
        if self.memory.num_dead:
            raise ValueError("admit rows before forgetting any: the memory has deleted rows")
        k, steps = int(self.config["k"]), int(self.config["admit_steps"])
        near = torch.cat([
            self.memory.search(self.keys(samples.inputs[i : i + _SEARCH_BATCH]), max(k - 1, 1))[1]
            for i in range(0, len(samples), _SEARCH_BATCH)
        ])  # fmt: skip
        found = torch.cat([samples.ids[:, None], near[:, : k - 1]], dim=1)
        start, nearest = torch.zeros(len(samples), self.config["token_dim"]), near[:, 0]
        start[nearest >= 0] = self.tokens.get(nearest[nearest >= 0])
        self.tokens.add(samples.ids, start)
        was, frozen = self.training, [p for p in self.parameters() if p is not self.tokens.weight]
        needs = [p.requires_grad for p in frozen]
        self.eval()
        try:
            for p in frozen:
                p.requires_grad_(False)
            for rows, extra in tqdm(
                list(rowwise.chunks(len(samples))), desc="munkey admit", disable=None, leave=False
            ):
                # Fixed-size chunks, padded with rows that find nothing: a token's steps
                # go through the same kernels whatever the other samples are.
                inputs, ids = (
                    rowwise.pad(samples.inputs[rows], extra),
                    rowwise.pad(samples.ids[rows], extra, -1),
                )
                lists, labels = rowwise.pad(found[rows], extra, -1), samples.labels[rows]
                for _ in range(steps):
                    logits = self._predict(inputs, lists, own=ids)[: len(labels)]
                    nn.functional.cross_entropy(logits, labels, reduction="sum").backward()
                    self.tokens.step()
        finally:
            for p, need in zip(frozen, needs, strict=True):
                p.requires_grad_(need)
            self.train(was)
        self.tokens.release_state()
        self.memory.add(samples.ids, self.keys(samples.inputs), self.tokens.get(samples.ids))

    def _precompute(self, train: Samples) -> tuple[torch.Tensor, torch.Tensor]:
        """Sorted train ids and, in that order, each sample's top ``k + margin`` rows
        (other rows, unless ``retrieve_self``).

        Queries and keys are frozen, so this search is the same at every step; per
        batch, :meth:`_precomputed` drops the batch's ids from these lists.
        """
        order = torch.argsort(train.ids)
        ids, queries = train.ids[order], self.keys(train.inputs[order])
        width = int(self.config["k"]) + _MARGIN
        found = torch.empty(len(ids), width, dtype=torch.int64)
        for i in tqdm(range(0, len(ids), _SEARCH_BATCH), desc="munkey neighbours", disable=None, leave=False):
            part = slice(i, i + _SEARCH_BATCH)
            exclude = None if self.config["retrieve_self"] else ids[part, None]
            found[part] = self.memory.search(queries[part], width, exclude_ids=exclude)[1]
        return ids, found

    def _precomputed(self, inputs: torch.Tensor, ids: torch.Tensor, k: int) -> torch.Tensor:
        """Top-``k`` rows of each training sample ``ids`` with the batch's ids excluded:
        the first ``k`` of its precomputed list not in the batch -- exactly what a search
        excluding the batch returns -- or such a search where too few are left."""
        lists = self._lists(ids)
        ok = ~torch.isin(lists, ids) & (lists >= 0)
        rank = ok.cumsum(1)
        keep = ok & (rank <= k)
        out = torch.full((len(ids), k), -1, dtype=torch.int64)
        rows, cols = keep.nonzero(as_tuple=True)
        out[rows, rank[keep] - 1] = lists[rows, cols]
        # A list that ran short where rows remain: ask the memory.
        short = (rank[:, -1] < k) & (lists >= 0).all(1)
        if bool(short.any()):
            exclude = ids.expand(int(short.sum()), -1).contiguous()
            out[short] = self.memory.search(self.keys(inputs[short]), k, exclude_ids=exclude)[1]
        return out

    def _lists(self, ids: torch.Tensor) -> torch.Tensor:
        """The precomputed neighbour lists of the training samples ``ids``."""
        sorted_ids, lists = self._neighbours
        pos = torch.searchsorted(sorted_ids, ids.contiguous()).clamp(max=len(sorted_ids) - 1)
        if not torch.equal(sorted_ids[pos], ids):
            raise KeyError("retrieval in training takes the training samples' ids")
        return lists[pos]

    # -------------------------------------------------------- forgetting
    def _delete_rows(self, ids: IdsLike, *, request_id: str | None, reason: str | None) -> int:
        """Delete the rows (key and token) from the memory and their tokens, with their
        optimiser state, from the table."""
        n = self.memory.delete(ids, request_id=request_id, reason=reason)
        self.tokens.delete(ids)
        return n

    def memory_for(self, samples: Samples) -> list[KeyMemory]:
        mem = self._empty_memory()
        mem.add(samples.ids, self.keys(samples.inputs), self.tokens.get(samples.ids))
        return [mem]

    def use_memories(self, memories: list[KeyMemory]) -> None:
        if len(memories) != 1 or not isinstance(memories[0], KeyMemory):
            raise ValueError(f"munkey reads one KeyMemory, got {memories!r}")
        mem = memories[0]
        if mem.key_dim != self.input_shape[0] or mem.value_dim != self.config["token_dim"]:
            raise ValueError(
                f"munkey needs a memory with key_dim={self.input_shape[0]} and "
                f"value_dim={self.config['token_dim']}, got {mem!r}"
            )
        self._held = [mem]

    def _empty_memory(self) -> KeyMemory:
        return KeyMemory(self.input_shape[0], self.config["token_dim"])
