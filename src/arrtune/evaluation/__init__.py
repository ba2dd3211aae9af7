"""Evaluation: retention (benchmarks, perplexity, drift, leak) and plasticity (the new task) of a model, or of
a base model and its adapter side by side. See :mod:`arrtune.evaluation.run` for the metrics.

By job: :mod:`~arrtune.evaluation.config` (what is measured), :mod:`~arrtune.evaluation.inputs` (the held-out
text, questions and task), :mod:`~arrtune.evaluation.benchmarks` and :mod:`~arrtune.evaluation.scoring`
(multiple choice), :mod:`~arrtune.evaluation.text` (perplexity and drift), :mod:`~arrtune.evaluation.form`
(bleed), :mod:`~arrtune.evaluation.instructions` (instruction following), :mod:`~arrtune.evaluation.measurements`
(one evaluation, family by family), :mod:`~arrtune.evaluation.run` (evaluating a model, a pair or a run),
:mod:`~arrtune.evaluation.output` (table, note, ``eval.json``) and :mod:`~arrtune.evaluation.scale` (the LoRA
scale of ``export --scale auto``)."""

from arrtune.evaluation.benchmarks import BENCHMARKS, MCItem, load_benchmark, load_jsonl_benchmark
from arrtune.evaluation.config import (
    DEFAULT_BENCHMARKS,
    EvalConfig,
    check_eval_inputs,
    resolve_from_run,
    task_of_run,
)
from arrtune.evaluation.measurements import EvalResult
from arrtune.evaluation.output import behaviour_note, format_table, write_eval_json
from arrtune.evaluation.run import evaluate, evaluate_model_pair, evaluate_run, evaluate_single
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
    "evaluate_run",
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
