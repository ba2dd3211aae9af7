"""What :class:`arrtune.trainer.ARRTrainer` makes of the datasets and tokenizer it is given: rows in any of
TRL's formats tokenized (:func:`tokenized_dataset`), and the default collator (:func:`sft_collator`)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from arrtune.config import ARRConfig
from arrtune.data.sft import collate_sft, tokenize_row
from arrtune.errors import ArrtuneError
from arrtune.lm import pad_token_id


def tokenized_dataset(dataset: Any, tokenizer: Any, args: ARRConfig, name: str) -> Any:
    """``dataset`` (a ``datasets.Dataset``, a list of rows, or None) as a list of ``{"input_ids", "labels"}``
    rows, longer than ``args.max_length`` ones dropped as arrtune train drops them; a dict of datasets
    (several evaluation sets) is tokenized per set."""
    if dataset is None:
        return None
    if isinstance(dataset, dict):
        return {
            key: tokenized_dataset(value, tokenizer, args, f"{name}[{key}]") for key, value in dataset.items()
        }
    rows = []
    for i, row in enumerate(dataset):
        example = tokenize_row(dict(row), tokenizer, f"{name}[{i}]", args.assistant_only_loss,
                               args.completion_only_loss, args.dataset_text_field,
                               args.prompt_completion_as_chat)  # fmt: skip
        if len(example["input_ids"]) <= args.max_length:
            rows.append(example)
    if not rows:
        raise ArrtuneError(f"{name}: no rows of at most max_length={args.max_length} tokens")
    return rows


def sft_collator(tokenizer: Any) -> Callable[[list[dict[str, list[int]]]], dict[str, torch.Tensor]]:
    """The default collator: :func:`arrtune.data.sft.collate_sft` with the tokenizer's pad id (its pad token,
    else BOS or EOS: :func:`arrtune.lm.pad_token_id`)."""
    return partial(collate_sft, pad_token_id=pad_token_id(tokenizer))
