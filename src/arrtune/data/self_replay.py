"""Self-replay (``replay: self``): the base model's own answers to general prompts, replayed during training.

Before training, the base model (no adapter yet) answers a pool of general prompts by sampling; the
conversations (chat template, the model's generated tokens exactly as sampled) become replay documents whose
labels cover only the answer tokens. They anchor *how the model answers* (its form, length, style), which
replaying web text does not (cf. self-synthesised rehearsal, arXiv 2403.01244; self-distillation
fine-tuning, arXiv 2402.13669).

* **Prompts**: ``replay_prompts`` (a ``.txt`` file, one prompt per line; a ``.jsonl`` file with a ``prompt``,
  ``question`` or ``text`` field; or a HF dataset id with such a column), or by default the built-in pool of
  Natural Questions (:func:`arrtune.data.corpora.self_replay_prompts`), disjoint from every evaluation prompt.
* **Budget**: prompts are answered in a fixed shuffled order until the answers hold the tokens training will
  replay (``max_steps x replay_ratio x replay_mix x`` SFT tokens per step, estimated from the data); the
  stream cycles through them if training needs more.
* **Cache**: ``$ARRTUNE_CACHE/self_replay/<key>.jsonl``, keyed by the model, the prompt list and the
  generation settings. It holds answers for a prefix of the prompt order, generated in fixed batches with a
  seed per batch, so a run that needs more tokens extends it and gets the same answers for the prefix; the
  runs of a ``compare`` grid share it. One JSON object per line: ``{"prompt", "answer", "answer_ids"}``.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from arrtune.errors import ArrtuneError
from arrtune.losses import IGNORE_INDEX

PROMPT_FIELDS = ("prompt", "question", "text")


@dataclass(frozen=True)
class GenerationSettings:
    """How the base model answers the self-replay prompts."""

    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 96
    batch_size: int = 32
    seed: int = 0


def load_prompts(source: str | None) -> list[str]:
    """The self-replay prompts: the built-in pool (``None``), a ``.txt``/``.jsonl`` file or a HF dataset id."""
    if source is None or source == "builtin":
        from arrtune.data.corpora import self_replay_prompts

        return list(self_replay_prompts())
    path = Path(source).expanduser()
    if path.suffix in (".txt", ".jsonl") or path.exists():
        from arrtune.data.jsonl import read_jsonl, read_utf8

        if path.is_dir():
            raise ArrtuneError(f"replay_prompts: {source} is a directory, not a file")
        if not path.is_file():
            raise ArrtuneError(f"replay_prompts: file not found: {source}")
        if path.suffix == ".jsonl":
            prompts = []
            for where, row in read_jsonl(path):
                name = next((f for f in PROMPT_FIELDS if f in row), None)
                if name is None or not isinstance(row[name], str):
                    raise ArrtuneError(f"{where}: needs a string field 'prompt', 'question' or 'text'")
                prompts.append(row[name])
        else:
            prompts = read_utf8(path).splitlines()
    else:
        import datasets

        try:
            ds = datasets.load_dataset(source, split="train")
        except Exception as exc:  # datasets raises many types
            raise ArrtuneError(f"replay_prompts: cannot load dataset '{source}': {exc}") from exc
        name = next((f for f in PROMPT_FIELDS if f in ds.column_names), None)
        if name is None:
            raise ArrtuneError(f"replay_prompts: dataset '{source}' has no column prompt, question or text")
        prompts = list(ds[name])
    prompts = list(dict.fromkeys(p.strip() for p in prompts if isinstance(p, str) and p.strip()))
    if not prompts:
        raise ArrtuneError(f"replay_prompts: {source} holds no prompts")
    return prompts


def cache_path(cache_root: Path, model_key: str, prompts: list[str], settings: GenerationSettings) -> Path:
    """Where the answers of this model to these prompts with these settings are cached."""
    digest = hashlib.sha256(
        json.dumps({"model": model_key, "prompts": prompts, "settings": asdict(settings)}).encode()
    ).hexdigest()[:20]
    return cache_root / "self_replay" / f"{digest}.jsonl"


def _read_cache(path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    if not path.is_file():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break  # a cut-short last line: regenerate from there
        if not isinstance(row, dict) or not isinstance(row.get("answer_ids"), list):
            break
        rows.append(row)
    return rows


def generate_answers(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[str],
    n_tokens: int,
    settings: GenerationSettings,
    path: Path,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], float]:
    """Answers to ``prompts`` (in a fixed shuffled order) until prompt + answer tokens reach ``n_tokens`` or
    the prompts run out, read from / added to the cache file ``path``. Returns the rows and the seconds spent
    generating (0 on a full cache hit)."""
    import time

    from arrtune.atomic import write_atomic
    from arrtune.generation import generate, question_prompt_ids

    order = list(range(len(prompts)))
    random.Random(f"self-replay:{settings.seed}").shuffle(order)
    rows = _read_cache(path)
    rows = rows[: len(rows) - len(rows) % settings.batch_size] if len(rows) < len(prompts) else rows

    def tokens(row: dict[str, Any]) -> int:
        return len(question_prompt_ids(tokenizer, row["prompt"])) + len(row["answer_ids"])

    have = sum(tokens(r) for r in rows)
    seconds = 0.0
    if have >= n_tokens or len(rows) >= len(prompts):
        return rows, seconds
    from tqdm.auto import tqdm

    started = time.perf_counter()
    with tqdm(total=n_tokens, initial=min(have, n_tokens), desc="self-replay answers", unit="tok",
              disable=not progress) as bar:  # fmt: skip
        while have < n_tokens and len(rows) < len(prompts):
            start = len(rows)
            batch = [prompts[i] for i in order[start : start + settings.batch_size]]
            ids = [question_prompt_ids(tokenizer, p) for p in batch]
            torch.manual_seed(settings.seed * 1_000_003 + start)
            answers = generate(
                model,
                tokenizer,
                ids,
                settings.max_new_tokens,
                len(batch),
                temperature=settings.temperature,
                top_p=settings.top_p,
                cache="auto",  # static shapes (compiled) on CUDA
            )
            for prompt, answer_ids in zip(batch, answers):
                text = tokenizer.decode(answer_ids, skip_special_tokens=True).strip()
                rows.append({"prompt": prompt, "answer": text, "answer_ids": answer_ids})
                have += len(question_prompt_ids(tokenizer, prompt)) + len(answer_ids)
            bar.update(min(have, n_tokens) - bar.n)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    seconds = time.perf_counter() - started
    return rows, seconds


def conversations(tokenizer: Any, rows: list[dict[str, Any]]) -> list[tuple[list[int], list[int]]]:
    """Replay documents from cached answers: the chat prompt's ids + the generated ids (labels only on the
    latter, the end-of-turn token included when the model generated it). Empty answers are skipped."""
    from arrtune.generation import question_prompt_ids

    docs = []
    for row in rows:
        answer = [int(t) for t in row["answer_ids"]]
        if not answer:
            continue
        prompt = question_prompt_ids(tokenizer, row["prompt"])
        docs.append((prompt + answer, [IGNORE_INDEX] * len(prompt) + answer))
    return docs


def token_budget(
    mean_example_tokens: float,
    examples_per_step: int,
    steps: int,
    replay_ratio: float,
    self_share: float,
) -> int:
    """Self-replay tokens a run consumes (all ranks), with a 10% margin."""
    return max(
        1, math.ceil(1.1 * mean_example_tokens * examples_per_step * steps * replay_ratio * self_share)
    )


def check_chat_template(args: Any, tokenizer: Any) -> None:
    """Self-replay asks the model questions through its chat template: refuse a tokenizer without one."""
    if not getattr(tokenizer, "chat_template", None):
        setting = "replay=self" if args.replay == "self" else f"replay_mix={args.resolved_replay_mix():g}"
        raise ArrtuneError(
            f"config: {setting}: self-replay asks the model questions through its chat template, and this "
            "tokenizer has none; set replay_mix: 0 to replay the corpus only"
        )


def self_replay_documents(args: Any, model: Any, tokenizer: Any, prompts: list[str],
                          examples: list[dict[str, Any]], state: Any,
                          model_key: str | None = None) -> tuple[list[tuple[list[int], list[int]]], dict[str, Any]]:  # fmt: skip
    """The model's answers to ``prompts`` as replay documents (:func:`conversations`), and the generation
    record (answers, tokens, seconds, cache file). ``args`` is an :class:`arrtune.ARRConfig` (its steps, batch size, replay ratio and
    mix size the set; its ``replay_*`` generation settings); ``examples`` the tokenized SFT rows (their mean
    length sizes the set); ``state`` accelerate's ``PartialState`` (the main process generates first, the
    other ranks read its cache). The model answers with any PEFT adapter switched off: the initial model's
    answers. ``model_key`` names the model in the cache key (default: its ``name_or_path`` and size)."""
    from arrtune.lm import adapter_disabled
    from arrtune.models import cache_dir

    check_chat_template(args, tokenizer)
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * state.num_processes
    steps = (
        args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * len(examples) / per_step)
    )
    mean_tokens = sum(len(e["input_ids"]) for e in examples) / len(examples)
    budget = token_budget(
        mean_tokens, per_step, steps, args.resolved_replay_ratio(), args.resolved_replay_mix()
    )
    settings = GenerationSettings(args.replay_temperature, args.replay_top_p, args.replay_max_new_tokens)
    name = getattr(getattr(model, "config", None), "_name_or_path", "")
    model_key = model_key or f"{name}|{model.num_parameters()}"
    path = cache_path(cache_dir(), model_key, prompts, settings)
    with state.main_process_first(), adapter_disabled(model):
        rows, seconds = generate_answers(
            model, tokenizer, prompts, budget, settings, path, not args.disable_tqdm
        )
    docs = conversations(tokenizer, rows)
    if len(docs) < state.num_processes:
        raise ArrtuneError("replay: the base model gave no usable self-replay answers (all empty)")
    info = {"self_replay_answers": len(docs), "self_replay_tokens": sum(len(d[0]) for d in docs),
            "self_replay_generation_s": seconds, "self_replay_cache": str(path)}  # fmt: skip
    return docs, info
