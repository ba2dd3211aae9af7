"""SFT data: load examples, turn them into chat messages, tokenize with the model's chat template, and label
only the assistant (response) tokens.

Sources: ``builtin:vornish`` / ``builtin:keywords`` (the built-in tasks, see :mod:`arrtune.data.task`), a local ``.jsonl`` /
``.json`` / ``.parquet`` file, or a Hugging Face dataset id (``org/name``, loaded with ``datasets``).
Formats, detected per row from its fields:

* chat: ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}``
* prompt/completion: ``{"prompt": ..., "completion": ...}``
* Alpaca: ``{"instruction": ..., "input": ... (optional), "output": ...}``

Every assistant turn is a response; its tokens (content and the template's end-of-turn marker) are the
only ones with labels. Examples longer than ``max_length`` are dropped and counted (truncation could cut
the response and teach the model to stop mid-answer).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from arrtune.data.jsonl import parse_json, read_jsonl, read_utf8
from arrtune.errors import ArrtuneError
from arrtune.lm import chat_template_ids, is_hub_id
from arrtune.losses import IGNORE_INDEX


@dataclass
class SFTStats:
    """What happened to the examples while tokenizing."""

    n_in: int = 0
    n_kept: int = 0
    n_too_long: int = 0
    n_empty_response: int = 0
    dropped_lines: list[str] = field(default_factory=list)


def _read_rows(source: str, split: str) -> list[tuple[str, dict]]:
    """(where, row) pairs; ``where`` names the file and line (or dataset and index) for error messages."""
    if source.startswith("builtin:"):
        from arrtune.data.task import builtin_task

        try:
            train, test = builtin_task(source.split(":", 1)[1])
        except ArrtuneError as exc:
            raise ArrtuneError(f"data: {exc}") from None
        rows = train if split == "train" else test
        return [(f"{source}[{i}]", r) for i, r in enumerate(rows)]
    path = Path(source).expanduser()
    if path.suffix in {".jsonl", ".json", ".parquet"} or path.exists():
        if path.is_dir():
            raise ArrtuneError(f"{source}: data is a directory, not a file")
        if not path.is_file():
            raise ArrtuneError(f"{source}: data file not found")
        if path.stat().st_size == 0:
            raise ArrtuneError(f"{source}: data file is empty")
        return _read_file(path)
    if is_hub_id(source):
        import datasets

        try:
            ds = datasets.load_dataset(source, split=split)
        except Exception as exc:  # datasets raises many types
            raise ArrtuneError(f"data: cannot load dataset '{source}' split '{split}': {exc}") from exc
        return [(f"{source}[{i}]", dict(r)) for i, r in enumerate(ds)]
    raise ArrtuneError(
        f"data: '{source}' is not a file, a built-in task (builtin:vornish, builtin:keywords) or a dataset id"
    )


def _read_file(path: Path) -> list[tuple[str, dict]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:
            raise ArrtuneError(f"{path}: not a readable parquet file ({exc})") from exc
        return [(f"{path} row {i + 1}", r) for i, r in enumerate(rows)]
    if path.suffix == ".json":
        text = read_utf8(path)
        if text.lstrip().startswith("["):
            rows = parse_json(text, path)
            if not all(isinstance(r, dict) for r in rows):
                raise ArrtuneError(f"{path}: expected a JSON list of objects")
            return [(f"{path} item {i + 1}", r) for i, r in enumerate(rows)]
        if text.lstrip().startswith("{") and "\n" in text.strip():
            try:
                whole = json.loads(text)
            except json.JSONDecodeError:
                whole = None
            if isinstance(whole, dict):
                raise ArrtuneError(
                    f"{path}: holds one JSON object; expected a JSON array of examples or JSON Lines (one "
                    "example per line)"
                )
    out = read_jsonl(path)
    if not out:
        raise ArrtuneError(f"{path}: no examples (the file holds only blank lines)")
    return out


def _need_str(row: dict, key: str, where: str, optional: bool = False) -> str:
    value = row.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        got = "missing" if value is None else type(value).__name__
        raise ArrtuneError(f"{where}: field '{key}' must be a string ({got})")
    return value


def to_messages(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    """Convert one row in any supported format to a list of chat messages (raises ``ArrtuneError``)."""
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ArrtuneError(f"{where}: field 'messages' must be a non-empty list")
        out = []
        for i, m in enumerate(msgs):
            if (
                not isinstance(m, dict)
                or not isinstance(m.get("role"), str)
                or not isinstance(m.get("content"), str)
            ):
                raise ArrtuneError(f"{where}: messages[{i}] needs string fields 'role' and 'content'")
            out.append({"role": m["role"], "content": m["content"]})
        if not any(m["role"] == "assistant" for m in out):
            raise ArrtuneError(f"{where}: 'messages' has no assistant turn to learn from")
        return out
    if "prompt" in row or "completion" in row:
        return [
            {"role": "user", "content": _need_str(row, "prompt", where)},
            {"role": "assistant", "content": _need_str(row, "completion", where)},
        ]
    if "instruction" in row or "output" in row:
        instruction = _need_str(row, "instruction", where)
        extra = _need_str(row, "input", where, optional=True)
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": _need_str(row, "output", where)},
        ]
    raise ArrtuneError(
        f"{where}: unknown format, fields {sorted(row)}; expected 'messages', 'prompt'+'completion', "
        "or 'instruction'+'output'"
    )


def read_held_out(source: str, field_name: str, scored: bool = True) -> list[list[dict[str, str]]]:
    """The conversations of a task file (JSON Lines, the row formats of ``data``): it must exist and parse,
    and, when its responses are ``scored`` (held-out examples), give every row a non-empty response (training
    rows may have empty ones: training drops and counts them). Errors name ``field_name``, the file and line."""
    path = Path(source).expanduser()
    if path.is_dir():
        raise ArrtuneError(f"{field_name}: {source} is a directory, not a file")
    if not path.is_file():
        raise ArrtuneError(f"{field_name}: cannot read {source} (no such file)")
    rows = read_jsonl(path)
    if not rows:
        raise ArrtuneError(f"{path}: no examples ({field_name} holds no JSON Lines rows)")
    out = []
    for where, row in rows:
        messages = to_messages(row, where)
        if scored and not [m for m in messages if m["role"] == "assistant"][-1]["content"].strip():
            raise ArrtuneError(f"{where}: empty response: a {field_name} example needs a response to score")
        out.append(messages)
    return out


def tokenize_messages(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]
) -> tuple[list[int], list[int]]:
    """Token ids and labels (``IGNORE_INDEX`` except on assistant turns) using the tokenizer's chat template."""
    ids = chat_template_ids(tokenizer, messages, generation_prompt=False)
    labels = [IGNORE_INDEX] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(chat_template_ids(tokenizer, messages[:i], generation_prompt=True))
        end = len(chat_template_ids(tokenizer, messages[: i + 1], generation_prompt=False))
        labels[start:end] = ids[start:end]
    return ids, labels


def load_sft_examples(
    source: str, tokenizer: PreTrainedTokenizerBase, max_length: int, split: str = "train",
    strings_as_chat: bool = True,
) -> tuple[list[dict[str, list[int]]], SFTStats]:  # fmt: skip
    """Load, convert and tokenize an SFT source; returns ``[{"input_ids", "labels"}]`` and statistics.
    ``strings_as_chat``: as :func:`tokenize_row`."""
    stats = SFTStats()
    examples = []
    for where, row in _read_rows(source, split):
        stats.n_in += 1
        messages = to_messages(row, where)
        if not any(m["content"].strip() for m in messages if m["role"] == "assistant"):
            stats.n_empty_response += 1
            stats.dropped_lines.append(f"{where}: empty response")
            continue
        try:
            if not strings_as_chat and isinstance(row.get("prompt"), str):
                plain = _plain_prompt_completion(row["prompt"], row["completion"], tokenizer, None)
                ids, labels = plain["input_ids"], plain["labels"]
            else:
                ids, labels = tokenize_messages(tokenizer, messages)
        except ArrtuneError:
            raise
        except Exception as exc:  # the chat template refused the turns, or the text cannot be encoded
            raise ArrtuneError(
                f"{where}: cannot apply the chat template ({type(exc).__name__}: {exc})"
            ) from exc
        if len(ids) > max_length:
            stats.n_too_long += 1
            stats.dropped_lines.append(f"{where}: {len(ids)} tokens > max_length {max_length}")
            continue
        examples.append({"input_ids": ids, "labels": labels})
    stats.n_kept = len(examples)
    if not examples:
        raise ArrtuneError(
            f"{source}: every example was filtered out ({stats.n_too_long} longer than max_length={max_length}, "
            f"{stats.n_empty_response} with an empty response)"
        )
    return examples, stats


def tokenize_row(
    row: dict[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    where: str,
    assistant_only_loss: bool = True,
    completion_only_loss: bool | None = None,
    text_field: str = "text",
    strings_as_chat: bool = True,
) -> dict[str, list[int]]:
    """One dataset row in any of TRL's formats as ``{"input_ids", "labels"}``: already tokenized
    (``input_ids``, optional ``labels``), language modelling (``text_field``: loss on every token),
    conversational ``messages`` (loss on the assistant turns with ``assistant_only_loss``, else on every
    token), ``prompt``/``completion`` as lists of messages (through the chat template) or as strings, or
    ``instruction``/``output``; loss on the completion unless ``completion_only_loss`` is False. String
    prompts and completions go through the chat template as a user and an assistant turn when
    ``strings_as_chat``, else they are plain text as TRL's standard format has them (prompt + completion +
    EOS, the completion starting where the tokenized prompt stops being a prefix)."""  # fmt: skip
    if "input_ids" in row:
        ids = list(row["input_ids"])
        return {"input_ids": ids, "labels": list(row.get("labels") or ids)}
    if text_field in row and not ({"messages", "prompt", "completion"} & set(row)):
        text = row[text_field]
        if not isinstance(text, str):
            raise ArrtuneError(f"{where}: field '{text_field}' must be a string")
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids = [*ids, tokenizer.eos_token_id]
        return {"input_ids": ids, "labels": list(ids)}
    if not strings_as_chat and isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
        return _plain_prompt_completion(row["prompt"], row["completion"], tokenizer, completion_only_loss)
    if isinstance(row.get("prompt"), list) or isinstance(row.get("completion"), list):  # conversational
        prompt, completion = row.get("prompt") or [], row.get("completion") or []
        messages = to_messages({"messages": [*prompt, *completion]}, where)
        every_token = completion_only_loss is False
    else:
        messages = to_messages(row, where)
        every_token = (not assistant_only_loss) if "messages" in row else completion_only_loss is False
    ids, labels = tokenize_messages(tokenizer, messages)
    return {"input_ids": ids, "labels": list(ids) if every_token else labels}


def _plain_prompt_completion(
    prompt: str, completion: str, tokenizer: PreTrainedTokenizerBase, completion_only_loss: bool | None
) -> dict[str, list[int]]:
    """TRL's standard prompt/completion tokenization: prompt + completion (+ EOS unless it ends with it) as
    plain text; the completion starts where the tokenized prompt and prompt + completion diverge."""
    eos = tokenizer.eos_token
    if eos and not completion.endswith(eos):
        completion += eos
    prompt_ids = tokenizer(text=prompt)["input_ids"]
    ids = tokenizer(text=prompt + completion)["input_ids"]
    n_prompt = next(
        (i for i, (a, b) in enumerate(zip(prompt_ids, ids)) if a != b), min(len(prompt_ids), len(ids))
    )
    if completion_only_loss is False:
        return {"input_ids": ids, "labels": list(ids)}
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * n_prompt + ids[n_prompt:]}


def collate_sft(examples: list[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad tokenized examples to the longest one (``torch.nn.utils.rnn.pad_sequence``): ``input_ids``
    with ``pad_token_id``, ``labels`` with ``IGNORE_INDEX``, and their ``attention_mask``, all int64.

    The pad id is given, not read from a tokenizer (transformers' ``DataCollatorForSeq2Seq`` pads on the
    tokenizer's ``padding_side`` and refuses a tokenizer without a pad token)."""
    from torch.nn.utils.rnn import pad_sequence

    for i, e in enumerate(examples):
        if len(e["labels"]) != len(e["input_ids"]):
            raise ArrtuneError(f"row {i}: {len(e['labels'])} labels for {len(e['input_ids'])} input_ids")
    ids = [torch.tensor(e["input_ids"], dtype=torch.long) for e in examples]
    labels = [torch.tensor(e["labels"], dtype=torch.long) for e in examples]
    return {
        "input_ids": pad_sequence(ids, batch_first=True, padding_value=pad_token_id),
        "labels": pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX),
        "attention_mask": pad_sequence([torch.ones_like(t) for t in ids], batch_first=True, padding_value=0),
    }
