"""Shared plumbing for the evaluation modules: model parts, evaluation mode, statistics, subsets.

Scoring only needs log-probabilities at a few positions, so instead of calling the model's full forward (which
applies the output head to every position) the scorers run the decoder stack, pick the hidden states they need
and apply the output head to those alone, in chunks. :class:`LMParts` hides how that is done; models whose head
is more than a plain linear layer (logit soft-capping or scaling) fall back to the full forward.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import TypeVar

import torch

T = TypeVar("T")

#: config attributes that make the output head more than ``lm_head(hidden)``
_HEAD_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PEFT wrapper (LoRA layers stay injected), or the model itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def base_context(model: torch.nn.Module) -> Callable[[], AbstractContextManager]:
    """Factory of the context in which ``model`` behaves as its base model (PEFT ``disable_adapter``)."""
    disable = getattr(model, "disable_adapter", None)
    if disable is None:
        raise TypeError("the model has no adapter (expected a peft.PeftModel); pass base_context explicitly")
    return disable


def null_context() -> AbstractContextManager:
    return contextlib.nullcontext()


class LMParts:
    """Run a causal LM as ``decoder -> hidden states`` and ``head -> logits`` so that the head is applied only
    where log-probabilities are needed."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        inner = unwrap(model)
        config = getattr(inner, "config", None)
        self.full_forward = any(
            getattr(config, name, None) not in (None, 1, 1.0) for name in _HEAD_TRANSFORMS
        )
        self.decoder = None if self.full_forward else inner.get_decoder()
        self.head = None if self.full_forward else inner.get_output_embeddings()
        if self.decoder is None or self.head is None or self.decoder is inner:
            self.full_forward = True
        self.vocab_size = int(inner.get_output_embeddings().weight.shape[0])
        self.dtype = next(inner.parameters()).dtype
        self.device = next(inner.parameters()).device

    def hidden(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None
    ):
        """Last hidden states (B, T, H), or the logits (B, T, V) when the model needs its full forward."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        if self.full_forward:
            return self.model(**kwargs).logits
        return self.decoder(**kwargs).last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits of selected hidden states (N, H) -> (N, V)."""
        out = hidden if self.full_forward else self.head(hidden)
        return out.float()


def chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def batched(items: Sequence[T], size: int) -> Iterator[list[T]]:
    for s in chunks(len(items), max(1, size)):
        yield list(items[s])


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """``model.eval()`` + ``torch.inference_mode()``; restores the training flag afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        if was_training:
            model.train()


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
    config = getattr(unwrap(model), "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return default
