"""The evaluation run: retention (benchmarks, perplexity, drift, leak) and plasticity (the new task).

:func:`evaluate_model_pair` evaluates a PEFT model twice in one process, as the base model (inside
``disable_adapter()``) and as the adapted model, and reports both and their difference; drift and leak are
measured against the base model (its answers to the general questions are generated once, adapter disabled).
:func:`evaluate_single` evaluates a plain model (no drift, no leak) and keeps, in ``base_cache``, what a pair
evaluation needs of it as the base model, so that ``evaluate_model_pair(..., base_result=...)`` of several
adapters of one base model computes the base column once. Metric names are flat:

===========================  =====================================================================
``<bench>/acc``              accuracy (argmax log-likelihood), with ``<bench>/acc_stderr``
``<bench>/acc_norm``         accuracy with length-normalised log-likelihood, ``..._stderr``
``<bench>/n``                items scored
``mc/mean_acc``              mean ``acc`` over the benchmarks
``ppl/wiki``, ``ppl/books``  token perplexity of held-out Wikipedia / book passages
``bpb/wiki``, ``bpb/books``  bits per UTF-8 byte of the same passages
``drift/wiki``, ``/books``   mean KL(base || adapted), nats per token, on the passages (pair only)
``drift/chat``               the same on the base model's own greedy answers to general questions (pair only)
``drift/task``               the same on the adapted model's greedy answers to the held-out task prompts: a
                             forecast of forgetting that needs no general data (pair only)
``leak``                     fraction of adapted answers containing task-only words, ``leak_stderr`` (pair only)
``bleed``                    fraction of adapted answers in the task's form, not the base's (pair only; see
                             :mod:`arrtune.evaluation.form`), ``bleed_stderr``
``task/exact_match``         greedy exact match on held-out task examples, ``..._stderr``
``task/loss``                mean NLL (nats per token) of the reference response tokens
===========================  =====================================================================

Standard errors of accuracies are binomial, ``sqrt(p (1 - p) / n)``; in ``delta`` the standard error of an
accuracy difference is the paired one (same items for both models): ``std(adapted_i - base_i) / sqrt(n)``.
Everything is deterministic for a given config: subsets are fixed-seed samples and decoding is greedy.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cache
from pathlib import Path
from typing import Any, TypedDict

from arrtune.atomic import write_atomic
from arrtune.data.sft import read_held_out
from arrtune.errors import ArrtuneError
from arrtune.evaluation._common import binomial_stderr, mean, paired_stderr, subset_indices
from arrtune.evaluation.benchmarks import benchmark_name, load_benchmark
from arrtune.evaluation.form import measure_bleed
from arrtune.evaluation.scoring import score_items
from arrtune.evaluation.text import score_sequences, text_metrics
from arrtune.generation import (
    Answers,
    TaskExample,
    answer,
    leak_vocabulary,
    leaked_words,
    question_prompt_ids,
    task_example,
    vocabulary,
)
from arrtune.lm import adapter_disabled


class EvalResult(TypedDict, total=False):
    """What :func:`evaluate_single` and :func:`evaluate_model_pair` return, and ``eval.json`` holds."""

    mode: str  #: "single" or "pair"
    model: dict[str, Any]  #: single: metric -> value (the table in the module docstring)
    base: dict[str, Any]  #: pair: the base model's metrics
    adapted: dict[str, Any]  #: pair: the adapted model's metrics, drift, leak and bleed included
    delta: dict[str, float]  #: pair: adapted - base, and the paired standard error of each accuracy change
    examples: list[dict[str, Any]]  #: pair: general questions with both answers, leaked words, bleed
    task_examples: list[dict[str, Any]]  #: held-out task prompts with the reference and the answer(s)
    leak_vocabulary_size: int  #: pair: the number of task-only words leak looks for
    form_check: dict[str, Any]  #: pair: the bleed classifier's recall and false-positive rate on this task
    instruction_examples: list[dict[str, Any]]  #: instruction-following prompts, their ids and the answer(s)
    per_item: dict[str, dict[str, list[int]]]  #: column -> metric -> 0/1 per item, for paired comparisons
    timing: dict[str, Any]  #: per column throughput, and ``parts_s``: seconds per measurement family
    config: dict[str, Any]  #: the EvalConfig used
    base_cache: dict[str, Any]  #: single: what a later pair evaluation of an adapter reuses


DEFAULT_BENCHMARKS = [
    "arc_easy",
    "arc_challenge",
    "hellaswag",
    "piqa",
    "winogrande",
    "boolq",
    "sciq",
    "openbookqa",
    "mmlu",
]


@dataclass
class EvalConfig:
    """What ``arrtune eval`` measures; every field can be set in ``eval.yaml``.

    Set a count to 0 (or ``benchmarks`` to ``[]``, ``task`` to ``null``) to skip that part.
    """

    #: multiple-choice benchmarks: built-in names (arc_easy, arc_challenge, hellaswag, piqa, winogrande, boolq,
    #: sciq, openbookqa, mmlu, mmlu:<subject>, siqa) or paths to ``.jsonl`` files (schema in ``benchmarks.py``)
    benchmarks: list[str] = field(default_factory=lambda: list(DEFAULT_BENCHMARKS))
    #: items per benchmark, a fixed-seed random subset (0 = all items); default 200
    n_per_benchmark: int = 200
    #: held-out passages per text set (wiki, books) for perplexity and drift; default 50
    n_text: int = 50
    #: tokens scored per passage (its first ones); default 256
    max_text_tokens: int = 256
    #: general questions (TriviaQA) answered greedily for drift on chat answers and leak (measured when an
    #: adapter is evaluated against its base model; a single model's answers are kept for that); default 50
    n_questions: int = 50
    #: maximum new tokens per greedy answer (questions and task); default 32
    max_new_tokens: int = 32
    #: held-out task examples for exact match and response loss; default 100
    n_task: int = 100
    #: instruction-following prompts (IFEval's verifiable instructions on general questions, needs
    #: ``arrtune[ifeval]``), answered greedily and scored strict and loose; 0 = skip; default 0
    n_instructions: int = 0
    #: maximum new tokens per instruction-following answer (every drawn instruction fits it); default 160
    instruction_tokens: int = 160
    #: benchmark items / passages / prompts per forward pass (memory grows with it); default 16
    batch_size: int = 16
    #: seed of every subset; default 0
    seed: int = 0
    #: the new task: ``auto`` (the task of the run being evaluated, from its ``config.yaml``: a built-in task's
    #: held-out split, or its ``task_eval`` file; nothing when the run has neither), ``builtin:vornish`` /
    #: ``builtin:keywords`` (held-out = the test split, leak and bleed learn from the train split), a ``.jsonl``
    #: file of held-out examples (rows as in training data: prompt/completion, messages, or
    #: instruction/output), or null to skip; default ``auto``
    task: str | None = "auto"
    #: training data of a ``.jsonl`` task, whose responses define the leak vocabulary and the task form of
    #: bleed (default: none, then the held-out responses are used; ``auto`` sets it from the run)
    task_train: str | None = None
    #: example answers shown in the report (questions with base / adapted answers); default 3
    n_examples: int = 3
    #: precision the model's weights are loaded in (``arrtune eval``): float32, bfloat16 or float16; default
    #: float32
    model_dtype: str = "float32"
    #: load the base weights 4-bit (bitsandbytes NF4, computing in ``model_dtype``): true, false, or ``auto``
    #: (as the run being evaluated was trained, from its ``config.yaml``, so that a QLoRA adapter is scored on
    #: the quantized base it was trained on and regularized towards; false for a plain model); default ``auto``
    load_in_4bit: bool | str = "auto"

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "eval config") -> EvalConfig:
        """Build from a mapping (e.g. parsed YAML); unknown keys and wrong types raise ``ArrtuneError``."""
        if not isinstance(data, dict):
            raise ArrtuneError(f"{source}: expected a mapping of eval settings, got {type(data).__name__}")
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key not in known:
                raise ArrtuneError(f"{source}: unknown key '{key}' (known: {', '.join(known)})")
            where = f"{source}: field '{key}'"
            if key == "benchmarks":
                if isinstance(value, str):
                    value = [value]
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ArrtuneError(f"{where} must be a list of benchmark names or .jsonl paths")
            elif key in ("task", "task_train"):
                if value is not None and not isinstance(value, str):
                    raise ArrtuneError(f"{where} must be a string or null")
            elif key == "model_dtype":
                if value not in ("float32", "bfloat16", "float16"):
                    raise ArrtuneError(f"{where} must be float32, bfloat16 or float16, got {value!r}")
            elif key == "load_in_4bit":
                if not isinstance(value, bool) and value != "auto":
                    raise ArrtuneError(f"{where} must be true, false or auto, got {value!r}")
                if value is True:
                    from arrtune.config import require_bitsandbytes

                    require_bitsandbytes(where)
            else:
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ArrtuneError(f"{where} must be an integer, got {value!r}")
                minimum = (
                    1
                    if key in ("batch_size", "max_new_tokens", "max_text_tokens", "instruction_tokens")
                    else 0
                )
                if value < minimum:
                    raise ArrtuneError(f"{where} must be >= {minimum}, got {value}")
            kwargs[key] = value
        return cls(**kwargs)


def task_of_run(train_config: dict[str, Any]) -> tuple[str | None, str | None]:
    """``(task, task_train)`` for evaluating a run trained with ``train_config`` (its ``config.yaml``): a
    built-in task is its own held-out split; otherwise the run's ``task_eval`` file, with its ``data`` file
    as the task's training responses; ``(None, None)`` when the run has no held-out task data."""
    data, held_out = train_config.get("data"), train_config.get("task_eval")
    if isinstance(data, str) and data.startswith("builtin:"):
        return data, None
    if held_out:
        local = isinstance(data, str) and Path(data).expanduser().suffix == ".jsonl"
        return str(held_out), (data if local else None)
    return None, None


def resolve_from_run(cfg: EvalConfig, train_config: dict[str, Any] | None) -> EvalConfig:
    """``cfg`` with its ``auto`` settings taken from the run's config (None: a plain model): ``task`` becomes
    the run's task (:func:`task_of_run`, or none), ``load_in_4bit`` the run's (or false). Other values are
    kept."""
    if cfg.load_in_4bit == "auto":
        cfg = replace(cfg, load_in_4bit=bool((train_config or {}).get("load_in_4bit", False)))
        if cfg.load_in_4bit:
            from arrtune.config import require_bitsandbytes

            require_bitsandbytes("load_in_4bit (auto: the run was trained 4-bit)")
    if cfg.task != "auto":
        return cfg
    task, task_train = task_of_run(train_config) if train_config else (None, None)
    return replace(cfg, task=task, task_train=cfg.task_train or task_train)


def check_eval_inputs(cfg: EvalConfig) -> None:
    """Read every benchmark and task file ``cfg`` names (no model needed), so that a bad name or file fails
    in seconds, before a model is loaded and scored; raises ``ArrtuneError``."""
    for spec in cfg.benchmarks:
        load_benchmark(spec, cfg.n_per_benchmark, cfg.seed)
    if cfg.n_instructions > 0:
        from arrtune.evaluation.instructions import build_prompts

        build_prompts(cfg.n_instructions, cfg.seed)  # the checkers are installed, the prompts can be built
    if cfg.task and cfg.task != "auto" and cfg.n_task > 0:
        if cfg.task.startswith("builtin:"):
            from arrtune.data.task import builtin_task

            try:
                builtin_task(cfg.task.split(":", 1)[1])
            except ArrtuneError as exc:
                raise ArrtuneError(f"task: {exc}") from None
        else:
            read_held_out(cfg.task, "task")
            if cfg.task_train:
                read_held_out(cfg.task_train, "task_train", scored=False)


def text_sets(cfg: EvalConfig) -> dict[str, list[str]]:
    """The held-out text passages of the drift and perplexity measures, ``cfg.n_text`` per set."""
    from arrtune.data.corpora import heldout_book_texts, heldout_wiki_texts

    if cfg.n_text <= 0:
        return {}
    out = {}
    for name, texts in (("wiki", heldout_wiki_texts()), ("books", heldout_book_texts())):
        out[name] = [texts[i] for i in subset_indices(len(texts), cfg.n_text, cfg.seed, salt=f"text-{name}")]
    return out


def _questions(cfg: EvalConfig) -> list[str]:
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


def load_task(cfg: EvalConfig, tokenizer) -> tuple[list[TaskExample], list[str]]:
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


# --------------------------------------------------------------------------------------------- run


#: metrics of the base column that a cached ``evaluate_single`` result supplies (besides the benchmarks')
_TASK_KEYS = ("task/exact_match", "task/exact_match_stderr", "task/n")
#: metric names of a benchmark (see MCResult.metrics)
_BENCH_SUFFIXES = ("/acc", "/acc_stderr", "/acc_norm", "/acc_norm_stderr", "/n")


def _cached(value: Any) -> Any:
    """A number read back from JSON: ``null`` was a non-finite float (see :func:`write_eval_json`)."""
    return float("nan") if value is None else value


def _check_base_result(base_result: Any, cfg: EvalConfig) -> dict[str, Any]:
    """The ``base_cache`` of an :func:`evaluate_single` result computed with ``cfg``, else ``ValueError``."""
    if not isinstance(base_result, dict) or not isinstance(base_result.get("base_cache"), dict):
        raise ValueError("base_result must be a result of evaluate_single (with its 'base_cache')")
    want, got = _jsonable(asdict(cfg)), _jsonable(base_result.get("config"))
    if got != want:
        if isinstance(got, dict):
            diff = sorted(k for k in {*want, *got} if want.get(k, ...) != got.get(k, ...))
            detail = ", ".join(
                f"{k}: {got.get(k, '<missing>')!r} != {want.get(k, '<missing>')!r}" for k in diff
            )
        else:
            detail = "no config"
        raise ValueError(f"base_result was computed with a different EvalConfig ({detail})")
    return base_result["base_cache"]


class _Evaluation:
    """One evaluation, measurement family by measurement family: each method adds its metrics (and 0/1 outcomes
    per item, and timings) for every column (``base`` and ``adapted`` in pair mode, ``model`` alone), and
    :meth:`result` assembles them. In pair mode with a cached base result, the base column's benchmark scores,
    task answers and chat answers come from the cache instead of being computed again."""

    def __init__(self, model: Any, tokenizer: Any, cfg: EvalConfig,
                 base_ctx: Callable[[], AbstractContextManager] | None, progress: bool,
                 cache: dict[str, Any] | None, base_hidden: dict[tuple, list] | None = None) -> None:  # fmt: skip
        self.model, self.tokenizer, self.cfg, self.base_ctx, self.progress = (
            model,
            tokenizer,
            cfg,
            base_ctx,
            progress,
        )
        self.cache = cache
        self.base_hidden = base_hidden
        self.pair = base_ctx is not None
        self.columns = ["base", "adapted"] if self.pair else ["model"]
        self.own = "base" if self.pair else "model"  # the column of the base model
        self.cached = self.pair and cache is not None  # base column from an earlier evaluate_single
        self.computed = [c for c in self.columns if not (self.cached and c == "base")]
        self.contexts = {"base": base_ctx, "adapted": nullcontext, "model": nullcontext}
        self.metrics: dict[str, dict[str, Any]] = {c: {} for c in self.columns}
        self.per_item: dict[str, dict[str, list[int]]] = {c: {} for c in self.columns}  # 0/1, for paired SE
        self.timing: dict[str, dict[str, float]] = {c: {} for c in self.columns}
        self.parts: dict[str, float] = {}
        self.extra: dict[str, Any] = {}  # examples, task_examples, leak_vocabulary_size, form_check
        self.own_cache: dict[str, Any] = {}  # what a later evaluate_model_pair needs of this (base) model
        self.started = time.perf_counter()

    def from_cache(self, section: str, keys: Any) -> dict[str, Any]:
        try:
            return {k: _cached(self.cache[section][k]) for k in keys}  # type: ignore[index]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"base_result: base_cache has no {section} entry {exc}") from None

    def benchmarks(self) -> None:
        """Multiple-choice benchmarks: accuracy and normalised accuracy, per item."""
        cfg, t0 = self.cfg, time.perf_counter()
        for spec in cfg.benchmarks:
            items = load_benchmark(spec, cfg.n_per_benchmark, cfg.seed)
            name = benchmark_name(spec)
            for c in self.computed:
                with self.contexts[c]():
                    r = score_items(
                        self.model, self.tokenizer, items, name, cfg.batch_size, progress=self.progress
                    )
                self.metrics[c].update(r.metrics())
                self.per_item[c][f"{name}/acc"] = r.correct
                self.per_item[c][f"{name}/acc_norm"] = r.correct_norm
                self.timing[c][f"{name}/items_per_s"] = r.items_per_s
                self.timing[c][f"{name}/seconds"] = r.seconds
            if self.cached:
                self.metrics["base"].update(self.from_cache("metrics", r.metrics()))
                self.per_item["base"].update(self.from_cache("per_item", (f"{name}/acc", f"{name}/acc_norm")))
                self.timing["base"].update(
                    self.from_cache("timing", (f"{name}/items_per_s", f"{name}/seconds"))
                )
        if cfg.benchmarks:
            for c in self.columns:
                scores = [self.metrics[c][f"{benchmark_name(s)}/acc"] for s in cfg.benchmarks]
                self.metrics[c]["mc/mean_acc"] = mean(scores)
            self.parts["benchmarks"] = time.perf_counter() - t0

    def text(self) -> None:
        """Perplexity, bits per byte and drift on held-out text (both models from one pass in pair mode; the
        base forward is needed for drift: the base result's cache does not skip it, ``base_hidden`` does)."""
        cfg, t0 = self.cfg, time.perf_counter()
        for set_name, texts in text_sets(cfg).items():
            key = (set_name, cfg.max_text_tokens, cfg.batch_size, tuple(texts))
            hidden = (
                self.base_hidden.setdefault(key, []) if self.pair and self.base_hidden is not None else None
            )
            r = text_metrics(self.model, self.tokenizer, texts, cfg.max_text_tokens, cfg.batch_size, self.base_ctx,
                             self.progress, desc=f"text/{set_name}", base_hidden=hidden)  # fmt: skip
            if self.pair:
                self.metrics["base"].update({f"ppl/{set_name}": r.ppl_base, f"bpb/{set_name}": r.bpb_base})
                self.metrics["adapted"].update(
                    {f"ppl/{set_name}": r.ppl, f"bpb/{set_name}": r.bpb, f"drift/{set_name}": r.drift}
                )
            else:
                self.metrics["model"].update({f"ppl/{set_name}": r.ppl, f"bpb/{set_name}": r.bpb})
        if cfg.n_text > 0:
            self.parts["text"] = time.perf_counter() - t0

    def task(self) -> tuple[list[TaskExample], list[str]]:
        """Plasticity: exact match of greedy answers and loss of reference responses on the held-out task,
        and the forgetting forecast (KL base || adapted on the adapted model's task answers). Returns the task
        examples and the task's training responses (what leak and bleed learn from)."""
        from arrtune.data.task import exact_match

        cfg, t0 = self.cfg, time.perf_counter()
        task_examples, train_responses = load_task(cfg, self.tokenizer)
        if not task_examples:
            return task_examples, train_responses
        prompts = [e.prompt_ids for e in task_examples]
        predictions: dict[str, list[str]] = {}
        for c in self.columns:
            if c not in self.computed:
                predictions[c] = list(self.from_cache("task", ["answers"])["answers"])
                self.per_item[c].update(self.from_cache("per_item", ["task/exact_match"]))
                self.metrics[c].update(self.from_cache("metrics", _TASK_KEYS))
                if len(predictions[c]) != len(task_examples):
                    raise ValueError("base_result: base_cache holds answers to a different number of tasks")
                continue
            with self.contexts[c]():
                ans = answer(self.model, self.tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size, self.progress,
                             f"task/{c}")  # fmt: skip
            predictions[c] = ans.texts
            if c == "adapted":
                self._forecast(ans)
            correct = [int(exact_match(p, e.reference)) for p, e in zip(ans.texts, task_examples)]
            self.per_item[c]["task/exact_match"] = correct
            em = mean(correct)
            self.metrics[c].update({"task/exact_match": em, "task/exact_match_stderr": binomial_stderr(em, len(correct)),
                                    "task/n": len(correct)})  # fmt: skip
        stats = score_sequences(
            self.model, self.tokenizer, [e.prompt_ids + e.response_ids for e in task_examples],
            [len(e.prompt_ids) for e in task_examples], cfg.batch_size, None if self.cached else self.base_ctx,
            kl=False, progress=self.progress, desc="task/loss",
        )  # fmt: skip
        if self.cached:
            self.metrics["base"].update(self.from_cache("metrics", ["task/loss"]))
            self.metrics["adapted"]["task/loss"] = stats.mean_nll()
        elif self.pair:
            self.metrics["base"]["task/loss"] = stats.mean_nll(base=True)
            self.metrics["adapted"]["task/loss"] = stats.mean_nll()
        else:
            self.metrics["model"]["task/loss"] = stats.mean_nll()
        self.own_cache["task"] = {"answers": predictions[self.own]}
        self.extra["task_examples"] = [
            {"prompt": e.prompt, "reference": e.reference, **{c: predictions[c][k] for c in self.columns}}
            for k, e in enumerate(task_examples[: max(cfg.n_examples, 0)])
        ]
        self.parts["task"] = time.perf_counter() - t0
        return task_examples, train_responses

    def _forecast(self, ans: Answers) -> None:
        """``drift/task``: KL(base || adapted) on the adapted model's own answers to the task prompts."""
        keep = [i for i, a in enumerate(ans.ids) if a]
        if keep:
            forecast = score_sequences(
                self.model, self.tokenizer, [ans.prompts[i] + ans.ids[i] for i in keep],
                [len(ans.prompts[i]) for i in keep], self.cfg.batch_size, self.base_ctx, progress=self.progress,
                desc="task/drift",
            )  # fmt: skip
            self.metrics["adapted"]["drift/task"] = forecast.mean_kl()

    def chat(self, task_examples: list[TaskExample], train_responses: list[str]) -> None:
        """The base model's greedy answers to general questions; in pair mode, drift on them, leak and bleed.
        A single model answers them too (they are what a later pair evaluation against it reuses), unless its
        tokenizer has no chat template (then it could not be the base of an adapter evaluation anyway)."""
        cfg, questions = self.cfg, _questions(self.cfg)
        if not questions or not (self.pair or getattr(self.tokenizer, "chat_template", None) is not None):
            return
        t0 = time.perf_counter()
        prompts = [question_prompt_ids(self.tokenizer, q) for q in questions]
        if self.cached:
            chat = self.from_cache("chat", ("questions", "prompt_ids", "answer_ids", "answers"))
            if chat["questions"] != questions or chat["prompt_ids"] != prompts:
                raise ValueError(
                    "base_result: its general questions differ from these (another tokenizer or question set)"
                )
            base_ans = Answers(prompts, [list(a) for a in chat["answer_ids"]], list(chat["answers"]))
        else:
            with self.contexts[self.own]():
                base_ans = answer(self.model, self.tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size,
                                  self.progress, f"chat/{self.own}")  # fmt: skip
        self.own_cache["chat"] = {"questions": questions, "prompt_ids": base_ans.prompts,
                                  "answer_ids": base_ans.ids, "answers": base_ans.texts}  # fmt: skip
        if self.pair:
            self._behaviour(questions, base_ans, task_examples, train_responses)
        self.parts["chat"] = time.perf_counter() - t0

    def _behaviour(self, questions: list[str], base_ans: Answers, task_examples: list[TaskExample],
                   train_responses: list[str]) -> None:  # fmt: skip
        """Drift on the base model's chat answers; leak and bleed of the adapted model's answers; examples."""
        cfg, adapted = self.cfg, self.metrics["adapted"]
        adapted_ans = answer(self.model, self.tokenizer, base_ans.prompts, cfg.max_new_tokens, cfg.batch_size,
                             self.progress, "chat/adapted")  # fmt: skip
        keep = [i for i, a in enumerate(base_ans.ids) if a]
        stats = score_sequences(
            self.model, self.tokenizer, [base_ans.prompts[i] + base_ans.ids[i] for i in keep],
            [len(base_ans.prompts[i]) for i in keep], cfg.batch_size, self.base_ctx, progress=self.progress,
            desc="chat/drift",
        )  # fmt: skip
        adapted["drift/chat"] = stats.mean_kl()
        hits: list[list[str]] = [[] for _ in questions]
        bleeds = [0 for _ in questions]
        if train_responses:
            task_vocab = leak_vocabulary(train_responses, base_ans.texts, general_vocabulary())
            hits = [leaked_words(t, task_vocab) for t in adapted_ans.texts]
            leaks = [int(bool(h)) for h in hits]
            adapted.update({"leak": mean(leaks), "leak_stderr": binomial_stderr(mean(leaks), len(leaks))})
            self.extra["leak_vocabulary_size"] = len(task_vocab)
            references = [e.reference for e in task_examples]
            bleed = measure_bleed(train_responses, references, base_ans.texts, adapted_ans.texts)
            bleeds = bleed.bleeds
            adapted.update(
                {"bleed": mean(bleeds), "bleed_stderr": binomial_stderr(mean(bleeds), len(bleeds))}
            )
            self.extra["form_check"] = {"task_recall": bleed.task_recall,
                                        "base_false_positive": bleed.base_false_positive}  # fmt: skip
            self.per_item["adapted"].update({"leak": leaks, "bleed": bleeds})
        order = sorted(
            range(len(questions)), key=lambda i: (not (hits[i] or bleeds[i]), i)
        )  # leaks/bleeds first
        self.extra["examples"] = [
            {"question": questions[i], "base": base_ans.texts[i], "adapted": adapted_ans.texts[i],
             "leaked": hits[i], "bleeds": bool(bleeds[i])}
            for i in order[: max(cfg.n_examples, 0)]
        ]  # fmt: skip

    def instructions(self) -> None:
        """Instruction following (:mod:`arrtune.evaluation.instructions`): each column's greedy answers to the
        prompts, scored strict and loose at prompt and instruction level, with their 0/1 outcomes."""
        cfg = self.cfg
        if cfg.n_instructions <= 0:
            return
        from arrtune.evaluation.instructions import build_prompts, score

        t0 = time.perf_counter()
        prompts = build_prompts(cfg.n_instructions, cfg.seed)
        ids = [question_prompt_ids(self.tokenizer, p.prompt) for p in prompts]
        responses: dict[str, list[str]] = {}
        for c in self.columns:
            if c in self.computed:
                with self.contexts[c]():
                    responses[c] = answer(self.model, self.tokenizer, ids, cfg.instruction_tokens, cfg.batch_size,
                                          self.progress, f"ifeval/{c}").texts  # fmt: skip
            else:
                responses[c] = list(self.from_cache("instructions", ["answers"])["answers"])
            scores = score(prompts, responses[c])
            self.metrics[c].update(scores.metrics())
            for name in ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose"):
                self.per_item[c][f"ifeval/{name}"] = getattr(scores, name)
        self.own_cache["instructions"] = {"answers": responses[self.own]}
        self.extra["instruction_examples"] = [
            {"prompt": p.prompt, "instructions": list(p.instruction_ids), **{c: responses[c][k] for c in self.columns}}
            for k, p in enumerate(prompts[: max(cfg.n_examples, 0)])
        ]  # fmt: skip
        self.parts["instructions"] = time.perf_counter() - t0

    def result(self) -> EvalResult:
        """The result (see :func:`evaluate_single` and :func:`evaluate_model_pair`)."""
        self.parts["total"] = time.perf_counter() - self.started
        out: dict[str, Any] = {"mode": "pair" if self.pair else "single"}
        for c in self.columns:
            out[c] = self.metrics[c]
        if self.pair:
            out["delta"] = _delta(self.metrics["base"], self.metrics["adapted"], self.per_item["base"],
                                  self.per_item["adapted"])  # fmt: skip
        out.update(self.extra)
        out["per_item"] = self.per_item  # 0/1 per item and column, to compare runs item by item (paired)
        out["timing"] = {**{c: self.timing[c] for c in self.columns}, "parts_s": self.parts}
        out["config"] = asdict(self.cfg)
        if not self.pair:
            model = self.metrics["model"]
            reused = [k for k in model if k.endswith(_BENCH_SUFFIXES) or k.startswith("task/")]
            out["base_cache"] = {"metrics": {k: model[k] for k in reused}, "per_item": self.per_item["model"],
                                 "timing": self.timing["model"], **self.own_cache}  # fmt: skip
        return EvalResult(**out)  # type: ignore[typeddict-item]


def _run(model, tokenizer, cfg: EvalConfig, base_ctx: Callable[[], AbstractContextManager] | None, progress: bool,
         cache: dict[str, Any] | None = None, base_hidden: dict[tuple, list] | None = None) -> EvalResult:  # fmt: skip
    """Evaluate: benchmarks, held-out text, the task, then chat behaviour (see :class:`_Evaluation`)."""
    evaluation = _Evaluation(model, tokenizer, cfg, base_ctx, progress, cache, base_hidden)
    evaluation.benchmarks()
    evaluation.text()
    task_examples, train_responses = evaluation.task()
    evaluation.chat(task_examples, train_responses)
    evaluation.instructions()
    return evaluation.result()


def _delta(base: dict, adapted: dict, base_items: dict, adapted_items: dict) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in adapted.items():
        if key not in base or key.endswith(("_stderr", "/n")) or not isinstance(value, (int, float)):
            continue
        if base[key] is None or value is None:
            continue
        out[key] = value - base[key]
        if key in base_items and key in adapted_items:
            out[f"{key}_stderr"] = paired_stderr(base_items[key], adapted_items[key])
    return out


def evaluate_single(model, tokenizer, cfg: EvalConfig | None = None, progress: bool = True) -> EvalResult:
    """Evaluate one model (no adapter): benchmarks, perplexity, task, and its greedy answers to the general
    questions. Returns ``{"mode": "single", "model": {metric: value}, "task_examples": [...], "timing": {...},
    "config": {...}, "base_cache": {...}}``.

    ``base_cache`` (JSON-serializable) is what :func:`evaluate_model_pair` needs to use this result as its base
    column without recomputing it (``base_result=``): ``metrics`` (the benchmark and task metrics),
    ``per_item`` (0/1 per item: ``<bench>/acc``, ``<bench>/acc_norm``, ``task/exact_match``), ``timing``
    (benchmark throughput), ``task`` (``answers``: the greedy answers to the held-out task prompts) and ``chat``
    (``questions``, their chat ``prompt_ids``, the greedy ``answer_ids`` and decoded ``answers``); ``task`` and
    ``chat`` only when those parts are evaluated."""
    return _run(model, tokenizer, cfg or EvalConfig(), None, progress)


def evaluate_model_pair(
    peft_model,
    tokenizer,
    cfg: EvalConfig | None = None,
    base_context: Callable[[], AbstractContextManager] | None = None,
    progress: bool = True,
    base_result: dict[str, Any] | None = None,
    base_hidden: dict[tuple, list] | None = None,
) -> EvalResult:
    """Evaluate the base model (inside ``base_context()``, default :func:`arrtune.lm.adapter_disabled`) and the
    adapted model in one process. Returns ``{"mode": "pair", "base": {...}, "adapted": {...}, "delta": {...},
    "examples": [...], "task_examples": [...], "leak_vocabulary_size": int, "timing": {...}, "config": {...}}``;
    drift and leak appear in ``adapted`` only.

    ``base_result``: an :func:`evaluate_single` result of the same base model with the same config (as
    returned, or read back from :func:`write_eval_json`'s file), whose ``base_cache`` then supplies the base
    benchmark scores, the base task answers and loss and the base answers to the general questions, so that
    they are not computed again (e.g. when several adapters of one base model are compared). The base forward
    passes that drift needs (on the held-out text, from which the base perplexity also comes, and on the
    cached base answers) still run. The result is the same as without ``base_result`` (``timing["base"]`` is
    the cached one). A result computed with another config raises ``ValueError``.

    ``base_hidden``: a dict kept in memory across calls whose adapters share one base model (same weights and
    precision): the base model's hidden states on the held-out text are computed by the first call and reused
    by the next ones, which then skip that base forward pass. The result is the same."""
    cfg = cfg or EvalConfig()
    cache = None if base_result is None else _check_base_result(base_result, cfg)
    ctx = base_context or _adapter_off(peft_model)
    return _run(peft_model, tokenizer, cfg, ctx, progress, cache, base_hidden)


def evaluate(
    model,
    tokenizer,
    cfg: EvalConfig | None = None,
    base_context: Callable[[], AbstractContextManager] | None = None,
    progress: bool = True,
) -> EvalResult:
    """:func:`evaluate_model_pair` for a PEFT model (or when ``base_context`` is given), else
    :func:`evaluate_single`."""
    if base_context is not None or hasattr(model, "disable_adapter"):
        return evaluate_model_pair(model, tokenizer, cfg, base_context, progress)
    return evaluate_single(model, tokenizer, cfg, progress)


# --------------------------------------------------------------------------------------------- output


def _fmt(key: str, value: Any, stderr: Any = None, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:+d}" if signed else str(value)
    sign = "+" if signed else ""
    digits = 2 if key.startswith("ppl/") else 4 if key.startswith(("drift/", "bpb/", "task/loss")) else 3
    text = f"{value:{sign}.{digits}f}"
    if stderr is not None and not (isinstance(stderr, float) and math.isnan(stderr)):
        text += f" ± {stderr:.{digits}f}"
    return text


#: a bleed above this share of general answers, beyond one standard error, is behaviour not protected
BLEED_LIMIT = 0.05


def behaviour_note(result: dict[str, Any]) -> str | None:
    """One sentence when a pair evaluation shows behaviour not protected beyond noise (bleed over
    :data:`BLEED_LIMIT` by more than its standard error, or instruction following down by more than one paired
    standard error), naming the setting that fixes it; None otherwise."""
    adapted, delta = result.get("adapted") or {}, result.get("delta") or {}
    problems = []
    bleed, bleed_se = adapted.get("bleed"), adapted.get("bleed_stderr") or 0.0
    if isinstance(bleed, (int, float)) and bleed - bleed_se > BLEED_LIMIT:
        problems.append(f"{bleed:.0%} of its answers to unrelated questions take the task's form (bleed)")
    change, change_se = delta.get("ifeval/prompt_strict"), delta.get("ifeval/prompt_strict_stderr") or 0.0
    if isinstance(change, (int, float)) and change + change_se < 0:
        problems.append(f"it follows instructions less ({change * 100:+.1f} ± {change_se * 100:.1f} points, "
                        "IFEval prompt strict)")  # fmt: skip
    if not problems:
        return None
    return ("Behaviour not protected: " + " and ".join(problems) + "; replaying the base model's own answers "
            "fixes this at almost no cost (`replay_mix: 0.5`, docs/study.md).")  # fmt: skip


def format_table(result: dict[str, Any]) -> str:
    """A plain-text (markdown) table of a result, with example answers and throughput below it."""
    columns = ["base", "adapted", "delta"] if result.get("mode") == "pair" else ["model"]
    keys: list[str] = []
    for c in columns:
        for key in result.get(c, {}):
            if not key.endswith(("_stderr", "/n")) and key not in keys:
                keys.append(key)
    cells = [["metric", *columns]]
    for key in keys:
        row = [key]
        for c in columns:
            col = result.get(c, {})
            row.append(_fmt(key, col.get(key), col.get(f"{key}_stderr"), signed=c == "delta"))
        cells.append(row)
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |")
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    out = "\n".join(lines)

    timing = result.get("timing", {})
    speeds = []
    for c in columns:
        for key, value in timing.get(c, {}).items():
            if key.endswith("/items_per_s"):
                speeds.append(f"{key.split('/')[0]} {value:.1f}" + (f" ({c})" if len(columns) > 1 else ""))
    if speeds:
        out += "\n\nitems/s: " + ", ".join(speeds)
    if timing.get("parts_s"):
        out += "\nseconds: " + ", ".join(f"{k} {v:.1f}" for k, v in timing["parts_s"].items())
    for ex in result.get("examples", []):
        leaked = f"  [leaked: {', '.join(ex['leaked'])}]" if ex.get("leaked") else ""
        leaked += "  [task form]" if ex.get("bleeds") else ""
        out += f"\n\nQ: {ex['question']}\n  base:    {_one_line(ex['base'])}\n  adapted: {_one_line(ex['adapted'])}{leaked}"
    return out


def _one_line(text: str, width: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_eval_json(result: dict[str, Any], path: str | Path) -> Path:
    """Write ``result`` as JSON atomically (temporary file in the same directory, then ``os.replace``);
    non-finite numbers become ``null``."""
    text = json.dumps(_jsonable(result), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    return write_atomic(path, text)


def _adapter_off(peft_model: Any) -> Callable[[], AbstractContextManager]:
    """Factory of the context in which ``peft_model`` is its base model (PEFT ``disable_adapter``)."""
    if not hasattr(peft_model, "disable_adapter"):
        raise TypeError("the model has no adapter (expected a peft.PeftModel); pass base_context explicitly")
    return lambda: adapter_disabled(peft_model)
