"""What an evaluation measures (:class:`EvalConfig`, the ``eval.yaml`` fields), its ``auto`` settings taken
from the run being evaluated, and the check of its inputs before a model is loaded."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from arrtune.data.sft import read_held_out
from arrtune.errors import ArrtuneError
from arrtune.evaluation.benchmarks import load_benchmark

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
    #: the instruction-following prompts: ``builtin`` (general questions with instructions drawn offline), or
    #: IFEval's own data, ``google/IFEval`` (Hub) or a local ``.jsonl`` / ``.parquet`` file in its format (its
    #: answers run long: set ``instruction_tokens`` to about 1280); default ``builtin``
    instruction_prompts: str = "builtin"
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
            elif key == "instruction_prompts":
                if not isinstance(value, str) or not value.strip():
                    raise ArrtuneError(
                        f"{where} must be 'builtin', a Hub dataset id or a file, got {value!r}"
                    )
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
        from arrtune.evaluation.instructions import checkers, instruction_prompts

        prompts = instruction_prompts(
            cfg.instruction_prompts, cfg.n_instructions, cfg.seed
        )  # they can be read
        if not prompts:
            raise ArrtuneError(f"instruction_prompts={cfg.instruction_prompts!r}: no prompts")
        checkers()  # the checkers are installed
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
