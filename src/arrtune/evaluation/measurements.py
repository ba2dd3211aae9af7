"""One evaluation, measurement family by measurement family (:class:`_Evaluation`), and the result it
assembles (:class:`EvalResult`); the metrics are listed in :mod:`arrtune.evaluation.run`."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict
from typing import Any, TypedDict

from arrtune.evaluation._common import binomial_stderr, mean, paired_stderr
from arrtune.evaluation.benchmarks import benchmark_name, load_benchmark
from arrtune.evaluation.config import EvalConfig
from arrtune.evaluation.form import measure_bleed
from arrtune.evaluation.inputs import general_vocabulary, load_task, question_set, text_sets
from arrtune.evaluation.scoring import score_items
from arrtune.evaluation.text import score_sequences, text_metrics
from arrtune.generation import (
    Answers,
    TaskExample,
    answer,
    leak_vocabulary,
    leaked_words,
    question_prompt_ids,
)


class EvalResult(TypedDict, total=False):
    """What :func:`evaluate_single` and :func:`evaluate_model_pair` return, and ``eval.json`` holds."""

    mode: str  #: "single" or "pair"
    model: dict[str, Any]  #: single: metric -> value (the table in :mod:`arrtune.evaluation.run`)
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


#: metrics of the base column that a cached ``evaluate_single`` result supplies (besides the benchmarks')
_TASK_KEYS = ("task/exact_match", "task/exact_match_stderr", "task/n")
#: metric names of a benchmark (see MCResult.metrics)
_BENCH_SUFFIXES = ("/acc", "/acc_stderr", "/acc_norm", "/acc_norm_stderr", "/n")


def _cached(value: Any) -> Any:
    """A number read back from JSON: ``null`` was a non-finite float (see :func:`write_eval_json`)."""
    return float("nan") if value is None else value


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
        """``keys`` of the cached base result's ``section``; a missing entry raises ``ValueError``."""
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
        cfg, questions = self.cfg, question_set(self.cfg)
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
        from arrtune.evaluation.instructions import instruction_prompts, score

        t0 = time.perf_counter()
        prompts = instruction_prompts(cfg.instruction_prompts, cfg.n_instructions, cfg.seed)
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


def measure(model: Any, tokenizer: Any, cfg: EvalConfig, base_ctx: Callable[[], AbstractContextManager] | None,
            progress: bool, cache: dict[str, Any] | None = None,
            base_hidden: dict[tuple, list] | None = None) -> EvalResult:  # fmt: skip
    """Evaluate: benchmarks, held-out text, the task, then chat behaviour and instruction following (see
    :class:`_Evaluation`); pair mode when ``base_ctx`` is given, with the base column from ``cache`` (a
    checked ``base_cache``) when that is given too."""
    evaluation = _Evaluation(model, tokenizer, cfg, base_ctx, progress, cache, base_hidden)
    evaluation.benchmarks()
    evaluation.text()
    task_examples, train_responses = evaluation.task()
    evaluation.chat(task_examples, train_responses)
    evaluation.instructions()
    return evaluation.result()
