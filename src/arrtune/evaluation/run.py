"""Evaluating a model, a base model with its adapter, or a trained run: retention (benchmarks, perplexity,
drift, leak) and plasticity (the new task).

:func:`evaluate_model_pair` evaluates a PEFT model twice in one process, as the base model (inside
``disable_adapter()``) and as the adapted model, and reports both and their difference; drift and leak are
measured against the base model (its answers to the general questions are generated once, adapter disabled).
:func:`evaluate_single` evaluates a plain model (no drift, no leak) and keeps, in ``base_cache``, what a pair
evaluation needs of it as the base model, so that ``evaluate_model_pair(..., base_result=...)`` of several
adapters of one base model computes the base column once. :func:`evaluate_run` evaluates a run (a model spec
and an adapter directory, or a model already wrapped) and writes its ``eval.json``: what ``arrtune eval``,
``arrtune compare`` and ``arrtune export`` call. Metric names are flat:

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
import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from arrtune.errors import ArrtuneError
from arrtune.evaluation.config import EvalConfig
from arrtune.evaluation.measurements import EvalResult, measure
from arrtune.evaluation.output import jsonable, write_eval_json
from arrtune.lm import adapter_disabled


def _check_base_result(base_result: Any, cfg: EvalConfig) -> dict[str, Any]:
    """The ``base_cache`` of an :func:`evaluate_single` result computed with ``cfg``, else ``ValueError``."""
    if not isinstance(base_result, dict) or not isinstance(base_result.get("base_cache"), dict):
        raise ValueError("base_result must be a result of evaluate_single (with its 'base_cache')")
    want, got = jsonable(asdict(cfg)), jsonable(base_result.get("config"))
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


def evaluate_single(
    model: Any, tokenizer: Any, cfg: EvalConfig | None = None, progress: bool = True
) -> EvalResult:
    """Evaluate one model (no adapter): benchmarks, perplexity, task, and its greedy answers to the general
    questions. Returns ``{"mode": "single", "model": {metric: value}, "task_examples": [...], "timing": {...},
    "config": {...}, "base_cache": {...}}``.

    ``base_cache`` (JSON-serializable) is what :func:`evaluate_model_pair` needs to use this result as its base
    column without recomputing it (``base_result=``): ``metrics`` (the benchmark and task metrics),
    ``per_item`` (0/1 per item: ``<bench>/acc``, ``<bench>/acc_norm``, ``task/exact_match``), ``timing``
    (benchmark throughput), ``task`` (``answers``: the greedy answers to the held-out task prompts) and ``chat``
    (``questions``, their chat ``prompt_ids``, the greedy ``answer_ids`` and decoded ``answers``); ``task`` and
    ``chat`` only when those parts are evaluated."""
    return measure(model, tokenizer, cfg or EvalConfig(), None, progress)


def evaluate_model_pair(
    peft_model: Any,
    tokenizer: Any,
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
    return measure(peft_model, tokenizer, cfg, ctx, progress, cache, base_hidden)


def evaluate(
    model: Any,
    tokenizer: Any,
    cfg: EvalConfig | None = None,
    base_context: Callable[[], AbstractContextManager] | None = None,
    progress: bool = True,
) -> EvalResult:
    """:func:`evaluate_model_pair` for a PEFT model (or when ``base_context`` is given), else
    :func:`evaluate_single`."""
    if base_context is not None or hasattr(model, "disable_adapter"):
        return evaluate_model_pair(model, tokenizer, cfg, base_context, progress)
    return evaluate_single(model, tokenizer, cfg, progress)


def _adapter_off(peft_model: Any) -> Callable[[], AbstractContextManager]:
    """Factory of the context in which ``peft_model`` is its base model (PEFT ``disable_adapter``)."""
    if not hasattr(peft_model, "disable_adapter"):
        raise TypeError("the model has no adapter (expected a peft.PeftModel); pass base_context explicitly")
    return lambda: adapter_disabled(peft_model)


def adapter_base(adapter: str | os.PathLike[str]) -> str:
    """The base model an adapter directory names (``base_model_name_or_path`` in its adapter_config.json)."""
    from arrtune.models import builtin_alias

    path = Path(adapter) / "adapter_config.json"
    try:
        base = json.loads(path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as exc:
        raise ArrtuneError(f"{path}: unreadable adapter config ({exc})") from exc
    if not isinstance(base, str) or not base:
        raise ArrtuneError(f"{path}: names no base model (base_model_name_or_path); pass --model")
    return builtin_alias(base) or base  # the upstream id of a built-in model: its built-in copy


def _with_adapter(model: Any, adapter: Path, spec: str | None) -> Any:
    """``model`` with the PEFT adapter in ``adapter``; an adapter of another base model raises ``ArrtuneError``."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, adapter)
    except RuntimeError as exc:  # size mismatch: the adapter belongs to another base model
        given = f"'{spec}'" if spec is not None else "the model given"
        raise ArrtuneError(
            f"{adapter}: this adapter was trained on '{adapter_base(adapter)}', whose shapes differ "
            f"from {given}; omit --model to use the adapter's own base"
        ) from exc


def evaluate_run(
    model: str | Any,
    cfg: EvalConfig,
    adapter: str | os.PathLike[str] | None = None,
    output: str | os.PathLike[str] | None = None,
    *,
    tokenizer: Any = None,
    progress: bool = True,
    base_result: dict[str, Any] | None = None,
    base_hidden: dict[tuple, list] | None = None,
) -> EvalResult:
    """Evaluate a run, write the result to ``output`` (:func:`write_eval_json`) when given, and return it.

    ``model``: a model spec, loaded in ``cfg.model_dtype`` (4-bit when ``cfg.load_in_4bit``; ``cfg`` resolved,
    see :func:`arrtune.evaluation.resolve_from_run`) with its tokenizer unless ``tokenizer`` is given; or a
    loaded model, plain or already wrapped in its adapter (a ``peft.PeftModel``), with its ``tokenizer``.
    ``adapter``: a PEFT adapter directory, loaded onto the model. A model with an adapter is evaluated against
    its base model (:func:`evaluate_model_pair`, which ``base_result`` and ``base_hidden`` are passed to), a
    plain model alone (:func:`evaluate_single`)."""
    spec = model if isinstance(model, str) else None
    if spec is not None:
        import torch

        if cfg.load_in_4bit == "auto":
            raise ValueError("evaluate_run: cfg.load_in_4bit is 'auto' (resolve it with resolve_from_run)")

        from arrtune.models import load_model, load_tokenizer

        tokenizer = load_tokenizer(spec) if tokenizer is None else tokenizer
        model = load_model(spec, dtype=getattr(torch, cfg.model_dtype), load_in_4bit=bool(cfg.load_in_4bit))
    elif tokenizer is None:
        raise TypeError("evaluate_run: a loaded model needs its tokenizer")
    if adapter is not None:
        model = _with_adapter(model, Path(adapter), spec)
    if hasattr(model, "disable_adapter"):
        result = evaluate_model_pair(model, tokenizer, cfg, progress=progress, base_result=base_result,
                                     base_hidden=base_hidden)  # fmt: skip
    elif base_result is not None or base_hidden is not None:
        raise ValueError("evaluate_run: base_result and base_hidden are for a model with an adapter")
    else:
        result = evaluate_single(model, tokenizer, cfg, progress=progress)
    if output is not None:
        write_eval_json(result, output)
    return result
