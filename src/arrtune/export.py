"""``arrtune export``: a trained run as a model to serve (merged) or an adapter to share, with a model card.

* **Merged** (default): PEFT's ``merge_and_unload`` folds the LoRA update into the base weights; the result
  (safetensors, tokenizer with its chat template, generation config) loads with
  ``AutoModelForCausalLM.from_pretrained(DIR)``, without arrtune or PEFT. ``dtype`` picks the saved precision.
* **Adapter only** (``adapter_only=True``): the PEFT adapter, naming the upstream Hub id of a built-in base.
* **Scale** ``s`` in [0, 1] multiplies the LoRA update by ``s`` (its ``B`` matrices; exact, since the update
  is ``B A``): interpolating between the base (0) and the fine-tune (1), as WiSE-FT does for full weights.
  ``scale="auto"`` (:func:`arrtune.evaluation.scale.choose_scale`) keeps the smallest s in {0.25, 0.5, 0.75, 1}
  whose held-out task exact match (teacher-forced greedy, one forward pass per item) is within one paired
  standard error of s = 1's: the least movement that keeps what the fine-tune learned; it reports the drift on held-out text at that s.
* **Model card** (``README.md`` with YAML front matter): the run's settings, its before/after table from
  ``eval.json`` (retention, plasticity, drift, leak, bleed, with standard errors; a run without one is
  evaluated first, with the default eval settings, unless ``evaluate=False``), two answers to general
  questions before and after, and the scale table when the scale was chosen.

Everything is written into a staging directory next to ``out`` and renamed into place at the end, so an
interrupted export leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from arrtune.errors import ArrtuneError
from arrtune.lm import is_hub_id

if TYPE_CHECKING:
    from arrtune.evaluation import EvalConfig

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
#: the run's own drift measures that --scale auto reuses for the full adapter
DRIFT_KEYS = ("drift/wiki", "drift/books")


def scale_lora(peft_model: Any, scale: float) -> int:
    """Multiply every LoRA ``B`` matrix of ``peft_model`` by ``scale`` (the update ``B A`` by ``scale``);
    returns the number of matrices scaled."""
    from arrtune.evaluation.scale import LoraScale

    if not 0 <= scale <= 1:
        raise ArrtuneError(f"--scale {scale}: must be in [0, 1]")
    lora_scale = LoraScale(peft_model)
    lora_scale.set(scale)
    return len(lora_scale.matrices)


def format_scale_table(rows: list[dict[str, float]], chosen: float) -> str:
    """The ``scale="auto"`` measurements as a markdown table, the chosen row marked."""
    drift_keys = sorted({k for r in rows for k in r if k.startswith("drift/")})
    head = ["scale", "task EM", "EM − EM(s=1)", *drift_keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        mark = " (chosen)" if r["scale"] == chosen else ""
        cells = [f"{r['scale']:g}{mark}", f"{r['task_em']:.2f} ± {r['task_em_se']:.2f}",
                 f"{r['em_vs_full']:+.2f} ± {r['em_vs_full_se']:.2f}", *[f"{r[k]:.4f}" if k in r else "–" for k in drift_keys]]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_run(run_dir: str | os.PathLike) -> tuple[Path, dict[str, Any], dict[str, Any] | None]:
    """The run's directory, its ``config.yaml`` and its ``eval.json`` (None when not evaluated)."""
    run = Path(run_dir)
    if not (run / "adapter" / "adapter_config.json").is_file() or not (run / "config.yaml").is_file():
        raise ArrtuneError(f"{run}: not a finished arrtune run (needs config.yaml and adapter/)")
    config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    evaluation = json.loads((run / "eval.json").read_text()) if (run / "eval.json").is_file() else None
    return run, config, evaluation


def model_card(config: dict[str, Any], evaluation: dict[str, Any] | None, scale: float, merged: bool,
               base_id: str, scale_table: str | None = None) -> str:  # fmt: skip
    """The Hugging Face model card (README.md) of an export: front matter, settings, forgetting table."""
    from arrtune.evaluation import behaviour_note, format_table

    data = config.get("data", "")
    front = {
        "base_model": base_id,
        "library_name": "transformers" if merged else "peft",
        "tags": ["arrtune", "lora", "approximate-regularized-replay", config.get("method", "arr")],
    }
    if isinstance(data, str) and is_hub_id(data):
        front["datasets"] = [data]
    settings = {k: config.get(k) for k in ("method", "kl_coef", "replay_ratio", "replay", "replay_mix", "kl_on",
                                           "lora_r", "lora_alpha", "learning_rate", "max_steps",
                                           "per_device_train_batch_size", "seed", "data")}  # fmt: skip
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# {'Merged model' if merged else 'LoRA adapter'} fine-tuned from {base_id} with arrtune", "",
        f"LoRA fine-tune with approximate regularized replay (arrtune). LoRA update scaled by **{scale:g}** "
        "(1 = as trained, 0 = the base model).", "",
        "## Settings", "", "| setting | value |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in settings.items() if v is not None], "",
        "## What the fine-tune cost and gained (base vs. adapted)", "",
    ]  # fmt: skip
    if evaluation is None:
        lines.append("Not evaluated (exported with --no-eval): run `arrtune eval --adapter RUN/adapter`, then "
                     "export again.")  # fmt: skip
    else:
        if scale != 1:
            lines.append(f"Measured on the adapter as trained (scale 1), not on this scale ({scale:g}).\n")
        lines.append(format_table(evaluation).split("\n\nitems/s:")[0])
        note = behaviour_note(evaluation, config)
        if note:
            lines += ["", f"**{note}**"]
        examples = [e for e in evaluation.get("examples", [])][:2]
        if examples:
            lines += ["", "Answers to general questions, before and after:", ""]
            for e in examples:
                lines += [f"- *{e['question']}*", f"  - base: {e['base']}", f"  - adapted: {e['adapted']}"]
    if scale_table:
        lines += ["", "## Adapter scale", "",
                  "The LoRA update was measured at several scales (exact match of greedy answers on the held-out "
                  "task, smallest scale first); the smallest scale whose exact match is within one paired standard "
                  "error of the full adapter's was kept. Drift (KL base ‖ adapted on held-out text) at the kept "
                  "and the full scale.", "", scale_table]  # fmt: skip
    return "\n".join(lines) + "\n"


def _eval_config(run: Path, config: dict[str, Any], evaluation: dict[str, Any] | None,
                 eval_settings: dict[str, Any] | None) -> EvalConfig:  # fmt: skip
    """The EvalConfig of an export's evaluation and ``--scale auto``: ``eval_settings``, else the run's own
    evaluation settings; resolved from the run's config, on the full-precision base (what is exported)."""
    from arrtune.evaluation import EvalConfig, resolve_from_run

    if not eval_settings and evaluation is not None and isinstance(evaluation.get("config"), dict):
        # no settings given: the run's own evaluation settings
        eval_cfg = EvalConfig.from_dict(evaluation["config"], f"{run / 'eval.json'}: config")
    else:
        eval_cfg = EvalConfig.from_dict(eval_settings or {}, "eval setting")
    # the model exported (and evaluated here) is the adapter merged into the full-precision base
    return resolve_from_run(replace(eval_cfg, load_in_4bit=False), config)


def _set_scale(model: Any, tokenizer: Any, scale: float | str, eval_cfg: EvalConfig,
               evaluation: dict[str, Any] | None, progress: bool) -> tuple[float, str | None]:  # fmt: skip
    """Scale the LoRA update of ``model`` by ``scale``, or for ``"auto"`` by the one that
    :func:`arrtune.evaluation.scale.choose_scale` chooses (printed with its table). Returns the scale and that
    table (None when the scale was given)."""
    from arrtune.evaluation.scale import choose_scale

    if scale != "auto":
        scale_lora(model, float(scale))
        return float(scale), None
    started = time.perf_counter()
    drift = {k: v for k, v in ((evaluation or {}).get("adapted") or {}).items() if k in DRIFT_KEYS}
    scale, rows = choose_scale(model, tokenizer, eval_cfg, full_drift=drift, progress=progress)
    scale_table = format_scale_table(rows, scale)
    print(scale_table)
    print(
        f"[export] scale {scale:g} chosen ({len(rows)} scales measured on {rows[0]['n']} held-out task items"
        f" in {time.perf_counter() - started:.1f} s)"
    )
    return scale, scale_table


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, adapter_only: bool = False,
               dtype: str = "auto", scale: float | str = 1.0, evaluate: bool = True,
               eval_settings: dict[str, Any] | None = None, progress: bool = True) -> Path:  # fmt: skip
    """Write the run's merged model (or adapter) with a model card into ``out``; returns ``out``. ``scale`` is
    a number in [0, 1] or ``"auto"``; ``evaluate``: evaluate a run that has no ``eval.json`` (and write it);
    ``eval_settings``: :class:`arrtune.evaluation.EvalConfig` fields for that evaluation and for ``auto``."""
    from peft import PeftModel

    from arrtune.evaluation import evaluate_run
    from arrtune.models import load_model, load_tokenizer, name_base_model, shareable_base_id

    run, config, evaluation = read_run(run_dir)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ArrtuneError(f"{out}: exists and is not empty; choose another --out")
    if dtype != "auto" and dtype not in DTYPES:
        raise ArrtuneError(f"--dtype {dtype}: expected auto, {', '.join(DTYPES)}")
    if scale != "auto" and not (isinstance(scale, (int, float)) and 0 <= scale <= 1):
        raise ArrtuneError(f"--scale {scale}: must be in [0, 1] or auto")
    eval_cfg = _eval_config(run, config, evaluation, eval_settings)
    if scale == "auto" and not eval_cfg.task:
        raise ArrtuneError(
            f"--scale auto: {run} has no held-out task to measure (set task_eval in its config)"
        )
    spec = config["model"]
    base_id = shareable_base_id(spec) or spec
    tokenizer = load_tokenizer(spec, bool(config.get("trust_remote_code")))
    base = load_model(spec, bool(config.get("trust_remote_code")))
    model = PeftModel.from_pretrained(base, run / "adapter")
    if evaluation is None and evaluate:
        print(f"[export] {run}: no eval.json; evaluating it first (--no-eval skips this)")
        evaluate_run(model, eval_cfg, output=run / "eval.json", tokenizer=tokenizer, progress=progress)
        evaluation = json.loads((run / "eval.json").read_text())
    scale, scale_table = _set_scale(model, tokenizer, scale, eval_cfg, evaluation, progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(staging, 0o755)
    try:
        if adapter_only:
            name_base_model(model, base_id)
            model.save_pretrained(staging, safe_serialization=True)
        else:
            merged = model.merge_and_unload()
            saved_dtype = DTYPES[dtype] if dtype != "auto" else _config_dtype(merged)
            merged.to(saved_dtype)
            merged.config.name_or_path = base_id
            merged.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "README.md").write_text(
            model_card(config, evaluation, scale, not adapter_only, base_id, scale_table)
        )
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out


def _config_dtype(model: Any) -> torch.dtype:
    """The precision the base model's config declares (its own ``torch_dtype``/``dtype``), else float32."""
    declared = getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None)
    if isinstance(declared, str):
        declared = DTYPES.get(declared)
    return declared if isinstance(declared, torch.dtype) else torch.float32
