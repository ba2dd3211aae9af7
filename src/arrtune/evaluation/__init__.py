"""Evaluation: retention (benchmarks, perplexity, drift, leak) and plasticity (the new task) of a model, or of
a base model and its adapter side by side. See :mod:`arrtune.evaluation.runner` for the metrics."""

from arrtune.evaluation.benchmarks import BENCHMARKS, MCItem, load_benchmark, load_jsonl_benchmark
from arrtune.evaluation.runner import (
    DEFAULT_BENCHMARKS,
    EvalConfig,
    EvalResult,
    behaviour_note,
    check_eval_inputs,
    evaluate,
    evaluate_model_pair,
    evaluate_single,
    format_table,
    resolve_from_run,
    task_of_run,
    write_eval_json,
)
from arrtune.evaluation.scoring import MCResult, loglikelihoods, score_items
from arrtune.evaluation.text import text_metrics

__all__ = [
    "BENCHMARKS",
    "DEFAULT_BENCHMARKS",
    "EvalConfig",
    "EvalResult",
    "behaviour_note",
    "check_eval_inputs",
    "MCItem",
    "MCResult",
    "evaluate",
    "evaluate_model_pair",
    "evaluate_single",
    "format_table",
    "load_benchmark",
    "load_jsonl_benchmark",
    "loglikelihoods",
    "resolve_from_run",
    "task_of_run",
    "score_items",
    "text_metrics",
    "write_eval_json",
]
