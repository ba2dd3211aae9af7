"""Helpers shared by the evaluation modules: statistics, fixed-seed subsets and tokenization as
lm-evaluation-harness does it. (How a model is run, batched and in evaluation mode, lives in :mod:`arrtune.lm`,
shared with training and generation.)"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch

from arrtune.lm import base_model


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
