"""Token-level statistics of whole sequences: perplexity, bits per byte, and drift (KL to the base model).

Everything here goes through :func:`score_sequences`, which scores the tokens ``seq[start:]`` of each
sequence (each predicted from all tokens before it) and, given a ``base_context``, also runs the base model
(e.g. a PEFT model with its adapter disabled) on the same batch, so that perplexity of both models and the KL
between them come from one pass over the data.

* **Perplexity** of a passage set: ``exp(sum NLL / number of tokens)`` over the first ``max_tokens`` tokens of
  every passage; the first token is predicted from the BOS token (else EOS), so every passage token counts.
* **Bits per byte**: ``sum NLL / ln 2 / number of UTF-8 bytes`` of the text those tokens cover (tokenizer
  independent, comparable across models).
* **Drift**: mean over scored tokens of ``KL(p_base || p_model)``, in nats per token, over the full vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from arrtune.lm import (
    HEAD_CHUNK,
    LMParts,
    batched,
    chunks,
    eval_mode,
    expand_cache,
    pad_token_id,
    prefix_token_id,
)

MIN_SHARED_PREFIX = 8  # tokens; a shorter common prefix is run with every batch


@dataclass
class SequenceStats:
    """Per-sequence sums over the scored tokens: NLL of the model, NLL of the base model and KL(base || model)
    (both None without a base context), the number of scored tokens, and how many of them are not the model's
    most likely next token (0: greedy decoding reproduces the sequence, given its first ``start`` tokens)."""

    nll: list[float]
    n_tokens: list[int]
    nll_base: list[float] | None = None
    kl: list[float] | None = None
    argmax_misses: list[int] | None = None

    @property
    def total_tokens(self) -> int:
        return sum(self.n_tokens)

    def mean_nll(self, base: bool = False) -> float:
        values = self.nll_base if base else self.nll
        if values is None or not self.total_tokens:
            return float("nan")
        return sum(values) / self.total_tokens

    def mean_kl(self) -> float:
        if self.kl is None or not self.total_tokens:
            return float("nan")
        return sum(self.kl) / self.total_tokens


def score_sequences(
    model,
    tokenizer,
    sequences: Sequence[Sequence[int]],
    starts: Sequence[int],
    batch_size: int = 16,
    base_context: Callable[[], AbstractContextManager] | None = None,
    kl: bool = True,
    progress: bool = False,
    desc: str = "text",
    base_hidden: list[torch.Tensor] | None = None,
    share_prefix: bool = True,
) -> SequenceStats:
    """NLL (and, with ``base_context``, base NLL and KL(base || model)) of tokens ``seq[start:]`` of each
    sequence; ``start >= 1``. Sequences are batched longest first, right-padded.

    ``share_prefix``: when all sequences start with the same tokens before any scored position (a chat
    template's system prompt, typically half of a short task item), those tokens run once and every batch
    continues from their keys and values (:func:`shared_prefix_length`); the results equal the unshared pass
    up to float rounding.

    ``base_hidden``: a list that holds the base model's last hidden states at the scored positions, one tensor
    per batch: filled when empty, used instead of the base forward pass when filled (by an earlier call with
    the same sequences, starts, batch size and base model, e.g. the next adapter of a comparison)."""
    if any(s < 1 or s > len(q) for q, s in zip(sequences, starts)):
        raise ValueError("every start must be in [1, len(sequence)]")
    parts = LMParts(model)
    pad_id = pad_token_id(tokenizer)
    n = len(sequences)
    totals = _Totals.zeros(n)
    order = sorted(range(n), key=lambda i: -len(sequences[i]))
    shared = shared_prefix_length(sequences, starts) if share_prefix else 0
    with eval_mode(model), tqdm(total=n, desc=desc, disable=not progress, leave=False) as bar:
        prefix = parts.prefix_cache(sequences[0][:shared]) if shared else None
        base_states = _BaseStates(parts, base_context, base_hidden, sequences[0][:shared] if shared else None)
        for b, indices in enumerate(batched(order, batch_size)):
            batch = _prepare_batch(sequences, starts, indices, shared, pad_id, parts.device)
            hidden = parts.hidden(batch.ids, batch.mask, None, _expanded(prefix, batch.size))
            hidden = hidden[batch.rows, batch.cols]
            hidden_base = base_states(b, batch)
            _add_scores(parts, totals, batch, hidden, hidden_base, base_context, kl)
            bar.update(batch.size)
    return totals.stats(sequences, starts, with_base=base_context is not None, kl=kl)


@dataclass
class _Batch:
    """One right-padded batch (tokens after the shared prefix) and, per scored token, its place and target."""

    size: int
    ids: torch.Tensor
    mask: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    targets: torch.Tensor
    owner: torch.Tensor


def _prepare_batch(
    sequences: Sequence[Sequence[int]],
    starts: Sequence[int],
    indices: list[int],
    shared: int,
    pad_id: int,
    device: torch.device,
) -> _Batch:
    """Inputs of the sequences ``indices``, and each scored token's row, column, target and sequence."""
    width = max(len(sequences[i]) for i in indices) - shared
    ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(indices), shared + width), dtype=torch.long)
    rows, cols, targets, owner = [], [], [], []
    for r, i in enumerate(indices):
        seq = list(sequences[i])
        ids[r, : len(seq) - shared] = torch.tensor(seq[shared:])
        mask[r, : len(seq)] = 1
        for t in range(starts[i], len(seq)):
            rows.append(r)
            cols.append(t - 1 - shared)
            targets.append(seq[t])
            owner.append(i)
    ids, mask = ids.to(device), mask.to(device)
    rows_t, cols_t = torch.tensor(rows), torch.tensor(cols)
    targets_t, owner_t = torch.tensor(targets), torch.tensor(owner)
    return _Batch(len(indices), ids, mask, rows_t, cols_t, targets_t, owner_t)


class _BaseStates:
    """The base model's last hidden states at each batch's scored positions (cached in ``base_hidden``)."""

    def __init__(
        self,
        parts: LMParts,
        base_context: Callable[[], AbstractContextManager] | None,
        base_hidden: list[torch.Tensor] | None,
        prefix_ids: Sequence[int] | None,
    ) -> None:
        self.parts = parts
        self.base_context = base_context
        self.base_hidden = base_hidden
        self.prefix_ids = prefix_ids
        self.prefix: Any = None  # the base model's cache of the shared prefix, built on first use

    def __call__(self, b: int, batch: _Batch) -> torch.Tensor | None:
        """States of batch ``b`` (None without a base context); new ones are appended to ``base_hidden``."""
        if self.base_context is None:
            return None
        if self.base_hidden is not None and b < len(self.base_hidden):
            return self.base_hidden[b]
        with self.base_context():
            if self.prefix_ids is not None and self.prefix is None:
                self.prefix = self.parts.prefix_cache(self.prefix_ids)
            hidden_base = self.parts.hidden(batch.ids, batch.mask, None, _expanded(self.prefix, batch.size))
            hidden_base = hidden_base[batch.rows, batch.cols]
        if self.base_hidden is not None:
            self.base_hidden.append(hidden_base)
        return hidden_base


@dataclass
class _Totals:
    """Per-sequence sums: model NLL, base NLL, KL(base || model) and argmax misses."""

    nll: torch.Tensor
    nll_base: torch.Tensor
    kl: torch.Tensor
    misses: torch.Tensor

    @classmethod
    def zeros(cls, n: int) -> _Totals:
        """Zero sums for ``n`` sequences."""
        zeros = [torch.zeros(n, dtype=torch.float64) for _ in range(3)]
        return cls(*zeros, torch.zeros(n, dtype=torch.long))

    def stats(
        self, sequences: Sequence[Sequence[int]], starts: Sequence[int], with_base: bool, kl: bool
    ) -> SequenceStats:
        """The sums as :class:`SequenceStats` (base NLL and KL only where computed)."""
        return SequenceStats(
            nll=self.nll.tolist(),
            n_tokens=[len(q) - s for q, s in zip(sequences, starts)],
            nll_base=self.nll_base.tolist() if with_base else None,
            kl=self.kl.tolist() if with_base and kl else None,
            argmax_misses=self.misses.tolist(),
        )


def _add_scores(
    parts: LMParts,
    totals: _Totals,
    batch: _Batch,
    hidden: torch.Tensor,
    hidden_base: torch.Tensor | None,
    base_context: Callable[[], AbstractContextManager] | None,
    kl: bool,
) -> None:
    """Add one batch's per-token NLL, misses and (with base states) base NLL and KL, head run in chunks."""
    owner, targets = batch.owner, batch.targets
    for s in chunks(len(targets), HEAD_CHUNK):
        logp = torch.log_softmax(parts.logits(hidden[s]).cpu(), dim=-1)
        tgt = targets[s, None]
        totals.nll.index_add_(0, owner[s], -logp.gather(1, tgt)[:, 0].double())
        totals.misses.index_add_(0, owner[s], (logp.argmax(-1) != targets[s]).long())
        if hidden_base is not None:
            with base_context():
                logp_base = torch.log_softmax(parts.logits(hidden_base[s]).cpu(), dim=-1)
            totals.nll_base.index_add_(0, owner[s], -logp_base.gather(1, tgt)[:, 0].double())
            if kl:
                token_kl = (logp_base.exp() * (logp_base - logp)).sum(-1).clamp_min(0.0)
                totals.kl.index_add_(0, owner[s], token_kl.double())


def shared_prefix_length(sequences: Sequence[Sequence[int]], starts: Sequence[int]) -> int:
    """Length of the token prefix all ``sequences`` share before their first scored position's input (at most
    ``min(starts) - 1``); 0 when shorter than :data:`MIN_SHARED_PREFIX` tokens (not worth a cache)."""
    if not sequences:
        return 0
    limit = min(starts) - 1
    first = sequences[0]
    length = 0
    while length < limit and all(seq[length] == first[length] for seq in sequences):
        length += 1
    return length if length >= MIN_SHARED_PREFIX else 0


def _expanded(prefix: Any, batch_size: int) -> Any:
    return None if prefix is None else expand_cache(prefix, batch_size)


def encode_passages(tokenizer, texts: Sequence[str], max_tokens: int) -> tuple[list[list[int]], list[int]]:
    """Per passage: ``[BOS] + first max_tokens tokens`` and the number of UTF-8 bytes those tokens cover."""
    prefix = prefix_token_id(tokenizer)
    sequences, n_bytes = [], []
    for text in texts:
        if getattr(tokenizer, "is_fast", False):
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids = list(enc["input_ids"][:max_tokens])
            end = enc["offset_mapping"][len(ids) - 1][1] if ids else 0
            covered = text[:end] if len(ids) < len(enc["input_ids"]) else text
        else:
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens])
            covered = tokenizer.decode(ids)
        if not ids:
            continue
        sequences.append([prefix] + ids)
        n_bytes.append(len(covered.encode("utf-8")))
    return sequences, n_bytes


@dataclass
class TextResult:
    """Perplexity / bits per byte of one passage set, for the model and (with a base context) the base model,
    and the drift between them."""

    ppl: float
    bpb: float
    ppl_base: float | None
    bpb_base: float | None
    drift: float | None
    n_passages: int
    n_tokens: int
    n_bytes: int


def text_metrics(
    model,
    tokenizer,
    texts: Sequence[str],
    max_tokens: int = 256,
    batch_size: int = 16,
    base_context: Callable[[], AbstractContextManager] | None = None,
    progress: bool = False,
    desc: str = "text",
    base_hidden: list[torch.Tensor] | None = None,
) -> TextResult:
    """Perplexity and bits per byte of ``texts`` (first ``max_tokens`` tokens each); with ``base_context``
    also those of the base model and the drift KL(base || model) per token, from the same pass
    (``base_hidden``: see :func:`score_sequences`)."""
    sequences, n_bytes = encode_passages(tokenizer, texts, max_tokens)
    stats = score_sequences(
        model,
        tokenizer,
        sequences,
        [1] * len(sequences),
        batch_size,
        base_context,
        progress=progress,
        desc=desc,
        base_hidden=base_hidden,
    )
    total_bytes = sum(n_bytes)

    def ppl_bpb(mean_nll: float, total_nll: float) -> tuple[float, float]:
        bpb = total_nll / math.log(2) / total_bytes if total_bytes else float("nan")
        return math.exp(mean_nll), bpb

    ppl, bpb = ppl_bpb(stats.mean_nll(), sum(stats.nll))
    ppl_base = bpb_base = drift = None
    if base_context is not None:
        ppl_base, bpb_base = ppl_bpb(stats.mean_nll(base=True), sum(stats.nll_base or []))
        drift = stats.mean_kl()
    return TextResult(ppl, bpb, ppl_base, bpb_base, drift, len(sequences), stats.total_tokens, total_bytes)
