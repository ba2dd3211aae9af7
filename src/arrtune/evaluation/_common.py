"""Helpers shared by the evaluation modules: batching, evaluation mode, statistics, fixed-seed subsets and
tokenization as lm-evaluation-harness does it. (How a model is run as decoder + head lives in
:mod:`arrtune.lm`, shared with training.)"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterator, Sequence
from typing import TypeVar

import torch

from arrtune.lm import base_model, without_dropout

T = TypeVar("T")


def chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def batched(items: Sequence[T], size: int) -> Iterator[list[T]]:
    for s in chunks(len(items), max(1, size)):
        yield list(items[s])


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """No dropout (:func:`arrtune.lm.without_dropout`) + ``torch.inference_mode()``; restores the training
    flag afterwards."""
    with without_dropout(model), torch.inference_mode():
        yield


def binomial_stderr(p: float, n: int) -> float:
    """Standard error of a proportion: ``sqrt(p (1 - p) / n)`` (NaN for n = 0)."""
    return math.sqrt(p * (1.0 - p) / n) if n > 0 else float("nan")


def mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def paired_stderr(a: Sequence[float], b: Sequence[float]) -> float:
    """Standard error of ``mean(b) - mean(a)`` over the same items: ``std(b_i - a_i, ddof=1) / sqrt(n)``."""
    n = len(a)
    if n < 2 or len(b) != n:
        return float("nan")
    diffs = [y - x for x, y in zip(a, b)]
    m = sum(diffs) / n
    var = sum((d - m) ** 2 for d in diffs) / (n - 1)
    return math.sqrt(var / n)


def subset_indices(total: int, n: int | None, seed: int, salt: str) -> list[int]:
    """A fixed-seed random subset of ``range(total)`` of size ``n`` (all when ``n`` is None, <= 0 or >= total),
    returned in increasing order; the same (total, n, seed, salt) always gives the same subset."""
    if n is None or n <= 0 or n >= total:
        return list(range(total))
    return sorted(random.Random(f"{salt}:{seed}").sample(range(total), n))


def prefix_token_id(tokenizer) -> int:
    """Token put before an empty context (lm-evaluation-harness: BOS, else EOS)."""
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id):
        if tid is not None:
            return int(tid)
    raise ValueError("the tokenizer has no BOS, EOS or pad token to start a sequence with")


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (the harness's ``tok_encode`` for causal models)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def max_positions(model: torch.nn.Module, default: int = 2048) -> int:
    config = getattr(base_model(model), "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return default
