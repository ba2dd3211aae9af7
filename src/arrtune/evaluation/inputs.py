"""What an evaluation reads besides the benchmarks: the held-out text passages, the general questions, the
general vocabulary that leak is measured against, and the held-out task with its training responses."""

from __future__ import annotations

from functools import cache
from typing import Any

from arrtune.data.sft import read_held_out
from arrtune.errors import ArrtuneError
from arrtune.evaluation._common import subset_indices
from arrtune.evaluation.config import EvalConfig
from arrtune.generation import TaskExample, task_example, vocabulary


def text_sets(cfg: EvalConfig) -> dict[str, list[str]]:
    """The held-out text passages of the drift and perplexity measures, ``cfg.n_text`` per set."""
    from arrtune.data.corpora import heldout_book_texts, heldout_wiki_texts

    if cfg.n_text <= 0:
        return {}
    out = {}
    for name, texts in (("wiki", heldout_wiki_texts()), ("books", heldout_book_texts())):
        out[name] = [texts[i] for i in subset_indices(len(texts), cfg.n_text, cfg.seed, salt=f"text-{name}")]
    return out


def question_set(cfg: EvalConfig) -> list[str]:
    """The general questions answered greedily for drift on chat answers, leak and bleed, ``cfg.n_questions``
    of them (a fixed-seed subset)."""
    from arrtune.data.corpora import general_questions

    if cfg.n_questions <= 0:
        return []
    qs = general_questions()
    return [qs[i] for i in subset_indices(len(qs), cfg.n_questions, cfg.seed, salt="questions")]


@cache
def general_vocabulary() -> frozenset[str]:
    """Words of general English for leak: all held-out passages (wiki, books) and all general questions."""
    from arrtune.data.corpora import general_questions, heldout_book_texts, heldout_wiki_texts

    return frozenset(vocabulary([*heldout_wiki_texts(), *heldout_book_texts(), *general_questions()]))


def _last_assistant(messages: list[dict[str, str]]) -> str:
    return [m["content"] for m in messages if m["role"] == "assistant"][-1]


def load_task(cfg: EvalConfig, tokenizer: Any) -> tuple[list[TaskExample], list[str]]:
    """Held-out task examples (a fixed-seed subset of ``n_task``) and the training responses for leak."""
    if not cfg.task or cfg.task == "auto" or cfg.n_task <= 0:  # auto without a run: see resolve_from_run
        return [], []
    if cfg.task.startswith("builtin:"):
        from arrtune.data.task import builtin_task

        try:  # same split as training (400 train, then the held-out examples)
            train, test = builtin_task(cfg.task.split(":", 1)[1], n_test=max(100, cfg.n_task))
        except ArrtuneError as exc:
            raise ArrtuneError(f"task: {exc}") from None
        test_msgs = [
            [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]
            for r in test
        ]
        train_responses = [r["completion"] for r in train]
    else:
        test_msgs = read_held_out(cfg.task, "task")
        train_msgs = (
            read_held_out(cfg.task_train, "task_train", scored=False) if cfg.task_train else test_msgs
        )
        train_responses = [_last_assistant(m) for m in train_msgs]
    chosen = subset_indices(len(test_msgs), cfg.n_task, cfg.seed, salt="task")
    return [task_example(tokenizer, test_msgs[i]) for i in chosen], train_responses
