"""Greedy generation with the chat template, leak detection, and the new task's plasticity metrics.

* **Generation**: every prompt is formatted with the tokenizer's chat template (a single user turn plus the
  generation prompt, exactly as training formats it, see :mod:`arrtune.data.sft`), batched with *left*
  padding, decoded greedily for at most ``max_new_tokens`` tokens; generation of a sequence stops at EOS
  (the tokenizer's and the model's generation config's). The answer is the decoded new tokens with special
  tokens skipped.
* **Exact match** (task): :func:`arrtune.data.task.exact_match` on the answer: the first non-empty line,
  lower-cased, punctuation at both ends stripped, whitespace collapsed, compared with the reference treated
  the same way.
* **Task loss**: mean NLL in nats per token of the reference response tokens (the assistant content and the
  template's end-of-turn marker, the tokens training puts labels on) given the prompt.
* **Leak**: words are maximal runs of letters, lower-cased. The task vocabulary is the words of the task's
  training responses minus every word that appears in the base model's answers or in general text (held-out
  Wikipedia and book passages and the general questions). An answer leaks when it contains a task-vocabulary
  word; the leak rate is the fraction of answers that leak.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import CompileConfig, GenerationConfig

from arrtune.lm import base_model, batched, chat_template_ids, eval_mode, pad_token_id

WORD_RE = re.compile(r"[^\W\d_]+")
#: key/value caches :func:`generate` can use
CACHE_KINDS = ("dynamic", "static", "static-compiled")


def question_prompt_ids(tokenizer, question: str) -> list[int]:
    """A single user turn plus the assistant generation prompt."""
    return chat_template_ids(tokenizer, [{"role": "user", "content": question}], generation_prompt=True)


def eos_token_ids(model, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    gen_config = getattr(base_model(model), "generation_config", None)
    configured = getattr(gen_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return sorted(int(i) for i in ids if i is not None)


def generate(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 32,
    batch_size: int = 16,
    progress: bool = False,
    desc: str = "generate",
    temperature: float = 0.0,
    top_p: float = 1.0,
    cache: str = "dynamic",
) -> list[list[int]]:
    """Continuations of tokenized prompts (left-padded batches, longest first), greedy, or sampled when
    ``temperature`` > 0 (nucleus ``top_p``); each result ends at and includes the first EOS token when one was
    generated.

    ``cache``: transformers' ``"dynamic"`` key/value cache, a ``"static"`` one (allocated at full length, so
    every decoding step has the same shapes and ``generate`` compiles the forward on accelerators), or
    ``"static-compiled"`` (compiled on any device); ``"auto"`` is static on CUDA for a model transformers can
    compile (not a quantized one) and dynamic elsewhere, where static shapes were slower
    (``benchmarks/generation_speed.py``; docs/study.md, "Cost of self-replay"). Self-replay generation uses
    ``"auto"``; evaluation keeps the dynamic cache, so its answers do not depend on the device's cache kind."""
    base = base_model(model)
    device = next(base.parameters()).device
    cache = _cache_kind(base, device, cache)
    eos = eos_token_ids(model, tokenizer)
    pad_id = pad_token_id(tokenizer)
    config = _generation_config(max_new_tokens, eos, pad_id, temperature, top_p, cache)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    outputs: list[list[int]] = [[] for _ in prompts]
    with eval_mode(model), tqdm(total=len(prompts), desc=desc, disable=not progress, leave=False) as bar:
        for batch in batched(order, batch_size):
            ids, mask = _left_padded([prompts[i] for i in batch], pad_id)
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config
            )
            for r, i in enumerate(batch):
                outputs[i] = _until_eos(out[r, ids.shape[1] :].tolist(), eos)
            bar.update(len(batch))
    return outputs


def _cache_kind(base, device: torch.device, cache: str) -> str:
    """``cache`` with ``"auto"`` resolved for this model and device; a ValueError for an unknown kind."""
    if cache == "auto":
        quantizer = getattr(base, "hf_quantizer", None)
        compilable = quantizer is None or getattr(quantizer, "is_compileable", False)
        cache = "static" if device.type == "cuda" and compilable else "dynamic"
    if cache not in CACHE_KINDS:
        raise ValueError(f"cache: {cache!r}, expected one of {', '.join(CACHE_KINDS)} or 'auto'")
    return cache


def _generation_config(
    max_new_tokens: int, eos: list[int], pad_id: int, temperature: float, top_p: float, cache: str
) -> GenerationConfig:
    """Greedy (or, with ``temperature`` > 0, nucleus-sampling) decoding with the given kind of cache."""
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} if temperature > 0 else {
        "do_sample": False}  # fmt: skip
    static = {"cache_implementation": "static"} if cache.startswith("static") else {}
    if cache == "static-compiled":
        compile_config = CompileConfig(fullgraph=False)
        compile_config._compile_all_devices = True  # transformers compiles only on accelerators by default
        static["compile_config"] = compile_config
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        num_beams=1,
        eos_token_id=eos,
        pad_token_id=pad_id,
        **sampling,
        **static,
    )


def _left_padded(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and attention mask of a batch of prompts, left-padded to the longest."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, prompt in enumerate(prompts):
        p = list(prompt)
        ids[r, width - len(p) :] = torch.tensor(p)
        mask[r, width - len(p) :] = 1
    return ids, mask


def _until_eos(tokens: list[int], eos: list[int]) -> list[int]:
    """The generated tokens up to and including the first EOS token (all of them without one)."""
    for k, tok in enumerate(tokens):
        if tok in eos:
            return tokens[: k + 1]
    return tokens


def decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True).strip()


@dataclass
class Answers:
    """Greedy answers to chat prompts: prompt ids, answer ids (EOS included when generated), decoded text."""

    prompts: list[list[int]]
    ids: list[list[int]]
    texts: list[str]


def answer(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 32,
    batch_size: int = 16,
    progress: bool = False,
    desc: str = "answers",
) -> Answers:
    ids = generate(model, tokenizer, prompts, max_new_tokens, batch_size, progress, desc)
    return Answers([list(p) for p in prompts], ids, [decode(tokenizer, a) for a in ids])


def words(text: str) -> set[str]:
    """Lower-cased runs of letters."""
    return set(WORD_RE.findall(text.lower()))


def vocabulary(texts: Iterable[str]) -> set[str]:
    out: set[str] = set()
    for t in texts:
        out |= words(t)
    return out


def leak_vocabulary(
    task_responses: Iterable[str], base_answers: Iterable[str], general: set[str]
) -> set[str]:
    """Words of the task's responses that are neither in the base model's answers nor in general text."""
    return vocabulary(task_responses) - vocabulary(base_answers) - general


def leaked_words(text: str, task_vocab: set[str]) -> list[str]:
    """The task-vocabulary words an answer contains, sorted."""
    return sorted(words(text) & task_vocab)


@dataclass
class TaskExample:
    """One held-out example of the new task: chat prompt ids, reference response ids (assistant content and
    end-of-turn marker), and the reference text."""

    prompt: str
    prompt_ids: list[int]
    response_ids: list[int]
    reference: str


def task_example(tokenizer, messages: list[dict[str, str]]) -> TaskExample:
    """Split a conversation at its last assistant turn into prompt and reference response."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompt_ids = chat_template_ids(tokenizer, messages[:last], generation_prompt=True)
    full = chat_template_ids(tokenizer, messages[: last + 1], generation_prompt=False)
    user_turns = [m["content"] for m in messages[:last] if m["role"] == "user"]
    return TaskExample(
        prompt=user_turns[-1] if user_turns else "",
        prompt_ids=prompt_ids,
        response_ids=full[len(prompt_ids) :],
        reference=messages[last]["content"],
    )
