"""``arrtune export``: a trained run as a model to serve (merged) or an adapter to share, with a model card.

* **Merged** (default): PEFT's ``merge_and_unload`` folds the LoRA update into the base weights; the result
  (safetensors, tokenizer with its chat template, generation config) loads with
  ``AutoModelForCausalLM.from_pretrained(DIR)``, without arrtune or PEFT. ``dtype`` picks the saved precision.
* **Adapter only** (``adapter_only=True``): the PEFT adapter, naming the upstream Hub id of a built-in base.
* **Scale** ``s`` in [0, 1] multiplies the LoRA update by ``s`` (its ``B`` matrices; exact, since the update
  is ``B A``): interpolating between the base (0) and the fine-tune (1), as WiSE-FT does for full weights.
* **Model card** (``README.md`` with YAML front matter): the run's settings and, when the run has an
  ``eval.json``, its before/after table (retention, plasticity, drift, leak, bleed, with standard errors) and
  two answers to general questions before and after.

Everything is written into a staging directory next to ``out`` and renamed into place at the end, so an
interrupted export leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from arrtune.errors import ArrtuneError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def scale_lora(peft_model: Any, scale: float) -> int:
    """Multiply every LoRA ``B`` matrix of ``peft_model`` by ``scale`` (the update ``B A`` by ``scale``);
    returns the number of matrices scaled."""
    if not 0 <= scale <= 1:
        raise ArrtuneError(f"--scale {scale}: must be in [0, 1]")
    n = 0
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                param.mul_(scale)
                n += 1
    return n


def read_run(run_dir: str | os.PathLike) -> tuple[Path, dict[str, Any], dict[str, Any] | None]:
    """The run's directory, its ``config.yaml`` and its ``eval.json`` (None when not evaluated)."""
    run = Path(run_dir)
    if not (run / "adapter" / "adapter_config.json").is_file() or not (run / "config.yaml").is_file():
        raise ArrtuneError(f"{run}: not a finished arrtune run (needs config.yaml and adapter/)")
    config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    evaluation = json.loads((run / "eval.json").read_text()) if (run / "eval.json").is_file() else None
    return run, config, evaluation


def model_card(config: dict[str, Any], evaluation: dict[str, Any] | None, scale: float, merged: bool,
               base_id: str) -> str:  # fmt: skip
    """The Hugging Face model card (README.md) of an export: front matter, settings, forgetting table."""
    from arrtune.evaluation import format_table

    data = config.get("data", "")
    front = {
        "base_model": base_id,
        "library_name": "transformers" if merged else "peft",
        "tags": ["arrtune", "lora", "approximate-regularized-replay", config.get("method", "arr")],
    }
    if isinstance(data, str) and data.count("/") == 1 and not Path(data).exists():
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
        lines.append("Not evaluated: run `arrtune eval --adapter RUN/adapter`, then export again.")
    else:
        if scale != 1:
            lines.append(f"Measured on the adapter as trained (scale 1), not on this scale ({scale:g}).\n")
        lines.append(format_table(evaluation).split("\n\nitems/s:")[0])
        examples = [e for e in evaluation.get("examples", [])][:2]
        if examples:
            lines += ["", "Answers to general questions, before and after:", ""]
            for e in examples:
                lines += [f"- *{e['question']}*", f"  - base: {e['base']}", f"  - adapted: {e['adapted']}"]
    return "\n".join(lines) + "\n"


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, adapter_only: bool = False,
               dtype: str = "auto", scale: float = 1.0) -> Path:  # fmt: skip
    """Write the run's merged model (or adapter) with a model card into ``out``; returns ``out``."""
    from peft import PeftModel

    from arrtune.models import load_model, load_tokenizer, name_base_model, shareable_base_id

    run, config, evaluation = read_run(run_dir)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ArrtuneError(f"{out}: exists and is not empty; choose another --out")
    if dtype != "auto" and dtype not in DTYPES:
        raise ArrtuneError(f"--dtype {dtype}: expected auto, {', '.join(DTYPES)}")
    if not 0 <= scale <= 1:
        raise ArrtuneError(f"--scale {scale}: must be in [0, 1]")
    spec = config["model"]
    base_id = shareable_base_id(spec) or spec
    tokenizer = load_tokenizer(spec, bool(config.get("trust_remote_code")))
    base = load_model(spec, bool(config.get("trust_remote_code")))
    model = PeftModel.from_pretrained(base, run / "adapter")
    scale_lora(model, scale)
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
        (staging / "README.md").write_text(model_card(config, evaluation, scale, not adapter_only, base_id))
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
