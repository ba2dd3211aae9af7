"""The LoRA scale of ``arrtune export --scale auto``: the smallest multiple of the trained update that keeps the
held-out task (:func:`choose_scale`), measured with the update set to each scale in turn (:class:`LoraScale`)."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch

from arrtune.errors import ArrtuneError
from arrtune.evaluation._common import binomial_stderr, paired_stderr
from arrtune.evaluation.config import EvalConfig
from arrtune.evaluation.inputs import load_task, text_sets
from arrtune.evaluation.text import score_sequences, text_metrics
from arrtune.generation import eos_token_ids
from arrtune.lm import adapter_disabled

#: the LoRA scales ``scale="auto"`` measures, largest first
AUTO_SCALES = (1.0, 0.75, 0.5, 0.25)
#: held-out text passages per set for the drift column of ``scale="auto"`` (the task uses the eval default)
AUTO_TEXT_PASSAGES = 10


def lora_b_matrices(peft_model: Any) -> dict[str, torch.nn.Parameter]:
    """The LoRA ``B`` matrices of ``peft_model`` by parameter name (the update of a layer is ``B A``)."""
    return {
        name: p for name, p in peft_model.named_parameters() if "lora_B" in name or "lora_embedding_B" in name
    }


class LoraScale:
    """Set the LoRA update of ``peft_model`` to ``s`` times the trained one, for any sequence of ``s`` (each
    from the trained ``B`` matrices kept at construction, so scales neither compound nor drift)."""

    def __init__(self, peft_model: Any) -> None:
        self.matrices = lora_b_matrices(peft_model)
        self.trained = {name: p.detach().clone() for name, p in self.matrices.items()}

    def set(self, scale: float) -> None:
        """Make the update ``scale`` times the trained one."""
        with torch.no_grad():
            for name, param in self.matrices.items():
                param.copy_(self.trained[name] * scale)


def _row(scale: float, correct: list[int], full: list[int]) -> dict[str, float]:
    """One measured scale: exact match with its standard error, and its paired difference from the full's."""
    em, full_em = sum(correct) / len(correct), sum(full) / len(full)
    return {"scale": scale, "n": len(correct), "task_em": em, "task_em_se": binomial_stderr(em, len(correct)),
            "em_vs_full": em - full_em, "em_vs_full_se": paired_stderr(full, correct)}  # fmt: skip


def _add_drift(rows: dict[float, dict[str, float]], scales: set[float], peft_model: Any, tokenizer: Any,
               cfg: EvalConfig, lora_scale: LoraScale, progress: bool) -> None:  # fmt: skip
    """Measure the drift on held-out text at each of ``scales`` into its row."""
    passages_by_set = text_sets(cfg)
    for s in sorted(scales):
        lora_scale.set(s)
        for name, passages in passages_by_set.items():
            rows[s][f"drift/{name}"] = text_metrics(
                peft_model, tokenizer, passages, cfg.max_text_tokens, cfg.batch_size,
                lambda: adapter_disabled(peft_model), progress, desc=f"scale {s:g}/{name}",
            ).drift  # fmt: skip


def choose_scale(peft_model: Any, tokenizer: Any, eval_cfg: EvalConfig, scales: tuple[float, ...] = AUTO_SCALES,
                 full_drift: dict[str, float] | None = None,
                 progress: bool = False) -> tuple[float, list[dict[str, float]]]:  # fmt: skip
    """Choose the LoRA scale: going down from the full adapter, the smallest scale before the first whose task
    exact match falls below the full adapter's by more than one paired standard error. Returns the chosen scale
    and one row per measured scale; leaves the adapter at that scale.

    Exact match here is teacher-forced greedy: the reference response, up to its end-of-turn token, is the
    model's most likely next token at every position, i.e. greedy decoding would write it token for token (one
    forward pass per item instead of a generation). Scales are measured from the largest down and the search
    stops at the first that fails: the usual outcome, a task that needs the full adapter, costs two passes.
    Each row: ``scale``, ``n`` items, exact match and its standard error, the difference from the full adapter with its
    paired standard error (same items); the rows of the chosen and the full adapter also carry the drift
    (token KL base || adapted) on held-out text. ``full_drift``: the full adapter's drift from the run's own
    evaluation, used instead of measuring it when the full adapter is kept. Needs the run's held-out task
    (``eval_cfg.task`` resolved)."""
    if not eval_cfg.task:
        raise ArrtuneError(
            "--scale auto: the run has no held-out task to measure (set task_eval in its config)"
        )
    cfg = replace(eval_cfg, n_text=AUTO_TEXT_PASSAGES)
    examples, _ = load_task(cfg, tokenizer)
    if not examples:
        raise ArrtuneError("--scale auto: no held-out task examples to measure (n_task must be > 0)")
    stop = set(eos_token_ids(peft_model, tokenizer))
    # each reference answer up to and including its first end-of-turn token: where greedy decoding stops
    answers = [e.response_ids[: next((k + 1 for k, t in enumerate(e.response_ids) if t in stop),
                                     len(e.response_ids))] for e in examples]  # fmt: skip
    sequences = [e.prompt_ids + a for e, a in zip(examples, answers)]
    starts = [len(e.prompt_ids) for e in examples]
    lora_scale = LoraScale(peft_model)

    def exact_match(scale: float) -> list[int]:
        lora_scale.set(scale)
        stats = score_sequences(peft_model, tokenizer, sequences, starts, cfg.batch_size, kl=False,
                                progress=progress, desc=f"scale {scale:g}/task")  # fmt: skip
        return [int(m == 0) for m in stats.argmax_misses or []]

    full_scale = max(scales)
    full = exact_match(full_scale)
    rows = {full_scale: _row(full_scale, full, full)}
    chosen = full_scale
    for s in sorted((x for x in scales if x != full_scale), reverse=True):
        rows[s] = _row(s, exact_match(s), full)
        se = 0.0 if math.isnan(rows[s]["em_vs_full_se"]) else rows[s]["em_vs_full_se"]
        if rows[s]["em_vs_full"] < -se:
            break
        chosen = s
    if chosen == full_scale and full_drift:
        rows[full_scale].update(full_drift)
    else:
        _add_drift(rows, {chosen, full_scale}, peft_model, tokenizer, cfg, lora_scale, progress)
    lora_scale.set(chosen)
    return chosen, [rows[s] for s in sorted(rows)]
